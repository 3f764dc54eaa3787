"""The sweep runner: one JSON-able record per (size, dtype, provider, mode), plus one floor record per (size, dtype)."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

import egma_kernels as ek

from .. import reference
from .._utils import cpu_name
from .problems import DTYPES, Problem, make_problem, similarity_elements
from .providers import LossOptions, Provider
from .sweeps import MODES, Size
from .timing import BudgetExceeded, measure_memory, measure_time

SCHEMA = "egma-bench/1"
TERMS = ("loss", "contrastive", "gaze_mlce", "mapping", "i2t", "t2i")
FLOOR = "floor (matmul)"


@dataclass
class RunConfig:
    sizes: List[Size]
    providers: List[Provider]
    modes: Sequence[str] = MODES
    dtypes: Sequence[str] = ("float32",)
    device: torch.device = torch.device("cpu")
    repeats: int = 10
    warmup: int = 2
    max_time_s: float = 2.0
    min_repeats: int = 3
    compile_sizes: Optional[Sequence[str]] = None
    options: LossOptions = field(default_factory=LossOptions)
    measure_memory: bool = True
    check_errors: bool = True
    budget_s: Optional[float] = None  # stop starting new measurements after this long
    max_error_elements: int = 400_000_000  # skip the float64 reference above this many (B*P) x N entries
    memory_fraction: float = 0.6  # skip a provider whose estimated memory exceeds this fraction of free memory
    sweep: str = "custom"


def environment(device: torch.device) -> dict:
    """Device name and versions recorded with every result."""
    info = dict(
        package_version=ek.__version__,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        python_version=platform.python_version(),
        platform=platform.platform(),
        cpu=cpu_name(),
        cpu_threads=torch.get_num_threads(),
        device=device.type,
    )
    try:
        import triton

        info["triton_version"] = triton.__version__
    except Exception:
        info["triton_version"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["driver_cuda_version"] = _driver_version()
    else:
        info["device_name"] = f"CPU: {info['cpu']} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    info["available_backends"] = ek.available_backends(device.type)
    try:
        info["load_average"] = os.getloadavg()[0]  # other work on the machine makes CPU timings noisy
    except OSError:
        info["load_average"] = None
    return info



def _driver_version():
    try:
        v = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        return v
    except Exception:
        return None


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def estimated_bytes(provider: str, problem: Problem, with_grad: bool) -> int:
    """A rough upper estimate of a provider's working memory (to skip what cannot fit instead of crashing)."""
    acc_size = 8 if problem.dtype == torch.float64 else 4
    if provider == "loop":
        dense = similarity_elements(problem, padded=True) * acc_size
        # its per-image slices of the matrix each get a full-size gradient buffer in the backward
        return dense * (5 if with_grad else 1)
    if provider in ("reference", "reference-compiled"):
        dense = similarity_elements(problem) * acc_size
        if problem.size.kind == "similarity":
            return dense * 2
        return dense * (6 if with_grad else 4)
    return similarity_elements(problem) * acc_size // 4  # fused backends do not materialise it


def _record_base(run_id, env, size: Size, problem: Problem, dtype_name: str, cfg: RunConfig) -> dict:
    return dict(
        schema=SCHEMA,
        run_id=run_id,
        sweep=cfg.sweep,
        kind=size.kind,
        size=size.name,
        B=size.B,
        P=size.P,
        D=size.D,
        R=size.R,
        N=problem.N,
        S_max=problem.S_max,
        lengths=problem.lengths,
        gaze_fraction=size.gaze_fraction if size.kind == "loss" else None,
        gaze_density=size.gaze_density if size.kind == "loss" else None,
        dtype=dtype_name,
        egma_compat=cfg.options.egma_compat if size.kind == "loss" else None,
        alpha=cfg.options.resolved_alpha() if size.kind == "loss" else None,
        input_bytes=problem.input_bytes(),
        **env,
    )


