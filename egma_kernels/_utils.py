"""Small helpers shared by the fused backends."""

from __future__ import annotations

import os

import torch

# Tests set this (or EGMA_KERNELS_POISON=1) so that every output buffer a fused backend allocates starts
# as NaN (integers as a large negative number): an element the kernel forgot to write then fails the comparison with the reference.
POISON_OUTPUTS = os.environ.get("EGMA_KERNELS_POISON", "0") == "1"


def new_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer the kernel fully overwrites: ``torch.empty`` normally, NaN-filled when poisoning."""
    if POISON_OUTPUTS:
        poison = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min  # integers: an impossible index
        return torch.full(shape, poison, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
