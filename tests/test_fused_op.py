"""The op contract of the fused backends (egma_kernels/fused_op.py): eager calls skip the dispatcher, calls
that a dispatch mode must see go through the custom ops, and both give the same values and gradients."""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import egma_kernels as ek
from egma_kernels import compiled, fused_op
from conftest import make_inputs

pytestmark = pytest.mark.skipif(not compiled.extension_loaded(), reason="egma_kernels._C is not built")


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _run(inputs, mode=None):
    leaves = [inputs[k].clone().requires_grad_(True) for k in ("patch_emb", "sent_emb", "logit_scale")]
    with mode if mode is not None else contextlib.nullcontext():
        terms = ek.fine_grained_loss(leaves[0], leaves[1], inputs["cu_seqlens"], leaves[2], inputs["gaze"],
                                     inputs["gaze_mask"], backend="cpu", return_details=True)
        (terms.loss + 0.3 * terms.i2t.sum() - terms.mapping).backward()
        i2t, t2i = ek.filip_similarity(leaves[0], leaves[1], inputs["cu_seqlens"], leaves[2], backend="cpu")
        (i2t.sum() + 2 * t2i.sum()).backward()
    return [*terms, i2t, t2i] + [x.grad for x in leaves]


def test_eager_path_and_op_path_agree():
    inputs = make_inputs([3, 1, 4, 2], 5, 8, seed=31, gaze="mixed", dtype=torch.float64)
    with torch.profiler.profile() as prof:
        eager = _run(inputs)
    names = {e.name for e in prof.events()}
    assert not any(n.startswith("egma_kernels::extension_") for n in names), sorted(names)  # no op dispatched
    assert "egma_kernels::loss_fwd" in names and "egma_kernels::loss_bwd" in names  # the kernels ran
    mode = _RecordOps()
    through_op = _run(inputs, mode)
    for op in ("extension_loss", "extension_loss_backward", "extension_filip", "extension_filip_backward"):
        assert f"egma_kernels.{op}.default" in mode.ops, mode.ops
    for a, b in zip(eager, through_op):
        assert torch.equal(a, b)


def test_saved_state_follows_the_save_rule():
    """The launchers are told to save their routes only when a backward pass may follow."""
    inputs = make_inputs([3, 1, 2], 4, 8, seed=32, gaze="all", dtype=torch.float64)
    seen = []
    original = fused_op._LossOps.forward

    def spy(self, *args):
        seen.append(bool(args[6][5]))  # options[5]: save
        return original(self, *args)

    fused_op._LossOps.forward = spy
    try:
        p = inputs["patch_emb"].clone().requires_grad_(True)
        args = (inputs["sent_emb"], inputs["cu_seqlens"], 5.0, inputs["gaze"])
        with torch.no_grad():
            ek.fine_grained_loss(p, *args, backend="cpu")
        ek.fine_grained_loss(inputs["patch_emb"], *args, backend="cpu")
        ek.fine_grained_loss(p, *args, backend="cpu")
    finally:
        fused_op._LossOps.forward = original
    assert seen == [False, False, True]
