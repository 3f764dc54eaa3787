"""Memory safety with the value checks off, and the input holes that a fuzzing pass found.

Every backend this machine has (``reference``, the compiled ``cpu`` ops, ``triton`` under the interpreter) gets:

* malformed report offsets with ``validate=False``, through ``fine_grained_loss``, ``filip_similarity`` and the
  raw ``torch.ops`` entry points, each batch of calls in a subprocess (a crash fails the test, not the run),
  with glibc's heap checks on (``MALLOC_CHECK_=3``: a write past a heap buffer aborts at the next free) and
  the inputs as views into larger buffers whose guard elements must come back unchanged;
* a randomised run of malformed offsets (and wrong ``max_seqlen``) at every backend, forward and backward;
* in-process: values checked as the kernels see them (after the cast to the compute dtype), positive gaze
  labels surviving the cast, double backward refused by the fused backends, the options' refusals.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import egma_kernels as ek
from conftest import make_inputs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = ek.available_backends("cpu")  # the backends that run CPU tensors here (triton: interpreter)
COMPILED_OPS = "cpu" in BACKENDS


def _run_isolated(body: str, timeout: int = 240) -> dict:
    """Run ``body`` in a fresh interpreter with heap checking; it must exit normally and print one JSON line."""
    prologue = textwrap.dedent(
        """
        import json, sys
        import torch
        import egma_kernels as ek

        GUARD = 12345.0

        def guarded(t, pad=7):
            # t as a view in the middle of a larger buffer whose other elements hold GUARD.
            flat = torch.full((t.numel() + 2 * pad,), GUARD, dtype=t.dtype)
            flat[pad:pad + t.numel()] = t.reshape(-1)
            return flat, flat[pad:pad + t.numel()].view(t.shape)

        def guards_intact(flat, n, pad=7):
            return bool((flat[:pad] == GUARD).all() and (flat[pad + n:] == GUARD).all())
        """
    )
    env = dict(os.environ)
    env.update(MALLOC_CHECK_="3", MALLOC_PERTURB_="165", TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + HERE)
    proc = subprocess.run(
        [sys.executable, "-c", prologue + textwrap.dedent(body)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, (
        f"subprocess died (exit {proc.returncode}; negative = killed by that signal)\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )
    lines = [line for line in proc.stdout.splitlines() if line[:1] in ("{", "[")]
    assert lines, f"no result printed; stderr: {proc.stderr[-2000:]}"
    return json.loads(lines[-1])


# The offsets of the fuzzing report (one image, one sentence) and more: past the end, empty, beyond N,
# negative, not starting at 0.
BAD_OFFSETS = [[0, 100000], [0, 0], [0, 2], [-5, 1], [1, 1], [0, -1], [-100000, 1], [2**31 - 1, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_offsets_with_checks_off(backend):
    result = _run_isolated(
        f"""
        backend = {backend!r}
        outcomes = []
        for cu_list in {BAD_OFFSETS!r}:
            for what in ("loss", "filip"):
                for max_seqlen in (None, 1):
                    if max_seqlen is not None and backend != "triton":
                        continue
                    pf, patch = guarded(torch.ones(1, 1, 1))
                    sf, sent = guarded(torch.ones(1, 1))
                    cf, cu = guarded(torch.tensor(cu_list, dtype=torch.int32))
                    patch.requires_grad_(True)
                    try:
                        if what == "loss":
                            out = ek.fine_grained_loss(patch, sent, cu, 1.0, torch.ones(1, 1), backend=backend,
                                                       validate=False, max_seqlen=max_seqlen)
                        else:
                            out = sum(x.sum() for x in ek.filip_similarity(
                                patch, sent, cu, 1.0, backend=backend, validate=False, max_seqlen=max_seqlen))
                        out.backward()
                        outcome = "returned"
                    except Exception as exc:  # a clear refusal is fine; a crash is not
                        outcome = "raised " + type(exc).__name__
                    intact = guards_intact(pf, 1) and guards_intact(sf, 1) and guards_intact(cf, 2)
                    outcomes.append([cu_list, what, max_seqlen, outcome, intact])
        print(json.dumps(outcomes))
        """
    )
    assert len(result) >= 2 * len(BAD_OFFSETS)
    for cu_list, what, max_seqlen, outcome, intact in result:
        assert intact, f"{backend} {what} cu={cu_list}: wrote outside its inputs"
        if backend == "cpu":
            # The compiled CPU ops check their offsets themselves: a clear error, not a number.
            assert outcome.startswith("raised"), f"cpu {what} cu={cu_list}: {outcome}"


@pytest.mark.skipif(not COMPILED_OPS, reason="the compiled extension is not built")
def test_raw_ops_check_offsets_shapes_and_indices():
    result = _run_isolated(
        """
        ops = torch.ops.egma_kernels
        B, P, D, N = 2, 3, 4, 3
        torch.manual_seed(0)
        p = torch.randn(B, P, D, dtype=torch.float64)
        s = torch.randn(N, D, dtype=torch.float64)
        cu = torch.tensor([0, 2, 3], dtype=torch.int32)
        t = torch.tensor(2.0, dtype=torch.float64)
        raised = {}

        def attempt(name, fn):
            try:
                fn()
                raised[name] = None
            except Exception as exc:
                raised[name] = str(exc).splitlines()[0]

        for bad in ([0, 2, 100000], [0, 0, 3], [0, 3, 2], [1, 2, 3], [0, -4, 3]):
            c = torch.tensor(bad, dtype=torch.int32)
            attempt(f"loss_fwd {bad}", lambda: ops.loss_fwd(p, s, c, t, None, None, 0.5, 0.3, 1., 1., 1., False, True))
            attempt(f"filip_fwd {bad}", lambda: ops.filip_fwd(p, s, c, t, False, True))
        terms, i2t, t2i, i2t_arg, t2i_arg, own = ops.loss_fwd(p, s, cu, t, None, None, 0.5, 0.3, 1., 1., 1., False, True)
        g4, gbb = torch.ones(4, dtype=torch.float64), torch.ones(B, B, dtype=torch.float64)
        args = dict(i2t_arg=i2t_arg, t2i_arg=t2i_arg, own=own)

        def bwd(**change):
            a = dict(args, **change)
            return ops.loss_bwd(g4, gbb, gbb, p, s, cu, t, None, None, i2t, t2i, a["i2t_arg"], a["t2i_arg"], a["own"],
                                0.5, 0.3, 1., 1., 1., False)

        attempt("loss_bwd good", bwd)
        attempt("loss_bwd i2t_arg beyond N", lambda: bwd(i2t_arg=torch.full_like(i2t_arg, 10**6)))
        attempt("loss_bwd i2t_arg in another report", lambda: bwd(i2t_arg=torch.zeros_like(i2t_arg)))
        attempt("loss_bwd t2i_arg negative", lambda: bwd(t2i_arg=torch.full_like(t2i_arg, -3)))
        attempt("loss_bwd t2i_arg beyond P", lambda: bwd(t2i_arg=torch.full_like(t2i_arg, P)))
        attempt("loss_bwd short own", lambda: bwd(own=own[:1]))
        attempt("loss_bwd short i2t_arg", lambda: bwd(i2t_arg=i2t_arg[:1]))
        i2t_f, t2i_f, ia, ta = ops.filip_fwd(p, s, cu, t, False, True)
        attempt("filip_bwd good", lambda: ops.filip_bwd(gbb, gbb, p, s, cu, t, i2t_f, t2i_f, ia, ta))
        attempt("filip_bwd bad index", lambda: ops.filip_bwd(gbb, gbb, p, s, cu, t, i2t_f, t2i_f, ia + 7, ta))
        attempt("filip_bwd short grad", lambda: ops.filip_bwd(gbb[:1], gbb, p, s, cu, t, i2t_f, t2i_f, ia, ta))
        print(json.dumps(raised))
        """
    )
    assert result["loss_bwd good"] is None and result["filip_bwd good"] is None, result
    for name, message in result.items():
        if "good" not in name:
            assert message is not None and "egma_kernels" in message, f"{name}: {message}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_malformed_offsets(backend):
    """Random offsets (out of range, decreasing, empty reports, wrong end) and wrong ``max_seqlen`` with the
    checks off: every call returns or raises, nothing dies, no input's guard elements change."""
    trials = 40 if backend == "triton" else 150
    result = _run_isolated(
        f"""
        import random
        backend, trials = {backend!r}, {trials}
        rng = random.Random(1234)
        counts = {{"returned": 0, "raised": 0, "valid offsets": 0}}
        for trial in range(trials):
            B, N, P, D = rng.randint(1, 4), rng.randint(1, 7), rng.randint(1, 5), rng.choice([1, 3, 8])
            kind = rng.random()
            if kind < 0.3:
                cu_list = [rng.randint(-3, N + 3) for _ in range(B + 1)]
            elif kind < 0.6:
                cu_list = sorted(rng.randint(0, N) for _ in range(B + 1))
            elif kind < 0.8:
                cu_list = [0] + sorted(rng.randint(0, N + 5) for _ in range(B))
            else:
                cu_list = [rng.choice([0, 0, 1, -(2**31), 2**31 - 1]) for _ in range(B + 1)]
            valid = cu_list[0] == 0 and cu_list[-1] == N and all(b > a for a, b in zip(cu_list, cu_list[1:]))
            counts["valid offsets"] += valid
            max_seqlen = rng.choice([None, 1, N]) if backend == "triton" else None
            pf, patch = guarded(torch.randn(B, P, D))
            sf, sent = guarded(torch.randn(N, D))
            cf, cu = guarded(torch.tensor(cu_list, dtype=torch.int32))
            gf, gaze = guarded(torch.rand(N, P))
            patch.requires_grad_(True)
            sent.requires_grad_(True)
            try:
                if rng.random() < 0.5:
                    out = ek.fine_grained_loss(patch, sent, cu, 3.0, gaze, backend=backend, validate=False,
                                               max_seqlen=max_seqlen, egma_compat=rng.random() < 0.5)
                else:
                    out = sum(x.sum() for x in ek.filip_similarity(
                        patch, sent, cu, 3.0, backend=backend, validate=False, max_seqlen=max_seqlen))
                out.backward()
                counts["returned"] += 1
            except Exception:
                counts["raised"] += 1
            n = (B * P * D, N * D, B + 1, N * P)
            for flat, size in zip((pf, sf, cf, gf), n):
                if not guards_intact(flat, size):
                    counts.setdefault("guards broken", []).append(cu_list)
        print(json.dumps(counts))
        """,
        timeout=400,
    )
    print(backend, result)
    assert "guards broken" not in result, result
    assert result["returned"] + result["raised"] == trials


