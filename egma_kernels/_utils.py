"""Small helpers shared by the fused backends."""

from __future__ import annotations

import contextlib
import os

import torch

# Tests turn this on (``poisoned_outputs()``, or EGMA_KERNELS_POISON=1) so that every output buffer a fused
# backend allocates starts as NaN (integers as an impossible index): an element the kernel forgot to write then
# fails the comparison with the reference. The compiled ops keep their own flag, set through the hooks below.
POISON_OUTPUTS = os.environ.get("EGMA_KERNELS_POISON", "0") == "1"
_POISON_HOOKS = []


def on_poison_change(hook) -> None:
    """Register ``hook(flag)``, called now and whenever ``set_poison_outputs`` changes the flag."""
    _POISON_HOOKS.append(hook)
    hook(POISON_OUTPUTS)


def set_poison_outputs(flag: bool) -> bool:
    """Turn output poisoning on or off for every fused backend; returns the previous setting."""
    global POISON_OUTPUTS
    previous = POISON_OUTPUTS
    POISON_OUTPUTS = bool(flag)
    for hook in _POISON_HOOKS:
        hook(POISON_OUTPUTS)
    return previous


@contextlib.contextmanager
def poisoned_outputs(flag: bool = True):
    """``with poisoned_outputs():`` every fused backend's outputs start as NaN inside the block (tests)."""
    previous = set_poison_outputs(flag)
    try:
        yield
    finally:
        set_poison_outputs(previous)


def positive_gaze_in(gaze: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``gaze`` cast to a kernel's ``dtype`` with its positive labels kept: the MLCE labels are ``gaze > 0``
    of the gaze as given, and a positive value below what ``dtype`` can hold (a float64 1e-50 in float32)
    would otherwise round to 0 and lose its label. Those values (and only those) become the dtype's smallest
    normal number, far below anything the mapping term's row sums can see."""
    if gaze.dtype == dtype or dtype == torch.float64:
        return gaze.to(dtype)
    cast = gaze.to(dtype)
    return torch.where((gaze > 0) & (cast == 0), torch.finfo(dtype).tiny, cast)


def new_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer the kernel fully overwrites: ``torch.empty`` normally, NaN-filled when poisoning."""
    if POISON_OUTPUTS:
        poison = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min  # integers: an impossible index
        return torch.full(shape, poison, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def cpu_name() -> str:
    """The processor's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows of it."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
