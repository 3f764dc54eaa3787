"""Random inputs for one benchmark size, and the float64 reference they are checked against."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..packing import cu_seqlens_from_lengths
from .sweeps import SIZES, Size

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

# t = 1/0.07, the logit scale the original model starts from.
LOGIT_SCALE = 1.0 / 0.07


@dataclass
class Problem:
    size: Size
    dtype: torch.dtype
    device: torch.device
    lengths: List[int]
    patch_emb: torch.Tensor  # leaves (requires_grad for a loss size)
    sent_emb: torch.Tensor
    cu_seqlens: torch.Tensor
    logit_scale: torch.Tensor
    gaze: Optional[torch.Tensor]
    gaze_mask: Optional[torch.Tensor]

    @property
    def N(self) -> int:
        return sum(self.lengths)

    @property
    def S_max(self) -> int:
        return max(self.lengths)

    @property
    def leaves(self) -> List[torch.Tensor]:
        return [t for t in (self.patch_emb, self.sent_emb, self.logit_scale) if t.requires_grad]

    def zero_grad(self) -> None:
        for t in (self.patch_emb, self.sent_emb, self.logit_scale):
            t.grad = None

    def input_bytes(self) -> int:
        total = 0
        for t in (self.patch_emb, self.sent_emb, self.cu_seqlens, self.logit_scale, self.gaze, self.gaze_mask):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def loss_args(self) -> Dict[str, Optional[torch.Tensor]]:
        return dict(
            patch_emb=self.patch_emb,
            sent_emb=self.sent_emb,
            cu_seqlens=self.cu_seqlens,
            logit_scale=self.logit_scale,
            gaze=self.gaze,
            gaze_mask=self.gaze_mask,
        )

    def as_float64(self, device: Optional[torch.device] = None) -> "Problem":
        """The same inputs (values as stored in ``dtype``) in float64: what the errors are measured against."""
        device = self.device if device is None else device

        def up(t):
            if t is None:
                return None
            if t.is_floating_point():
                out = t.detach().to(device=device, dtype=torch.float64)
                return out.requires_grad_(t.requires_grad)
            return t.to(device)

        return Problem(
            self.size, torch.float64, device, self.lengths, up(self.patch_emb), up(self.sent_emb),
            up(self.cu_seqlens), up(self.logit_scale), up(self.gaze), up(self.gaze_mask),
        )


# A long-tailed report length (lognormal, median 5, clipped to 1..30): tiles sized by the longest report pad
# most here (tools/padding_counts.py).
SIZES.setdefault("egma-longtail", Size("egma-longtail", "loss", B=40, P=49, max_sent=30))


def draw_lengths(size: Size) -> List[int]:
    g = torch.Generator().manual_seed(1000 + size.seed)
    if size.name.endswith("longtail"):
        x = (torch.randn(size.R, generator=g, dtype=torch.float64) * 0.75 + math.log(5.0)).exp().round()
        return x.clamp(size.min_sent, size.max_sent).long().tolist()
    return torch.randint(size.min_sent, size.max_sent + 1, (size.R,), generator=g).tolist()


def make_problem(size: Size, dtype: torch.dtype, device: torch.device) -> Problem:
    """Unit-norm embeddings drawn on the CPU from a fixed seed (identical on every machine), then moved."""
    g = torch.Generator().manual_seed(size.seed)
    lengths = draw_lengths(size)
    N = sum(lengths)
    grad = size.kind == "loss"
    patch = torch.nn.functional.normalize(torch.randn(size.B, size.P, size.D, generator=g), dim=-1)
    sent = torch.nn.functional.normalize(torch.randn(N, size.D, generator=g), dim=-1)
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    gaze = gaze_mask = None
    if size.kind == "loss" and size.gaze_fraction > 0:
        heat = torch.rand(N, size.P, generator=g)
        keep = torch.rand(N, size.P, generator=g) < size.gaze_density
        gaze = (heat * keep).to(device=device, dtype=dtype)
        if size.gaze_fraction < 1:
            mask = torch.rand(size.B, generator=g) < size.gaze_fraction
            mask[0] = True
            gaze_mask = mask.to(device)
    return Problem(
        size=size,
        dtype=dtype,
        device=device,
        lengths=lengths,
        patch_emb=patch.to(device=device, dtype=dtype).requires_grad_(grad),
        sent_emb=sent.to(device=device, dtype=dtype).requires_grad_(grad),
        cu_seqlens=cu_seqlens_from_lengths(lengths).to(device),
        logit_scale=torch.tensor(LOGIT_SCALE, dtype=scale_dtype, device=device).requires_grad_(grad),
        gaze=gaze,
        gaze_mask=gaze_mask,
    )


def similarity_elements(problem: Problem, padded: bool = False) -> int:
    """Entries of the ``(B*P) x N`` similarity matrix (``x (R*S_max)`` for the zero-padded layout)."""
    cols = problem.size.R * problem.S_max if padded else problem.N
    return problem.size.B * problem.size.P * cols