# ---------------------------------------------------------------------------------------------------------
# In-process: what the kernels see, labels, double backward, options.


def _tiny(dtype=torch.float32):
    torch.manual_seed(0)
    p = torch.nn.functional.normalize(torch.randn(2, 4, 8, dtype=dtype), dim=-1)
    s = torch.nn.functional.normalize(torch.randn(3, 8, dtype=dtype), dim=-1)
    return p, s, torch.tensor([0, 2, 3], dtype=torch.int32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_are_checked_as_the_kernels_see_them(backend):
    p, s, cu = _tiny()
    huge_gaze = torch.zeros(3, 4, dtype=torch.float64)
    huge_gaze[0, 0] = 1e300  # finite in float64, inf in the embeddings' float32
    with pytest.raises(ValueError, match="gaze must be finite in torch.float32"):
        ek.fine_grained_loss(p, s, cu, 2.0, huge_gaze, backend=backend)
    for scale in (1e300, 1e-300, np.float64(1e-300)):
        with pytest.raises(ValueError, match="logit_scale must be finite and > 0 in torch.float32"):
            ek.fine_grained_loss(p, s, cu, scale, backend=backend)
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
        ek.fine_grained_loss(p, s, cu, torch.tensor(1e300, dtype=torch.float64), backend=backend)
    # numpy scalars are numbers like any other
    want = ek.fine_grained_loss(p, s, cu, 2.5, alpha=0.25, backend=backend)
    got = ek.fine_grained_loss(p, s, cu, np.float32(2.5), alpha=np.float64(0.25), backend=backend)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_positive_gaze_keeps_its_label(backend):
    p, s, cu = _tiny()
    gaze = torch.zeros(3, 4, dtype=torch.float64)
    gaze[0, 1] = 1e-50  # a positive label for gaze > 0; 0.0 once cast to float32
    gaze[2, 3] = 0.5
    ref = ek.fine_grained_loss(p.double(), s.double(), cu, 5.0, gaze, backend="reference", return_details=True)
    got = ek.fine_grained_loss(p, s, cu, 5.0, gaze, backend=backend, return_details=True)
    dropped = ek.fine_grained_loss(p, s, cu, 5.0, gaze.float(), backend="reference", return_details=True)
    assert abs(dropped.gaze_mlce.item() - ref.gaze_mlce.item()) > 1e-3  # the label matters in this case
    assert abs(got.gaze_mlce.item() - ref.gaze_mlce.item()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward(backend):
    p, s, cu = _tiny(torch.float64)
    p = p.clone().requires_grad_(True)
    gaze = torch.rand(3, 4, dtype=torch.float64)
    loss = ek.fine_grained_loss(p, s, cu, 3.0, gaze, backend=backend)
    (g,) = torch.autograd.grad(loss, p, create_graph=True)
    if backend == "reference":
        (gg,) = torch.autograd.grad(g.pow(2).sum(), p)
        assert torch.isfinite(gg).all() and gg.abs().sum() > 0
    else:
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(g.pow(2).sum(), p)
    # first-order gradients under create_graph=True are still right
    (want,) = torch.autograd.grad(ek.fine_grained_loss(p, s, cu, 3.0, gaze, backend="reference"), p)
    torch.testing.assert_close(g.detach(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "option,value,fragment",
    [
        ("egma_compat", "no", "egma_compat must be True or False"),
        ("egma_compat", 1, "egma_compat must be True or False"),
        ("weights", "111", "weights must be three finite numbers"),
        ("weights", None, "weights must be three finite numbers"),
        ("weights", {1.0, 2.0, 3.0}, "weights must be three finite numbers"),
        ("alpha", float("nan"), "alpha must be a number in [0, 1]"),
        ("alpha", True, "alpha must be a number in [0, 1]"),
        ("max_seqlen", 0, "max_seqlen must be a positive int"),
    ],
)
def test_bad_options_are_refused_clearly(option, value, fragment):
    p, s, cu = _tiny()
    with pytest.raises((ValueError, TypeError)) as info:
        ek.fine_grained_loss(p, s, cu, 2.0, **{option: value})
    assert fragment in str(info.value)
    if option != "max_seqlen":
        with pytest.raises((ValueError, TypeError)):
            ek.FineGrainedLoss(**{option: value})


def test_good_options_of_other_types_are_accepted():
    p, s, cu = _tiny()
    want = ek.fine_grained_loss(p, s, cu, 2.0, weights=(1.0, 0.5, 2.0), egma_compat=True)
    for weights in ([1, 0.5, 2], np.array([1.0, 0.5, 2.0]), torch.tensor([1.0, 0.5, 2.0])):
        got = ek.fine_grained_loss(p, s, cu, 2.0, weights=weights, egma_compat=np.bool_(True))
        torch.testing.assert_close(got, want)
    ek.fine_grained_loss(p, s, cu, 2.0, max_seqlen=np.int64(2))
    # an upper bound above N is taken as N (no report is longer), on every backend
    for backend in BACKENDS:
        got = ek.fine_grained_loss(p, s, cu, 2.0, max_seqlen=10**9, validate=False, backend=backend)
        torch.testing.assert_close(got, ek.fine_grained_loss(p, s, cu, 2.0, backend="reference"), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not COMPILED_OPS, reason="the compiled extension is not built")
def test_torch_compile_keeps_the_ops_own_bounds():
    """Under torch.compile the Python value checks are skipped; the compiled ops still refuse bad offsets."""
    inputs = make_inputs([2, 1], 3, 8, seed=1, gaze="none", dtype=torch.float32)

    @torch.compile(fullgraph=True, backend="eager")
    def f(p, s, cu, t):
        return ek.fine_grained_loss(p, s, cu, t, backend="cpu")

    args = (inputs["patch_emb"], inputs["sent_emb"], inputs["cu_seqlens"], inputs["logit_scale"])
    want = ek.fine_grained_loss(*args, backend="cpu")
    torch.testing.assert_close(f(*args), want)
    bad = torch.tensor([0, 5, 3], dtype=torch.int32)
    with pytest.raises(Exception, match="cu_seqlens"):
        f(args[0], args[1], bad, args[3])
