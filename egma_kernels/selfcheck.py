"""The self-check: every fused backend on this device against the float64 reference, forward and backward.

Two users: ``egma-bench --selfcheck`` runs the full check (``FULL_CASES`` in float32, bfloat16 and float16
where the backend runs them, plus a short timing) and writes a JSON report a user can attach to a bug
report; ``backends.resolve_backend`` runs the small first-use check (``FIRST_USE_CASES``) the first time
``backend=None`` would choose a fused backend on a device, and caches the verdict on disk (``Verdicts``).

Each case runs the backend *by name* (never ``backend=None``, which would start a check inside the check),
with every output buffer poisoned (NaN), and compares the four loss terms, I2T, T2I and the gradients of
``patch_emb``, ``sent_emb`` and ``logit_scale`` with the float64 reference under ``tolerances``.

Environment: ``EGMA_KERNELS_FIRST_USE_CHECK=0`` turns the first-use check off; ``EGMA_KERNELS_CACHE`` is the
cache folder (default ``~/.cache/egma_kernels``; verdicts under ``selfcheck/``); ``EGMA_KERNELS_TEST_PERTURB``
(tests only) makes one backend's output wrong in this module's call path, e.g. ``cpu:grad_patch``
(see ``docs/selfcheck.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from . import _utils, tolerances

ENV_FIRST_USE = "EGMA_KERNELS_FIRST_USE_CHECK"
ENV_CACHE = "EGMA_KERNELS_CACHE"
ENV_PERTURB = "EGMA_KERNELS_TEST_PERTURB"
TERMS = ("loss", "contrastive", "gaze_mlce", "mapping", "i2t", "t2i")
GRADS = ("grad_patch", "grad_sent", "grad_scale")
QUANTITIES = TERMS + GRADS
# Inputs whose best-match similarities lie closer than this are redrawn: rounding (16-bit inputs) or a
# float32 sum can then pick the other match, which moves a gradient by far more than any tolerance.
MIN_ARGMAX_GAP = 1e-5


def first_use_check_enabled() -> bool:
    """Whether ``backend=None`` checks a fused backend before it first trusts it (``EGMA_KERNELS_FIRST_USE_CHECK``)."""
    return os.environ.get(ENV_FIRST_USE, "1").strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class CheckCase:
    """One problem: report lengths, patches P, width D, gaze ("none", "all", "mixed"), loss options, and for
    the triton backend the launch-configuration entries it forces (``triton_backend.CONFIG_OVERRIDES``)."""

    name: str
    lengths: Tuple[int, ...]
    P: int
    D: int
    gaze: str = "all"
    egma_compat: bool = False
    seed: int = 0
    options: Tuple[Tuple[str, object], ...] = ()
    triton_config: Tuple[Tuple[str, object], ...] = ()
    # "float64": against the float64 reference within tolerances.rtol; "same_dtype": large problems, within
    # tolerances.same_dtype_bound of the reference's own error in the backend's dtype.
    rule: str = "float64"
    gpu_only: bool = False

    def __str__(self):
        return (f"{self.name} (B={len(self.lengths)} N={sum(self.lengths)} longest={max(self.lengths)} "
                f"P={self.P} D={self.D} gaze={self.gaze}{' egma_compat' if self.egma_compat else ''})")


def _random_lengths(seed: int, reports: int, longest: int) -> Tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(1, longest + 1, (reports,), generator=g).tolist())


_ONE_DOT = (("fwd_SIM_ONE_DOT", True), ("SIM_ONE_DOT", True), ("sent_SIM_ONE_DOT", True))
_LOOPED = (("fwd_SIM_ONE_DOT", False), ("SIM_ONE_DOT", False), ("sent_SIM_ONE_DOT", False))

FULL_CASES = (
    CheckCase("one-sentence reports", (1, 1, 1, 1), P=5, D=32, seed=2),
    CheckCase("mixed gaze, egma_compat", (3, 1, 4, 2, 5), P=7, D=16, gaze="mixed", egma_compat=True, seed=1),
    CheckCase("no gaze", (2, 6, 3, 1, 2, 2, 7), P=9, D=32, gaze="none", seed=3),
    CheckCase("options", (5, 2), P=33, D=48, gaze="mixed", seed=5,
              options=(("alpha", 0.3), ("map_threshold", 0.5), ("weights", (0.5, 2.0, 1.5)))),
    CheckCase("long report (17)", (17, 3, 1), P=3, D=16, egma_compat=True, seed=6),
    CheckCase("long report (70)", (70, 2, 1), P=5, D=100, gaze="mixed", egma_compat=True, seed=16),
    CheckCase("routes saved", (3, 1, 4, 2, 5), P=7, D=16, gaze="mixed", seed=7, triton_config=(("save_route", True),)),
    CheckCase("routes recomputed", (3, 1, 4, 2, 5), P=7, D=16, gaze="mixed", seed=7,
              triton_config=(("save_route", False),)),
    CheckCase("tiles: 4 reports forward, 2 backward, one dot", (4, 4, 1, 2), P=17, D=24, gaze="mixed",
              egma_compat=True, seed=11,
              triton_config=(("fwd_group", 4), ("bwd_group", 2), ("sent_group", 4), *_ONE_DOT)),
    CheckCase("tiles: 2 reports forward, 4 backward, looped D", (4, 4, 1, 2), P=17, D=24, gaze="mixed", seed=11,
              triton_config=(("fwd_group", 2), ("bwd_group", 4), ("sent_group", 2), *_LOOPED)),
    CheckCase("patch grid 70, D=300", (2, 1, 3), P=70, D=300, seed=10),
    CheckCase("patch grid 196 (ViT 14x14)", _random_lengths(20, 16, 10), P=196, D=512, gaze="mixed", seed=20,
              rule="same_dtype", gpu_only=True),
    CheckCase("patch grid 196, recomputed", _random_lengths(21, 64, 10), P=196, D=512, gaze="mixed", egma_compat=True,
              seed=21, rule="same_dtype", gpu_only=True, triton_config=(("save_route", False),)),
    CheckCase("patch grid 784 (28x28)", _random_lengths(22, 8, 10), P=784, D=256, gaze="mixed", seed=22,
              rule="same_dtype", gpu_only=True),
)
# The first-use check: the paths every training run takes (gaze on some reports, egma_compat on and off, a
# long report, routes saved and recomputed), at small shapes sharing most tile sizes: on a GPU its cost is
# compiling those few kernel variants (Triton's disk cache keeps them for later processes).
FIRST_USE_CASES = tuple(c for c in FULL_CASES if c.name in (
    "mixed gaze, egma_compat", "long report (17)", "routes recomputed"))


def check_dtypes(backend: str, device: torch.device) -> Tuple[List[torch.dtype], Optional[str]]:
    """The dtypes the self-check runs ``backend`` in on ``device``, and why any is left out (None)."""
    if backend == "triton" and device.type == "cpu":
        return [torch.float32, torch.float16], ("bfloat16 skipped: Triton's interpreter computes bfloat16 wrongly "
                                                "(docs/selfcheck.md); it is checked on a GPU")
    return [torch.float32, torch.bfloat16, torch.float16], None


# ---------------------------------------------------------------------------------------------------------
# Inputs


def _normalised(shape, g):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _draw(case: CheckCase, seed: int) -> dict:
    """Unit-norm embeddings, sparse non-negative gaze (a random subset of reports with "mixed"), scale 10."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(case.lengths), sum(case.lengths)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(case.lengths), 0)
    x = dict(patch_emb=_normalised((B, case.P, case.D), g), sent_emb=_normalised((N, case.D), g), cu_seqlens=cu,
             logit_scale=torch.tensor(10.0, dtype=torch.float64), gaze=None, gaze_mask=None)
    if case.gaze != "none":
        heat = torch.rand(N, case.P, generator=g, dtype=torch.float64)
        x["gaze"] = heat * (torch.rand(N, case.P, generator=g) < 0.4)
        if case.gaze == "mixed":
            mask = torch.rand(B, generator=g) < 0.5
            mask[0] = True
            mask[-1] = B == 1
            x["gaze_mask"] = mask
    return x


