"""What the datasets' fake trees share: a tiny image, a CSV file and the report every fake reading dictates.

Each dataset module's ``write_fake_tree`` writes a tiny tree in that dataset's published layout, for tests and
demos; no real data. ``registry.write_fake_trees`` writes all of them. Seeds and values are fixed, so a tree
is the same bytes every time (a gzipped file's header also holds the time it was written).
"""

from __future__ import annotations

import csv
import gzip
import os
from typing import Iterable, Optional, Sequence

# The report of every fake reading: REFLACX's word timestamps, EGD-CXR's phrases and MIMIC-EYE's report text
REPORT = ["the heart is enlarged.", "there is no pleural effusion.", "clear lungs."]


def write_image(path: str, w: int = 64, h: int = 80, seed: int = 0, fmt: Optional[str] = None) -> None:
    """A ``w`` x ``h`` 8-bit grey image (smooth waves plus seeded noise) at ``path``, making its folder; the
    format follows the file name unless ``fmt`` names it."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = 120 + 60 * np.sin(xx / 7.0 + seed) * np.cos(yy / 9.0) + rng.normal(0, 10, (h, w))
    Image.fromarray(np.clip(a, 0, 255).astype("uint8")).save(path, format=fmt)


def write_csv(path: str, header: Sequence, rows: Iterable[Sequence]) -> None:
    """Write a CSV file (header row, then rows), making its folder; a ``.gz`` path is written gzipped."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open(path, "wt", newline="") if path.endswith(".gz") else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