class Progress:
    """One line per finished measurement on stderr, with a count and the elapsed time; while one step runs
    longer than ``heartbeat_s`` (torch.compile on a CPU takes a minute or more), a line every ``heartbeat_s``
    says what is still running."""

    def __init__(self, total: int, stream=None, enabled: bool = True, heartbeat_s: float = 20.0):
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        self._last = self.start
        self._label: Optional[str] = None
        self._label_start = self.start
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(f"[{self.done:>3}/{self.total} {self.elapsed():6.1f}s] {text}\n")
            self.stream.flush()
            self._last = time.perf_counter()

    def step(self, text: str, count: bool = True) -> None:
        if count:
            self.done += 1
        if self.enabled:
            self._write(text)

    def note(self, text: str) -> None:
        if self.enabled:
            self._write(text)

    def working_on(self, label: Optional[str]) -> None:
        """Name the step now running (for the heartbeat lines); starts the heartbeat thread on first use."""
        self._label, self._label_start = label, time.perf_counter()
        if self.enabled and self.heartbeat_s and self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="egma-bench-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            label = self._label
            now = time.perf_counter()
            if label and now - self._last >= self.heartbeat_s:
                self._write(f"still running after {now - self._label_start:.0f} s: {label}")

    def close(self) -> None:
        self._stop.set()
        self._label = None


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return "out of memory" in str(exc).lower()


def _cleanup(device, full: bool = True):
    if full or device.type == "cuda":
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double().to(a.device)).abs().max())


def _reference64(problem: Problem, cfg: RunConfig, compat: bool) -> dict:
    """Float64 reference outputs and gradients on the problem's inputs (upcast from the run dtype)."""
    p64 = problem.as_float64()
    if problem.size.kind == "similarity":
        with torch.no_grad():
            i2t, t2i = reference.filip_similarity_ref(p64.patch_emb, p64.sent_emb, p64.cu_seqlens, p64.logit_scale, egma_compat=compat)
        return dict(outputs=dict(i2t=i2t, t2i=t2i), grads={})
    opts = cfg.options
    terms = ek.fine_grained_loss(
        **p64.loss_args(),
        alpha=opts.resolved_alpha(),
        map_threshold=opts.map_threshold,
        weights=opts.weights,
        egma_compat=compat,
        backend="reference",
        return_details=True,
    )
    terms.loss.backward()
    outputs = {k: getattr(terms, k).detach() for k in TERMS}
    grads = dict(patch_emb=p64.patch_emb.grad, sent_emb=p64.sent_emb.grad, logit_scale=p64.logit_scale.grad)
    return dict(outputs=outputs, grads=grads)


def _errors(provider: Provider, problem: Problem, cfg: RunConfig, ref: dict) -> dict:
    """Worst absolute error of the outputs and worst relative error of the gradients against float64."""
    if problem.size.kind == "similarity":
        with torch.no_grad():
            i2t, t2i = provider.similarity(problem)
        outs = dict(i2t=i2t, t2i=t2i)
        grads = {}
    else:
        problem.zero_grad()
        terms = provider.loss(problem, cfg.options)
        terms.loss.backward()
        outs = {k: getattr(terms, k) for k in TERMS}
        grads = dict(patch_emb=problem.patch_emb.grad, sent_emb=problem.sent_emb.grad, logit_scale=problem.logit_scale.grad)
        problem.zero_grad()
    err_terms = {k: _max_abs(outs[k], ref["outputs"][k]) for k in outs}
    grad_errs = {}
    for k, g in grads.items():
        r = ref["grads"][k]
        scale = float(r.abs().max())
        grad_errs[k] = _max_abs(g, r) / scale if scale > 0 else _max_abs(g, r)
    return dict(
        max_abs_err=max(err_terms.values()),
        err_terms=err_terms,
        max_rel_grad_err=max(grad_errs.values()) if grad_errs else None,
        grad_errs=grad_errs or None,
    )


def _mode_callables(provider: Provider, problem: Problem, cfg: RunConfig, mode: str):
    """``(fn, pre)`` for a mode: the timed call and its untimed preparation."""
    if problem.size.kind == "similarity":
        def fn():
            with torch.no_grad():
                return provider.similarity(problem)
        return fn, None
    opts = cfg.options
    if mode == "forward":
        return (lambda: provider.loss(problem, opts).loss), None
    if mode == "full":
        def full():
            provider.loss(problem, opts).loss.backward()
        return full, problem.zero_grad
    if mode == "backward":
        holder = {}

        def pre():
            problem.zero_grad()
            holder["loss"] = provider.loss(problem, opts).loss

        def bwd():
            holder.pop("loss").backward()
        return bwd, pre
    raise ValueError(f"unknown mode {mode!r}")


