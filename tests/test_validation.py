"""Every refusal of docs/loss.md (section 9): a clear error, raised before anything is computed."""

import pytest
import torch

import egma_kernels as ek
from conftest import make_inputs


@pytest.fixture
def good():
    return make_inputs([2, 3, 1], 4, 8, seed=0, gaze="mixed")


def _with(good, **changes):
    return {**good, **changes}


BAD_CASES = [
    # (description, changes as a function of the good inputs, error type, message fragment)
    ("patch rank", lambda g: dict(patch_emb=g["patch_emb"][0]), ValueError, "patch_emb must have shape (B, P, D)"),
    ("sent rank", lambda g: dict(sent_emb=g["sent_emb"][None]), ValueError, "sent_emb must have shape (N, D)"),
    ("D mismatch", lambda g: dict(sent_emb=g["sent_emb"][:, :5]), ValueError, "same embedding size D=8"),
    ("no sentences", lambda g: dict(sent_emb=g["sent_emb"][:0]), ValueError, "at least one sentence"),
    ("int patches", lambda g: dict(patch_emb=g["patch_emb"].long()), TypeError, "patch_emb must be float16"),
    ("dtype mismatch", lambda g: dict(sent_emb=g["sent_emb"].float()), TypeError, "differs from patch_emb dtype"),
    ("patch not tensor", lambda g: dict(patch_emb=g["patch_emb"].tolist()), TypeError, "patch_emb must be a torch.Tensor"),
    ("cu float", lambda g: dict(cu_seqlens=g["cu_seqlens"].float()), TypeError, "cu_seqlens must be int32"),
    ("cu 2-D", lambda g: dict(cu_seqlens=g["cu_seqlens"][None]), ValueError, "cu_seqlens must be 1-D"),
    ("cu length", lambda g: dict(cu_seqlens=g["cu_seqlens"][:-1]), ValueError, "B+1 = 4 entries"),
    ("cu start", lambda g: dict(cu_seqlens=torch.tensor([1, 2, 5, 6], dtype=torch.int32)), ValueError, "cu_seqlens[0] must be 0"),
    ("cu end", lambda g: dict(cu_seqlens=torch.tensor([0, 2, 4, 5], dtype=torch.int32)), ValueError, "must equal the number of sentences N=6"),
    ("cu decreasing", lambda g: dict(cu_seqlens=torch.tensor([0, 4, 3, 6], dtype=torch.int32)), ValueError, "non-decreasing"),
    ("empty report", lambda g: dict(cu_seqlens=torch.tensor([0, 2, 2, 6], dtype=torch.int32)), ValueError, "at least one sentence"),
    ("scale zero", lambda g: dict(logit_scale=0.0), ValueError, "logit_scale must be finite and > 0"),
    ("scale negative tensor", lambda g: dict(logit_scale=torch.tensor(-1.0)), ValueError, "logit_scale must be finite and > 0"),
    ("scale nan", lambda g: dict(logit_scale=torch.tensor(float("nan"))), ValueError, "logit_scale must be finite and > 0"),
    ("scale inf", lambda g: dict(logit_scale=float("inf")), ValueError, "logit_scale must be finite and > 0"),
    ("scale vector", lambda g: dict(logit_scale=torch.ones(2)), ValueError, "logit_scale must be a scalar"),
    ("scale int tensor", lambda g: dict(logit_scale=torch.tensor(3)), TypeError, "floating-point"),
    ("scale string", lambda g: dict(logit_scale="10"), TypeError, "logit_scale must be a positive number"),
    ("gaze shape", lambda g: dict(gaze=g["gaze"][:, :3]), ValueError, "gaze must have shape (N, P) = (6, 4)"),
    ("gaze int", lambda g: dict(gaze=(g["gaze"] > 0).int()), TypeError, "gaze must be a floating-point"),
    ("gaze negative", lambda g: dict(gaze=g["gaze"] - 1), ValueError, "gaze must be >= 0"),
    ("gaze nan", lambda g: dict(gaze=g["gaze"].index_fill(0, torch.tensor([1]), float("nan"))), ValueError, "gaze must be finite"),
    ("gaze inf", lambda g: dict(gaze=g["gaze"].index_fill(0, torch.tensor([1]), float("inf"))), ValueError, "gaze must be finite"),
    ("mask without gaze", lambda g: dict(gaze=None), ValueError, "gaze_mask was given without gaze"),
    ("mask shape", lambda g: dict(gaze_mask=torch.ones(2, dtype=torch.bool)), ValueError, "gaze_mask must have shape (B,) = (3,)"),
    ("mask dtype", lambda g: dict(gaze_mask=torch.ones(3)), TypeError, "gaze_mask must be a bool tensor"),
]