def _rounded(x: dict, dtype: torch.dtype) -> dict:
    """The inputs rounded to ``dtype`` and back: the reference then sees what the backend sees."""
    out = dict(x)
    for key in ("patch_emb", "sent_emb", "gaze"):
        if out[key] is not None:
            out[key] = out[key].to(dtype).to(torch.float64)
    return out


def argmax_gap(x: dict, egma_compat: bool) -> float:
    """The smallest margin between a best match and the runner-up, over each patch's best sentence of each
    report (a zero-padded sentence counts with egma_compat) and each sentence's best patch of each image."""
    sim = torch.einsum("bpd,nd->bpn", x["patch_emb"], x["sent_emb"])  # (B, P, N)
    gaps = []
    if sim.shape[1] > 1:
        top = sim.topk(2, dim=1).values
        gaps.append((top[:, 0] - top[:, 1]).min().item())
    cu = x["cu_seqlens"].tolist()
    longest = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    for a, b in zip(cu[:-1], cu[1:]):
        seg = sim[:, :, a:b]
        if egma_compat and b - a < longest:
            seg = torch.cat([seg, seg.new_zeros(seg.shape[:-1] + (1,))], dim=-1)
        if seg.shape[-1] > 1:
            top = seg.topk(2, dim=-1).values
            gaps.append((top[..., 0] - top[..., 1]).min().item())
    return min(gaps, default=float("inf"))


