"""The loss options, checked once and frozen: what every backend receives besides the tensors.

``fine_grained_loss`` resolves its keyword options here (defaults, types, ranges) into one ``LossOptions``;
the backends read its fields. The defaults are the ones of ``docs/loss.md``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

DEFAULT_ALPHA = 0.5
EGMA_COMPAT_ALPHA = 0.8
DEFAULT_MAP_THRESHOLD = 2.0 / 7.0
DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)


class OptionError(ValueError, TypeError):
    """A bad loss option: a ``ValueError`` (and a ``TypeError`` when its type is wrong), with the expectation."""


@dataclass(frozen=True)
class LossOptions:
    """``alpha``: weight of the sentence-over-patches MLCE direction; ``map_threshold``: the mapping term's
    min-max threshold; ``weights``: (contrastive, gaze_mlce, mapping) multipliers; ``egma_compat``: the
    authors' training code's variant of the contrastive term."""

    alpha: float = DEFAULT_ALPHA
    map_threshold: float = DEFAULT_MAP_THRESHOLD
    weights: Tuple[float, float, float] = DEFAULT_WEIGHTS
    egma_compat: bool = False

    @property
    def op_floats(self) -> Tuple[float, float, float, float, float]:
        """``(alpha, map_threshold, w_con, w_mlce, w_map)``: the fused ops' ``options`` list without ``save``."""
        return (self.alpha, self.map_threshold, *self.weights)

    def as_kwargs(self) -> dict:
        """The keyword arguments of the backends' loss functions."""
        return {
            "alpha": self.alpha,
            "map_threshold": self.map_threshold,
            "weights": self.weights,
            "egma_compat": self.egma_compat,
        }


def is_real_number(x) -> bool:
    """A real number that is not a bool: Python and numpy ints and floats, 0-dim real tensors excluded."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _unit_interval(name: str, value) -> float:
    if not is_real_number(value):
        raise OptionError(f"{name} must be a number in [0, 1], got {value!r} ({type(value).__name__})")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise OptionError(f"{name} must be a number in [0, 1], got {value!r}")
    return value


def _flag(name: str, value) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise OptionError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def _weights(value) -> Tuple[float, float, float]:
    expected = "weights must be three finite numbers (contrastive, gaze_mlce, mapping)"
    if isinstance(value, torch.Tensor):
        if value.numel() != 3 or value.is_complex() or value.dtype == torch.bool:
            raise OptionError(f"{expected}, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.detach().reshape(-1).tolist()
    if isinstance(value, (str, bytes, set, frozenset, dict)) or not hasattr(value, "__iter__"):
        raise OptionError(f"{expected}, got {value!r}")
    items = list(value)
    if len(items) != 3 or not all(is_real_number(w) for w in items):
        raise OptionError(f"{expected}, got {value!r}")
    out = tuple(float(w) for w in items)
    if not all(math.isfinite(w) for w in out):
        raise OptionError(f"{expected}, got {value!r}")
    return out


def resolve_loss_options(
    alpha: Optional[float] = None,
    map_threshold: float = DEFAULT_MAP_THRESHOLD,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    egma_compat: bool = False,
) -> LossOptions:
    """Check the loss options and fill in the defaults (``alpha``: 0.5, or 0.8 with ``egma_compat``).

    Options given as plain Python numbers (and a tuple of weights), as a training loop passes the same ones
    on every call, are resolved once and then looked up."""
    if alpha is None and map_threshold is DEFAULT_MAP_THRESHOLD and weights is DEFAULT_WEIGHTS and egma_compat is False:
        return _DEFAULTS
    key = _plain_key(alpha, map_threshold, weights, egma_compat)
    options = _RESOLVED.get(key) if key is not None else None
    if options is not None:
        return options
    egma_compat = _flag("egma_compat", egma_compat)
    if alpha is None:
        alpha = EGMA_COMPAT_ALPHA if egma_compat else DEFAULT_ALPHA
    options = LossOptions(
        alpha=_unit_interval("alpha", alpha),
        map_threshold=_unit_interval("map_threshold", map_threshold),
        weights=_weights(weights),
        egma_compat=egma_compat,
    )
    if key is not None and len(_RESOLVED) < 256:
        _RESOLVED[key] = options
    return options


_RESOLVED: dict = {}
_PLAIN_TYPES = (float, int, bool, type(None))


def _plain_key(alpha, map_threshold, weights, egma_compat) -> Optional[tuple]:
    """A lookup key of options that are plain Python values (each with its type: True is not 1), else None."""
    if type(weights) is not tuple:
        return None
    values = (alpha, map_threshold, egma_compat, *weights)
    if not all(type(v) in _PLAIN_TYPES for v in values):
        return None
    return tuple((type(v), v) for v in values)


_DEFAULTS = LossOptions()
