"""From per-report sentence tensors (a list, or a padded batch) to the packed ``(sent_emb, cu_seqlens)``."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch


def cu_seqlens_from_lengths(lengths: Union[Sequence[int], torch.Tensor], device=None) -> torch.Tensor:
    """``(B+1,)`` int32 offsets from per-report lengths (each >= 1)."""
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() != 1 or lengths.numel() == 0:
        raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be integers, got {lengths.dtype}")
    if bool((lengths < 1).any()):
        raise ValueError(f"every report needs at least one sentence, got lengths {lengths.tolist()}")
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, dim=0)
    return cu


def pack_sentences(
    sentences: Union[Sequence[torch.Tensor], torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    lengths: Optional[Union[Sequence[int], torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pack per-report sentences into ``(sent_emb (N, ...), cu_seqlens (B+1,) int32)``.

    Accepts either
      * a list of ``B`` tensors ``(n_k, ...)`` (``n_k >= 1``), or
      * a padded tensor ``(B, S_max, ...)`` with ``mask`` ``(B, S_max)`` bool (True = real sentence, any
        positions, kept in order) or ``lengths`` ``(B,)`` (the first ``lengths[k]`` rows are real).

    The trailing dimensions are free, so the same call packs gaze maps ``(B, S_max, P)`` too.
    """
    if isinstance(sentences, torch.Tensor):
        if sentences.dim() < 2:
            raise ValueError(f"a padded batch must have shape (B, S_max, ...), got {tuple(sentences.shape)}")
        if (mask is None) == (lengths is None):
            raise ValueError("a padded batch needs exactly one of mask (B, S_max) or lengths (B,)")
        B, S_max = sentences.shape[:2]
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=sentences.device)
            if lengths.shape != (B,):
                raise ValueError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
            if bool((lengths > S_max).any()):
                raise ValueError(f"lengths must be <= S_max = {S_max}, got {lengths.tolist()}")
            mask = torch.arange(S_max, device=sentences.device).unsqueeze(0) < lengths.unsqueeze(1)
        else:
            if not isinstance(mask, torch.Tensor) or mask.shape != (B, S_max) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor of shape (B, S_max) = ({B}, {S_max})")
            mask = mask.to(sentences.device)
        counts = mask.sum(dim=1)
        cu = cu_seqlens_from_lengths(counts)
        return sentences[mask], cu
    if mask is not None or lengths is not None:
        raise ValueError("mask and lengths apply to a padded tensor, not to a list of per-report tensors")
    sentences = list(sentences)
    if not sentences:
        raise ValueError("pack_sentences needs at least one report")
    for k, s in enumerate(sentences):
        if not isinstance(s, torch.Tensor) or s.dim() < 1:
            raise ValueError(f"report {k} must be a tensor (n_k, ...), got {type(s).__name__}")
        if s.shape[1:] != sentences[0].shape[1:]:
            raise ValueError(f"report {k} has shape {tuple(s.shape)}, report 0 has {tuple(sentences[0].shape)}")
    cu = cu_seqlens_from_lengths([s.shape[0] for s in sentences], device=sentences[0].device)
    return torch.cat(sentences, dim=0), cu


def unpack_sentences(sent_emb: torch.Tensor, cu_seqlens: torch.Tensor) -> list:
    """The inverse of ``pack_sentences`` for a list: ``B`` views ``(n_k, ...)``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return list(torch.split(sent_emb, lengths, dim=0))
