"""Backend registry: which implementations of the loss exist, which can run here, and which to pick.

A backend is a pair of functions with the signatures of ``reference.fine_grained_loss_ref`` and
``reference.filip_similarity_ref``, taking validated inputs. Fused backends (``triton``, ``cuda``,
``cpu``) register themselves here as they land; ``reference`` is always available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from . import reference

ENV_BACKEND = "EGMA_KERNELS_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    loss: Callable
    similarity: Callable
    devices: tuple  # device types it runs on, e.g. ("cpu", "cuda")
    is_available: Callable[[], bool] = lambda: True
    # Lower is preferred by ``backend=None`` among the available backends for a device.
    priority: int = 100
    # Device types for which ``backend=None`` may pick it (default: all of ``devices``). The Triton
    # backend runs CPU tensors only under the interpreter, which is for tests, never a default.
    auto_devices: Optional[tuple] = None
    # Whether the loss/similarity functions take ``max_seqlen=`` (the longest report, a host int).
    wants_max_seqlen: bool = False
    # Why it is unavailable, in words with the fix where there is one (None: no reason known).
    why_unavailable: Optional[Callable[[], Optional[str]]] = None


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


register_backend(
    Backend(
        name="reference",
        loss=reference.fine_grained_loss_ref,
        similarity=reference.filip_similarity_ref,
        devices=("cpu", "cuda"),
        priority=1000,
    )
)


def known_backends() -> List[str]:
    return sorted(_REGISTRY)


def _device_type(device) -> str:
    """The device type of ``device`` (a ``torch.device`` or a string such as "cpu", "cuda", "cuda:1"),
    refusing one that no registered backend runs on."""
    if isinstance(device, torch.device):
        kind = device.type
    elif isinstance(device, str):
        try:
            kind = torch.device(device).type
        except RuntimeError:
            kind = device
    else:
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    supported = sorted({d for b in _REGISTRY.values() for d in b.devices} | {"cpu", "cuda"})
    if kind not in supported:
        raise ValueError(f"unknown device {device!r}: egma_kernels backends run on {', '.join(supported)} tensors")
    return kind


def available_backends(device=None, *, auto: bool = False) -> List[str]:
    """Names of the backends that can run here, best first, optionally only those for a device type
    ("cpu", "cuda"; a device type no backend runs on raises ``ValueError``); with ``auto=True`` only those
    that ``backend=None`` may choose for that device. Why a fused backend is missing:
    ``unavailable_backends()``."""
    if device is not None:
        device = _device_type(device)
    names = []
    for b in sorted(_REGISTRY.values(), key=lambda b: (b.priority, b.name)):
        devices = (b.auto_devices if b.auto_devices is not None else b.devices) if auto else b.devices
        if device is not None and device not in devices:
            continue
        if b.is_available():
            names.append(b.name)
    return names


def unavailable_backends() -> Dict[str, str]:
    """``{name: why}`` for each registered backend that cannot run here (with the fix where there is one)."""
    out = {}
    for name in known_backends():
        b = _REGISTRY[name]
        if not b.is_available():
            out[name] = (b.why_unavailable() if b.why_unavailable is not None else None) or "unavailable"
    return out


def resolve_backend(name: Optional[str], device: torch.device) -> Backend:
    """The backend to run for tensors on ``device``: ``name``, else ``$EGMA_KERNELS_BACKEND``, else the best."""
    if name is None:
        name = os.environ.get(ENV_BACKEND) or None
    if name is None or name == "auto":
        candidates = _available_for(device.type, auto=True)
        if not candidates:
            raise RuntimeError(f"no egma_kernels backend can run on {device.type} tensors")
        return _REGISTRY[candidates[0]]
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string or None, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(known_backends())} (or None/'auto')")
    backend = _REGISTRY[name]
    # The device first: a backend for another device is refused for that reason, whatever this installation has.
    if device.type not in backend.devices:
        raise ValueError(
            f"backend {name!r} runs on {', '.join(backend.devices)} tensors, but the inputs are on {device.type}; "
            f"for {device.type} tensors use one of: {', '.join(_available_for(device.type)) or 'none'}"
        )
    if not backend.is_available():
        why = backend.why_unavailable() if backend.why_unavailable is not None else None
        raise RuntimeError(
            f"backend {name!r} is not available in this installation"
            + (f": {why}" if why else "")
            + f"; available for {device.type} tensors: {', '.join(_available_for(device.type)) or 'none'}"
        )
    return backend


def _available_for(device_type: str, auto: bool = False) -> List[str]:
    try:
        return available_backends(device_type, auto=auto)
    except ValueError:
        return []