def case_inputs(case: CheckCase, dtype: torch.dtype) -> dict:
    """Float64 inputs of ``case`` already rounded to ``dtype``; small cases are redrawn (seeds in a fixed
    order) until no best match has a runner-up within ``MIN_ARGMAX_GAP``. Large ones ("same_dtype") are not:
    their rule compares with the reference's own rounding instead."""
    for attempt in range(64):
        x = _rounded(_draw(case, case.seed + 7919 * attempt), dtype)
        if case.rule != "float64" or argmax_gap(x, case.egma_compat) >= MIN_ARGMAX_GAP:
            return x
    return x


# ---------------------------------------------------------------------------------------------------------
# Running a case


def _perturbation(backend: str) -> Optional[str]:
    """The quantity ``EGMA_KERNELS_TEST_PERTURB`` ("backend:quantity[,...]") makes wrong for ``backend``."""
    for item in os.environ.get(ENV_PERTURB, "").split(","):
        name, _, what = item.strip().partition(":")
        if name == backend and what:
            if what not in QUANTITIES:
                raise ValueError(f"{ENV_PERTURB}: unknown quantity {what!r} in {item!r}; "
                                 f"one of {', '.join(QUANTITIES)}")
            return what
    return None


@contextlib.contextmanager
def _triton_config(backend: str, entries):
    """The triton backend's launch configuration with ``entries`` forced, for this block only."""
    if backend != "triton" or not entries:
        yield
        return
    from . import triton_backend as tb

    saved = tb.CONFIG_OVERRIDES
    tb.CONFIG_OVERRIDES = {**saved, **dict(entries)}
    try:
        yield
    finally:
        tb.CONFIG_OVERRIDES = saved


