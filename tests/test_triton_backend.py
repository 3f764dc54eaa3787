"""The "triton" backend against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1):
float32 and float64, small shapes, every output buffer poisoned. On a GPU the `gpu`-marked tests run
the compiled kernels in bfloat16/float16/float32.
"""

import pytest
import torch

import egma_kernels as ek
from egma_kernels.tolerances import same_dtype_bound
from backend_cases import CASES, Case, check_backend, check_filip_backend
from conftest import make_inputs

pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(
    "triton" not in ek.available_backends(), reason="triton backend unavailable (no GPU and no interpreter)"
)
pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

EXTRA_CASES = [
    Case((2, 1, 3), P=70, D=80, gaze="all", seed=10),  # two patch blocks, two D blocks, D not a power of 2
    Case((4, 4, 1, 2), P=17, D=24, gaze="mixed", egma_compat=True, seed=11, options=dict(map_threshold=0.0)),
    Case((3, 2), P=6, D=16, gaze="none", egma_compat=True, seed=12, options=dict(weights=(0.0, 0.0, 1.0))),
    # D > 256: the backward kernels split their output columns into chunks (float64: chunks of 256)
    Case((2, 3), P=5, D=300, gaze="mixed", seed=15),
    # a 70-sentence report: BLOCK_S=128, narrower report-kernel blocks, output chunks of 64 in float64
    Case((70, 2, 1), P=5, D=100, gaze="mixed", egma_compat=True, seed=16),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES + EXTRA_CASES, ids=str)
def test_values_and_gradients_match_reference(case, dtype):
    check_backend("triton", case, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("groups", [(4, 2, True), (2, 4, False)], ids=["fwd4-bwd2-one-dot", "fwd2-bwd4-looped"])
@pytest.mark.parametrize("case", [CASES[1], CASES[5], EXTRA_CASES[1]], ids=str)
def test_report_groups_in_float64(case, groups, monkeypatch):
    """Several reports per program (the GPU default for float32/bf16 in the forward and dpatch kernels; the
    dsent kernel's is tuned on a GPU) held to float64 precision too, with
    the similarity as one dot over D (16-bit inputs on a GPU) or as a loop over D blocks (3xTF32 float32)."""
    from egma_kernels import triton_backend as tb

    fwd_group, bwd_group, one_dot = groups
    monkeypatch.setattr(tb, "CONFIG_OVERRIDES", {"fwd_group": fwd_group, "bwd_group": bwd_group,
                                                 "sent_group": fwd_group, "fwd_SIM_ONE_DOT": one_dot,
                                                 "SIM_ONE_DOT": one_dot, "sent_SIM_ONE_DOT": one_dot})
    check_backend("triton", case, device=DEVICE, dtype=torch.float64)
    check_filip_backend("triton", 3, (2, 1, 4, 3, 1), P=6, D=16, device=DEVICE, dtype=torch.float64)


SLICED_CASES = [  # few images (few programs) and reports filling two or three packed tiles: loops to slice
    Case((9, 8, 10, 7, 6), P=7, D=16, gaze="mixed", egma_compat=True, seed=13),
    Case((17, 3, 1, 12, 9, 14), P=3, D=16, gaze="all", seed=14),
]


@pytest.mark.parametrize("budget", [0.0, 100.0], ids=["unsliced", "sliced"])
@pytest.mark.parametrize("case", SLICED_CASES, ids=str)
def test_backward_slices(case, budget, monkeypatch):
    """The backward kernels with and without their loops split into slices (partial gradient buffers summed
    afterwards): a budget of 0 bytes forbids slicing, a large one lets both kernels slice (the dpatch
    kernel's slices take every S-th packed tile, the dsent kernel's a range of images)."""
    from egma_kernels import triton_backend as tb

    monkeypatch.setattr(tb, "CONFIG_OVERRIDES", {"partial_budget": budget})
    chosen = []
    num_slices = tb._num_slices
    monkeypatch.setattr(tb, "_num_slices", lambda *a, **k: chosen.append(num_slices(*a, **k)) or chosen[-1])
    check_backend("triton", case, device=DEVICE, dtype=torch.float64)
    assert len(chosen) >= 2
    if budget == 0:
        assert set(chosen) == {1}
    elif not ON_GPU:  # the interpreter's "device" of 2 units asks for slices whenever few programs run
        assert all(n > 1 for n in chosen), chosen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[6], EXTRA_CASES[0], EXTRA_CASES[3]], ids=str)
