"""The exact EGMA loss in vectorised PyTorch (``docs/loss.md`` sections 2 to 6).

This is the function every fused backend is held to. It has no Python loop over images or reports:
varlen reports are handled with segment reductions over the sentence -> report map (``scatter_reduce``
for segment max/min, ``index_add`` for segment sums) and block masks on dense matrices. It materialises
the ``(B*P) x N`` similarity matrix, which is exactly what the fused kernels avoid.

Inputs are assumed validated (see ``egma_kernels._validation``); the public entry points in
``egma_kernels.functional`` validate and then call these functions. Everything is computed in the
accumulation dtype: float64 for float64 inputs, float32 otherwise. Gradients come from autograd.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ._validation import accumulation_dtype


class LossTerms(NamedTuple):
    """What a backend returns: the total and its parts (all 0-dim) and the two ``B x B`` matrices."""

    loss: torch.Tensor
    contrastive: torch.Tensor
    gaze_mlce: torch.Tensor
    mapping: torch.Tensor
    i2t: torch.Tensor
    t2i: torch.Tensor


def report_of_sentence(cu_seqlens: torch.Tensor, num_sentences: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(owner, lengths)``: the report index of each sentence (N,) and each report's length (R,), int64.

    ``output_size`` keeps ``repeat_interleave`` free of a host synchronisation on CUDA.
    """
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    owner = torch.repeat_interleave(
        torch.arange(lengths.shape[0], device=cu.device), lengths, output_size=num_sentences
    )
    return owner, lengths


def _segment_reduce(values: torch.Tensor, owner: torch.Tensor, num_segments: int, dim: int, reduce: str) -> torch.Tensor:
    """Max / min / sum of ``values`` along ``dim`` over the segments given by ``owner`` (every segment non-empty)."""
    shape = list(values.shape)
    shape[dim] = num_segments
    index_shape = [1] * values.dim()
    index_shape[dim] = owner.shape[0]
    if reduce == "sum":
        return values.new_zeros(shape).index_add(dim, owner, values)
    index = owner.view(index_shape).expand_as(values)
    return values.new_zeros(shape).scatter_reduce(dim, index, values, reduce, include_self=False)