def _run(x: dict, backend: str, dtype: torch.dtype, device: torch.device, case: CheckCase) -> Dict[str, torch.Tensor]:
    """Loss terms and gradients of ``backend`` (by name) on ``x`` cast to ``dtype`` on ``device``."""
    import egma_kernels as ek
    from .backends import self_check_running

    leaves = {
        "grad_patch": x["patch_emb"].detach().to(device, dtype).requires_grad_(True),
        "grad_sent": x["sent_emb"].detach().to(device, dtype).requires_grad_(True),
        "grad_scale": x["logit_scale"].detach().to(device, torch.float64 if dtype == torch.float64 else torch.float32)
        .requires_grad_(True),
    }
    gaze = x["gaze"].to(device, dtype) if x["gaze"] is not None else None
    mask = x["gaze_mask"].to(device) if x["gaze_mask"] is not None else None
    with _triton_config(backend, case.triton_config), self_check_running():
        terms = ek.fine_grained_loss(leaves["grad_patch"], leaves["grad_sent"], x["cu_seqlens"].to(device),
                                     leaves["grad_scale"], gaze, mask, egma_compat=case.egma_compat,
                                     backend=backend, return_details=True, **dict(case.options))
        terms.loss.backward()
    out = {name: getattr(terms, name).detach() for name in TERMS}
    out.update({name: leaf.grad for name, leaf in leaves.items()})
    return out


def _perturbed(out: Dict[str, torch.Tensor], what: Optional[str]) -> Dict[str, torch.Tensor]:
    if what is not None and out.get(what) is not None:
        t = out[what]
        out = dict(out, **{what: t + 0.25 * (1.0 + t.detach().abs().max())})  # 5x the loosest tolerance
    return out