@pytest.mark.parametrize("what,change,error,fragment", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_refused(good, what, change, error, fragment):
    with pytest.raises(error) as info:
        ek.fine_grained_loss(**_with(good, **change(good)))
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "option,value,fragment",
    [
        ("alpha", 1.5, "alpha must be a number in [0, 1]"),
        ("alpha", "0.5", "alpha must be a number in [0, 1]"),
        ("map_threshold", -0.1, "map_threshold must be a number in [0, 1]"),
        ("weights", (1.0, 1.0), "weights must be three finite numbers"),
        ("weights", (1.0, float("nan"), 1.0), "weights must be three finite numbers"),
    ],
)
def test_bad_options_are_refused(good, option, value, fragment):
    with pytest.raises(ValueError) as info:
        ek.fine_grained_loss(**good, **{option: value})
    assert fragment in str(info.value)


def test_offset_error_shows_the_offsets(good):
    with pytest.raises(ValueError, match=r"got cu_seqlens = \[0, 2, 2, 6\]"):
        ek.fine_grained_loss(**_with(good, cu_seqlens=torch.tensor([0, 2, 2, 6], dtype=torch.int32)))


def test_nothing_is_computed_on_bad_input(good, monkeypatch):
    called = []
    import egma_kernels.backends as backends

    original = backends._REGISTRY["reference"]
    monkeypatch.setitem(
        backends._REGISTRY, "reference", original.__class__(**{**original.__dict__, "loss": lambda *a, **k: called.append(1)})
    )
    with pytest.raises(ValueError):
        ek.fine_grained_loss(**_with(good, gaze=good["gaze"] - 1))
    assert called == []


def test_value_checks_can_be_switched_off(good, monkeypatch):
    bad = _with(good, gaze=good["gaze"] - 1)
    ek.fine_grained_loss(**bad, validate=False)  # computes, no error
    monkeypatch.setenv("EGMA_KERNELS_VALIDATE", "0")
    ek.fine_grained_loss(**bad)
    with pytest.raises(ValueError):
        ek.fine_grained_loss(**bad, validate=True)


def test_int64_offsets_are_accepted(good):
    a = ek.fine_grained_loss(**good)
    b = ek.fine_grained_loss(**_with(good, cu_seqlens=good["cu_seqlens"].long()))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change,error,fragment",
    [
        (lambda g: dict(cu_seqlens=torch.tensor([0, 2, 7], dtype=torch.int32)), ValueError, "number of sentences N=6"),
        (lambda g: dict(sent_emb=g["sent_emb"][:, :3]), ValueError, "same embedding size"),
        (lambda g: dict(logit_scale=-2.0), ValueError, "logit_scale"),
    ],
)
def test_filip_similarity_refuses_bad_input(good, change, error, fragment):
    args = dict(patch_emb=good["patch_emb"], sent_emb=good["sent_emb"], cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32), logit_scale=1.0)
    args.update(change(good))
    with pytest.raises(error, match=fragment):
        ek.filip_similarity(**args)


def test_unknown_and_unavailable_backends(good, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'nope'; known backends: .*reference"):
        ek.fine_grained_loss(**good, backend="nope")
    monkeypatch.setenv("EGMA_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ek.fine_grained_loss(**good)
    monkeypatch.setenv("EGMA_KERNELS_BACKEND", "reference")
    ek.fine_grained_loss(**good)

    import egma_kernels.backends as backends

    backends.register_backend(backends.Backend("missing", None, None, ("cpu",), is_available=lambda: False))
    try:
        with pytest.raises(RuntimeError, match="backend 'missing' is not available"):
            ek.fine_grained_loss(**good, backend="missing")
        assert "missing" not in ek.available_backends()
        assert "missing" in ek.known_backends()
    finally:
        del backends._REGISTRY["missing"]
    backends.register_backend(backends.Backend("gpu-only", None, None, ("cuda",)))
    try:
        with pytest.raises(ValueError, match="backend 'gpu-only' runs on cuda tensors, but the inputs are on cpu"):
            ek.fine_grained_loss(**good, backend="gpu-only")
    finally:
        del backends._REGISTRY["gpu-only"]
