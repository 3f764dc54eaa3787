"""Import the fused backends that exist in this installation; each registers itself in ``backends``.

A backend whose dependencies are missing (no Triton, extension not built) registers as unavailable
rather than failing the package import; ``backends.unavailable_backends()`` then says why.
"""

import dataclasses
import importlib
import warnings
from typing import Optional

_MODULES = ("egma_kernels.triton_backend", "egma_kernels.compiled")
# The oldest Triton the kernels are written for (pyproject's ``triton`` extra; docs/building.md).
MIN_TRITON = (3, 6)


def load_all() -> None:
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it needs is missing
                warnings.warn(f"{name} could not be imported ({exc}); its backend is unavailable")
    _explain_triton()


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def triton_why_unavailable() -> Optional[str]:
    """Why the triton backend cannot run here, in words with the fix (None when it can)."""
    import sys

    import torch

    tb = sys.modules.get("egma_kernels.triton_backend")
    if tb is None:
        return "egma_kernels.triton_backend could not be imported (see the warning issued on import)"
    if tb.triton is None:
        error = tb._TRITON_IMPORT_ERROR
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "triton":
            return 'Triton is not installed (pip install "egma-kernels[triton]", or pip install "triton>=3.6")'
        return f"Triton failed to import ({type(error).__name__}: {error})"
    version = getattr(tb.triton, "__version__", "0")
    if _version_tuple(version) < MIN_TRITON:
        return f"Triton {version} is too old; the kernels need Triton >= {'.'.join(map(str, MIN_TRITON))}"
    if not tb.interpreting() and not torch.cuda.is_available():
        return ("no CUDA device is visible (the triton backend runs CUDA tensors; TRITON_INTERPRET=1 runs it on "
                "CPU tensors in Triton's interpreter, for tests)")
    return None


def _explain_triton() -> None:
    """Give the registered triton backend its reason for being unavailable (and refuse a too-old Triton)."""
    from . import backends

    registered = backends._REGISTRY.get("triton")
    if registered is None or registered.why_unavailable is not None:
        return
    original = registered.is_available
    tb = importlib.import_module("egma_kernels.triton_backend")
    too_old = tb.triton is not None and _version_tuple(getattr(tb.triton, "__version__", "0")) < MIN_TRITON

    def is_available() -> bool:  # on every backend=None call: no more than the original's work
        return not too_old and original()

    backends.register_backend(dataclasses.replace(registered, is_available=is_available,
                                                  why_unavailable=triton_why_unavailable))