def beyond_limits(backend: str, case: CheckCase, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why ``backend`` refuses ``case`` on this device by design (None: it runs it). The triton backend's
    report kernels need 160 KiB of shared memory per block for reports over 64 sentences: cards with less
    (sm_86/sm_89) refuse them with a clear error, which is no fault of the kernels."""
    if backend != "triton" or device.type != "cuda":
        return None
    from . import triton_backend as tb

    cfg = tb._config(dtype, case.P, case.D, max(case.lengths), len(case.lengths), tb._shared_memory(device))
    if not cfg["report_fits"]:
        return f"reports of {max(case.lengths)} sentences need more shared memory than this GPU has (refused by design)"
    return None


def run_case(backend: str, case: CheckCase, dtype: torch.dtype, device: torch.device) -> dict:
    """One case of ``backend`` against the reference: ``{"case", "dtype", "ok", "errors": {quantity:
    [error, bound]}}``, with ``"error"`` (the exception's text) when the backend raised, or ``"skipped"`` (why)
    when the backend refuses the case on this device by design."""
    record = {"case": str(case), "dtype": str(dtype).replace("torch.", ""), "rule": case.rule}
    skipped = beyond_limits(backend, case, dtype, device)
    if skipped:
        record.update(ok=True, skipped=skipped)
        return record
    start = time.perf_counter()
    try:
        x = case_inputs(case, dtype)
        want = _run(x, "reference", torch.float64, torch.device("cpu"), case)
        same = _run(x, "reference", dtype, device, case) if case.rule == "same_dtype" else None
        with _utils.poisoned_outputs(True):
            got = _perturbed(_run(x, backend, dtype, device, case), _perturbation(backend))
    except Exception as exc:  # a kernel that fails to compile or launch fails the check
        first_line = (str(exc).strip().splitlines() or [""])[0]
        record.update(ok=False, error=f"{type(exc).__name__}: {first_line}")
        return record
    errors = {}
    for name in QUANTITIES:
        if got[name] is None or tuple(got[name].shape) != tuple(want[name].shape):
            errors[name] = [float("inf"), 0.0]
            continue
        err = tolerances.max_error(got[name], want[name])
        if same is not None:
            bound = tolerances.same_dtype_bound(tolerances.max_error(same[name], want[name]), dtype)
        else:
            bound = tolerances.bound(want[name], dtype)
        errors[name] = [err, bound]
    record.update(ok=all(e <= b for e, b in errors.values()), errors=errors,
                  seconds=round(time.perf_counter() - start, 3))
    return record


def worst(record: dict) -> str:
    """The worst quantity of a failed case, in words."""
    if "error" in record:
        return f"{record['case']} {record['dtype']}: raised {record['error']}"
    name, (err, bound) = max(record["errors"].items(), key=lambda kv: kv[1][0] / kv[1][1] if kv[1][1] else float("inf"))
    return f"{record['case']} {record['dtype']}: {name} error {err:.3e} > bound {bound:.3e}"


@contextlib.contextmanager
def _neutral_settings():
    """The check's own settings whatever the caller's (the first-use check runs inside the user's first loss
    call, which may be under no_grad, inference_mode or autocast, with TF32 allowed): autograd on, no
    autocast, float32 matmuls in full precision (the tolerances' setting), the launch configuration and
    output poisoning restored afterwards."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False), \
                torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def run_cases(backend: str, device: torch.device, cases: Iterable[CheckCase], dtypes=None, on_record=None) -> dict:
    """Every case in every dtype of ``check_dtypes`` (or ``dtypes``): ``{"backend", "device", "passed",
    "cases": [...], "notes": [...], "seconds"}``; ``on_record(records)`` after each case."""
    device = torch.device(device)
    chosen, note = check_dtypes(backend, device)
    dtypes = chosen if dtypes is None else [d for d in dtypes if d in chosen]
    start = time.perf_counter()
    records = []
    with _neutral_settings():
        for case in cases:
            if case.gpu_only and device.type != "cuda":
                continue
            for dtype in dtypes:
                records.append(run_case(backend, case, dtype, device))
                if on_record is not None:
                    on_record(records)
    result = {"backend": backend, "device": device.type, "passed": all(r["ok"] for r in records) and bool(records),
              "cases": records, "notes": [note] if note else [], "seconds": round(time.perf_counter() - start, 3)}
    if not records:
        result["notes"].append("no case ran")
    return result


# ---------------------------------------------------------------------------------------------------------
# What the verdict is keyed by, and where it is kept


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# The files each backend's numbers depend on, as installed (the compiled extension by its binary).
_SOURCES = {
    "triton": ("triton_kernels.py", "triton_backend.py", "fused_op.py", "_utils.py", "_validation.py", "packing.py"),
    "cpu": ("compiled.py", "fused_op.py", "_utils.py", "_validation.py", "_C*"),
    "cuda": ("compiled.py", "fused_op.py", "_utils.py", "_validation.py", "_C*"),
}


def kernel_source_hash(backend: str) -> str:
    """SHA-256 (first 16 hex digits) of the installed files ``backend`` runs: its Python launchers and kernels,
    and for the compiled backends the extension's binary."""
    import glob

    h = hashlib.sha256()
    for pattern in _SOURCES.get(backend, ()):
        for path in sorted(glob.glob(os.path.join(_PACKAGE, pattern))):
            if path.endswith((".so", ".pyd")) or not pattern.endswith("*"):
                stat = os.stat(path)
                h.update(os.path.basename(path).encode() + b"\0" + _file_digest(path, stat.st_size, stat.st_mtime_ns))
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """SHA-256 of a file, read once per (path, size, modification time): the extension is megabytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()



def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def device_identity(device: torch.device) -> dict:
    """What the verdict depends on besides the sources: the card (name, compute capability) or CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"device": "cuda", "name": torch.cuda.get_device_name(index), "arch": f"sm_{major}{minor}"}
    return {"device": device.type, "name": _utils.cpu_name(), "arch": platform.machine()}


def cache_key(backend: str, device: torch.device) -> dict:
    """The fields a cached verdict must match: backend, device identity, kernel source hash and versions."""
    from . import __version__

    return {"backend": backend, **device_identity(device), "kernel_source_hash": kernel_source_hash(backend),
            "egma_kernels": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": _triton_version() if backend == "triton" else None,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1" if backend == "triton" else None}


def cache_dir() -> str:
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "egma_kernels")
    return os.path.join(root, "selfcheck")


def _cache_path(key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir(), f"{key['backend']}-{digest}.json")


def _plain(value):
    """``value`` as strict JSON takes it: floats to 4 significant digits, a non-finite one as a string."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_json(payload: dict) -> str:
    """Indented JSON with each ``[error, bound]`` pair on one line (a report stays a few hundred lines)."""
    text = json.dumps(_plain(payload), indent=1, sort_keys=True)
    return re.sub(r"\[\s+([^\[\]{},\s]+),\s+([^\[\]{},\s]+)\s+\]", r"[\1, \2]", text) + "\n"


def write_json_atomically(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and a rename: a reader (another
    rank, another process) sees the old file or the whole new one, never half of it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(to_json(payload))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_verdict(backend: str, device: torch.device) -> Optional[dict]:
    """The cached verdict of ``backend`` on this device, sources and versions (None: never checked, or the
    file is unreadable; an unreadable file only means the check runs again)."""
    key = cache_key(backend, device)
    try:
        with open(_cache_path(key)) as f:
            verdict = json.load(f)
    except (OSError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) and verdict.get("key") == key else None


def save_verdict(result: dict, device: torch.device, kind: str) -> Optional[str]:
    """Cache ``result`` (``run_cases``' summary) as the verdict of its backend; returns the file. Not cached
    (None: the verdict lives for this process only) when the folder cannot be written, or when a case raised
    instead of computing: that may pass (memory taken by another process, a full disk for Triton's cache),
    so the next process checks again, where a wrong number would stay wrong."""
    if any("error" in r for r in result["cases"]):
        return None
    key = cache_key(result["backend"], device)
    failed = [worst(r) for r in result["cases"] if not r["ok"]]
    verdict = {"key": key, "passed": result["passed"], "kind": kind, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
               time.gmtime()), "seconds": result["seconds"], "cases": len(result["cases"]), "failed_cases": len(failed),
               "failures": failed[:5]}
    path = _cache_path(key)
    try:
        write_json_atomically(path, verdict)
    except OSError:
        return None
    return path


def first_use_check(backend: str, device: torch.device) -> dict:
    """The cached verdict of ``backend`` on ``device``, running the small check first when there is none."""
    verdict = load_verdict(backend, device)
    if verdict is not None:
        return verdict
    result = run_cases(backend, device, FIRST_USE_CASES, dtypes=[torch.float32, torch.bfloat16])
    path = save_verdict(result, device, "first-use")
    verdict = load_verdict(backend, device) if path else None
    if verdict is None:  # not cached: keep it for this process
        failed = [worst(r) for r in result["cases"] if not r["ok"]]
        verdict = {"passed": result["passed"], "kind": "first-use", "failed_cases": len(failed), "failures": failed[:5]}
    verdict["ran_now_s"] = result["seconds"]
    return verdict


# ---------------------------------------------------------------------------------------------------------
# The full check and its report


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """The machine in a report: device, driver, versions."""
    from . import __version__

    env = {**device_identity(device), "driver": _driver_version() if device.type == "cuda" else None,
           "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "triton": _triton_version(), "egma_kernels": __version__, "platform": platform.platform(),
           "torch_threads": torch.get_num_threads(), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
           "kernel_source_hash": {b: kernel_source_hash(b) for b in _SOURCES}}
    if device.type == "cuda":
        env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return env


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backend(backend: str, device: torch.device, repeats: int = 5) -> dict:
    """Forward+backward milliseconds (best of ``repeats``) of ``backend`` and of the reference at one size."""
    gpu = device.type == "cuda"
    case = CheckCase("timing", _random_lengths(30, 32 if gpu else 8, 8), P=196 if gpu else 49, D=512 if gpu else 64,
                     gaze="mixed", seed=30, rule="same_dtype")
    if backend == "triton" and device.type == "cpu":  # the interpreter: seconds per call, a smaller problem
        case = dataclasses.replace(case, lengths=(3, 1, 2), P=7, D=16)
    x = case_inputs(case, torch.float32)
    out = {"case": str(case), "dtype": "float32"}
    for name, field_name in ((backend, "backend_ms"), ("reference", "reference_ms")):
        times = []
        with _neutral_settings():
            for _ in range(repeats + 1):
                _sync(device)
                t0 = time.perf_counter()
                _run(x, name, torch.float32, device, case)
                _sync(device)
                times.append(time.perf_counter() - t0)
        out[field_name] = round(min(times[1:]) * 1e3, 3)  # the first run compiles / warms up
    return out


def backends_to_check(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """The fused backends available for ``device``'s tensors, and why each other known fused backend is not."""
    from .backends import available_backends, unavailable_backends

    names = [n for n in available_backends(device.type) if n != "reference"]
    missing = {n: why for n, why in unavailable_backends().items() if n != "reference"}
    return names, missing


def full_check(device: torch.device, backends: Optional[List[str]] = None, timing: bool = True,
               progress=None, on_update=None) -> dict:
    """The self-check of every fused backend on ``device`` (or ``backends``): the report as a dict.
    ``progress(text)`` hears of each case; ``on_update(report)`` receives the report so far after each case
    (``"complete": False``), so that a run cut short (a time limit) still leaves the cases it ran."""
    device = torch.device(device)
    names, missing = backends_to_check(device)
    if backends is not None:
        names = backends
    start = time.perf_counter()
    report = {"format": "egma-kernels-selfcheck/1", "environment": environment(device),
              "tolerances": {"rtol": {str(k).replace("torch.", ""): v for k, v in tolerances.RTOL.items()},
                             "same_dtype_factor": tolerances.SAME_DTYPE_FACTOR,
                             "same_dtype_floor": tolerances.SAME_DTYPE_FLOOR,
                             "same_dtype_floor_tf32": tolerances.SAME_DTYPE_FLOOR_TF32},
              "perturbed": os.environ.get(ENV_PERTURB) or None, "backends": {}, "unavailable": missing,
              "complete": False}
    for name in names:
        if progress:
            progress(f"checking {name} on {device.type} ...")

        def on_record(records, name=name):
            last = records[-1]
            if progress:
                state = "skipped" if "skipped" in last else "ok" if last["ok"] else "FAILED " + worst(last)
                progress(f"  {name} {last['case']} {last['dtype']}: {state}")
            if on_update is not None:
                report["backends"][name] = {"backend": name, "device": device.type, "verdict": "RUNNING",
                                            "cases": list(records)}
                on_update(report)

        result = run_cases(name, device, FULL_CASES, on_record=on_record)
        if timing and result["passed"]:
            try:
                result["timing"] = time_backend(name, device)
            except Exception as exc:
                result["timing"] = {"error": f"{type(exc).__name__}: {exc}"}
        result["verdict"] = "PASS" if result["passed"] else "FAIL"
        path = save_verdict(result, device, "full")
        result["cache_file"] = os.path.basename(path) if path else None  # the folder: selfcheck.cache_dir()
        report["backends"][name] = result
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["passed"] = all(r["passed"] for r in report["backends"].values())
    report["complete"] = True
    return report


def verdict_lines(report: dict) -> List[str]:
    """One line per backend (and its failures), for the terminal."""
    lines = []
    for name, r in report["backends"].items():
        failed = [c for c in r["cases"] if not c["ok"]]
        timing = r.get("timing") or {}
        speed = (f"; forward+backward {timing['backend_ms']:.2f} ms vs reference {timing['reference_ms']:.2f} ms"
                 if "backend_ms" in timing else "")
        skipped = [c for c in r["cases"] if "skipped" in c]
        ran = len(r["cases"]) - len(skipped)
        lines.append(f"{name} on {r['device']}: {'PASS' if r['passed'] else 'FAIL'} ({ran - len(failed)}/{ran} cases, "
                     f"{r['seconds']:.1f} s{speed})")
        lines += [f"  FAILED {worst(c)}" for c in failed]
        lines += [f"  skipped {c['case']} {c['dtype']}: {c['skipped']}" for c in skipped]
        lines += [f"  note: {n}" for n in r["notes"]]
    for name, why in report["unavailable"].items():
        lines.append(f"{name}: not checked, unavailable: {why}")
    return lines
