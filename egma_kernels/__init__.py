"""egma-kernels: the EGMA (eye-gaze guided multi-modal alignment) loss in one call.

See ``docs/loss.md`` for the exact function and the README for usage.
"""

from .backends import SelfCheckWarning, available_backends, known_backends, unavailable_backends
from .functional import fine_grained_loss, filip_similarity
from .modules import FineGrainedLoss
from .packing import cu_seqlens_from_lengths, pack_sentences, unpack_sentences
from .reference import LossTerms, filip_similarity_ref, fine_grained_loss_ref
from . import _optional_backends

_optional_backends.load_all()

__version__ = "0.1.0"

__all__ = [
    "fine_grained_loss",
    "filip_similarity",
    "FineGrainedLoss",
    "LossTerms",
    "pack_sentences",
    "unpack_sentences",
    "cu_seqlens_from_lengths",
    "available_backends",
    "known_backends",
    "unavailable_backends",
    "SelfCheckWarning",
    "fine_grained_loss_ref",
    "filip_similarity_ref",
    "__version__",
]
