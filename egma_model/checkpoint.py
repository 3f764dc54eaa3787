"""Atomic, self-checking checkpoint folders.

A checkpoint is a folder (``<out>/checkpoint``, ``<out>/final``, ``<out>/step-<n>``) written as a whole or
not at all:

1. every file is written into a temporary folder beside the target (same parent, so on the same file
   system), flushed and ``fsync``-ed;
2. a manifest, ``checkpoint.json``, lists every file with its size and SHA-256, the step and the format
   version; it is written last, so a folder without it was never finished;
3. the temporary folder replaces the target by renames: the previous checkpoint is moved aside to
   ``<target>.previous``, the new one renamed into place, then the previous one removed. A kill between the
   two renames leaves ``<target>.previous`` complete, and :func:`resolve` falls back to it.

Loading (:func:`verify`) checks the manifest against the files (missing, extra-sized or altered files are
refused, naming the file), so a torn or foreign checkpoint is refused with a :class:`CheckpointError`
instead of loading half of one. The same pattern as the common trainers' (write to a temporary name, then
``os.replace``; e.g. huggingface/transformers ``Trainer._save_checkpoint`` staging folder), extended to a
whole folder.

Fault injection for the tests: ``EGMA_TEST_CHECKPOINT_FAULT=<point>:<action>[:<n>]`` makes the ``n``-th
save (default the first) of the process kill its own process (``kill``, SIGKILL) or raise
``OSError(ENOSPC)`` (``enospc``) at ``point``: ``after_weights`` (model weights written, nothing else),
``before_manifest`` (every file written, no manifest), ``before_swap`` (temporary folder complete),
``mid_swap`` (the previous checkpoint moved aside, the new one not yet in place) or ``after_swap`` (the new
checkpoint in place).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import uuid
from typing import Callable, Dict, Optional

__all__ = ["CheckpointError", "MANIFEST_NAME", "FORMAT", "write", "verify", "resolve", "copy", "fault_point",
           "save_tensors", "save_torch"]

MANIFEST_NAME = "checkpoint.json"
FORMAT = "egma-checkpoint"
VERSION = 1
PREVIOUS_SUFFIX = ".previous"
_FAULT_ENV = "EGMA_TEST_CHECKPOINT_FAULT"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (the previous one is kept) or that is torn, altered or not an
    EGMA checkpoint; the message names the folder and what is wrong."""


_fault_hits: Dict[str, int] = {}


def fault_point(name: str) -> None:
    """The test hook (module docstring): act if ``EGMA_TEST_CHECKPOINT_FAULT`` names this point (and this
    is the ``n``-th time the process reaches it, with ``<point>:<action>:<n>``)."""
    spec = os.environ.get(_FAULT_ENV, "")
    if not spec:
        return
    point, action, nth = (spec.split(":") + ["", "1"])[:3]
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    raise ValueError(f"{_FAULT_ENV}={spec!r}: the action must be kill or enospc")


def write_bytes(path: str, data) -> None:
    """``data`` written to ``path`` through Python's file I/O, so that a full disk raises ``OSError(ENOSPC)``."""
    with open(path, "wb") as f:
        f.write(data)


