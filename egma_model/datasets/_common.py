"""What every dataset module shares: the manifest's columns, the split spelling, the summary (rows written,
skipped rows by reason, the gaze readers' counts), the CSV/size/split helpers, DICOM conversion, and the
``Command`` that a dataset module declares for each of its ``egma-prepare`` subcommands.

Every CSV is read by ``egma_model.textio`` (strict UTF-8, a byte-order mark skipped) and also under its gzipped
name ``<name>.gz``. RSNA and SIIM split 70/15/15 into train/valid/test as GLoRIA's preprocessing does (its
split is sklearn's ``train_test_split`` with ``random_state=0``; ours is a seeded permutation of the same sizes, so the same
proportions, not the same images). DICOM images are converted once to 8-bit PNG under ``<out dir>/images/``
with ``pydicom`` (in the ``model`` extra; without it those rows are skipped and the summary says so) by
``dicom_to_uint8`` (rescale, window, MONOCHROME1 inversion); a PNG/JPEG already next to the DICOM (same name) is
used as is.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .. import gaze as gz
from ..sentences import split_sentences
from ..textio import find_published, read_csv_rows


@dataclass(frozen=True)
class Command:
    """One ``egma-prepare`` subcommand of a dataset module: its help line, how it runs (``run(ns, out_dir)``
    returns a ``Summary``; ``ns`` holds ``--root``, ``--out`` and the command's own options), the options it adds
    (``add_arguments(parser)``), and whether it takes ``--mimic-cxr-jpg`` and ``--seed``."""

    help: str
    run: Callable
    add_arguments: Optional[Callable] = None
    mimic_cxr_jpg: bool = False
    seed: bool = False


COLUMNS = ["image", "report", "gaze_format", "gaze", "gaze_transcript", "dicom_id", "image_width", "image_height",
           "labels", "split", "source_id"]


IMAGE_EXTS = (".jpg", ".jpeg", ".png")


# One spelling of the split names in every manifest: MIMIC-CXR's split file (and REFLACX's metadata, which copies
# it) says ``validate``; our seeded splits and the recipes say ``valid``.
SPLIT_NAMES = {"train": "train", "valid": "valid", "validate": "valid", "validation": "valid", "val": "valid",
               "test": "test"}


def split_name(value) -> str:
    """A dataset's split value in our spelling (``train``/``valid``/``test``); empty stays empty, an unknown
    value is kept (lowercased) so that the summary shows it."""
    v = str(value or "").strip().lower()
    return SPLIT_NAMES.get(v, v)


class PrepareError(ValueError):
    """A dataset folder without the files its layout needs (the message names the file)."""


DUPLICATE = "duplicate reading (same reading id, or same image and transcript), kept once"


class Summary:
    """Counts for the summary: rows written, skipped rows by reason (with the first examples)."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.rows: List[Dict] = []
        self.skipped: Counter = Counter()
        self.examples: Dict[str, List[str]] = defaultdict(list)
        self.sentences = 0
        self.reports = 0
        self.notes: List[str] = []
        # fixations kept and dropped by the readers' rule (egma_model.gaze.apply_reader_rules), readings left
        # without a usable fixation, readings seen twice
        self.gaze: Counter = Counter()
        self._seen: set = set()

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    def add(self, row: Dict, sentences: Optional[Sequence[str]] = None, *, where: str = "",
            keys: Iterable = ()) -> bool:
        """Add a manifest row; a row with a key already added (the same reading again) is counted, not added."""
        keys = list(keys)
        if any(k in self._seen for k in keys):
            self.skip(where or str(row.get("source_id", "")), DUPLICATE)
            return False
        self._seen.update(keys)
        self.rows.append(row)
        if sentences:
            self.reports += 1
            self.sentences += len(sentences)
        return True

    def count_gaze(self, kept: int, off_image: int, non_finite: int) -> None:
        self.gaze["fixations_kept"] += kept
        self.gaze["fixations_dropped_off_image"] += off_image
        self.gaze["fixations_dropped_non_finite"] += non_finite
        if kept == 0:
            self.gaze["readings_without_usable_fixations"] += 1

    def to_dict(self, manifest: str) -> Dict:
        images = {r["image"] for r in self.rows}
        gaze_images = {r["image"] for r in self.rows if r.get("gaze_format")}
        splits = Counter(r.get("split") or "" for r in self.rows)
        labels = Counter(l for r in self.rows for l in (r.get("labels") or "").split(";") if l)
        return {"dataset": self.dataset, "manifest": os.path.abspath(manifest), "rows": len(self.rows),
                "images": len(images), "reports": self.reports, "sentences": self.sentences,
                "images_with_gaze": len(gaze_images), "readings_with_gaze": sum(bool(r.get("gaze_format"))
                                                                                for r in self.rows),
                "splits": dict(splits), "labels": dict(labels), "skipped": dict(self.skipped),
                "gaze_rules": {"version": gz.READER_RULES_VERSION, **{k: self.gaze[k] for k in GAZE_COUNTS}},
                "skipped_examples": dict(self.examples), "notes": self.notes}


GAZE_COUNTS = ("fixations_kept", "fixations_dropped_off_image", "fixations_dropped_non_finite",
               "readings_without_usable_fixations")


def write_manifest(summary: Summary, out: str) -> Dict:
    """Write the manifest CSV and ``<out>.summary.json``; returns the summary dict."""
    if not summary.rows:
        raise PrepareError(f"{summary.dataset}: no usable rows (skipped: {dict(summary.skipped)}; examples: "
                           f"{dict(summary.examples)})")
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in summary.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    d = summary.to_dict(out)
    with open(out + ".summary.json", "w") as f:
        json.dump(d, f, indent=2)
    return d


def format_summary(d: Dict) -> str:
    lines = [f"{d['dataset']}: {d['rows']} rows, {d['images']} images, {d['reports']} reports, "
             f"{d['sentences']} sentences, {d['images_with_gaze']} images with gaze -> {d['manifest']}"]
    if d["splits"]:
        lines.append("  splits: " + ", ".join(f"{k or '(none)'} {v}" for k, v in sorted(d["splits"].items())))
    if d["labels"]:
        lines.append("  labels: " + ", ".join(f"{k} {v}" for k, v in sorted(d["labels"].items())))
    g = d.get("gaze_rules") or {}
    if any(g.get(k) for k in GAZE_COUNTS):
        lines.append(f"  gaze (reader rules v{g['version']}): {g['fixations_kept']} fixations kept, "
                     f"{g['fixations_dropped_off_image']} dropped off the image, {g['fixations_dropped_non_finite']} "
                     f"dropped as not finite; {g['readings_without_usable_fixations']} readings without a usable "
                     "fixation (written without gaze)")
    for reason, n in sorted(d["skipped"].items(), key=lambda kv: -kv[1]):
        ex = "; ".join(d["skipped_examples"].get(reason, [])[:2])
        lines.append(f"  skipped {n}: {reason} (e.g. {ex})")
    for n in d["notes"]:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def _published(path: str) -> Optional[str]:
    """``path`` as published or gzipped (``<path>.gz``), None when neither exists."""
    if path.endswith(".gz"):
        return path if os.path.isfile(path) else None
    return find_published(os.path.dirname(path), os.path.basename(path))


def _read_csv(path: str, required: Sequence[str] = ()) -> Tuple[List[str], List[Dict]]:
    """Header and rows of a published CSV (or its ``.gz``), read by the one text rule (egma_model.textio)."""
    found = _published(path)
    if found is None:
        raise PrepareError(f"{path}: file not found (nor {os.path.basename(path)}.gz)")
    path = found
    header, rows = read_csv_rows(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {missing}; found {header}")
    return header, rows


def _image_size(path: str) -> Optional[Tuple[int, int]]:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:
        return None


def _same_aspect(a: Tuple[int, int], b: Tuple[int, int], tol: float = 0.01) -> bool:
    return abs(a[0] / a[1] - b[0] / b[1]) <= tol * (a[0] / a[1])


def _int(v) -> Optional[int]:
    try:
        x = int(float(v))
        return x if x > 0 else None
    except (TypeError, ValueError):
        return None


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "1.0", "yes")


def _split_sentences(text: str) -> List[str]:
    return split_sentences(text or "")


def _without_gaze(row: Dict, report: str) -> Dict:
    """A reading whose every fixation was dropped: kept as image + report, claiming no gaze."""
    return dict(row, gaze_format="", gaze="", gaze_transcript="", report=report)


def _note_missing_split(s: Summary, where_split: str) -> None:
    n = sum(1 for r in s.rows if not r.get("split"))
    if n:
        s.notes.append(f"{n} rows have no split: {where_split} (they are left out of --split train/valid/test)")


def _seeded_split(keys: List[str], seed: int, fractions=(0.7, 0.15, 0.15)) -> Dict[str, str]:
    order = sorted(keys)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test_val = int(round(n * (fractions[1] + fractions[2])))
    n_test = n_test_val // 2
    out = {}
    for i, k in enumerate(order):
        out[k] = "train" if i < n - n_test_val else ("test" if i < n - n_test_val + n_test else "valid")
    return out


def _first(v) -> float:
    """A DICOM number that may be multi-valued (several windows): the first value."""
    try:
        return float(v[0])
    except TypeError:
        return float(v)


def dicom_to_uint8(ds):
    """A greyscale DICOM as 8-bit display pixels (``(H, W)`` uint8; the first frame of a multi-frame file).

    1. The modality transform (``RescaleSlope``/``RescaleIntercept`` or a Modality LUT), by pydicom's
       ``apply_modality_lut``: stored values of any bit depth become the modality's values (e.g. HU).
    2. The VOI transform: with ``WindowCenter``/``WindowWidth`` (the first pair when there are several), the
       DICOM linear window (PS3.3 C.11.2.1.2): ``((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped to ``[0, 1]``;
       with a VOI LUT sequence, pydicom's ``apply_voi_lut`` then min-max; with neither, min-max over the image.
    3. ``MONOCHROME1`` (low values shown bright, as many CR images are stored) is inverted, so that the PNG is
       always bright-is-dense like MONOCHROME2.
    4. ``[0, 1]`` -> ``0..255`` rounded.
    """
    import numpy as np

    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    a = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        a = a[0]
    v = np.asarray(apply_modality_lut(a, ds), dtype=np.float64)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        x = np.clip((v - (c - 0.5)) / max(w - 1.0, 1.0) + 0.5, 0.0, 1.0)
    else:
        if "VOILUTSequence" in ds:
            v = np.asarray(apply_voi_lut(v, ds), dtype=np.float64)
        lo, hi = float(v.min()), float(v.max())
        x = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        x = 1.0 - x
    return np.rint(x * 255.0).astype(np.uint8)


class DicomImages:
    """Image files by id: a PNG/JPEG next to (or instead of) the DICOM, else the DICOM converted to PNG."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.missing_pydicom = False

    def image_for(self, dcm_path: str) -> Tuple[Optional[str], Optional[str]]:
        stem = os.path.splitext(dcm_path)[0]
        for ext in IMAGE_EXTS:
            if os.path.isfile(stem + ext):
                return stem + ext, None
        if not os.path.isfile(dcm_path):
            return None, "image file not found"
        png = os.path.join(self.out_dir, os.path.basename(stem) + ".png")
        if os.path.isfile(png):
            return png, None
        try:
            import pydicom  # optional: only for converting DICOM images
        except ImportError:
            self.missing_pydicom = True
            return None, "DICOM image and pydicom is not installed (pip install pydicom, or convert to PNG)"
        try:
            from PIL import Image

            a = dicom_to_uint8(pydicom.dcmread(dcm_path))
            os.makedirs(self.out_dir, exist_ok=True)
            Image.fromarray(a).save(png)
        except Exception as e:  # a broken DICOM is one skipped row, not a failed run
            return None, f"DICOM unreadable ({type(e).__name__})"
        return png, None


def _binary_set(name: str, ids_labels: Dict[str, int], paths: Dict[str, str], positive: str, out_dir: str,
                seed: int, s: Summary) -> Summary:
    splits = _seeded_split(list(ids_labels), seed)
    conv = DicomImages(os.path.join(out_dir, "images", name))
    for k in sorted(ids_labels):
        where = f"{k}"
        p = paths.get(k)
        if p is None:
            s.skip(where, "image file not found")
            continue
        image, err = conv.image_for(p)
        if err:
            s.skip(where, err)
            continue
        s.add({"image": os.path.abspath(image), "labels": positive if ids_labels[k] else "Normal",
               "split": splits[k], "source_id": k})
    if conv.missing_pydicom:
        s.notes.append("DICOM rows were skipped: install pydicom to convert them (pip install pydicom)")
    return s
