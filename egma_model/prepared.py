"""The preparation cache: images, sentences and gaze computed once, read at training time without decoding.

Built by ``egma-prepare cache --manifest M`` (see :func:`build_cache`). A cache is a folder:

==================  ========================================================================================
``images.npy``      ``(N, size, size)`` float32: ``preprocess_image``'s output for each manifest row, exactly
                    (the photometric augmentation and the normalisation still run per item, as before)
``gaze.npy``        ``(total sentences, P)`` float32: every row's per-sentence gaze on the patch grid
``rows.json``       per row: its sentences, the first gaze row, and whether the row has gaze
``cache.json``      the settings it was built with (:func:`cache_settings`), the manifest's hash, the sizes;
                    written last, so a folder without it is an unfinished build
==================  ========================================================================================

Beside the manifest, the build writes ``<manifest>.cached.csv`` (or ``.jsonl``; ``<manifest>.cached-<folder>.csv``
for a folder other than the default): the manifest's rows with two more columns, ``cache`` (the folder, relative to the manifest) and ``cache_row``. A dataset built on records
that carry them reads the cache (``EGMADataset(..., prepared=True)``, the default) and refuses it, naming each
setting that differs, when it was built with other settings than the run's (image size, patch grid, gaze
options, sentence rule, the gaze readers' rules version, the cache format).

The build is resumable: rows are processed in chunks, each chunk's sentences and gaze are written to
``partial/`` as they finish and the images straight into ``images.npy``; a re-run skips finished chunks.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import gaze as gz

CACHE_FORMAT = 1
CACHE_COLUMNS = ("cache", "cache_row")
CHUNK_ROWS = 64


class CacheMismatchError(ValueError):
    """A preparation cache built with other settings than the run's, or an unfinished or damaged one."""


def cache_settings(*, image_size: int, grid: Sequence[int], gaze_options, use_gaze: bool, split_rule: str) -> Dict:
    """Everything that changes what the cache holds. Two runs may share a cache only if these are equal."""
    return {
        "format": CACHE_FORMAT,
        "image_size": int(image_size),
        "grid": [int(grid[0]), int(grid[1])],
        "gaze_options": dataclasses.asdict(gaze_options),
        "use_gaze": bool(use_gaze),
        "split_rule": str(split_rule),
        "gaze_reader_rules": str(getattr(gz, "READER_RULES_VERSION", "0")),
    }


def _differences(built: Dict, wanted: Dict, prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(built) | set(wanted)):
        a, b = built.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: cache {a!r}, this run {b!r}")
    return out


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class PreparedCache:
    """An opened cache folder (memory-mapped; safe to open in every DataLoader worker)."""

    def __init__(self, folder: str):
        self.folder = folder
        meta_path = os.path.join(folder, "cache.json")
        if not os.path.isfile(meta_path):
            raise CacheMismatchError(f"{folder}: not a finished preparation cache (no cache.json); "
                                     f"run `egma-prepare cache` again to finish it")
        with open(meta_path) as f:
            self.meta = json.load(f)
        with open(os.path.join(folder, "rows.json")) as f:
            self.rows = json.load(f)
        self.images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
        self.gaze = np.load(os.path.join(folder, "gaze.npy"), mmap_mode="r")
        if len(self.rows) != self.meta.get("rows") or self.images.shape[0] != len(self.rows):
            raise CacheMismatchError(f"{folder}: damaged cache ({len(self.rows)} rows listed, "
                                     f"{self.images.shape[0]} images, cache.json says {self.meta.get('rows')})")

    def check(self, settings: Dict) -> None:
        diff = _differences(self.meta["settings"], settings)
        if diff:
            raise CacheMismatchError(
                f"{self.folder}: the preparation cache was built with other settings than this run's: "
                + "; ".join(diff) + ". Rebuild it with `egma-prepare cache` and this run's options, or train "
                "from the original manifest")

    def image(self, row: int) -> torch.Tensor:
        """``(1, size, size)`` float32, equal to ``preprocess_image(load_image(path), size)``."""
        return torch.from_numpy(np.array(self.images[row], dtype=np.float32, copy=True))[None]

    def sentences_and_gaze(self, row: int) -> Tuple[List[str], Optional[torch.Tensor]]:
        r = self.rows[row]
        sentences = list(r["sentences"])
        if not r["has_gaze"]:
            return sentences, None
        g = np.array(self.gaze[r["gaze_start"]: r["gaze_start"] + len(sentences)], dtype=np.float32, copy=True)
        return sentences, torch.from_numpy(g)


_OPEN: Dict[str, PreparedCache] = {}


def open_cache(folder: str) -> PreparedCache:
    """The cache at ``folder``, opened once per process."""
    key = os.path.realpath(folder)
    if key not in _OPEN:
        _OPEN[key] = PreparedCache(folder)
    return _OPEN[key]


# ------------------------------------------------------------------------------------------- building


def _cached_manifest_path(manifest: str, folder: str) -> str:
    """Beside the manifest (its relative paths stay valid): ``<stem>.cached.csv`` for the default folder,
    ``<stem>.cached-<folder name>.csv`` for another, so that caches of other settings do not overwrite it."""
    stem, ext = os.path.splitext(manifest)
    ext = ext if ext in (".csv", ".jsonl") else ".csv"
    if os.path.abspath(folder) == os.path.abspath(stem + ".cache"):
        return f"{stem}.cached{ext}"
    return f"{stem}.cached-{os.path.basename(os.path.normpath(folder))}{ext}"