def save_tensors(tensors: Dict, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """A safetensors file. Serialised in memory first: safetensors' own file writer and torch.save's report a
    full disk as their internal errors (``SafetensorError``, ``RuntimeError: unexpected pos``), Python's
    file I/O as ``OSError(ENOSPC)``; the cost is one serialised copy in host memory while it is written."""
    from safetensors.torch import save

    write_bytes(path, save(tensors, metadata=metadata))


def save_torch(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path``, serialised in memory first (see ``save_tensors``)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoint manifests, the preparation cache's key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: str) -> None:
    """Flush every file and folder under ``root`` to the disk (a rename is durable only after its data)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some systems (Windows): nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _listing(root: str) -> Dict[str, Dict]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel != MANIFEST_NAME:
                out[rel] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    return out


def write(path: str, fill: Callable[[str], None], *, step: Optional[int] = None, kind: str = "model") -> None:
    """Write the checkpoint folder ``path`` atomically: ``fill(tmp)`` writes the files into a temporary
    folder, then the manifest is added and the folder renamed into place (module docstring).

    Any ``OSError`` (a full disk, no permission) removes the temporary folder, keeps the previous
    checkpoint and raises ``CheckpointError`` naming ``path`` and the cause."""
    path = os.path.normpath(path)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_stale_temporaries(parent, os.path.basename(path))
        os.makedirs(tmp)
        fill(tmp)
        fault_point("before_manifest")
        manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "step": step, "files": _listing(tmp)}
        with open(os.path.join(tmp, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        _fsync_tree(tmp)
        fault_point("before_swap")
        _swap_into_place(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}"
                              f"{_keep_note(path)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temporaries(parent: str, name: str) -> None:
    """Temporary folders of saves that were killed (one writer per checkpoint folder at a time)."""
    prefix = f".{name}.tmp-"
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _keep_note(path: str) -> str:
    if os.path.isdir(path):
        return "; the previous checkpoint there is kept"
    if os.path.isdir(path + PREVIOUS_SUFFIX):
        return f"; the previous checkpoint is kept as {path + PREVIOUS_SUFFIX}"
    return ""


def _swap_into_place(tmp: str, path: str) -> None:
    previous = path + PREVIOUS_SUFFIX
    if os.path.isdir(path):
        if os.path.isdir(previous):
            if _is_complete(path):
                shutil.rmtree(previous)
            else:  # a torn target beside a complete previous one: keep the good one as the fallback
                shutil.rmtree(path)
        if os.path.isdir(path):
            os.replace(path, previous)
    fault_point("mid_swap")
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(previous, ignore_errors=True)
    fault_point("after_swap")


def _is_complete(path: str) -> bool:
    try:
        verify(path)
        return True
    except CheckpointError:
        return False


def verify(path: str) -> Dict:
    """The manifest of the checkpoint folder ``path`` after checking every file against it; a missing
    folder, a missing or foreign manifest, a missing file or one whose size or SHA-256 differs raises
    ``CheckpointError`` naming it."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no checkpoint folder there")
    mpath = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{path}: not a complete EGMA checkpoint (no {MANIFEST_NAME}: the save did not "
                              f"finish, or the folder was written by something else)")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: unreadable checkpoint manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{mpath}: not an EGMA checkpoint manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{mpath}: checkpoint format version {manifest.get('version')!r}; this egma_model "
                              f"reads version {VERSION}")
    for rel, entry in manifest["files"].items():
        fpath = os.path.join(path, *rel.split("/"))
        if not os.path.isfile(fpath):
            raise CheckpointError(f"{path}: torn checkpoint: {rel} is missing")
        size = os.path.getsize(fpath)
        if size != entry.get("size"):
            raise CheckpointError(f"{path}: torn checkpoint: {rel} has {size} bytes, the manifest says "
                                  f"{entry.get('size')}")
        if file_sha256(fpath) != entry.get("sha256"):
            raise CheckpointError(f"{path}: altered checkpoint: {rel} does not match its SHA-256 in {MANIFEST_NAME}")
    return manifest


def resolve(path: str) -> str:
    """The folder to load for checkpoint ``path``: ``path`` when complete, else ``<path>.previous`` when a
    save was killed between its two renames (verified); otherwise the error about ``path``."""
    try:
        verify(path)
        return path
    except CheckpointError as first:
        previous = path + PREVIOUS_SUFFIX
        if os.path.isdir(previous):
            try:
                verify(previous)
                return previous
            except CheckpointError:
                pass
        raise first


def copy(src: str, dst: str) -> None:
    """Copy the checkpoint folder ``src`` to ``dst`` the same atomic way (``src`` verified first)."""
    manifest = verify(src)

    def fill(tmp: str) -> None:
        for rel in manifest["files"]:
            target = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(src, *rel.split("/")), target)

    write(dst, fill, step=manifest.get("step"), kind=manifest.get("kind", "model"))
