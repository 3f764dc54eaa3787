"""Building the preparation cache (``egma-prepare cache``): every manifest row's image, sentences and gaze
computed once, in resumable chunks. The cache's format and its reader are in ``egma_model.prepared``.

Module attributes are read at call time (``data.load_image``, ``prepared.CHUNK_ROWS``) so that a test can
inject a fault or a chunk size.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from typing import Dict, Optional

import numpy as np

from egma_kernels.cli_support import progress_bar

from . import data, prepared
from .checkpoint import file_sha256
from .prepared import CACHE_COLUMNS, CacheMismatchError, cache_settings
from .textio import read_csv_rows, read_text


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
    tmp = out_path + ".tmp"
    if manifest.endswith(".jsonl") or manifest.endswith(".json"):
        lines = [ln for ln in read_text(manifest).splitlines() if ln.strip()]
        with open(tmp, "w", encoding="utf-8") as f:
            for i, ln in enumerate(lines):
                obj = json.loads(ln)
                obj.update(cache=rel, cache_row=i)
                f.write(json.dumps(obj) + "\n")
    else:
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
    gaze_options = gaze_options or data.GazeOptions()
    folder = folder or os.path.splitext(manifest)[0] + ".cache"
    t0 = time.perf_counter()
    records = data.load_manifest(manifest, split_rule=split_rule)
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
    ds = data.EGMADataset(records, image_size=image_size, grid=tuple(grid), train=False, max_sentences=0,
                     gaze_options=gaze_options, use_gaze=use_gaze)
    chunks = range(0, len(records), prepared.CHUNK_ROWS)
    bar = _progress(len(records), progress)
    for start in chunks:
        part = os.path.join(folder, "partial", f"{start:08d}.npz")
        stop = min(start + prepared.CHUNK_ROWS, len(records))
        if os.path.isfile(part):
            bar.update(stop - start)
            continue
        sentences, gazes, has = [], [], []
        for i in range(start, stop):
            images[i] = data.preprocess_image(data.load_image(records[i].image), image_size)[0].numpy()
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
    return progress_bar(total=total, desc="preparing", enabled=enabled, unit="row") or _NoBar()
