"""The ``loop`` provider: the structure of the original EGMA training code, rewritten as a baseline.

This is what users run today (the authors' ``SPARC_FILIP_PartGaze_Model`` in ``egma/modeling_egma.py`` of
github.com/MoMarky/EGMA), written from scratch with the same *shape of computation* so that the benchmark
compares the fused backends with it:

* the packed sentences are scattered, report by report in a Python loop, into a zero-padded
  ``(B, S_max, D)`` buffer;
* one ``(B*P) x (B*S_max)`` similarity matrix is computed and reshaped for the two FILIP matrices (the
  zero rows take part in the max, which is what ``egma_compat=True`` in ``docs/loss.md`` describes);
* the gaze MLCE runs in a Python loop over the images that carry gaze, on the matched ``n_k x P`` block
  (the ``1e12`` masking trick of the original multi-label cross-entropy);
* the gaze-guided mapping runs in a Python loop over the images (per-image min-max, threshold, gaze,
  row-normalise, two small products, two symmetric CLIP losses), as ``docs/loss.md`` defines it.

The math is ``docs/loss.md``'s with ``egma_compat=True`` for the first two terms (the mapping term has no compatibility
mode). It accumulates in float32 (float64 for float64 inputs), like the reference. It returns a
``LossTerms`` so the harness can compare it with every other provider.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..reference import LossTerms

_BIG = 1e12  # the original code masks logits by subtracting this


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad_reports(sent: torch.Tensor, lengths: List[int]) -> torch.Tensor:
    """Scatter the packed sentences into a zero-padded ``(R, S_max, D)`` buffer, one report at a time."""
    s_max = max(lengths)
    buf = sent.new_zeros(len(lengths), s_max, sent.shape[1])
    start = 0
    for k, n in enumerate(lengths):
        buf[k, :n] = sent[start : start + n]
        start += n
    return buf


def _ce_diag(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def _clip(u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * (u @ v.t())
    return 0.5 * (_ce_diag(logits) + _ce_diag(logits.t()))


def _mlce_rows(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Multi-label categorical cross-entropy of each row, written the way the original code writes it."""
    signed = (1 - 2 * labels) * logits
    neg = signed - labels * _BIG
    pos = signed - (1 - labels) * _BIG
    zeros = torch.zeros_like(signed[..., :1])
    return torch.logsumexp(torch.cat([neg, zeros], dim=-1), dim=-1) + torch.logsumexp(torch.cat([pos, zeros], dim=-1), dim=-1)


def _binarise_rows(r: torch.Tensor, threshold: float) -> torch.Tensor:
    lo = r.min(dim=1, keepdim=True).values
    hi = r.max(dim=1, keepdim=True).values
    spread = hi - lo
    flat = spread == 0
    scaled = (r - lo) / torch.where(flat, torch.ones_like(spread), spread)
    scaled = torch.where(flat, torch.ones_like(scaled), scaled)
    return (scaled >= threshold).to(r.dtype)


