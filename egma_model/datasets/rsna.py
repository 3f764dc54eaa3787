"""RSNA Pneumonia: the ``egma-prepare rsna`` subcommand.

RSNA Pneumonia (Kaggle ``rsna-pneumonia-detection-challenge``): ``stage_2_train_labels.csv`` (``patientId``,
``x``, ``y``, ``width``, ``height``, ``Target``; several rows per image when there are several boxes) and
``stage_2_train_images/<patientId>.dcm``. Labels ``Pneumonia``/``Normal``.
"""

from __future__ import annotations

import os
from typing import Dict

from ._common import Command, Summary, _binary_set, _read_csv
from ._fakes import write_csv, write_image

def prepare_rsna(root: str, out_dir: str, *, seed: int = 0) -> Summary:
    """RSNA Pneumonia: one row per ``patientId`` (positive if any of its rows has ``Target`` 1)."""
    s = Summary("rsna")
    _, rows = _read_csv(os.path.join(root, "stage_2_train_labels.csv"), ["patientId", "Target"])
    labels: Dict[str, int] = {}
    for i, r in enumerate(rows):
        pid = r["patientId"].strip()
        t = r["Target"].strip()
        if t not in ("0", "1") or not pid:
            s.skip(f"stage_2_train_labels.csv: row {i + 2}", "Target is not 0 or 1 (or patientId empty)")
            continue
        labels[pid] = max(labels.get(pid, 0), int(t))
    img_dir = os.path.join(root, "stage_2_train_images")
    paths = {k: os.path.join(img_dir, k + ".dcm") for k in labels}
    return _binary_set("rsna", labels, paths, "Pneumonia", out_dir, seed, s)


def _run(ns, out_dir: str) -> Summary:
    return prepare_rsna(ns.root, out_dir, seed=ns.seed)


COMMANDS = {"rsna": Command("RSNA Pneumonia (stage_2_train_labels.csv)", _run, seed=True)}


# ----------------------------------------------------------------------------------- the fake tree


def write_fake_tree(root: str) -> None:
    """A tiny RSNA Pneumonia tree in the published layout under ``root``, for tests and demos; no real data.

    stage_2_train_labels.csv (two boxes for one positive) and PNGs named like the DICOMs; a bad Target and a
    missing image."""
    ids = [f"rsna-{i:03d}" for i in range(20)]
    rows = []
    for i, k in enumerate(ids):
        t = int(i % 3 == 0)
        rows.append((k, "10" if t else "", "20" if t else "", "30" if t else "", "40" if t else "", t))
        if i == 0:
            rows.append((k, "50", "60", "10", "10", 1))
        if i != 19:
            write_image(os.path.join(root, "stage_2_train_images", f"{k}.png"), seed=i)
    rows.append(("rsna-bad", "", "", "", "", "x"))
    write_csv(os.path.join(root, "stage_2_train_labels.csv"), ["patientId", "x", "y", "width", "height", "Target"],
              rows)
