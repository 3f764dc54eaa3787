"""``nn.Module`` wrapper holding the loss options."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .functional import fine_grained_loss
from .options import DEFAULT_MAP_THRESHOLD, DEFAULT_WEIGHTS, resolve_loss_options


# The keyword options of fine_grained_loss that the module holds as attributes.
_OPTION_NAMES = ("alpha", "map_threshold", "weights", "egma_compat", "backend", "return_details", "validate", "group")


class FineGrainedLoss(nn.Module):
    """The EGMA loss as a module; ``forward`` takes the tensors of ``fine_grained_loss``."""

    def __init__(
        self,
        *,
        alpha: Optional[float] = None,
        map_threshold: float = DEFAULT_MAP_THRESHOLD,
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        egma_compat: bool = False,
        backend: Optional[str] = None,
        return_details: bool = False,
        validate: Optional[bool] = None,
        group=None,
    ):
        super().__init__()
        options = resolve_loss_options(alpha, map_threshold, weights, egma_compat)  # bad options refused here
        self.alpha = alpha
        self.map_threshold = options.map_threshold
        self.weights = options.weights
        self.egma_compat = options.egma_compat
        self.backend = backend
        self.return_details = return_details
        self.validate = validate
        # A torch.distributed process group: the loss of the group's global batch (see fine_grained_loss).
        self.group = group

    def forward(self, patch_emb, sent_emb, cu_seqlens, logit_scale, gaze=None, gaze_mask=None, max_seqlen=None):
        # The options are read at each call (not frozen at construction): assigning an attribute, e.g.
        # ``loss.backend = "reference"``, takes effect at the next call.
        options = {name: getattr(self, name) for name in _OPTION_NAMES}
        return fine_grained_loss(patch_emb, sent_emb, cu_seqlens, logit_scale, gaze, gaze_mask,
                                 max_seqlen=max_seqlen, **options)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, map_threshold={self.map_threshold:.4g}, weights={self.weights}, "
            f"egma_compat={self.egma_compat}, backend={self.backend}"
            + (", group=<process group>" if self.group is not None else "")
        )
