"""SIIM-ACR Pneumothorax: the ``egma-prepare siim`` subcommand.

SIIM-ACR Pneumothorax (Kaggle ``siim-acr-pneumothorax-segmentation``): ``train-rle.csv`` (``ImageId``,
`` EncodedPixels`` -- the header has a leading space; ``-1`` = no pneumothorax; several rows per image
with several masks) and ``dicom-images-train/<study>/<series>/<ImageId>.dcm``. Labels
``Pneumothorax``/``Normal``.
"""

from __future__ import annotations

import os
from typing import Dict

from ._common import IMAGE_EXTS, Command, PrepareError, Summary, _binary_set, _read_csv
from ._fakes import write_csv, write_image

def prepare_siim(root: str, out_dir: str, *, seed: int = 0) -> Summary:
    """SIIM-ACR Pneumothorax: one row per ``ImageId`` (positive if any mask is not ``-1``)."""
    s = Summary("siim")
    header, rows = _read_csv(os.path.join(root, "train-rle.csv"), ["ImageId"])
    col = next((c for c in header if c.strip() == "EncodedPixels"), None)
    if col is None:
        raise PrepareError(f"{os.path.join(root, 'train-rle.csv')}: no EncodedPixels column; found {header}")
    labels: Dict[str, int] = {}
    for i, r in enumerate(rows):
        k = r["ImageId"].strip()
        enc = (r.get(col) or "").strip()
        if not k or not enc:
            s.skip(f"train-rle.csv: row {i + 2}", "ImageId or EncodedPixels empty")
            continue
        labels[k] = max(labels.get(k, 0), 0 if enc == "-1" else 1)
    paths: Dict[str, str] = {}
    img_root = os.path.join(root, "dicom-images-train")
    if not os.path.isdir(img_root):
        raise PrepareError(f"{img_root}: folder not found")
    for d, _, names in os.walk(img_root):
        for n in names:
            stem, ext = os.path.splitext(n)
            if ext.lower() == ".dcm" or ext.lower() in IMAGE_EXTS:
                paths.setdefault(stem, os.path.join(d, stem + ".dcm"))
    return _binary_set("siim", labels, paths, "Pneumothorax", out_dir, seed, s)


def _run(ns, out_dir: str) -> Summary:
    return prepare_siim(ns.root, out_dir, seed=ns.seed)


COMMANDS = {"siim": Command("SIIM-ACR Pneumothorax (train-rle.csv)", _run, seed=True)}


# ----------------------------------------------------------------------------------- the fake tree


def write_fake_tree(root: str) -> None:
    """A tiny SIIM-ACR Pneumothorax tree in the published layout under ``root``, for tests and demos; no real
    data.

    train-rle.csv (' EncodedPixels' header; -1 = none; two masks for one image) and images in
    dicom-images-train/<study>/<series>/; an empty EncodedPixels cell."""
    rows = []
    for i in range(20):
        k = f"1.2.276.0.{i}"
        rows.append((k, " -1" if i % 2 else " 387620 23 996 33"))
        if i == 1:
            rows.append((k, " 100 5"))
        write_image(os.path.join(root, "dicom-images-train", f"st{i}", f"se{i}", f"{k}.png"), seed=i)
    rows.append(("1.2.276.0.99", ""))
    write_csv(os.path.join(root, "train-rle.csv"), ["ImageId", " EncodedPixels"], rows)