def test_routes_recomputed_in_the_backward(case, dtype, monkeypatch):
    """The backward pass with the similarity tiles recomputed (its path when B x B x P route indices would
    outweigh the gradients, and for float64 on a GPU) against the reference; the other tests take the
    saved routes at their sizes (checked here too)."""
    from egma_kernels import triton_backend as tb

    shapes = []
    route_shape = tb._route_shape
    monkeypatch.setattr(tb, "_route_shape", lambda *a: shapes.append(route_shape(*a)) or shapes[-1])
    check_backend("triton", case, device=DEVICE, dtype=dtype)
    B, P = len(case.lengths), case.P
    saved = (0,) if ON_GPU and dtype == torch.float64 else (B, B, P)  # float64 on a GPU always recomputes
    assert shapes and all(shape == saved for shape in shapes), shapes
    shapes.clear()
    monkeypatch.setattr(tb, "CONFIG_OVERRIDES", {"save_route": False})
    check_backend("triton", case, device=DEVICE, dtype=dtype)
    assert shapes and all(shape == (0,) for shape in shapes), shapes


def test_no_routes_without_a_backward_pass(monkeypatch):
    """The forward saves routes only when a backward pass may follow: not under no_grad, nor when no input
    requires a gradient; the values are the same either way."""
    from egma_kernels import triton_backend as tb

    shapes = []
    route_shape = tb._route_shape
    monkeypatch.setattr(tb, "_route_shape", lambda *a: shapes.append(route_shape(*a)) or shapes[-1])
    inputs = make_inputs([3, 1, 2], 5, 16, seed=21, gaze="mixed", dtype=torch.float32)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    loss = lambda: ek.fine_grained_loss(**args, backend="triton")
    plain = loss()  # nothing requires a gradient
    args["patch_emb"].requires_grad_(True)
    with torch.no_grad():
        no_grad = loss()
    assert shapes == [(0,), (0,)], shapes
    shapes.clear()
    with_grad = loss()
    assert shapes == [(3, 3, 5)], shapes
    assert plain.item() == no_grad.item() == with_grad.item()


def test_route_budget_rule():
    """Routes are saved while B*B*P bytes fit in the gradients' bytes; not for float64 on a GPU."""
    from egma_kernels import triton_backend as tb

    patch = torch.empty(40, 49, 512, device="meta")
    assert tb._route_shape(patch, 233, 10) == (40, 40, 49)  # 77 KB of routes against 4.5 MB of gradients
    big = torch.empty(4096, 49, 64, device="meta")
    assert tb._route_shape(big, 20000, 10) == (0,)  # 822 MB of routes against 56 MB of gradients
    assert tb._route_dtype(128) == torch.uint8 and tb._route_dtype(129) == torch.int16


def test_dot_precisions_on_a_gpu(monkeypatch):
    """On a GPU (not the interpreter): float32 products in 3xTF32 unless TF32 is allowed; 16-bit inputs'
    backward gradient products in one TF32 pass; float64 in IEEE. The AOT check compiles these."""
    from egma_kernels import triton_backend as tb

    monkeypatch.setattr(tb, "interpreting", lambda: False)
    rule = lambda dtype, matmul: (lambda c: (c["DOT_PRECISION"], c["grad_precision"]))(
        tb.launch_config.__wrapped__(dtype, 49, 512, 10, 40, tb.DEFAULT_SHARED_MEMORY, matmul))
    assert rule(torch.float32, "highest") == ("tf32x3", "tf32x3")
    assert rule(torch.float32, "high") == ("tf32", "tf32")
    assert rule(torch.bfloat16, "highest") == ("tf32x3", "tf32")
    assert rule(torch.float16, "high") == ("tf32", "tf32")
    assert rule(torch.float64, "highest") == ("ieee", "ieee")


