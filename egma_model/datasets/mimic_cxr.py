"""MIMIC-CXR-JPG, the images (and the official split) behind REFLACX and EGD-CXR.

MIMIC-CXR-JPG (PhysioNet ``mimic-cxr-jpg`` 2.0.0/2.1.0): ``files/p<XX>/p<subject_id>/s<study_id>/<dicom_id>.jpg``,
``mimic-cxr-2.0.0-metadata.csv.gz`` (``dicom_id``, ``Rows``, ``Columns``: the DICOM's size) and
``mimic-cxr-2.0.0-split.csv.gz`` (``dicom_id``, ``split``: ``train``/``validate``/``test``), gzipped as
published (plain names are read too). Images are looked up by ``dicom_id`` over the whole
``files/`` tree, so a path that differs between a gaze set and the JPG release (``.dcm`` vs ``.jpg``, a
``physionet.org/files/mimic-cxr/2.0.0/`` prefix, another version folder) still finds its image.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from ..textio import find_published
from ._common import IMAGE_EXTS, PrepareError, _int, _read_csv, split_name
from ._fakes import write_csv, write_image


class MimicJpg:
    """MIMIC-CXR-JPG: ``dicom_id`` -> JPG path (one walk of ``files/``), the DICOM sizes and the official split."""

    def __init__(self, root: Optional[str]):
        self.root = root
        self.paths: Dict[str, str] = {}
        self.sizes: Dict[str, Tuple[int, int]] = {}
        self.split: Dict[str, str] = {}
        if not root:
            return
        if not os.path.isdir(root):
            raise PrepareError(f"{root}: MIMIC-CXR-JPG folder not found")
        files = os.path.join(root, "files") if os.path.isdir(os.path.join(root, "files")) else root
        for d, _, names in os.walk(files):
            for n in names:
                stem, ext = os.path.splitext(n)
                if ext.lower() in IMAGE_EXTS:
                    self.paths.setdefault(stem, os.path.join(d, n))
        # PhysioNet distributes both files gzipped (mimic-cxr-jpg 2.0.0/2.1.0 file list): either name is read
        p = find_published(root, "mimic-cxr-2.0.0-metadata.csv", ["mimic-cxr-2.1.0-metadata.csv"])
        if p:
            _, rows = _read_csv(p, ["dicom_id", "Rows", "Columns"])
            for r in rows:
                w, h = _int(r["Columns"]), _int(r["Rows"])
                if w and h:
                    self.sizes[r["dicom_id"].strip()] = (w, h)
        p = find_published(root, "mimic-cxr-2.0.0-split.csv")
        if p:
            _, rows = _read_csv(p, ["dicom_id", "split"])
            self.split = {r["dicom_id"].strip(): split_name(r["split"]) for r in rows}

    def find(self, dicom_id: str, hint: Optional[str] = None) -> Optional[str]:
        """The JPG of ``dicom_id``; ``hint`` (a MIMIC-CXR path as a gaze set writes it) is tried first."""
        if hint and self.root:
            tail = hint.replace("\\", "/")
            if "files/" in tail:
                tail = tail[tail.index("files/"):]
            cand = os.path.join(self.root, os.path.splitext(tail)[0] + ".jpg")
            if os.path.isfile(cand):
                return cand
        return self.paths.get(dicom_id)


# ----------------------------------------------------------------------------------- the fake tree


# The fake tree's images, (subject_id, study_id, dicom_id); the gaze sets' fake trees refer to them
FAKE_ITEMS: List[Tuple[str, str, str]] = [(f"1{i}000001", f"5{i}00000{i}", f"dicom-{i}") for i in range(7)]


FAKE_SPLITS = {0: "test", 1: "validate", 3: "test", 4: "validate"}  # MIMIC-CXR's spelling; the rest "train"


def fake_split(i: int) -> str:
    """The split of the fake tree's ``i``-th image, as MIMIC-CXR's split file spells it."""
    return FAKE_SPLITS.get(i, "train")


def write_fake_tree(root: str, items: Sequence[Tuple[str, str, str]], split_file: bool = True) -> None:
    """A tiny MIMIC-CXR-JPG tree in the published layout under ``root``, for tests and demos; no real data.

    items: (subject_id, study_id, dicom_id); JPG 64x80, the 'DICOM' 128x160 in the metadata. The metadata and
    split files are gzipped, as PhysioNet distributes them; ``split_file=False`` leaves the split file out."""
    meta, split = [], []
    for i, (sub, study, dicom) in enumerate(items):
        write_image(os.path.join(root, "files", f"p{sub[:2]}", f"p{sub}", f"s{study}", f"{dicom}.jpg"), seed=i)
        meta.append((dicom, sub, study, "PA", 160, 128))
        split.append((dicom, study, sub, fake_split(i)))
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"),
              ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"], meta)
    if split_file:
        write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), ["dicom_id", "study_id", "subject_id", "split"],
                  split)
