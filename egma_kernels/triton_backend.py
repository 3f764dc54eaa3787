"""The ``"triton"`` backend: fused Triton kernels (``triton_kernels.py``) registered as PyTorch custom ops.

One custom op computes everything that touches the ``(B*P) x N`` similarities (``I2T``, ``T2I`` and the
per-report gaze-MLCE and mapping terms); its backward is a second op. Autograd and fake (meta)
implementations are registered on the ops, so ``torch.compile(fullgraph=True)`` sees two opaque ops and
no graph break. The remaining arithmetic is a handful of ``B``-sized torch ops (the cross-entropies and
the masked means), differentiated by autograd.

On CUDA tensors the kernels run on the GPU. With ``TRITON_INTERPRET=1`` set before import, Triton's
interpreter runs them on CPU tensors (float32/float64): that is how the tests exercise them without a GPU.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _utils
from ._validation import accumulation_dtype as _acc_dtype
from .backends import Backend, register_backend
from .reference import LossTerms, report_of_sentence

try:
    import triton
    import triton.language as tl

    from . import triton_kernels as K

    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the installation
    triton = None
    _TRITON_IMPORT_ERROR = exc


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    if triton is None:
        return False
    return interpreting() or torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------


def _pow2(x: int, at_least: int = 16) -> int:
    return max(at_least, triton.next_power_of_2(int(x)))


def _config(dtype: torch.dtype, P: int, D: int, max_seqlen: int) -> dict:
    """Tile sizes and precision of every kernel for one problem shape (the AOT check uses it too)."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    if interpreting() or dtype == torch.float64:
        precision = "ieee"
    else:
        # fp32 operands (the float32 forward, every backward product): 3xTF32 keeps float32 accuracy on
        # tensor cores. bf16/fp16 forward operands ignore it (exact products, float32 accumulation).
        precision = "tf32x3"
    wide = 2 if dtype == torch.float64 else 1  # float64 tiles take twice the shared memory
    block_s = _pow2(max_seqlen)
    d_pad = _pow2(D)
    # The [patch block, D] operand of the sentence-gradient kernel lives in shared memory: keep it
    # near 64 KiB (H100/H200 allow 227 KiB per block).
    sent_block_p = max(16, min(64, 16384 // (d_pad * wide)))
    return dict(
        ACC=acc,
        DOT_PRECISION=precision,
        BLOCK_S=block_s,
        BLOCK_D=min(64 // wide, _pow2(D)),
        D_PAD=d_pad,
        fwd_block_p=min(64 // wide, _pow2(P)),
        bwd_patch_rows=16,
        bwd_sent_block_p=sent_block_p,
        matched_block_p=min(64 // wide, _pow2(P)),
    )


def _check_device(*tensors: Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(
                "the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                f"got a tensor on {t.device}"
            )


# ---------------------------------------------------------------------------------------------------
# Kernel launches (plain functions: the custom ops below wrap them)
# ---------------------------------------------------------------------------------------------------


def _launch_filip_fwd(patch, sent, cu, scale, smax, max_seqlen, *, egma_compat, write_own):
    num_images, P, D = patch.shape
    N = sent.shape[0]
    R = cu.shape[0] - 1
    cfg = _config(patch.dtype, P, D, max_seqlen)
    acc = _acc_dtype(patch.dtype)
    i2t = _utils.new_output((num_images, R), acc, patch.device)
    t2i = _utils.new_output((num_images, R), acc, patch.device)
    best_patch = _utils.new_output((num_images, N), torch.int32, patch.device)
    own = _utils.new_output((N, P), acc, patch.device) if write_own else i2t  # i2t: an unused placeholder
    K._filip_fwd_kernel[(num_images, R)](
        patch, sent, cu, scale, smax, i2t, t2i, best_patch, own,
        P, D, N, R, patch.stride(0), patch.stride(1), sent.stride(0),
        EGMA_COMPAT=egma_compat, WRITE_OWN=write_own,
        BLOCK_P=cfg["fwd_block_p"], BLOCK_S=cfg["BLOCK_S"], BLOCK_D=cfg["BLOCK_D"],
        ACC=cfg["ACC"], DOT_PRECISION=cfg["DOT_PRECISION"],
    )
    return i2t, t2i, best_patch, own


def _num_slices(programs: int, items: int, bytes_per_slice: int, device: torch.device) -> int:
    """How many slices to split a backward kernel's sequential loop into, for enough programs in flight.

    Each slice writes its own partial buffer (summed afterwards in a fixed order), so slicing costs memory:
    at most 256 MiB of partials. Under the interpreter a "device" of 2 units keeps the sliced path tested.
    """
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    wanted = triton.cdiv(4 * units, max(1, programs))
    return int(max(1, min(wanted, items, 16, (256 << 20) // max(1, bytes_per_slice))))


def _launch_filip_bwd(g_i2t, g_t2i, d_own, patch, sent, cu, scale, smax, best_patch, max_seqlen, *, egma_compat):
    num_images, P, D = patch.shape
    N = sent.shape[0]
    R = cu.shape[0] - 1
    cfg = _config(patch.dtype, P, D, max_seqlen)
    acc = _acc_dtype(patch.dtype)
    elem = torch.finfo(acc).bits // 8
    has_own = d_own is not None
    d_own = d_own if has_own else g_i2t  # placeholder pointer, never read
    g_i2t = g_i2t.to(acc).contiguous()
    g_t2i = g_t2i.to(acc).contiguous()
    common = dict(
        EGMA_COMPAT=egma_compat, HAS_OWN_GRAD=has_own, BLOCK_S=cfg["BLOCK_S"], BLOCK_D=cfg["BLOCK_D"],
        D_PAD=cfg["D_PAD"], ACC=cfg["ACC"], DOT_PRECISION=cfg["DOT_PRECISION"],
    )
    # dpatch: one program per (image, block of patch rows, slice of the reports); 16 rows keep the
    # [rows, D] accumulator small.
    block_rows = cfg["bwd_patch_rows"]
    row_blocks = triton.cdiv(P, block_rows)
    slices = _num_slices(num_images * row_blocks, R, num_images * P * D * elem, patch.device)
    reps_per_slice = triton.cdiv(R, slices)
    slices = triton.cdiv(R, reps_per_slice)
    d_patch = _utils.new_output((slices, num_images, P, D), acc, patch.device)
    d_scale_parts = _utils.new_output((slices * num_images * row_blocks,), acc, patch.device)
    K._filip_bwd_patch_kernel[(num_images, row_blocks, slices)](
        patch, sent, cu, scale, smax, g_i2t, g_t2i, best_patch, d_own, d_patch, d_scale_parts,
        P, D, N, R, reps_per_slice, patch.stride(0), patch.stride(1), sent.stride(0),
        BLOCK_P=block_rows, **common,
    )
    # dsent: one program per (report, slice of the images).
    slices_s = _num_slices(R, num_images, N * D * elem, patch.device)
    images_per_slice = triton.cdiv(num_images, slices_s)
    slices_s = triton.cdiv(num_images, images_per_slice)
    d_sent = _utils.new_output((slices_s, N, D), acc, patch.device)
    K._filip_bwd_sent_kernel[(R, slices_s)](
        patch, sent, cu, scale, smax, g_i2t, g_t2i, best_patch, d_own, d_sent,
        num_images, P, D, N, R, images_per_slice, patch.stride(0), patch.stride(1), sent.stride(0),
        BLOCK_P=cfg["bwd_sent_block_p"], **common,
    )
    return d_patch.sum(dim=0), d_sent.sum(dim=0), d_scale_parts.sum()


def _launch_matched_fwd(own, gaze, gaze_mask, cu, threshold, max_seqlen, P):
    B = cu.shape[0] - 1
    N = own.shape[0]
    cfg = _config(own.dtype, P, 16, max_seqlen)
    acc = own.dtype
    s2p, p2s, clip_p, clip_s = (_utils.new_output((B,), acc, own.device) for _ in range(4))
    row_stats = _utils.new_output((N, 7), acc, own.device)
    z1_row_lse = _utils.new_output((B, P), acc, own.device)
    z1_col_lse = _utils.new_output((B, P), acc, own.device)
    has_gaze = gaze is not None
    K._matched_fwd_kernel[(B,)](
        own, gaze if has_gaze else own, gaze_mask if has_gaze else cu, cu,
        s2p, p2s, clip_p, clip_s, row_stats, z1_row_lse, z1_col_lse,
        P, float(threshold), HAS_GAZE=has_gaze,
        BLOCK_P=cfg["matched_block_p"], BLOCK_S=cfg["BLOCK_S"], ACC=cfg["ACC"], DOT_PRECISION=cfg["DOT_PRECISION"],
    )
    return s2p, p2s, clip_p, clip_s, row_stats, z1_row_lse, z1_col_lse


def _launch_matched_bwd(grads, own, gaze, gaze_mask, cu, row_stats, z1_row_lse, z1_col_lse, threshold, max_seqlen):
    B = cu.shape[0] - 1
    N, P = own.shape
    cfg = _config(own.dtype, P, 16, max_seqlen)
    d_own = _utils.new_output((N, P), own.dtype, own.device)
    has_gaze = gaze is not None
    g_s2p, g_p2s, g_clip_p, g_clip_s = (g.to(own.dtype).contiguous() for g in grads)
    K._matched_bwd_kernel[(B,)](
        own, gaze if has_gaze else own, gaze_mask if has_gaze else cu, cu,
        g_s2p, g_p2s, g_clip_p, g_clip_s, row_stats, z1_row_lse, z1_col_lse, d_own,
        P, float(threshold), HAS_GAZE=has_gaze,
        BLOCK_P=cfg["matched_block_p"], BLOCK_S=cfg["BLOCK_S"], ACC=cfg["ACC"], DOT_PRECISION=cfg["DOT_PRECISION"],
    )
    return d_own


# ---------------------------------------------------------------------------------------------------
# Custom ops: the loss (forward, backward) and the rectangular similarity (forward, backward)
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("egma_kernels::triton_loss_fwd", mutates_args=())
def _loss_fwd_op(
    patch: Tensor, sent: Tensor, cu: Tensor, scale: Tensor, smax: Tensor,
    gaze: Optional[Tensor], gaze_mask: Optional[Tensor],
    threshold: float, egma_compat: bool, max_seqlen: int,
) -> List[Tensor]:
    i2t, t2i, best_patch, own = _launch_filip_fwd(
        patch, sent, cu, scale, smax, max_seqlen, egma_compat=egma_compat, write_own=True
    )
    s2p, p2s, clip_p, clip_s, row_stats, z1_row, z1_col = _launch_matched_fwd(
        own, gaze, gaze_mask, cu, threshold, max_seqlen, patch.shape[1]
    )
    return [i2t, t2i, s2p, p2s, clip_p, clip_s, best_patch, own, row_stats, z1_row, z1_col]


@_loss_fwd_op.register_fake
def _(patch, sent, cu, scale, smax, gaze, gaze_mask, threshold, egma_compat, max_seqlen):
    B, P, _ = patch.shape
    N = sent.shape[0]
    acc = _acc_dtype(patch.dtype)
    new = lambda *shape, dtype=acc: patch.new_empty(shape, dtype=dtype)
    return [new(B, B), new(B, B), new(B), new(B), new(B), new(B), new(B, N, dtype=torch.int32),
            new(N, P), new(N, 7), new(B, P), new(B, P)]


@torch.library.custom_op("egma_kernels::triton_loss_bwd", mutates_args=())
def _loss_bwd_op(
    g_i2t: Tensor, g_t2i: Tensor, g_s2p: Tensor, g_p2s: Tensor, g_clip_p: Tensor, g_clip_s: Tensor,
    patch: Tensor, sent: Tensor, cu: Tensor, scale: Tensor, smax: Tensor,
    gaze: Optional[Tensor], gaze_mask: Optional[Tensor],
    best_patch: Tensor, own: Tensor, row_stats: Tensor, z1_row: Tensor, z1_col: Tensor,
    threshold: float, egma_compat: bool, max_seqlen: int,
) -> List[Tensor]:
    d_own = _launch_matched_bwd(
        (g_s2p, g_p2s, g_clip_p, g_clip_s), own, gaze, gaze_mask, cu, row_stats, z1_row, z1_col, threshold, max_seqlen
    )
    d_patch, d_sent, d_scale = _launch_filip_bwd(
        g_i2t, g_t2i, d_own, patch, sent, cu, scale, smax, best_patch, max_seqlen, egma_compat=egma_compat
    )
    return [d_patch.to(patch.dtype), d_sent.to(sent.dtype), d_scale.to(scale.dtype)]


@_loss_bwd_op.register_fake
def _(g_i2t, g_t2i, g_s2p, g_p2s, g_clip_p, g_clip_s, patch, sent, cu, scale, smax, gaze, gaze_mask,
      best_patch, own, row_stats, z1_row, z1_col, threshold, egma_compat, max_seqlen):
    return [torch.empty_like(patch), torch.empty_like(sent), torch.empty_like(scale)]


def _loss_setup_context(ctx, inputs, output):
    patch, sent, cu, scale, smax, gaze, gaze_mask, threshold, egma_compat, max_seqlen = inputs
    best_patch, own, row_stats, z1_row, z1_col = output[6:]
    ctx.save_for_backward(patch, sent, cu, scale, smax, gaze, gaze_mask, best_patch, own, row_stats, z1_row, z1_col)
    ctx.options = (threshold, egma_compat, max_seqlen)


def _loss_backward(ctx, grads):
    patch, sent, cu, scale, smax, gaze, gaze_mask, best_patch, own, row_stats, z1_row, z1_col = ctx.saved_tensors
    B = patch.shape[0]
    acc = _acc_dtype(patch.dtype)
    shapes = [(B, B), (B, B), (B,), (B,), (B,), (B,)]
    grads = [g if g is not None else patch.new_zeros(shape, dtype=acc) for g, shape in zip(grads[:6], shapes)]
    d_patch, d_sent, d_scale = _loss_bwd_op(
        *grads, patch, sent, cu, scale, smax, gaze, gaze_mask, best_patch, own, row_stats, z1_row, z1_col, *ctx.options
    )
    return d_patch, d_sent, None, d_scale, None, None, None, None, None, None


torch.library.register_autograd("egma_kernels::triton_loss_fwd", _loss_backward, setup_context=_loss_setup_context)


@torch.library.custom_op("egma_kernels::triton_filip_fwd", mutates_args=())
def _filip_fwd_op(patch: Tensor, sent: Tensor, cu: Tensor, scale: Tensor, max_seqlen: int) -> List[Tensor]:
    i2t, t2i, best_patch, _ = _launch_filip_fwd(patch, sent, cu, scale, cu, max_seqlen, egma_compat=False, write_own=False)
    return [i2t, t2i, best_patch]


@_filip_fwd_op.register_fake
def _(patch, sent, cu, scale, max_seqlen):
    M = patch.shape[0]
    R = cu.shape[0] - 1
    acc = _acc_dtype(patch.dtype)
    return [patch.new_empty(M, R, dtype=acc), patch.new_empty(M, R, dtype=acc),
            patch.new_empty(M, sent.shape[0], dtype=torch.int32)]


@torch.library.custom_op("egma_kernels::triton_filip_bwd", mutates_args=())
def _filip_bwd_op(
    g_i2t: Tensor, g_t2i: Tensor, patch: Tensor, sent: Tensor, cu: Tensor, scale: Tensor, best_patch: Tensor, max_seqlen: int
) -> List[Tensor]:
    d_patch, d_sent, d_scale = _launch_filip_bwd(
        g_i2t, g_t2i, None, patch, sent, cu, scale, cu, best_patch, max_seqlen, egma_compat=False
    )
    return [d_patch.to(patch.dtype), d_sent.to(sent.dtype), d_scale.to(scale.dtype)]


@_filip_bwd_op.register_fake
def _(g_i2t, g_t2i, patch, sent, cu, scale, best_patch, max_seqlen):
    return [torch.empty_like(patch), torch.empty_like(sent), torch.empty_like(scale)]


def _filip_setup_context(ctx, inputs, output):
    patch, sent, cu, scale, max_seqlen = inputs
    ctx.save_for_backward(patch, sent, cu, scale, output[2])
    ctx.max_seqlen = max_seqlen


def _filip_backward(ctx, grads):
    patch, sent, cu, scale, best_patch = ctx.saved_tensors
    shape = (patch.shape[0], cu.shape[0] - 1)
    acc = _acc_dtype(patch.dtype)
    g_i2t, g_t2i = (g if g is not None else patch.new_zeros(shape, dtype=acc) for g in grads[:2])
    d_patch, d_sent, d_scale = _filip_bwd_op(g_i2t, g_t2i, patch, sent, cu, scale, best_patch, ctx.max_seqlen)
    return d_patch, d_sent, None, d_scale, None


torch.library.register_autograd("egma_kernels::triton_filip_fwd", _filip_backward, setup_context=_filip_setup_context)


# ---------------------------------------------------------------------------------------------------
# The backend functions (validated inputs, see backends.py)
# ---------------------------------------------------------------------------------------------------


def _prepare(patch_emb, sent_emb, cu_seqlens, logit_scale, max_seqlen):
    _check_device(patch_emb, sent_emb)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one host read; pass max_seqlen to avoid it
    return (
        patch_emb.contiguous(),
        sent_emb.contiguous(),
        cu_seqlens.to(torch.int32).contiguous(),
        logit_scale.reshape(()).to(_acc_dtype(patch_emb.dtype)),
        max_seqlen,
    )


def fine_grained_loss_triton(
    patch_emb: Tensor,
    sent_emb: Tensor,
    cu_seqlens: Tensor,
    logit_scale: Tensor,
    gaze: Optional[Tensor] = None,
    gaze_mask: Optional[Tensor] = None,
    *,
    alpha: float = 0.5,
    map_threshold: float = 2.0 / 7.0,
    weights: Tuple[float, float, float] = (1.0, 1.0, 1.0),
    egma_compat: bool = False,
    max_seqlen: Optional[int] = None,
) -> LossTerms:
    patch, sent, cu, scale, max_seqlen = _prepare(patch_emb, sent_emb, cu_seqlens, logit_scale, max_seqlen)
    B = patch.shape[0]
    _, lengths = report_of_sentence(cu, sent.shape[0])
    smax = lengths.max().to(torch.int32)
    if gaze is not None:
        gaze = gaze.contiguous()
        gaze_mask = gaze_mask.contiguous()
    i2t, t2i, s2p, p2s, clip_p, clip_s, *_ = _loss_fwd_op(
        patch, sent, cu, scale, smax, gaze, gaze_mask, float(map_threshold), bool(egma_compat), int(max_seqlen)
    )
    targets = torch.arange(B, device=patch.device)
    if egma_compat:
        contrastive = 0.5 * (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i, targets))
    else:
        contrastive = 0.5 * (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i.t(), targets))
    if gaze is None:
        gaze_mlce = i2t.new_zeros(())
    else:
        per_report = alpha * s2p + (1.0 - alpha) * p2s
        gaze_mlce = torch.where(gaze_mask, per_report, torch.zeros_like(per_report)).sum() / gaze_mask.sum().clamp_min(1)
    mapped = lengths >= 2
    per_report_map = 0.5 * (clip_p + clip_s)
    mapping = torch.where(mapped, per_report_map, torch.zeros_like(per_report_map)).sum() / mapped.sum().clamp_min(1)
    w_con, w_mlce, w_map = weights
    loss = w_con * contrastive + w_mlce * gaze_mlce + w_map * mapping
    return LossTerms(loss, contrastive, gaze_mlce, mapping, i2t, t2i)


def filip_similarity_triton(
    patch_emb: Tensor, sent_emb: Tensor, cu_seqlens: Tensor, logit_scale: Tensor, max_seqlen: Optional[int] = None
) -> Tuple[Tensor, Tensor]:
    patch, sent, cu, scale, max_seqlen = _prepare(patch_emb, sent_emb, cu_seqlens, logit_scale, max_seqlen)
    i2t, t2i, _ = _filip_fwd_op(patch, sent, cu, scale, int(max_seqlen))
    return i2t, t2i


register_backend(
    Backend(
        name="triton",
        loss=fine_grained_loss_triton,
        similarity=filip_similarity_triton,
        devices=("cuda", "cpu") if interpreting() else ("cuda",),
        is_available=is_available,
        priority=5,
        auto_devices=("cuda",),
        wants_max_seqlen=True,
    )
)
