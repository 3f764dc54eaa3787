"""Input checks shared by every backend (``docs/loss.md``, section 9: the refusals).

Two kinds of check:

* metadata (ranks, sizes, dtypes, devices): always, free;
* values (``cu_seqlens`` offsets, gaze signs, ``logit_scale > 0``): read the tensors' contents. On CUDA
  tensors that is one host synchronisation, batched into a single read; pass ``validate=False`` (or set
  ``EGMA_KERNELS_VALIDATE=0``) to skip it in a hot training loop whose inputs are known to be good.
  Under ``torch.compile`` tracing the value checks are skipped (they would break the graph).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .options import is_real_number

Scale = Union[float, int, torch.Tensor]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate (and return) in float64, every other float dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _value_checks_enabled(validate: Optional[bool]) -> bool:
    if validate is None:
        validate = os.environ.get("EGMA_KERNELS_VALIDATE", "1").strip().lower() not in ("0", "false", "no", "off")
    if not validate:
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    return True


@dataclass
class CheckedInputs:
    """Validated inputs, ready for a backend. ``logit_scale`` is a 0-dim tensor in the accumulation dtype."""

    patch_emb: torch.Tensor
    sent_emb: torch.Tensor
    cu_seqlens: torch.Tensor  # int32, on the embeddings' device
    logit_scale: torch.Tensor
    gaze: Optional[torch.Tensor]
    gaze_mask: Optional[torch.Tensor]  # bool (B,), None when gaze is None
    # The longest report's sentence count: given by the caller, or read with the value checks; None when
    # neither happened (a backend that needs it reads it itself).
    max_seqlen: Optional[int] = None


def check_embeddings(patch_emb, sent_emb, cu_seqlens, num_reports: Optional[int]) -> None:
    """Metadata checks on the embeddings and offsets. ``num_reports=None`` allows any number of reports."""
    patch_emb = _require_tensor("patch_emb", patch_emb)
    sent_emb = _require_tensor("sent_emb", sent_emb)
    cu_seqlens = _require_tensor("cu_seqlens", cu_seqlens)
    if patch_emb.dim() != 3:
        raise ValueError(f"patch_emb must have shape (B, P, D), got {_describe(patch_emb)}")
    if sent_emb.dim() != 2:
        raise ValueError(f"sent_emb must have shape (N, D), got {_describe(sent_emb)}")
    B, P, D = patch_emb.shape
    if B < 1 or P < 1 or D < 1:
        raise ValueError(f"patch_emb must have B, P, D >= 1, got shape {tuple(patch_emb.shape)}")
    if sent_emb.shape[1] != D:
        raise ValueError(
            f"sent_emb must have the same embedding size D={D} as patch_emb, got shape {tuple(sent_emb.shape)}"
        )
    if sent_emb.shape[0] < 1:
        raise ValueError("sent_emb must hold at least one sentence, got N=0")
    if patch_emb.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"patch_emb must be float16, bfloat16, float32 or float64, got {patch_emb.dtype}")
    if sent_emb.dtype != patch_emb.dtype:
        raise TypeError(f"sent_emb dtype {sent_emb.dtype} differs from patch_emb dtype {patch_emb.dtype}")
    if sent_emb.device != patch_emb.device:
        raise ValueError(f"sent_emb is on {sent_emb.device} but patch_emb is on {patch_emb.device}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D (num_reports + 1,), got {_describe(cu_seqlens)}")
    if cu_seqlens.dtype not in _INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.device != patch_emb.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the embeddings are on {patch_emb.device}")
    if num_reports is not None and cu_seqlens.shape[0] != num_reports + 1:
        raise ValueError(
            f"cu_seqlens must have B+1 = {num_reports + 1} entries (one report per image), "
            f"got {cu_seqlens.shape[0]}"
        )
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have at least 2 entries (one report), got {cu_seqlens.shape[0]}")


def _scale_tensor(logit_scale: Scale, like: torch.Tensor) -> torch.Tensor:
    acc = accumulation_dtype(like.dtype)
    if isinstance(logit_scale, (bool, np.bool_)):
        raise TypeError("logit_scale must be a positive number or a scalar tensor, got bool")
    if is_real_number(logit_scale):  # Python and numpy numbers: checked here, as the kernels will see them
        scale = torch.tensor(float(logit_scale), dtype=acc)
        if not (math.isfinite(scale.item()) and scale.item() > 0):
            raise ValueError(
                f"logit_scale must be finite and > 0 in {acc} (the dtype the loss computes in), got {logit_scale!r}"
                + (f", which is {scale.item()!r} in {acc}" if scale.item() != float(logit_scale) else "")
            )
        return scale.to(like.device)
    if not isinstance(logit_scale, torch.Tensor):
        raise TypeError(f"logit_scale must be a positive number or a scalar tensor, got {type(logit_scale).__name__}")
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar (one element), got shape {tuple(logit_scale.shape)}")
    if not logit_scale.is_floating_point():
        raise TypeError(f"logit_scale must be a floating-point tensor, got {logit_scale.dtype}")
    if logit_scale.device != like.device:
        raise ValueError(f"logit_scale is on {logit_scale.device} but the embeddings are on {like.device}")
    return logit_scale.reshape(()).to(acc)


def _check_offset_values(cu_seqlens: torch.Tensor, num_sentences: int, bad: list) -> None:
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    bad.append(("cu_seqlens[0] must be 0", cu_seqlens[0] != 0))
    bad.append((f"cu_seqlens[-1] must equal the number of sentences N={num_sentences}", cu_seqlens[-1] != num_sentences))
    bad.append(("cu_seqlens must be non-decreasing", (lengths < 0).any()))
    bad.append(("every report needs at least one sentence (cu_seqlens has an empty report)", (lengths == 0).any()))


def _raise_first(bad: list, describe_offsets: Optional[torch.Tensor] = None) -> int:
    """Evaluate all pending value checks with a single host read, raise the first that failed.

    Returns the longest report's length, read in the same transfer.
    """
    lengths = describe_offsets[1:] - describe_offsets[:-1]
    values = torch.stack([cond.reshape(()).to(torch.int64) for _, cond in bad] + [lengths.max().to(torch.int64)])
    *flags, max_seqlen = values.cpu().tolist()
    for (message, _), failed in zip(bad, flags):
        if failed:
            if describe_offsets is not None and "cu_seqlens" in message:
                shown = describe_offsets[:12].tolist()
                suffix = ", ..." if describe_offsets.numel() > 12 else ""
                message = f"{message}; got cu_seqlens = {shown}{suffix}"
            raise ValueError(message)
    return int(max_seqlen)


def _check_max_seqlen(max_seqlen, num_sentences: int) -> Optional[int]:
    if max_seqlen is None:
        return None
    if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int (the longest report's sentence count), got {max_seqlen!r}")
    # An upper bound of the longest report is accepted; no report is longer than N, so a larger bound is
    # taken as N and the kernels never size a tile beyond the sentences there are.
    return min(int(max_seqlen), max(int(num_sentences), 1))


def _settle_max_seqlen(given: Optional[int], measured: Optional[int]) -> Optional[int]:
    if given is not None and measured is not None and given < measured:
        raise ValueError(f"max_seqlen={given} is smaller than the longest report ({measured} sentences)")
    return given if given is not None else measured


def check_filip_inputs(
    patch_emb, sent_emb, cu_seqlens, logit_scale: Scale, validate: Optional[bool], max_seqlen: Optional[int] = None
) -> CheckedInputs:
    check_embeddings(patch_emb, sent_emb, cu_seqlens, num_reports=None)
    scale = _scale_tensor(logit_scale, patch_emb)
    max_seqlen = _check_max_seqlen(max_seqlen, sent_emb.shape[0])
    measured = None
    if _value_checks_enabled(validate):
        bad: list = []
        _check_offset_values(cu_seqlens, sent_emb.shape[0], bad)
        if isinstance(logit_scale, torch.Tensor):
            bad.append(("logit_scale must be finite and > 0", ~(torch.isfinite(scale) & (scale > 0))))
        measured = _raise_first(bad, cu_seqlens)
    max_seqlen = _settle_max_seqlen(max_seqlen, measured)
    return CheckedInputs(patch_emb, sent_emb, cu_seqlens.to(torch.int32), scale, None, None, max_seqlen)


def check_loss_inputs(
    patch_emb,
    sent_emb,
    cu_seqlens,
    logit_scale: Scale,
    gaze,
    gaze_mask,
    *,
    validate: Optional[bool],
    max_seqlen: Optional[int] = None,
) -> CheckedInputs:
    """Check the loss's tensors (the options are checked by ``options.resolve_loss_options``)."""
    check_embeddings(patch_emb, sent_emb, cu_seqlens, num_reports=patch_emb.shape[0] if isinstance(patch_emb, torch.Tensor) and patch_emb.dim() == 3 else None)
    B, P, _ = patch_emb.shape
    N = sent_emb.shape[0]
    scale = _scale_tensor(logit_scale, patch_emb)

    if gaze is not None:
        gaze = _require_tensor("gaze", gaze)
        if gaze.shape != (N, P):
            raise ValueError(f"gaze must have shape (N, P) = ({N}, {P}), got {_describe(gaze)}")
        if not gaze.is_floating_point():
            raise TypeError(f"gaze must be a floating-point tensor, got {gaze.dtype}")
        if gaze.device != patch_emb.device:
            raise ValueError(f"gaze is on {gaze.device} but the embeddings are on {patch_emb.device}")
    if gaze_mask is not None:
        gaze_mask = _require_tensor("gaze_mask", gaze_mask)
        if gaze is None:
            raise ValueError("gaze_mask was given without gaze; pass gaze (N, P) too, or neither")
        if gaze_mask.shape != (B,):
            raise ValueError(f"gaze_mask must have shape (B,) = ({B},), got {_describe(gaze_mask)}")
        if gaze_mask.dtype != torch.bool:
            raise TypeError(f"gaze_mask must be a bool tensor, got {gaze_mask.dtype}")
        if gaze_mask.device != patch_emb.device:
            raise ValueError(f"gaze_mask is on {gaze_mask.device} but the embeddings are on {patch_emb.device}")
    elif gaze is not None:
        gaze_mask = torch.ones(B, dtype=torch.bool, device=patch_emb.device)

    max_seqlen = _check_max_seqlen(max_seqlen, sent_emb.shape[0])
    measured = None
    if _value_checks_enabled(validate):
        bad: list = []
        _check_offset_values(cu_seqlens, N, bad)
        if isinstance(logit_scale, torch.Tensor):
            bad.append(("logit_scale must be finite and > 0", ~(torch.isfinite(scale) & (scale > 0))))
        if gaze is not None:
            # Finite in the embeddings' dtype, which is what the fused kernels read it in (a float64 1e300 beside
            # float32 embeddings is inf there).
            bad.append((
                f"gaze must be finite in {patch_emb.dtype}, the embeddings' dtype (found inf, nan, or a value "
                "beyond its range)",
                ~torch.isfinite(gaze.to(patch_emb.dtype)).all(),
            ))
            bad.append(("gaze must be >= 0 (found a negative value)", (gaze < 0).any()))
        measured = _raise_first(bad, cu_seqlens)
    max_seqlen = _settle_max_seqlen(max_seqlen, measured)
    return CheckedInputs(patch_emb, sent_emb, cu_seqlens.to(torch.int32), scale, gaze, gaze_mask, max_seqlen)