def test_patch_grid_of_1024():
    """Issue 3's largest patch grid (P=1024: 32 patch blocks, P x P mapping logits) in float64."""
    check_backend("triton", Case((2, 3), P=1024, D=16, gaze="mixed", egma_compat=True, seed=17),
                  device=DEVICE, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_randomised_cases(seed):
    g = torch.Generator().manual_seed(500 + seed)
    B = int(torch.randint(1, 6, (1,), generator=g))
    lengths = tuple(torch.randint(1, 9, (B,), generator=g).tolist())
    case = Case(
        lengths,
        P=int(torch.randint(1, 40, (1,), generator=g)),
        D=int(torch.randint(1, 50, (1,), generator=g)),
        gaze=["none", "all", "mixed"][seed % 3] if B > 1 else "all",
        egma_compat=bool(seed % 2),
        seed=seed,
        options=dict(alpha=float(torch.rand((), generator=g)), map_threshold=float(torch.rand((), generator=g))),
    )
    check_backend("triton", case, device=DEVICE, dtype=torch.float64)


@pytest.mark.parametrize("num_images,lengths", [(5, (2, 3, 1)), (1, (4,)), (3, (1, 1, 1, 1, 2, 19))])
def test_filip_similarity_rectangular(num_images, lengths):
    check_filip_backend("triton", num_images, lengths, P=7, D=20, device=DEVICE, dtype=torch.float64)


def test_deterministic():
    inputs = make_inputs([3, 1, 4, 2], 9, 16, seed=3, gaze="mixed", dtype=torch.float32)
    results = []
    for _ in range(2):
        # fresh leaves per run: .to() may return the same tensor, and both runs would share one .grad
        patch = inputs["patch_emb"].to(DEVICE).detach().clone().requires_grad_(True)
        sent = inputs["sent_emb"].to(DEVICE).detach().clone().requires_grad_(True)
        args = {**{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()},
                "patch_emb": patch, "sent_emb": sent}
        loss = ek.fine_grained_loss(**args, backend="triton")
        loss.backward()
        results.append((loss.detach(), patch.grad, sent.grad))
    for a, b in zip(*results):
        assert a is not b and torch.equal(a, b)


def test_max_seqlen_argument():
    inputs = make_inputs([3, 1, 4], 5, 16, seed=4)
    expected = ek.fine_grained_loss(**inputs, backend="reference")
    # a larger bound is fine (bigger tiles), with and without value checks
    assert torch.allclose(ek.fine_grained_loss(**inputs, backend="triton", max_seqlen=40), expected, rtol=1e-10)
    assert torch.allclose(ek.fine_grained_loss(**inputs, backend="triton", validate=False), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="max_seqlen=3 is smaller than the longest report"):
        ek.fine_grained_loss(**inputs, backend="triton", max_seqlen=3)
    with pytest.raises(ValueError, match="max_seqlen must be a positive int"):
        ek.fine_grained_loss(**inputs, backend="triton", max_seqlen=0)


def test_float32_products_follow_torch_matmul_precision(monkeypatch):
    """3xTF32 (float32-accurate) by default; one TF32 pass once the user allows TF32 for float32 matmuls."""
    from egma_kernels import triton_backend as tb

    monkeypatch.setattr(tb, "interpreting", lambda: False)  # the GPU choice (the interpreter takes ieee)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert tb._config(torch.float32, 49, 512, 10)["DOT_PRECISION"] == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert tb._config(torch.float32, 49, 512, 10)["DOT_PRECISION"] == "tf32"
        assert tb._config(torch.float64, 49, 512, 10)["DOT_PRECISION"] == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)
        tb.launch_config.cache_clear()


def test_not_chosen_automatically_for_cpu_tensors():
    assert "triton" not in ek.available_backends("cpu", auto=True)
    if not ON_GPU:
        assert "triton" in ek.available_backends("cpu")  # explicitly, under the interpreter


