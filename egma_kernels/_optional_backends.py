"""Import the fused backends that exist in this installation; each registers itself in ``backends``.

A backend whose dependencies are missing (no Triton, extension not built) registers as unavailable
rather than failing the package import.
"""

import importlib
import warnings

_MODULES = ("egma_kernels.triton_backend", "egma_kernels.compiled")


def load_all() -> None:
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it needs is missing
                warnings.warn(f"{name} could not be imported ({exc}); its backend is unavailable")