def count_measurements(cfg: RunConfig) -> int:
    total = 0
    for size in cfg.sizes:
        modes = ["forward"] if size.kind == "similarity" else list(cfg.modes)
        total += len(cfg.dtypes) * (1 + len(cfg.providers) * len(modes))
    return total


def run(cfg: RunConfig, progress: Optional[Progress] = None, on_record: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Run the sweep; return (and pass to ``on_record`` as they come) the records."""
    device = cfg.device
    env = environment(device)
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    env["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    progress = progress or Progress(count_measurements(cfg), enabled=False)
    records: List[dict] = []
    started = time.perf_counter()

    def emit(rec):
        records.append(rec)
        if on_record is not None:
            on_record(rec)

    def over_budget():
        return cfg.budget_s is not None and time.perf_counter() - started > cfg.budget_s

    def budget_left():
        return None if cfg.budget_s is None else cfg.budget_s - (time.perf_counter() - started)

    timing_kw = dict(repeats=cfg.repeats, warmup=cfg.warmup, max_time_s=cfg.max_time_s, min_repeats=cfg.min_repeats)

    for size in cfg.sizes:
        modes = ["forward"] if size.kind == "similarity" else [m for m in MODES if m in cfg.modes]
        for dtype_name in cfg.dtypes:
            dtype = DTYPES[dtype_name]
            n_here = 1 + len(cfg.providers) * len(modes)
            if over_budget():
                reason = f"time budget of {cfg.budget_s:.0f} s spent"
                base = dict(schema=SCHEMA, run_id=run_id, sweep=cfg.sweep, kind=size.kind, size=size.name, B=size.B,
                            P=size.P, D=size.D, R=size.R, dtype=dtype_name, status="skipped", reason=reason, **env)
                emit(dict(base, provider=FLOOR, mode="forward"))
                for provider in cfg.providers:
                    for mode in modes:
                        emit(dict(base, provider=provider.name, mode=mode))
                progress.done += n_here
                progress.note(f"{size.name} {dtype_name}: skipped ({reason})")
                continue
            try:
                problem = make_problem(size, dtype, device)
            except Exception as exc:  # noqa: BLE001 - report and go on
                progress.done += n_here
                progress.note(f"{size.name} {dtype_name}: inputs failed: {exc}")
                continue
            base = _record_base(run_id, env, size, problem, dtype_name, cfg)

            # The floor: one bare (B*P) x D by D x N product in the same dtype.
            a = torch.randn(size.B * size.P, size.D, device=device).to(dtype)
            b = torch.randn(size.D, problem.N, device=device).to(dtype)
            try:
                floor = measure_time(lambda: torch.mm(a, b), device, **timing_kw)
                floor_ms = floor.median_s * 1e3
                rec = dict(base, provider=FLOOR, mode="forward", status="ok", **floor.as_ms(), floor_ms=floor_ms, floor_ratio=1.0)
            except Exception as exc:  # noqa: BLE001
                floor_ms = None
                rec = dict(base, provider=FLOOR, mode="forward", status="error", reason=repr(exc))
            del a, b
            emit(rec)
            progress.step(f"{size.name} {dtype_name} {FLOOR}: {_fmt_ms(rec)}")

            refs: Dict[bool, dict] = {}
            for provider in cfg.providers:
                compat = provider.similarity_compat() if size.kind == "similarity" else cfg.options.egma_compat
                prov_base = dict(base, provider=provider.name, egma_compat=compat)
                reason = provider.skip_reason(problem, cfg.options)
                if reason is None and provider.name == "reference-compiled" and cfg.compile_sizes is not None and size.name not in cfg.compile_sizes:
                    reason = "not compiled at this size (see --compile-sizes)"
                if reason is None and problem.dtype == torch.bfloat16 and device.type == "cpu" and provider.name == "triton":
                    reason = "bfloat16 is broken in the Triton interpreter"
                if reason is None:
                    need = estimated_bytes(provider.name, problem, size.kind == "loss")
                    free = _free_bytes(device)
                    if need > cfg.memory_fraction * free:
                        reason = f"estimated {need / 2**30:.1f} GiB > {cfg.memory_fraction:.0%} of {free / 2**30:.1f} GiB free"
                if reason is None and over_budget():
                    reason = f"time budget of {cfg.budget_s:.0f} s spent"
                if reason is not None:
                    for mode in modes:
                        emit(dict(prov_base, mode=mode, status="skipped", reason=reason))
                        progress.step(f"{size.name} {dtype_name} {provider.name} {mode}: skipped ({reason})")
                    continue

                # Errors against float64 (also the first warm-up, and the compile for reference-compiled).
                label = f"{size.name} {dtype_name} {provider.name}"
                if provider.name == "reference-compiled":
                    label += " (torch.compile, once per mode)"
                    progress.note(f"{size.name} {dtype_name} reference-compiled: compiling with torch.compile, once "
                                  f"per mode: about a minute on an idle CPU, several on a busy one")
                progress.working_on(label)
                errs = {}
                t0 = time.perf_counter()
                try:
                    if cfg.check_errors and similarity_elements(problem) <= cfg.max_error_elements:
                        if compat not in refs:
                            refs[compat] = _reference64(problem, cfg, compat)
                        errs = _errors(provider, problem, cfg, refs[compat])
                        errs["err_vs"] = f"float64 reference, egma_compat={compat}"
                    else:
                        errs = dict(err_vs="not checked" + ("" if cfg.check_errors else " (--no-errors)"))
                except Exception as exc:  # noqa: BLE001
                    _cleanup(device)
                    status = "oom" if _is_oom(exc) else "error"
                    for mode in modes:
                        emit(dict(prov_base, mode=mode, status=status, reason=f"error check: {exc!r}"[:500]))
                        progress.step(f"{size.name} {dtype_name} {provider.name} {mode}: {status} ({exc!r})"[:300])
                    continue
                first_call_s = time.perf_counter() - t0

                memory_by_mode: Dict[str, tuple] = {}
                for mode in modes:
                    if over_budget():
                        emit(dict(prov_base, mode=mode, status="skipped", reason=f"time budget of {cfg.budget_s:.0f} s spent"))
                        progress.step(f"{size.name} {dtype_name} {provider.name} {mode}: skipped (time budget)")
                        continue
                    rec = dict(prov_base, mode=mode, **errs, first_call_s=first_call_s)
                    try:
                        fn, pre = _mode_callables(provider, problem, cfg, mode)
                        timing = measure_time(fn, device, pre=pre, budget_left_s=budget_left(), **timing_kw)
                        rec.update(status="ok", **timing.as_ms())
                        if floor_ms:
                            rec.update(floor_ms=floor_ms, floor_ratio=timing.median_s * 1e3 / floor_ms)
                        if cfg.measure_memory:
                            mem_mode = "full" if mode == "backward" else mode
                            if mem_mode not in memory_by_mode:
                                mfn, mpre = _mode_callables(provider, problem, cfg, mem_mode)
                                memory_by_mode[mem_mode] = measure_memory(mfn, device, pre=mpre)
                                problem.zero_grad()
                            new_peak, method = memory_by_mode[mem_mode]
                            rec.update(
                                scratch_bytes=new_peak,
                                peak_bytes=new_peak + problem.input_bytes(),
                                memory_method=method,
                                memory_of=mem_mode,
                            )
                    except BudgetExceeded as exc:
                        rec.update(status="skipped", reason=f"time budget: {exc}")
                    except Exception as exc:  # noqa: BLE001
                        _cleanup(device)
                        rec.update(status="oom" if _is_oom(exc) else "error", reason=repr(exc)[:500])
                    problem.zero_grad()
                    emit(rec)
                    progress.step(f"{size.name} {dtype_name} {provider.name} {mode}: {_fmt_ms(rec)}")
            del problem, refs
            _cleanup(device, full=False)
    progress.working_on(None)
    return records


def _fmt_ms(rec: dict) -> str:
    if rec.get("status") != "ok":
        return f"{rec.get('status')} ({rec.get('reason', '')})"[:200]
    text = f"{rec['median_ms']:.3g} ms"
    if rec.get("floor_ratio") and rec["provider"] != FLOOR:
        text += f" ({rec['floor_ratio']:.1f}x floor)"
    if rec.get("max_abs_err") is not None:
        text += f", err {rec['max_abs_err']:.1e}"
    return text
