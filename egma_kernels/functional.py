"""The public functions: validate, pick a backend, run it."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from ._validation import Scale, check_filip_inputs, check_loss_inputs
from .backends import resolve_backend
from .distributed import current_group, fine_grained_loss_distributed
from .options import DEFAULT_ALPHA, DEFAULT_MAP_THRESHOLD, DEFAULT_WEIGHTS, EGMA_COMPAT_ALPHA, resolve_loss_options
from .reference import LossTerms

__all__ = ["fine_grained_loss", "filip_similarity", "DEFAULT_ALPHA", "DEFAULT_MAP_THRESHOLD", "EGMA_COMPAT_ALPHA"]


def fine_grained_loss(
    patch_emb: torch.Tensor,
    sent_emb: torch.Tensor,
    cu_seqlens: torch.Tensor,
    logit_scale: Scale,
    gaze: Optional[torch.Tensor] = None,
    gaze_mask: Optional[torch.Tensor] = None,
    *,
    alpha: Optional[float] = None,
    map_threshold: float = DEFAULT_MAP_THRESHOLD,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    egma_compat: bool = False,
    backend: Optional[str] = None,
    return_details: bool = False,
    validate: Optional[bool] = None,
    max_seqlen: Optional[int] = None,
    group=None,
) -> Union[torch.Tensor, LossTerms]:
    """The EGMA loss (``docs/loss.md``): fine-grained contrastive + gaze MLCE + gaze-guided mapping.

    Args:
        patch_emb: ``(B, P, D)`` patch tokens of ``B`` images, L2-normalised along ``D``.
            float16, bfloat16, float32 or float64.
        sent_emb: ``(N, D)`` sentence embeddings of the ``B`` reports packed in batch order, same dtype
            and device as ``patch_emb`` (``pack_sentences`` builds it).
        cu_seqlens: ``(B+1,)`` int32 offsets: report ``k`` owns sentences ``cu_seqlens[k]:cu_seqlens[k+1]``,
            each report at least one sentence.
        logit_scale: the temperature multiplier ``t > 0``: a number or a scalar tensor (gets a gradient).
        gaze: optional ``(N, P)`` non-negative gaze heat of each sentence on each patch (no gradient).
        gaze_mask: optional ``(B,)`` bool, which reports carry gaze (default: all, when ``gaze`` is given).
        alpha: weight of the sentence-to-patch MLCE direction; default 0.5 (0.8 with ``egma_compat``).
        map_threshold: the min-max threshold of the mapping weights (default 2/7).
        weights: ``(w_con, w_mlce, w_map)`` multiplying the three terms.
        egma_compat: reproduce the original EGMA training code (zero-padded I2T max, image-wise T2I CE).
        backend: ``None``/``"auto"`` for the best available, or a name from ``available_backends()``.
        return_details: return a ``LossTerms(loss, contrastive, gaze_mlce, mapping, i2t, t2i)``.
        validate: check the input *values* too (offsets, gaze signs, ``logit_scale > 0``); default on
            (``EGMA_KERNELS_VALIDATE=0`` turns it off). On CUDA this costs one host synchronisation.
            Off (and under ``torch.compile``, which skips them) bad values give wrong numbers or the ops'
            own errors, never an access outside the tensors (``docs/loss.md``, "What validate=False gives up").
        max_seqlen: the longest report's sentence count, if the caller knows it (as in flash-attention's
            varlen API). The fused GPU kernels size their tiles by it; without it (and with ``validate``
            off) they read it from ``cu_seqlens``, one host synchronisation. Pass it under ``torch.compile``.
        group: ``None`` for the loss of this process's batch; a ``torch.distributed`` process group (e.g.
            ``torch.distributed.group.WORLD``) for the loss of the group's global batch, every image against
            every report of every rank (``docs/distributed.md``: the value returned is the global loss, and
            DistributedDataParallel's averaged gradients are those of the global loss). ``None`` takes the
            group of an enclosing ``egma_kernels.distributed.loss_group`` context, if any.

    Returns:
        The scalar loss (float32; float64 for float64 inputs), or ``LossTerms`` with ``i2t``/``t2i`` ``(B, B)``
        (with ``group``: this rank's rows against every report of the group, ``(B_local, B_global)``).
    """
    options = resolve_loss_options(alpha, map_threshold, weights, egma_compat)
    if group is None:
        group = current_group()
    if group is not None:
        terms = fine_grained_loss_distributed(
            patch_emb, sent_emb, cu_seqlens, logit_scale, gaze, gaze_mask, group=group, **options.as_kwargs(),
            backend=backend, validate=validate, max_seqlen=max_seqlen,
        )
        return terms if return_details else terms.loss
    checked = check_loss_inputs(
        patch_emb, sent_emb, cu_seqlens, logit_scale, gaze, gaze_mask, validate=validate, max_seqlen=max_seqlen
    )
    impl = resolve_backend(backend, checked.patch_emb.device)
    extra = {"max_seqlen": checked.max_seqlen} if impl.wants_max_seqlen else {}
    terms = impl.loss(
        checked.patch_emb,
        checked.sent_emb,
        checked.cu_seqlens,
        checked.logit_scale,
        checked.gaze,
        checked.gaze_mask,
        **options.as_kwargs(),
        **extra,
    )
    return terms if return_details else terms.loss


def filip_similarity(
    patch_emb: torch.Tensor,
    sent_emb: torch.Tensor,
    cu_seqlens: torch.Tensor,
    logit_scale: Scale = 1.0,
    *,
    backend: Optional[str] = None,
    validate: Optional[bool] = None,
    max_seqlen: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Late-interaction (FILIP) similarity of every image with every report, differentiable.

    Args:
        patch_emb: ``(M, P, D)`` patch tokens of ``M`` images.
        sent_emb: ``(N, D)`` sentences of ``R`` reports packed in order.
        cu_seqlens: ``(R+1,)`` int32 offsets of the reports (``R`` need not equal ``M``).
        logit_scale: multiplier ``t > 0`` (default 1).
        backend, validate, max_seqlen: as in ``fine_grained_loss``.

    Returns:
        ``(i2t, t2i)``, both ``(M, R)`` float32 (float64 for float64 inputs):
        ``i2t[a, b]`` = mean over image ``a``'s patches of the best sentence of report ``b``;
        ``t2i[a, b]`` = mean over report ``b``'s sentences of the best patch of image ``a``.
    """
    checked = check_filip_inputs(patch_emb, sent_emb, cu_seqlens, logit_scale, validate, max_seqlen)
    impl = resolve_backend(backend, checked.patch_emb.device)
    extra = {"max_seqlen": checked.max_seqlen} if impl.wants_max_seqlen else {}
    return impl.similarity(checked.patch_emb, checked.sent_emb, checked.cu_seqlens, checked.logit_scale, **extra)
