"""The vectorised reference against the literal loop of docs/loss.md (tests/spec_loop.py), in float64."""

import pytest
import torch

import egma_kernels as ek
from conftest import make_inputs
from spec_loop import filip_loop, loss_loop

TERMS = ("loss", "contrastive", "gaze_mlce", "mapping", "i2t", "t2i")
RTOL = 1e-10


def _random_lengths(B, seed, max_len=6, ones=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (B,), generator=g).tolist()
    if ones:
        lengths[0] = 1  # always at least one one-sentence report
    return lengths


def _close(actual, expected, rtol=RTOL, what=""):
    assert actual.dtype == expected.dtype, what
    err = (actual - expected).abs().max().item()
    bound = rtol * max(1.0, expected.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def _run_both(inputs, **options):
    leaves = {}
    for name in ("patch_emb", "sent_emb", "logit_scale"):
        leaves[name] = [inputs[name].clone().requires_grad_(True) for _ in range(2)]
    ours = ek.fine_grained_loss(
        leaves["patch_emb"][0], leaves["sent_emb"][0], inputs["cu_seqlens"], leaves["logit_scale"][0],
        inputs["gaze"], inputs["gaze_mask"], return_details=True, backend="reference", **options,
    )
    loop_options = dict(options)
    theirs = loss_loop(
        leaves["patch_emb"][1], leaves["sent_emb"][1], inputs["cu_seqlens"], leaves["logit_scale"][1],
        inputs["gaze"], inputs["gaze_mask"],
        alpha=loop_options.pop("alpha", None), theta=loop_options.pop("map_threshold", 2 / 7),
        weights=loop_options.pop("weights", (1, 1, 1)), egma_compat=loop_options.pop("egma_compat", False),
    )
    return ours, theirs, leaves


CASES = [
    # (lengths, P, D, gaze, egma_compat)
    ([3, 1, 4, 2, 5], 4, 7, "all", False),
    ([3, 1, 4, 2, 5], 4, 7, "all", True),
    ([2, 2, 6], 49, 33, "mixed", False),
    ([2, 2, 6], 49, 33, "mixed", True),
    ([1, 5, 3, 1], 1, 16, "none", False),
    ([1, 5, 3, 1], 1, 16, "none", True),
    ([1], 4, 5, "all", False),  # one image, one one-sentence report
    ([1, 1, 1], 4, 9, "all", False),  # no report takes part in the mapping term
    ([4, 4, 4], 9, 12, "mixed", True),  # all reports the same length: compat padding is a no-op
]


@pytest.mark.parametrize("lengths,P,D,gaze,compat", CASES)
def test_values_and_gradients_match_spec_loop(lengths, P, D, gaze, compat):
    inputs = make_inputs(lengths, P, D, seed=len(lengths) * 100 + P, gaze=gaze)
    ours, theirs, leaves = _run_both(inputs, egma_compat=compat)
    for name in TERMS:
        _close(getattr(ours, name), theirs[name], what=name)
    ours.loss.backward()
    theirs["loss"].backward()
    for name, (a, b) in leaves.items():
        _close(a.grad, b.grad, what=f"d loss / d {name}")


@pytest.mark.parametrize("seed", range(6))
def test_randomised_cases_match_spec_loop(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    B = int(torch.randint(1, 7, (1,), generator=g))
    P = [1, 4, 49, 7, 16, 3][seed]
    D = int(torch.randint(3, 40, (1,), generator=g))
    lengths = _random_lengths(B, seed, ones=seed % 2 == 0)
    gaze = ["none", "all", "mixed"][seed % 3] if B > 1 else "all"
    options = dict(
        egma_compat=bool(seed % 2),
        alpha=float(torch.rand((), generator=g)),
        map_threshold=float(torch.rand((), generator=g)) * 0.8,
        weights=(0.7, 1.3, 0.4),
    )
    inputs = make_inputs(lengths, P, D, seed=seed, gaze=gaze, scale=float(1 + 20 * torch.rand((), generator=g)))
    ours, theirs, leaves = _run_both(inputs, **options)
    for name in TERMS:
        _close(getattr(ours, name), theirs[name], what=name)
    ours.loss.backward()
    theirs["loss"].backward()
    for name, (a, b) in leaves.items():
        _close(a.grad, b.grad, what=f"d loss / d {name}")


def test_each_term_moves_the_total():
    """The weights really weigh the terms (a test that would catch a dropped or swapped term)."""
    inputs = make_inputs([3, 2, 4], 6, 8, seed=5, gaze="all")
    terms = ek.fine_grained_loss(**inputs, return_details=True)
    assert all(float(v) > 0 for v in (terms.contrastive, terms.gaze_mlce, terms.mapping))
    for i, name in enumerate(("contrastive", "gaze_mlce", "mapping")):
        w = [0.0, 0.0, 0.0]
        w[i] = 2.0
        only = ek.fine_grained_loss(**inputs, weights=w)
        _close(only, 2.0 * getattr(terms, name), what=name)


def test_ties_for_the_min_max():
    """Reports whose sentences are all equal and images whose patches are all equal: min-max is all ones."""
    inputs = make_inputs([3, 2, 4, 1], 5, 6, seed=7, gaze="mixed")
    inputs["sent_emb"][0:3] = inputs["sent_emb"][0]  # report 0: three identical sentences
    inputs["patch_emb"][2] = inputs["patch_emb"][2, 0]  # image 2: five identical patches
    for compat in (False, True):
        ours = ek.fine_grained_loss(**inputs, egma_compat=compat, return_details=True)
        theirs = loss_loop(**inputs, egma_compat=compat)
        for name in TERMS:
            _close(getattr(ours, name), theirs[name], what=name)


def test_without_gaze_the_mlce_term_is_zero_and_gaze_mask_all_false_matches():
    inputs = make_inputs([2, 3, 1], 4, 8, seed=3, gaze="all")
    with_gaze_off = ek.fine_grained_loss(**{**inputs, "gaze_mask": torch.zeros(3, dtype=torch.bool)}, return_details=True)
    no_gaze = ek.fine_grained_loss(**{**inputs, "gaze": None}, return_details=True)
    assert float(no_gaze.gaze_mlce) == 0.0
    for name in TERMS:
        _close(getattr(with_gaze_off, name), getattr(no_gaze, name), what=name)


def test_gaze_gets_no_gradient_and_is_not_modified():
    inputs = make_inputs([2, 3], 4, 8, seed=4, gaze="all")
    gaze = inputs["gaze"].clone().requires_grad_(True)
    before = gaze.detach().clone()
    patch = inputs["patch_emb"].clone().requires_grad_(True)
    loss = ek.fine_grained_loss(**{**inputs, "gaze": gaze, "patch_emb": patch})
    loss.backward()
    assert patch.grad is not None and gaze.grad is None
    assert torch.equal(gaze.detach(), before)


@pytest.mark.parametrize("compat", [False, True])
def test_gradcheck(compat):
    inputs = make_inputs([2, 1, 3], 3, 5, seed=11, gaze="mixed", scale=4.0)
    cu, gaze, mask = inputs["cu_seqlens"], inputs["gaze"], inputs["gaze_mask"]

    def f(patch, sent, scale):
        return ek.fine_grained_loss(patch, sent, cu, scale, gaze, mask, egma_compat=compat)

    args = tuple(inputs[n].clone().requires_grad_(True) for n in ("patch_emb", "sent_emb", "logit_scale"))
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_filip_similarity():
    inputs = make_inputs([2, 3], 3, 4, seed=12, gaze="none", scale=3.0)
    cu = inputs["cu_seqlens"]
    patch = make_inputs([1] * 4, 3, 4, seed=13)["patch_emb"].requires_grad_(True)
    sent = inputs["sent_emb"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, s: ek.filip_similarity(p, s, cu, 3.0), (patch, sent))


@pytest.mark.parametrize("M,R", [(7, 3), (2, 5), (1, 1)])
def test_filip_similarity_rectangular(M, R):
    lengths = _random_lengths(R, seed=M * 10 + R)
    sents = make_inputs(lengths, 5, 11, seed=M + R)
    patches = make_inputs([1] * M, 5, 11, seed=M + R + 1)["patch_emb"]
    i2t, t2i = ek.filip_similarity(patches, sents["sent_emb"], sents["cu_seqlens"], 2.5)
    assert i2t.shape == t2i.shape == (M, R)
    ref_i2t, ref_t2i = filip_loop(patches, sents["sent_emb"], sents["cu_seqlens"], 2.5)
    _close(i2t, ref_i2t, what="i2t")
    _close(t2i, ref_t2i, what="t2i")


def test_filip_similarity_is_the_loss_matrices():
    inputs = make_inputs([3, 1, 2], 4, 6, seed=21)
    terms = ek.fine_grained_loss(**inputs, return_details=True)
    i2t, t2i = ek.filip_similarity(inputs["patch_emb"], inputs["sent_emb"], inputs["cu_seqlens"], inputs["logit_scale"])
    _close(i2t, terms.i2t, what="i2t")
    _close(t2i, terms.t2i, what="t2i")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_inputs_give_float32_close_to_float64(dtype, tol):
    exact = make_inputs([3, 2, 5, 1], 16, 32, seed=31, gaze="mixed")
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "logit_scale" else v)
           for k, v in exact.items()}
    low["logit_scale"] = exact["logit_scale"].float()
    ref = ek.fine_grained_loss(**exact, return_details=True)
    got = ek.fine_grained_loss(**low, return_details=True)
    for name in TERMS:
        value = getattr(got, name)
        assert value.dtype == torch.float32, name
        expected = getattr(ref, name)
        err = (value.double() - expected).abs().max().item()
        assert err <= tol * max(1.0, expected.abs().max().item()), f"{name}: {err}"
    # the gradient comes back in the input dtype
    patch = low["patch_emb"].clone().requires_grad_(True)
    ek.fine_grained_loss(**{**low, "patch_emb": patch}).backward()
    assert patch.grad.dtype == dtype and torch.isfinite(patch.grad.float()).all()


def test_float64_stays_float64():
    inputs = make_inputs([2, 2], 3, 4, seed=41)
    terms = ek.fine_grained_loss(**inputs, return_details=True)
    assert all(getattr(terms, n).dtype == torch.float64 for n in TERMS)


def test_non_contiguous_inputs():
    inputs = make_inputs([2, 3, 1], 6, 10, seed=51, gaze="all")
    expected = ek.fine_grained_loss(**inputs, return_details=True)
    patch_t = inputs["patch_emb"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    sent_big = torch.zeros(inputs["sent_emb"].shape[0], 20, dtype=torch.float64)
    sent_big[:, ::2] = inputs["sent_emb"]
    gaze_t = inputs["gaze"].t().contiguous().t()
    got = ek.fine_grained_loss(patch_t, sent_big[:, ::2], inputs["cu_seqlens"], inputs["logit_scale"], gaze_t,
                               return_details=True)
    assert not patch_t.is_contiguous() and not sent_big[:, ::2].is_contiguous()
    for name in TERMS:
        _close(getattr(got, name), getattr(expected, name), rtol=1e-12, what=name)
