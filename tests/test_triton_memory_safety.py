"""Memory safety of the "triton" backend with the value checks off: offsets, second derivatives, tiny positive gaze.

With ``validate=False`` (or a ``max_seqlen`` smaller than the longest report) malformed ``cu_seqlens``
must give garbage at worst, never a read or write outside a tensor. The kernels clamp every report's
offsets to ``0 <= start <= end <= N`` and the backend bounds ``max_seqlen`` by N.

How the bounds are checked (under TRITON_INTERPRET=1, on CPU tensors): every unsafe case runs in a child
process (this file run as a script), so that a crash fails the test instead of killing the run. In the
child, every input is a view into the middle of a larger buffer whose rest holds sentinel values (NaN
for the embeddings and gaze, 0x7f7f7f7f for the offsets), and every buffer the backend allocates for
its kernels (``_utils.new_output``: outputs, saved tensors, partial sums) is made the same way. After the
forward and backward pass the child compares all guard bytes with their starting values: a kernel
write outside a tensor changes them, and a far write kills the child. Reads outside the inputs show
up as NaN: for the offsets whose clamped form is a valid partition, the results must equal those of
the clamped offsets with the checks on.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
GUARD = 4096  # sentinel elements before and after every tensor


# ---------------------------------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------------------------------


class Guards:
    """Tensors as views into the middle of sentinel-filled buffers, and a check of the sentinels."""

    def __init__(self):
        self.buffers = []  # (whole buffer, elements of the view, its guard bytes when made)

    def view(self, shape, dtype, fill=None):
        numel = 1
        for s in shape:
            numel *= int(s)
        if dtype.is_floating_point:
            sentinel = float("nan")
        elif dtype == torch.bool:
            sentinel = True
        else:
            sentinel = min(0x7F7F7F7F, torch.iinfo(dtype).max)
        whole = torch.full((numel + 2 * GUARD,), sentinel, dtype=dtype)
        inner = whole[GUARD:GUARD + numel].view(shape)
        if fill is not None:
            inner.copy_(fill)
        self.buffers.append((whole, numel, self._guard_bytes(whole, numel).clone()))
        return inner

    @staticmethod
    def _guard_bytes(whole, numel):
        raw = whole.view(torch.uint8) if whole.dtype != torch.bool else whole.to(torch.uint8)
        per = whole.element_size()
        return torch.cat([raw[: GUARD * per], raw[(GUARD + numel) * per:]])

    def damaged(self):
        """How many buffers had a guard byte changed."""
        bad = 0
        for w, n, b in self.buffers:
            bad += int(not torch.equal(self._guard_bytes(w, n), b))
        return bad


def _run_case(case, guards):
    """One call (forward and backward) of the loss or the similarity on guarded inputs, checks off."""
    import egma_kernels as ek
    from egma_kernels import _utils

    dtype = getattr(torch, case["dtype"])
    B, P, D, N = case["B"], case["P"], case["D"], case["N"]
    g = torch.Generator().manual_seed(case.get("seed", 0))
    patch = guards.view((B, P, D), dtype, torch.randn(B, P, D, generator=g, dtype=dtype)).requires_grad_()
    sent = guards.view((N, D), dtype, torch.randn(N, D, generator=g, dtype=dtype)).requires_grad_()
    cu = guards.view((len(case["cu"]),), torch.int32, torch.tensor(case["cu"], dtype=torch.int64).to(torch.int32))
    gaze = gaze_mask = None
    if case.get("gaze"):
        gaze = guards.view((N, P), dtype, torch.rand(N, P, generator=g, dtype=dtype))
        gaze_mask = guards.view((B,), torch.bool, torch.ones(B, dtype=torch.bool))
    _utils.new_output = lambda shape, dt, device: guards.view(tuple(shape), dt)
    if case["kind"] == "loss":
        terms = ek.fine_grained_loss(
            patch, sent, cu, 10.0, gaze, gaze_mask, backend="triton", validate=False, max_seqlen=case["max_seqlen"],
            egma_compat=case.get("egma_compat", False), return_details=True,
        )
        (terms.loss + terms.i2t.sum()).backward()
        values = [terms.loss, terms.i2t, patch.grad, sent.grad]
    else:
        i2t, t2i = ek.filip_similarity(patch, sent, cu, 10.0, backend="triton", validate=False,
                                       max_seqlen=case["max_seqlen"])
        (i2t.sum() + 2 * t2i.sum()).backward()
        values = [i2t, t2i, patch.grad, sent.grad]
    return guards.damaged(), [v.detach().clone() for v in values]


def _clamped(cu, N):
    """The kernels' view of the offsets: report k is [start_k, end_k), 0 <= start_k <= end_k <= N."""
    starts = [min(max(c, 0), N) for c in cu[:-1]]
    ends = [min(max(e, s), N) for s, e in zip(starts, cu[1:])]
    return starts, ends


