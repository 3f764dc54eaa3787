"""Backend registry: which implementations of the loss exist, which can run here, and which to pick.

A backend is a pair of functions with the signatures of ``reference.fine_grained_loss_ref`` and
``reference.filip_similarity_ref``, taking validated inputs. Fused backends (``triton``, ``cuda``,
``cpu``) register themselves here as they land; ``reference`` is always available.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
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
        for candidate in candidates:
            if _trusted(candidate, device):
                return _REGISTRY[candidate]
        return _REGISTRY["reference"]
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
    _warn_if_unchecked(name, device)
    return backend


def _available_for(device_type: str, auto: bool = False) -> List[str]:
    try:
        return available_backends(device_type, auto=auto)
    except ValueError:
        return []


# ---------------------------------------------------------------------------------------------------------
# First-use check (selfcheck.py, docs/selfcheck.md): ``backend=None`` chooses a fused backend only once it
# has passed the self-check on this device (kernel sources, torch and Triton versions); the verdict is
# cached on disk and, after the first call, held here, so that the loss's hot path does one dict lookup.

_VERDICTS: Dict[tuple, bool] = {}  # (backend, device type, device index) -> trusted by backend=None
_FAILED: Dict[tuple, dict] = {}  # the verdicts behind the False entries of _VERDICTS
_WARNED: Dict[tuple, bool] = {}  # (backend, device type, device index) of a by-name choice already warned about
_CHECKING = [0]  # > 0 while a self-check runs: its by-name calls are neither checked nor warned about


@contextmanager
def self_check_running():
    """Inside: by-name choices skip the first-use bookkeeping (the self-check's own calls)."""
    _CHECKING[0] += 1
    try:
        yield
    finally:
        _CHECKING[0] -= 1


def reset_first_use_state() -> None:
    """Forget this process's verdicts and warnings (the disk cache stays): the next call looks again."""
    _VERDICTS.clear()
    _FAILED.clear()
    _WARNED.clear()


def _trusted(name: str, device: torch.device) -> bool:
    """Whether ``backend=None`` may choose ``name`` for tensors on ``device``."""
    key = (name, device.type, device.index)
    verdict = _VERDICTS.get(key)
    if verdict is not None:
        return verdict
    if name == "reference" or _CHECKING[0]:
        return True
    from . import selfcheck

    if torch.compiler.is_compiling():
        return True  # not recorded: the first eager call checks (a check cannot run inside a traced graph)
    if not selfcheck.first_use_check_enabled():
        _VERDICTS[key] = True
        return True
    try:
        with self_check_running():
            result = selfcheck.first_use_check(name, device)
    except Exception as exc:  # the check's own failure (not a kernel's: run_case records those) trusts the backend
        warnings.warn(f"egma_kernels: the first-use self-check of backend {name!r} could not run "
                      f"({type(exc).__name__}: {exc}); the backend is used unchecked. Run `egma-bench --selfcheck` "
                      f"(docs/selfcheck.md).", SelfCheckWarning, stacklevel=4)
        result = {"passed": True}
    _VERDICTS[key] = bool(result.get("passed"))
    if not _VERDICTS[key]:
        _FAILED[key] = result
        warnings.warn(_failed_message(name, device, result, chosen_instead=True), SelfCheckWarning, stacklevel=4)
    return _VERDICTS[key]


def _warn_if_unchecked(name: str, device: torch.device) -> None:
    """One warning per (backend, device) when a backend chosen by name failed its self-check here or was
    never checked (with the first-use check on)."""
    key = (name, device.type, device.index)
    if name == "reference" or _CHECKING[0] or key in _WARNED:
        return
    _WARNED[key] = True
    from . import selfcheck

    if not selfcheck.first_use_check_enabled():
        return
    if key in _VERDICTS:  # checked (or its check turned off) when backend=None considered it
        verdict = _FAILED.get(key, {"passed": True})
    else:
        verdict = selfcheck.load_verdict(name, device)
    if verdict is None:
        warnings.warn(
            f"egma_kernels: backend {name!r} has not been self-checked on this {device.type} device with these "
            f"kernel sources and versions; it runs as asked. Run `egma-bench --selfcheck` once to check it "
            f"(docs/selfcheck.md), or set {selfcheck.ENV_FIRST_USE}=0 after you have.", SelfCheckWarning, stacklevel=4)
    elif not verdict.get("passed"):
        warnings.warn(_failed_message(name, device, verdict, chosen_instead=False), SelfCheckWarning, stacklevel=4)


def _failed_message(name: str, device: torch.device, verdict: dict, chosen_instead: bool) -> str:
    from . import selfcheck

    failures = verdict.get("failures") or ["(no case detail)"]
    more = verdict.get("failed_cases", len(failures)) - 1
    action = (f"backend=None will not choose it on this device (another backend, at worst 'reference', runs "
              f"instead)" if chosen_instead else "it runs because it was asked for by name")
    return (f"egma_kernels: backend {name!r} FAILED its self-check on this {device.type} device "
            f"({failures[0]}{f'; {more} more failed case(s)' if more > 0 else ''}); {action}. Its results "
            f"may be wrong. Please run `egma-bench --selfcheck --report selfcheck.json` and attach selfcheck.json "
            f"to a bug report (docs/selfcheck.md). The verdict is cached under {selfcheck.cache_dir()}; "
            f"{selfcheck.ENV_FIRST_USE}=0 turns the check off.")


class SelfCheckWarning(RuntimeWarning):
    """A fused backend failed its self-check on this device, or was chosen by name without one."""