def _write_cached_manifest(manifest: str, folder: str, out_path: str) -> None:
    """The manifest's rows as they are, plus ``cache`` and ``cache_row`` (rows counted as load_manifest does)."""
    rel = os.path.relpath(folder, os.path.dirname(os.path.abspath(out_path)))
    from .textio import read_text

    tmp = out_path + ".tmp"
    if manifest.endswith(".jsonl") or manifest.endswith(".json"):
        lines = [ln for ln in read_text(manifest).splitlines() if ln.strip()]
        with open(tmp, "w", encoding="utf-8") as f:
            for i, ln in enumerate(lines):
                obj = json.loads(ln)
                obj.update(cache=rel, cache_row=i)
                f.write(json.dumps(obj) + "\n")
    else:
        from .textio import read_csv_rows

        header, rows = read_csv_rows(manifest)
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header + [c for c in CACHE_COLUMNS if c not in header])
            for i, r in enumerate(rows):
                r = dict(r, cache=rel, cache_row=str(i))
                w.writerow([r.get(c, "") for c in header + [c for c in CACHE_COLUMNS if c not in header]])
    os.replace(tmp, out_path)


def build_cache(manifest: str, folder: Optional[str] = None, *, image_size: int = 224, grid=(7, 7),
                gaze_options=None, use_gaze: bool = True, split_rule: str = "ours", progress: bool = True,
                rebuild: bool = False) -> Dict:
    """Prepare every row of ``manifest`` once; returns a summary (rows, seconds, bytes on disk, paths)."""
    from .data import EGMADataset, GazeOptions, load_image, load_manifest, preprocess_image

    gaze_options = gaze_options or GazeOptions()
    folder = folder or os.path.splitext(manifest)[0] + ".cache"
    t0 = time.perf_counter()
    records = load_manifest(manifest, split_rule=split_rule)
    settings = cache_settings(image_size=image_size, grid=grid, gaze_options=gaze_options, use_gaze=use_gaze,
                              split_rule=split_rule)
    digest = file_sha256(manifest)
    plan = {"settings": settings, "manifest_sha256": digest, "rows": len(records)}
    if rebuild and os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(os.path.join(folder, "partial"), exist_ok=True)
    plan_path = os.path.join(folder, "plan.json")
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        if old != plan:  # another manifest or other settings: start again rather than mix
            shutil.rmtree(folder)
            os.makedirs(os.path.join(folder, "partial"))
    _write_json(plan_path, plan)
    if os.path.isfile(os.path.join(folder, "cache.json")):
        os.remove(os.path.join(folder, "cache.json"))  # unfinished until this build finishes
    img_path = os.path.join(folder, "images.npy")
    mode = "r+" if os.path.isfile(img_path) else "w+"
    images = np.lib.format.open_memmap(img_path, mode=mode, dtype=np.float32,
                                       shape=(len(records), image_size, image_size))
    ds = EGMADataset(records, image_size=image_size, grid=tuple(grid), train=False, max_sentences=0,
                     gaze_options=gaze_options, use_gaze=use_gaze)
    chunks = range(0, len(records), CHUNK_ROWS)
    bar = _progress(len(records), progress)
    for start in chunks:
        part = os.path.join(folder, "partial", f"{start:08d}.npz")
        stop = min(start + CHUNK_ROWS, len(records))
        if os.path.isfile(part):
            bar.update(stop - start)
            continue
        sentences, gazes, has = [], [], []
        for i in range(start, stop):
            images[i] = preprocess_image(load_image(records[i].image), image_size)[0].numpy()
            s, g = ds.sentences_and_gaze(i)
            sentences.append(s)
            has.append(g is not None)
            gazes.append(g.numpy() if g is not None else np.zeros((len(s), grid[0] * grid[1]), np.float32))
            bar.update(1)
        images.flush()
        tmp = part + ".tmp.npz"
        np.savez(tmp, gaze=np.concatenate(gazes).astype(np.float32), has=np.array(has),
                 sentences=np.array(json.dumps(sentences)))
        os.replace(tmp, part)
    bar.close()
    del images
    _assemble(folder, len(records), grid, plan)
    shutil.rmtree(os.path.join(folder, "partial"), ignore_errors=True)
    out_manifest = _cached_manifest_path(manifest, folder)
    _write_cached_manifest(manifest, folder, out_manifest)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return {"rows": len(records), "seconds": time.perf_counter() - t0, "bytes": size, "cache": folder,
            "manifest": out_manifest}


def _assemble(folder: str, n: int, grid, plan: Dict) -> None:
    rows, gazes, start = [], [], 0
    for f in sorted(os.listdir(os.path.join(folder, "partial"))):
        if not f.endswith(".npz") or f.endswith(".tmp.npz"):
            continue
        with np.load(os.path.join(folder, "partial", f)) as z:
            sentences = json.loads(str(z["sentences"]))
            g, has = z["gaze"], z["has"]
        gazes.append(g)
        for s, h in zip(sentences, has):
            rows.append({"sentences": s, "gaze_start": start, "has_gaze": bool(h)})
            start += len(s)
    if len(rows) != n:
        raise CacheMismatchError(f"{folder}: {len(rows)} of {n} rows prepared; run the build again")
    P = int(grid[0]) * int(grid[1])
    np.save(os.path.join(folder, "gaze.npy"), np.concatenate(gazes) if gazes else np.zeros((0, P), np.float32))
    _write_json(os.path.join(folder, "rows.json"), rows)
    _write_json(os.path.join(folder, "cache.json"), dict(plan, sentences=start))


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="preparing", unit="row", dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return _NoBar()