def child_main(cases):
    """Runs each case, prints one JSON line per case: guard buffers damaged, finite results, and for the
    cases whose clamped offsets are a valid partition, whether the results match the valid call."""
    import egma_kernels as ek

    for case in cases:
        print(json.dumps({"start": case["name"]}), flush=True)
        guards = Guards()
        damaged, values = _run_case(case, guards)
        result = {"name": case["name"], "damaged": damaged, "buffers": len(guards.buffers)}
        starts, ends = _clamped(case["cu"], case["N"])
        valid = starts[0] == 0 and ends[-1] == case["N"] and all(e > s for s, e in zip(starts, ends)) \
            and all(s == e for s, e in zip(starts[1:], ends[:-1]))
        longest = max(e - s for s, e in zip(starts, ends))
        if valid and case.get("compare", True) and (case["max_seqlen"] is None or case["max_seqlen"] >= longest):
            # the same call on the clamped offsets, checks on: reading outside the inputs (NaN) would differ
            good = dict(case, cu=[starts[0]] + ends, max_seqlen=longest)
            _, expected = _run_case(good, Guards())
            result["matches_clamped"] = all(
                torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=False) for a, b in zip(values, expected)
            )
        print(json.dumps(result), flush=True)
    del ek


def _spawn(cases, timeout=240):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("EGMA_KERNELS_POISON", None)
    proc = subprocess.run([sys.executable, HERE, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    results = {}
    last_started = None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            if "start" in item:
                last_started = item["start"]
            else:
                results[item["name"]] = item
    assert proc.returncode == 0, (
        f"child died with return code {proc.returncode} (signal {-proc.returncode if proc.returncode < 0 else None}) "
        f"in case {last_started!r}\n{proc.stderr[-3000:]}"
    )
    return results


# ---------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------

def _case(name, cu, N, max_seqlen, *, kind="loss", B=None, P=5, D=8, dtype="float32", gaze=True, **extra):
    B = B if B is not None else (len(cu) - 1 if kind == "loss" else 2)
    return dict(name=name, cu=cu, N=N, B=B, P=P, D=D, max_seqlen=max_seqlen, kind=kind, dtype=dtype,
                gaze=gaze and kind == "loss", **extra)


# Offsets of the issue and their relatives (N sentences given; the loss has len(cu) - 1 reports).
MALFORMED = [
    _case("end_far_beyond_N", [0, 100000], 1, None),
    _case("empty_report", [0, 0], 1, None),
    _case("end_beyond_N", [0, 2], 1, None),
    _case("end_beyond_N_max_seqlen_given", [0, 3, 12], 6, 4),
    _case("not_starting_at_0", [2, 4, 6], 6, 2),
    _case("negative_start", [-3, 2, 6], 6, 4),
    _case("decreasing", [0, 5, 2, 6], 6, 5),
    _case("int32_extremes", [-2**31, 2**31 - 1, 3], 4, 4),
    _case("huge_max_seqlen", [0, 2, 4], 4, 10**6),
    _case("max_seqlen_too_small", [0, 7, 9], 9, 1),
    _case("max_seqlen_too_small_compat", [0, 20, 21, 40], 40, 3, egma_compat=True),
    _case("beyond_N_compat", [0, 1, 50], 6, 49, egma_compat=True),
    _case("float64_beyond_N", [0, 3, 9], 5, 6, dtype="float64"),
    _case("filip_beyond_N", [0, 3, 40], 5, 37, kind="filip"),
    _case("filip_decreasing", [0, 4, 1, 3], 5, 4, kind="filip"),
]


def test_malformed_offsets_stay_in_bounds():
    cases = MALFORMED
    results = _spawn(cases)
    for case in cases:
        r = results[case["name"]]
        assert r["damaged"] == 0, f"{case['name']}: {r['damaged']} of {r['buffers']} buffers written outside"
        if "matches_clamped" in r:
            assert r["matches_clamped"], f"{case['name']}: read outside its inputs (or misclamped)"


def random_cases(seed, count):
    """Offsets drawn from in-range, out-of-range, negative, decreasing and int32-extreme values."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        N = rng.randint(1, 9)
        R = rng.randint(1, 4)
        pool = lambda: rng.choice([
            rng.randint(0, N), rng.randint(0, N), rng.randint(-3, N + 3), rng.randint(N, 10 * N + 5),
            -rng.randint(1, 2**31 - 1), rng.randint(0, 2**31 - 1), 0, N,
        ])
        cu = sorted(pool() for _ in range(R + 1)) if rng.random() < 0.3 else [pool() for _ in range(R + 1)]
        max_seqlen = rng.choice([None, 1, rng.randint(1, N), rng.randint(1, 4 * N + 40)])
        kind = rng.choice(["loss", "loss", "filip"])
        cases.append(_case(
            f"random{seed}_{i}", cu, N, max_seqlen, kind=kind, P=rng.randint(1, 6), D=rng.choice([4, 8, 20]),
            dtype=rng.choice(["float32", "float64"]), gaze=rng.random() < 0.7,
            egma_compat=rng.random() < 0.3, seed=i, compare=False,
        ))
    return cases


# Cases per run (each about a second in the interpreter); EGMA_FUZZ_CASES / EGMA_FUZZ_SEED for longer runs.
RANDOM_COUNT = int(os.environ.get("EGMA_FUZZ_CASES", "10"))
RANDOM_SEED = int(os.environ.get("EGMA_FUZZ_SEED", "1"))


def test_random_malformed_offsets():
    cases = random_cases(RANDOM_SEED, RANDOM_COUNT)
    results = _spawn(cases, timeout=max(240, 10 * RANDOM_COUNT))
    damaged = [name for name, r in results.items() if r["damaged"]]
    print(f"random malformed offsets, seed {RANDOM_SEED}: {len(results)} cases run, {len(damaged)} wrote outside")
    assert len(results) == RANDOM_COUNT
    assert not damaged, damaged


needs_interpreter_or_gpu = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="no interpreter, no GPU"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@needs_interpreter_or_gpu
@pytest.mark.parametrize("kind", ["loss", "filip"])
def test_double_backward_raises(kind):
    """A second derivative through the fused ops raises a clear error (the reference supports it)."""
    import egma_kernels as ek
    from conftest import make_inputs

    inputs = make_inputs((2, 3), 5, 8, dtype=torch.float64)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    patch = inputs["patch_emb"].requires_grad_()
    if kind == "loss":
        out = ek.fine_grained_loss(**inputs, backend="triton")
    else:
        out = ek.filip_similarity(patch, inputs["sent_emb"], inputs["cu_seqlens"], 10.0, backend="triton")[0].sum()
    first, = torch.autograd.grad(out, patch, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        first.square().sum().backward()
    # a plain first derivative is unaffected
    again, = torch.autograd.grad(
        ek.fine_grained_loss(**inputs, backend="triton") if kind == "loss" else
        ek.filip_similarity(patch, inputs["sent_emb"], inputs["cu_seqlens"], 10.0, backend="triton")[0].sum(), patch)
    torch.testing.assert_close(again, first.detach())


@needs_interpreter_or_gpu
def test_tiny_positive_gaze_stays_a_label():
    """A float64 gaze of 1e-50 is a positive label (gaze > 0) for the reference; with float32 embeddings
    the kernels cast it to float32, where it would be 0 and the label gone."""
    import egma_kernels as ek
    from conftest import make_inputs

    inputs = make_inputs((3, 2, 4), 6, 8, dtype=torch.float32, gaze="none")
    N, P = inputs["sent_emb"].shape[0], 6
    g = torch.Generator().manual_seed(3)
    inputs["gaze"] = (torch.rand(N, P, generator=g) < 0.4).to(torch.float64) * 1e-50
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    got = ek.fine_grained_loss(**inputs, backend="triton", return_details=True)
    ref = ek.fine_grained_loss(**{k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                                  for k, v in inputs.items()}, backend="reference", return_details=True)
    no_labels = ek.fine_grained_loss(**dict(inputs, gaze=torch.zeros_like(inputs["gaze"])), backend="reference",
                                     return_details=True)
    assert inputs["gaze"].gt(0).any() and inputs["gaze"].max() < 1e-49
    assert abs(ref.gaze_mlce.item() - no_labels.gaze_mlce.item()) > 0.05  # the labels matter here
    torch.testing.assert_close(got.gaze_mlce.double(), ref.gaze_mlce, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.loss.double(), ref.loss, rtol=1e-4, atol=1e-5)


@needs_interpreter_or_gpu
def test_raw_ops_check_the_layout():
    """The custom ops check the shapes and strides the kernels index by (they can be called directly)."""
    import egma_kernels  # noqa: F401  (registers the ops)
    from conftest import make_inputs

    x = make_inputs((2, 3), 5, 8, dtype=torch.float32)
    patch, sent, cu = x["patch_emb"].to(DEVICE), x["sent_emb"].to(DEVICE), x["cu_seqlens"].to(DEVICE)
    scale = torch.tensor(10.0, device=DEVICE)
    gaze, mask = x["gaze"].to(DEVICE), torch.ones(2, dtype=torch.bool, device=DEVICE)
    op = torch.ops.egma_kernels.triton_loss
    options = [0.5, 0.3, 1.0, 1.0, 1.0, 0.0]
    op(patch, sent, cu, scale, gaze, mask, options, False, 3)  # the layout as the kernels want it
    bad = [
        (patch, sent, cu[:2], scale, gaze, mask),  # cu_seqlens of 2 entries for B = 2
        (patch, sent, cu.expand(3).as_strided((3,), (0,)), scale, gaze, mask),  # a zero stride
        (patch, sent[:, :4], cu, scale, gaze, mask),  # D differs
        (patch, sent.t().contiguous().t(), cu, scale, gaze, mask),  # sentences not row-major
        (patch, sent, cu, scale, gaze[:, :3], mask),  # gaze (N, 3)
        (patch, sent, cu, scale, gaze, mask[:1]),  # gaze_mask (1,)
        (patch, sent, cu, scale, gaze, None),  # gaze without gaze_mask
        (patch, sent, cu.float(), scale, gaze, mask),  # float offsets
    ]
    for args in bad:
        with pytest.raises(ValueError, match="triton op"):
            op(*args, options, False, 3)
    with pytest.raises(ValueError, match="triton op"):
        torch.ops.egma_kernels.triton_filip(patch, sent[:0], cu, scale, 3)  # no sentences


def test_guards_catch_a_write_outside():
    """The harness itself: a kernel told a wrong size writes into the guard, and the check sees it."""
    guards = Guards()
    x = guards.view((4,), torch.float32, torch.zeros(4))
    x.as_strided((6,), (1,)).fill_(1.0)  # two elements past the end
    assert guards.damaged() == 1


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
    child_main(json.loads(sys.argv[1]))
