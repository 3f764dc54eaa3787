"""How close a fused backend must come to the float64 reference: the one statement of the tolerances.

The test suite (``tests/backend_cases.py``) and the self-check (``selfcheck.py``, ``egma-bench --selfcheck``
and the first-use check) both hold a backend to these numbers; ``docs/selfcheck.md`` explains them.

An output ``got`` passes against the reference ``want`` (float64, computed on the same inputs rounded to
the backend's dtype) when ``max |got - want| <= RTOL[dtype] * max(1, max |want|)``: relative to the largest
value, absolute below 1 (the loss terms and gradients are O(1) or smaller).

Large problems in 16-bit or TF32 arithmetic accumulate rounding that grows with the sizes; there the rule is
the one of flash-attention's tests: the backend's error against float64 at most ``SAME_DTYPE_FACTOR`` times
the error of the reference run in the backend's dtype, plus ``SAME_DTYPE_FLOOR`` (``SAME_DTYPE_FLOOR_TF32`` for
float32 where torch allows TF32 matmuls).
"""

from __future__ import annotations

import torch

RTOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
SAME_DTYPE_FACTOR = 2.0
SAME_DTYPE_FLOOR = 1e-5
# float32 under torch.set_float32_matmul_precision("high"/"medium"): one TF32 pass in the kernels and in the
# reference's matmuls alike.
SAME_DTYPE_FLOOR_TF32 = 1e-4


def rtol(dtype: torch.dtype) -> float:
    """The relative tolerance of a backend run in ``dtype`` against the float64 reference."""
    try:
        return RTOL[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for {dtype}; the backends run in {', '.join(map(str, RTOL))}") from None


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest absolute difference (inf when ``got`` holds a NaN or an infinity)."""
    got = got.detach().to("cpu", torch.float64)
    want = want.detach().to("cpu", torch.float64)
    if not torch.isfinite(got).all():
        return float("inf")
    return (got - want).abs().max().item() if got.numel() else 0.0


def bound(want: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error allowed against the float64 ``want`` for a backend run in ``dtype``."""
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    return rtol(dtype) * max(1.0, scale)


def same_dtype_bound(reference_error: float, dtype: torch.dtype) -> float:
    """The largest error allowed when the reference run in ``dtype`` misses float64 by ``reference_error``."""
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return SAME_DTYPE_FACTOR * reference_error + (SAME_DTYPE_FLOOR_TF32 if tf32 else SAME_DTYPE_FLOOR)
