"""Shared checks that hold a fused backend to the reference: import and call from a backend's test file.

    from backend_cases import CASES, check_backend
    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_mybackend(case):
        check_backend("mybackend", case, device="cpu", dtype=torch.float64)

Each case compares values (all six LossTerms) and gradients (patch_emb, sent_emb, logit_scale) with the
float64 reference, with every backend output buffer poisoned (NaN) before the run.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

import egma_kernels as ek
import egma_kernels._utils as utils
from egma_kernels import tolerances
from conftest import make_inputs

TERMS = ("loss", "contrastive", "gaze_mlce", "mapping", "i2t", "t2i")


@dataclass(frozen=True)
class Case:
    lengths: Tuple[int, ...]
    P: int
    D: int
    gaze: str = "all"  # none | all | mixed
    egma_compat: bool = False
    seed: int = 0
    options: dict = field(default_factory=dict, hash=False, compare=False)

    def __str__(self):
        return f"B{len(self.lengths)}-N{sum(self.lengths)}-P{self.P}-D{self.D}-{self.gaze}{'-compat' if self.egma_compat else ''}"


CASES = [
    Case((3, 1, 4, 2, 5), P=4, D=16, gaze="all"),
    Case((3, 1, 4, 2, 5), P=7, D=16, gaze="mixed", egma_compat=True, seed=1),
    Case((1, 1, 1), P=5, D=32, gaze="all", seed=2),  # one-sentence reports only: no mapping term
    Case((2, 6, 3, 1, 2, 2, 7), P=9, D=32, gaze="none", seed=3),
    Case((1,), P=1, D=16, gaze="all", seed=4),  # one image, one patch, one sentence
    Case((5, 2), P=33, D=48, gaze="mixed", seed=5, options=dict(alpha=0.3, map_threshold=0.5, weights=(0.5, 2.0, 1.5))),
    Case((17, 3, 1), P=3, D=16, gaze="all", egma_compat=True, seed=6),  # a report longer than 16 sentences
]


def _tolerance(dtype):
    return tolerances.rtol(dtype)  # stated once, in egma_kernels/tolerances.py (the self-check uses it too)


def check_backend(backend: str, case: Case, device: str = "cpu", dtype=torch.float64, rtol: Optional[float] = None):
    """Values and gradients of ``backend`` against the float64 reference on ``case``; raises AssertionError."""
    rtol = _tolerance(dtype) if rtol is None else rtol
    exact = make_inputs(list(case.lengths), case.P, case.D, seed=case.seed, gaze=case.gaze)
    if dtype in (torch.float16, torch.bfloat16):
        # Hold the backend to the float64 reference on the same rounded inputs: rounding the inputs alone
        # can flip a near-tie in a max, which no backend can be blamed for.
        for key in ("patch_emb", "sent_emb", "gaze"):
            if exact[key] is not None:
                exact[key] = exact[key].to(dtype).to(torch.float64)
    options = dict(egma_compat=case.egma_compat, **case.options)

    def run(inputs, name, run_dtype, run_device):
        leaves = {}
        args = dict(inputs)
        for key in ("patch_emb", "sent_emb"):
            leaves[key] = inputs[key].to(device=run_device, dtype=run_dtype).detach().requires_grad_(True)
            args[key] = leaves[key]
        scale_dtype = torch.float64 if run_dtype == torch.float64 else torch.float32
        leaves["logit_scale"] = inputs["logit_scale"].to(device=run_device, dtype=scale_dtype).detach().requires_grad_(True)
        args["logit_scale"] = leaves["logit_scale"]
        args["cu_seqlens"] = inputs["cu_seqlens"].to(run_device)
        if inputs["gaze"] is not None:
            args["gaze"] = inputs["gaze"].to(device=run_device, dtype=run_dtype)
        if inputs["gaze_mask"] is not None:
            args["gaze_mask"] = inputs["gaze_mask"].to(run_device)
        terms = ek.fine_grained_loss(**args, backend=name, return_details=True, **options)
        terms.loss.backward()
        return terms, {k: v.grad for k, v in leaves.items()}

    ref_terms, ref_grads = run(exact, "reference", torch.float64, "cpu")
    with utils.poisoned_outputs(True):
        terms, grads = run(exact, backend, dtype, device)

    for name in TERMS:
        got, want = getattr(terms, name), getattr(ref_terms, name)
        assert got.shape == want.shape, f"{case}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
        _assert_close(got, want, rtol, f"{case}: {name}")
    for name, want in ref_grads.items():
        got = grads[name]
        assert got is not None, f"{case}: no gradient for {name}"
        _assert_close(got, want, rtol, f"{case}: d loss / d {name}")


def _assert_close(got, want, rtol, what):
    got = got.detach().to("cpu", torch.float64)
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an output element left unwritten?)"
    err = tolerances.max_error(got, want)
    bound = rtol * max(1.0, want.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def check_filip_backend(backend: str, num_images: int, lengths, P: int, D: int, device="cpu", dtype=torch.float64, seed=0):
    """``filip_similarity`` of ``backend`` against the reference on rectangular inputs, values and gradients."""
    rtol = _tolerance(dtype)
    sents = make_inputs(list(lengths), P, D, seed=seed, gaze="none")
    patches = make_inputs([1] * num_images, P, D, seed=seed + 1, gaze="none")["patch_emb"]
    g = torch.Generator().manual_seed(seed + 2)
    w1 = torch.randn(num_images, len(lengths), generator=g, dtype=torch.float64)
    w2 = torch.randn(num_images, len(lengths), generator=g, dtype=torch.float64)

    def run(name, run_dtype, run_device):
        p = patches.detach().to(run_device, run_dtype).clone().requires_grad_(True)
        s = sents["sent_emb"].detach().to(run_device, run_dtype).clone().requires_grad_(True)
        i2t, t2i = ek.filip_similarity(p, s, sents["cu_seqlens"].to(run_device), 3.0, backend=name)
        ((i2t.double().cpu() * w1).sum() + (t2i.double().cpu() * w2).sum()).backward()
        return i2t, t2i, p.grad, s.grad

    want = run("reference", torch.float64, "cpu")
    with utils.poisoned_outputs(True):
        got = run(backend, dtype, device)
    for name, a, b in zip(("i2t", "t2i", "d/dpatch", "d/dsent"), got, want):
        _assert_close(a, b, rtol, f"filip {num_images}x{len(lengths)} {name}")