def test_torch_compile_fullgraph():
    """Both custom ops are opaque to dynamo: a compiled training step has no graph break."""
    inputs = make_inputs([2, 3, 1], 5, 16, seed=5, gaze="mixed", dtype=torch.float32)
    inputs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}

    def step(patch, sent):
        return ek.fine_grained_loss(patch, sent, inputs["cu_seqlens"], inputs["logit_scale"], inputs["gaze"],
                                    inputs["gaze_mask"], backend="triton", max_seqlen=3)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (step, compiled):
        patch = inputs["patch_emb"].clone().requires_grad_(True)
        sent = inputs["sent_emb"].clone().requires_grad_(True)
        loss = fn(patch, sent)
        loss.backward()
        grads.append((loss.detach(), patch.grad, sent.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_opcheck():
    from egma_kernels import triton_backend as tb

    inputs = make_inputs([2, 3], 4, 16, seed=6, gaze="all", dtype=torch.float32)
    patch = inputs["patch_emb"].to(DEVICE).requires_grad_(True)
    sent = inputs["sent_emb"].to(DEVICE).requires_grad_(True)
    cu = inputs["cu_seqlens"].to(DEVICE)
    scale = inputs["logit_scale"].to(DEVICE).requires_grad_(True)
    gaze = inputs["gaze"].to(DEVICE)
    mask = torch.ones(2, dtype=torch.bool, device=DEVICE)
    for compat in (False, True):
        torch.library.opcheck(
            tb._loss_op, (patch, sent, cu, scale, gaze, mask, [0.5, 2 / 7, 1.0, 1.0, 1.0, float(compat)], compat, 3),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )  # the last option, for_backward: routes saved (1.0) or not (0.0)
    torch.library.opcheck(
        tb._filip_op, (patch, sent, cu, scale, 3),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("upstream", ["terms", "matrices", "contrastive-only", "mapping-only", "mlce-and-i2t"])
def test_gradients_through_terms_and_matrices(upstream):
    """The backward op takes any mix of upstream gradients (loss, terms, I2T/T2I), not only the loss's."""
    inputs = make_inputs([3, 1, 4, 2], 6, 16, seed=13, gaze="mixed")
    g = torch.Generator().manual_seed(14)
    w = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)

    def objective(terms):
        if upstream == "terms":
            return 0.3 * terms.contrastive + 1.7 * terms.gaze_mlce - 0.4 * terms.mapping + terms.loss
        if upstream == "matrices":
            return (terms.i2t.double().cpu() * w[0]).sum() + (terms.t2i.double().cpu() * w[1]).sum()
        if upstream == "contrastive-only":
            return terms.contrastive
        if upstream == "mapping-only":
            return terms.mapping
        return terms.gaze_mlce + (terms.i2t.double().cpu() * w[0]).sum()

    grads = []
    for backend, device, dtype in (("reference", "cpu", torch.float64), ("triton", DEVICE, torch.float64)):
        # fresh leaves per run (.to() alone may return the very same tensor, and its .grad with it)
        patch = inputs["patch_emb"].to(device, dtype).detach().clone().requires_grad_(True)
        sent = inputs["sent_emb"].to(device, dtype).detach().clone().requires_grad_(True)
        scale = inputs["logit_scale"].to(device, dtype).detach().clone().requires_grad_(True)
        terms = ek.fine_grained_loss(patch, sent, inputs["cu_seqlens"].to(device), scale, inputs["gaze"].to(device, dtype),
                                     inputs["gaze_mask"].to(device), backend=backend, return_details=True)
        objective(terms).backward()
        grads.append([patch.grad, sent.grad, scale.grad])
    for name, got, want in zip(("patch", "sent", "scale"), grads[1], grads[0]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-11, msg=lambda m: f"d/d{name}: {m}")


# ----------------------------------------------------------------------------------------------------
# GPU: the compiled kernels in every dtype, larger shapes (skipped without a GPU)
# ----------------------------------------------------------------------------------------------------


def _errors(backend, inputs, dtype, **options):
    """Max abs error of values and gradients vs the float64 reference, for ``backend`` run in ``dtype``."""
    def run(name, run_dtype):
        patch = inputs["patch_emb"].to("cuda", run_dtype).requires_grad_(True)
        sent = inputs["sent_emb"].to("cuda", run_dtype).requires_grad_(True)
        scale = inputs["logit_scale"].to("cuda", torch.float64 if run_dtype == torch.float64 else torch.float32)
        scale.requires_grad_(True)
        gaze = inputs["gaze"].to("cuda", run_dtype) if inputs["gaze"] is not None else None
        mask = inputs["gaze_mask"].to("cuda") if inputs["gaze_mask"] is not None else None
        terms = ek.fine_grained_loss(patch, sent, inputs["cu_seqlens"].to("cuda"), scale, gaze, mask, backend=name,
                                     return_details=True, **options)
        terms.loss.backward()
        return [terms.loss, terms.i2t, terms.t2i, patch.grad, sent.grad, scale.grad]

    exact = run("reference", torch.float64)
    same_dtype_ref = run("reference", dtype)
    fused = run(backend, dtype)
    err = lambda xs: [(x.double() - e).abs().max().item() for x, e in zip(xs, exact)]
    return err(fused), err(same_dtype_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("lengths_seed,B,P,D,compat", [(0, 40, 49, 512, False), (1, 64, 196, 512, True), (2, 8, 784, 256, False)])
def test_gpu_matches_reference_flash_attention_style(dtype, lengths_seed, B, P, D, compat):
    """Fused error at most twice the error of the reference run in the same dtype (plus a small floor)."""
    g = torch.Generator().manual_seed(lengths_seed)
    lengths = torch.randint(1, 11, (B,), generator=g).tolist()
    inputs = make_inputs(lengths, P, D, seed=lengths_seed, gaze="mixed")
    fused, ref = _errors("triton", inputs, dtype, egma_compat=compat)
    names = ["loss", "i2t", "t2i", "d_patch", "d_sent", "d_scale"]
    for name, f, r in zip(names, fused, ref):
        assert f <= same_dtype_bound(r, dtype), f"{name}: fused error {f:.3e} > 2 x reference error {r:.3e}"


@pytest.mark.gpu
def test_gpu_float32_with_tf32_allowed_matches_reference_under_the_same_setting():
    """set_float32_matmul_precision("high"): one TF32 pass, held to the reference run under TF32 too."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 11, (40,), generator=g).tolist()
    inputs = make_inputs(lengths, 49, 512, seed=3, gaze="mixed")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        fused, ref = _errors("triton", inputs, torch.float32)
        bounds = [same_dtype_bound(r, torch.float32) for r in ref]  # under TF32: the TF32 floor
    finally:
        torch.set_float32_matmul_precision(before)
    for name, f, r, limit in zip(["loss", "i2t", "t2i", "d_patch", "d_sent", "d_scale"], fused, ref, bounds):
        assert f <= limit, f"{name}: fused error {f:.3e} > 2 x reference error {r:.3e}"


@pytest.mark.gpu
def test_gpu_no_host_synchronisation_with_max_seqlen():
    """validate=False and max_seqlen given: forward and backward never wait for the device."""
    inputs = make_inputs([3, 1, 4, 2], 49, 64, seed=8, gaze="mixed", dtype=torch.float32)
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    args["patch_emb"].requires_grad_(True)
    for compat in (False, True):  # compile first
        ek.fine_grained_loss(**args, backend="triton", validate=False, max_seqlen=4, egma_compat=compat).backward()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for compat in (False, True):
            ek.fine_grained_loss(**args, backend="triton", validate=False, max_seqlen=4, egma_compat=compat).backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.gpu
def test_gpu_large_batch_runs_and_matches_in_float32():
    g = torch.Generator().manual_seed(9)
    lengths = torch.randint(1, 16, (512,), generator=g).tolist()
    inputs = make_inputs(lengths, 196, 128, seed=9, gaze="all", dtype=torch.float32)
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ref = ek.fine_grained_loss(**args, backend="reference", return_details=True)
    got = ek.fine_grained_loss(**args, backend="triton", return_details=True)
    for name in ("loss", "contrastive", "gaze_mlce", "mapping"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("B,P,D,max_len", [(4096, 4, 32, 3), (6, 1024, 64, 9)], ids=["B4096", "P1024"])
def test_gpu_issue_size_limits_match_reference(B, P, D, max_len):
    """The largest sizes the backend promises (B=4096 images; P=1024 patches), values and gradients in float32
    against the float64 reference."""
    g = torch.Generator().manual_seed(B + P)
    lengths = torch.randint(1, max_len + 1, (B,), generator=g).tolist()
    inputs = make_inputs(lengths, P, D, seed=11, gaze="mixed", dtype=torch.float64)
    fused, ref = _errors("triton", inputs, torch.float32)
    for name, f, r in zip(["loss", "i2t", "t2i", "d_patch", "d_sent", "d_scale"], fused, ref):
        assert f <= same_dtype_bound(r, torch.float32), f"{name}: fused error {f:.3e} > 2 x reference error {r:.3e}"
