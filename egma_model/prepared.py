"""The preparation cache: images, sentences and gaze computed once, read at training time without decoding.

Built by ``egma-prepare cache --manifest M`` (see ``egma_model.prepared_build.build_cache``). A cache is a folder:

==================  ========================================================================================
``images.npy``      ``(N, size, size)`` float32: ``preprocess_image``'s output for each manifest row, exactly
                    (the photometric augmentation and the normalisation still run per item)
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

import dataclasses
import json
import os
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
        "gaze_reader_rules": gz.READER_RULES_VERSION,
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


_OPEN: Dict[tuple, PreparedCache] = {}


def open_cache(folder: str) -> PreparedCache:
    """The cache at ``folder``, opened once per process and build (a rebuilt cache has a new ``cache.json``)."""
    try:
        st = os.stat(os.path.join(folder, "cache.json"))
        key = (os.path.realpath(folder), st.st_mtime_ns, st.st_size)
    except OSError:
        return PreparedCache(folder)  # names what is missing
    if key not in _OPEN:
        _OPEN[key] = PreparedCache(folder)
    return _OPEN[key]


# The builder lives in egma_model.prepared_build (it reads manifests through egma_model.data, which reads caches
# through this module); its names stay importable from here for one release, through importlib so that no
# import points back up.
_MOVED = {"build_cache": "egma_model.prepared_build"}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