def _segment_logsumexp_with_zero(values: torch.Tensor, keep: torch.Tensor, owner: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``log(1 + sum_{u in segment, keep[u]} exp(values[u]))`` along dim 0, computed stably.

    The extra zero logit makes the shift ``m >= 0`` finite even for a segment with nothing kept. Masked
    entries go through ``exp(-inf) = 0`` so no inf or nan reaches the backward pass.
    """
    masked = torch.where(keep, values, torch.full_like(values, float("-inf")))
    with torch.no_grad():
        shift = values.new_zeros((num_segments,) + values.shape[1:]).scatter_reduce(
            0, owner.view(-1, *([1] * (values.dim() - 1))).expand_as(values), masked, "amax", include_self=True
        )
    terms = torch.exp(masked - shift[owner])
    return shift + torch.log(torch.exp(-shift) + _segment_reduce(terms, owner, num_segments, 0, "sum"))


def _logsumexp_with_zero(values: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``log(1 + sum_{keep} exp(values))`` along ``dim`` (a dense row)."""
    masked = torch.where(keep, values, torch.full_like(values, float("-inf")))
    zero = values.new_zeros(values.shape[:dim] + (1,) + values.shape[dim + 1 :])
    return torch.logsumexp(torch.cat([zero, masked], dim=dim), dim=dim)


def _min_max_binarise(values: torch.Tensor, row_min: torch.Tensor, row_max: torch.Tensor, threshold: float) -> torch.Tensor:
    """``1[ mm(v) >= threshold ]`` with ``mm`` the row min-max (all ones on a constant row)."""
    spread = row_max - row_min
    constant = spread == 0
    scaled = (values - row_min) / torch.where(constant, torch.ones_like(spread), spread)
    scaled = torch.where(constant, torch.ones_like(scaled), scaled)
    return (scaled >= threshold).to(values.dtype)


def similarity_ref(patch_emb: torch.Tensor, sent_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``A[a, i, u] = t * <patch_emb[a, i], sent_emb[u]>`` as a ``(B, P, N)`` tensor in the accumulation dtype."""
    acc = accumulation_dtype(patch_emb.dtype)
    B, P, D = patch_emb.shape
    sims = patch_emb.to(acc).reshape(B * P, D) @ sent_emb.to(acc).t()
    return (logit_scale.to(acc) * sims).view(B, P, sent_emb.shape[0])


def _filip_from_similarity(
    sims: torch.Tensor, owner: torch.Tensor, lengths: torch.Tensor, egma_compat: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    num_reports = lengths.shape[0]
    # I2T: each patch's best sentence of each report, averaged over patches.
    best_sentence = _segment_reduce(sims, owner, num_reports, dim=2, reduce="amax")  # (B, P, R)
    if egma_compat:
        # The original code zero-pads reports to the longest one, so a shorter report's max also sees 0.
        padded = lengths < lengths.max()
        best_sentence = torch.where(padded, best_sentence.clamp_min(0), best_sentence)
    i2t = best_sentence.mean(dim=1)
    # T2I: each sentence's best patch of each image, averaged over the report's sentences.
    best_patch = sims.amax(dim=1)  # (B, N)
    t2i = _segment_reduce(best_patch, owner, num_reports, dim=1, reduce="sum") / lengths.to(sims.dtype)
    return i2t, t2i


def filip_similarity_ref(
    patch_emb: torch.Tensor,
    sent_emb: torch.Tensor,
    cu_seqlens: torch.Tensor,
    logit_scale: torch.Tensor,
    egma_compat: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(I2T, T2I)``, both ``(num_images, num_reports)``, for any numbers of images and reports."""
    owner, lengths = report_of_sentence(cu_seqlens, sent_emb.shape[0])
    sims = similarity_ref(patch_emb, sent_emb, logit_scale)
    return _filip_from_similarity(sims, owner, lengths, egma_compat)


def _clip_per_block(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss of a batch of square logit blocks ``(K, M, M)`` with targets on the diagonal -> (K,)."""
    diag = torch.diagonal(logits, dim1=1, dim2=2)
    rows = (torch.logsumexp(logits, dim=2) - diag).mean(dim=1)
    cols = (torch.logsumexp(logits, dim=1) - diag).mean(dim=1)
    return 0.5 * (rows + cols)


def fine_grained_loss_ref(
    patch_emb: torch.Tensor,
    sent_emb: torch.Tensor,
    cu_seqlens: torch.Tensor,
    logit_scale: torch.Tensor,
    gaze: Optional[torch.Tensor] = None,
    gaze_mask: Optional[torch.Tensor] = None,
    *,
    alpha: float = 0.5,
    map_threshold: float = 2.0 / 7.0,
    weights: Tuple[float, float, float] = (1.0, 1.0, 1.0),
    egma_compat: bool = False,
) -> LossTerms:
    """The EGMA loss of ``docs/loss.md`` on validated inputs; see ``egma_kernels.fine_grained_loss``.

    ``logit_scale`` is a 0-dim tensor; ``gaze_mask`` is a bool ``(B,)`` tensor whenever ``gaze`` is given.
    """
    B, P, D = patch_emb.shape
    N = sent_emb.shape[0]
    acc = accumulation_dtype(patch_emb.dtype)
    device = patch_emb.device
    scale = logit_scale.to(acc)
    patches = patch_emb.to(acc)
    sents = sent_emb.to(acc)
    owner, lengths = report_of_sentence(cu_seqlens, N)
    lengths_f = lengths.to(acc)
    targets = torch.arange(B, device=device)

    # 1. Fine-grained contrastive term.
    sims = similarity_ref(patches, sents, scale)  # (B, P, N)
    i2t, t2i = _filip_from_similarity(sims, owner, lengths, egma_compat)
    if egma_compat:
        contrastive = 0.5 * (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i, targets))
    else:
        contrastive = 0.5 * (F.cross_entropy(i2t, targets) + F.cross_entropy(t2i.t(), targets))

    # The matched blocks, packed like the sentences: own[u, i] = A[owner(u), i ; u]  (N, P).
    sentence_index = torch.arange(N, device=device)
    own = sims[owner, :, sentence_index]

    # 2. Gaze-label term.
    if gaze is None:
        gaze_mlce = own.new_zeros(())
        has_gaze = torch.zeros(B, dtype=torch.bool, device=device)
    else:
        has_gaze = gaze_mask
        positive = gaze > 0
        per_sentence = _logsumexp_with_zero(own, ~positive, dim=1) + _logsumexp_with_zero(-own, positive, dim=1)
        s2p = _segment_reduce(per_sentence, owner, B, dim=0, reduce="sum") / lengths_f  # (B,)
        per_patch = _segment_logsumexp_with_zero(own, ~positive, owner, B) + _segment_logsumexp_with_zero(
            -own, positive, owner, B
        )  # (B, P)
        p2s = per_patch.mean(dim=1)
        per_report = alpha * s2p + (1.0 - alpha) * p2s
        gaze_mlce = torch.where(has_gaze, per_report, torch.zeros_like(per_report)).sum() / has_gaze.sum().clamp_min(1)

    # 3. Gaze-guided mapping term. The weights are piecewise constant: no gradient flows through them.
    with torch.no_grad():
        own_d = own.detach()
        if gaze is None:
            gaze_add = torch.zeros_like(own_d)
        else:
            gaze_add = torch.where(has_gaze[owner].unsqueeze(1), gaze.to(acc), torch.zeros_like(own_d))
        # W_I2T: each patch's weights over its report's sentences (stored (N, P), normalised over segments).
        seg_min = _segment_reduce(own_d, owner, B, dim=0, reduce="amin")[owner]
        seg_max = _segment_reduce(own_d, owner, B, dim=0, reduce="amax")[owner]
        w_i2t = _min_max_binarise(own_d, seg_min, seg_max, map_threshold) + gaze_add
        w_i2t = w_i2t / _segment_reduce(w_i2t, owner, B, dim=0, reduce="sum")[owner]
        # W_T2I: each sentence's weights over its image's patches.
        row_min = own_d.amin(dim=1, keepdim=True)
        row_max = own_d.amax(dim=1, keepdim=True)
        w_t2i = _min_max_binarise(own_d, row_min, row_max, map_threshold) + gaze_add
        w_t2i = w_t2i / w_t2i.sum(dim=1, keepdim=True)
        # Block-diagonal scatter so each mapping is one dense matrix product.
        w_i2t_dense = own_d.new_zeros(B, P, N)
        w_i2t_dense[owner, :, sentence_index] = w_i2t
        w_t2i_dense = own_d.new_zeros(N, B, P)
        w_t2i_dense[sentence_index, owner, :] = w_t2i

    cross_p = (w_i2t_dense.view(B * P, N) @ sents).view(B, P, D)  # each patch rebuilt from sentences
    cross_s = w_t2i_dense.view(N, B * P) @ patches.reshape(B * P, D)  # each sentence rebuilt from patches
    clip_patches = _clip_per_block(scale * torch.bmm(cross_p, patches.transpose(1, 2)))  # (B,)

    same_report = owner.unsqueeze(0) == owner.unsqueeze(1)
    sent_logits = scale * (cross_s @ sents.t())
    sent_logits = torch.where(same_report, sent_logits, torch.full_like(sent_logits, float("-inf")))
    diag = torch.diagonal(sent_logits)
    per_sentence_clip = 0.5 * ((torch.logsumexp(sent_logits, dim=1) - diag) + (torch.logsumexp(sent_logits, dim=0) - diag))
    clip_sentences = _segment_reduce(per_sentence_clip, owner, B, dim=0, reduce="sum") / lengths_f

    mapped = lengths >= 2
    per_report_map = 0.5 * (clip_patches + clip_sentences)
    mapping = torch.where(mapped, per_report_map, torch.zeros_like(per_report_map)).sum() / mapped.sum().clamp_min(1)

    w_con, w_mlce, w_map = (float(w) for w in weights)
    loss = w_con * contrastive + w_mlce * gaze_mlce + w_map * mapping
    return LossTerms(loss, contrastive, gaze_mlce, mapping, i2t, t2i)