def loop_filip_similarity(
    patch_emb: torch.Tensor, sent_emb: torch.Tensor, cu_seqlens: torch.Tensor, logit_scale=1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(I2T, T2I)`` of ``M`` images against ``R`` reports through the zero-padded buffer (I2T as ``egma_compat``)."""
    acc = _acc(patch_emb.dtype)
    patch = patch_emb.to(acc)
    sent = sent_emb.to(acc)
    scale = torch.as_tensor(logit_scale, dtype=acc, device=patch.device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    M, P, D = patch.shape
    R, S = len(lengths), max(lengths)
    padded = _pad_reports(sent, lengths)
    sims = scale * (patch.reshape(M * P, D) @ padded.reshape(R * S, D).t())  # (M*P, R*S)
    i2t = sims.view(M * P, R, S).amax(dim=2).view(M, P, R).mean(dim=1)
    n = torch.tensor(lengths, dtype=acc, device=patch.device)
    t2i = sims.view(M, P, R * S).amax(dim=1).view(M, R, S).sum(dim=2) / n
    return i2t, t2i


def loop_fine_grained_loss(
    patch_emb: torch.Tensor,
    sent_emb: torch.Tensor,
    cu_seqlens: torch.Tensor,
    logit_scale,
    gaze: Optional[torch.Tensor] = None,
    gaze_mask: Optional[torch.Tensor] = None,
    *,
    alpha: float = 0.8,
    map_threshold: float = 2.0 / 7.0,
    weights: Tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> LossTerms:
    """The EGMA loss computed with the original code's structure (``docs/loss.md`` with ``egma_compat=True``)."""
    acc = _acc(patch_emb.dtype)
    device = patch_emb.device
    patch = patch_emb.to(acc)
    sent = sent_emb.to(acc)
    scale = torch.as_tensor(logit_scale, device=device).to(acc)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # the original's per_img_sent_num (host list)
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    B, P, D = patch.shape
    S = max(lengths)

    # One similarity matrix against the zero-padded sentences.
    padded = _pad_reports(sent, lengths)
    sims = scale * (patch.reshape(B * P, D) @ padded.reshape(B * S, D).t())  # (B*P, B*S)
    i2t = sims.view(B * P, B, S).amax(dim=2).view(B, P, B).mean(dim=1)
    n = torch.tensor(lengths, dtype=acc, device=device)
    t2i = sims.view(B, P, B * S).amax(dim=1).view(B, B, S).sum(dim=2) / n
    contrastive = 0.5 * (_ce_diag(i2t) + _ce_diag(t2i))

    blocks = sims.view(B, P, B, S)
    if gaze is not None:
        gaze_acc = gaze.to(acc)
        with_gaze = [True] * B if gaze_mask is None else [bool(g) for g in gaze_mask.tolist()]
    else:
        gaze_acc = None
        with_gaze = [False] * B

    # Gaze MLCE: one image at a time, on its own sentences.
    mlce_total = sims.new_zeros(())
    for k in range(B):
        if not with_gaze[k]:
            continue
        n_k, c_k = lengths[k], starts[k]
        text_to_patch = blocks[k, :, k, :n_k].t()  # (n_k, P)
        labels = (gaze_acc[c_k : c_k + n_k] > 0).to(acc)
        s2p = _mlce_rows(labels, text_to_patch).mean()
        p2s = _mlce_rows(labels.t(), text_to_patch.t()).mean()
        mlce_total = mlce_total + alpha * s2p + (1 - alpha) * p2s
    gaze_mlce = mlce_total / max(1, sum(with_gaze))

    # Gaze-guided mapping: one image at a time.
    map_total = sims.new_zeros(())
    mapped = 0
    for k in range(B):
        n_k, c_k = lengths[k], starts[k]
        if n_k < 2:
            continue
        sent_k = sent[c_k : c_k + n_k]
        with torch.no_grad():
            r = blocks[k, :, k, :n_k].detach()  # (P, n_k), rows patches
            w_i2t = _binarise_rows(r, map_threshold)
            w_t2i = _binarise_rows(r.t(), map_threshold)
            if with_gaze[k]:
                g = gaze_acc[c_k : c_k + n_k]
                w_i2t = w_i2t + g.t()
                w_t2i = w_t2i + g
            w_i2t = w_i2t / w_i2t.sum(dim=1, keepdim=True)
            w_t2i = w_t2i / w_t2i.sum(dim=1, keepdim=True)
        cross_p = w_i2t @ sent_k  # (P, D)
        cross_s = w_t2i @ patch[k]  # (n_k, D)
        map_total = map_total + 0.5 * (_clip(cross_p, patch[k], scale) + _clip(cross_s, sent_k, scale))
        mapped += 1
    mapping = map_total / max(1, mapped)

    w_con, w_mlce, w_map = (float(w) for w in weights)
    loss = w_con * contrastive + w_mlce * gaze_mlce + w_map * mapping
    return LossTerms(loss, contrastive, gaze_mlce, mapping, i2t, t2i)
