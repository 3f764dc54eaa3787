"""``egma-prepare``: the public datasets, as downloaded, to manifests that ``egma-train``/``egma-eval`` read.

Subcommands (each writes ``<out>`` (a CSV manifest, columns as in ``egma_model.data``) and
``<out>.summary.json``, and prints the summary: images, reports, sentences, images with gaze, rows skipped
and why)::

    egma-prepare mimic-eye  --root mimic-eye/                                   --out data/mimic_eye.csv
    egma-prepare reflacx    --root reflacx/ --mimic-cxr-jpg mimic-cxr-jpg/2.0.0/ --out data/reflacx.csv
    egma-prepare egd-cxr    --root egd-cxr/1.0.0/ --mimic-cxr-jpg mimic-cxr-jpg/2.0.0/ --out data/egd.csv
    egma-prepare chexpert-5x200 --root CheXpert-v1.0/                           --out data/chexpert_5x200.csv
    egma-prepare chexpert   --root CheXpert-v1.0/                               --out data/chexpert.csv
    egma-prepare rsna       --root rsna-pneumonia/                              --out data/rsna.csv
    egma-prepare siim       --root siim-acr/                                    --out data/siim.csv

Layouts and columns, and where they come from (docs/datasets.md has a table per dataset). Every CSV is read by
``egma_model.textio`` (strict UTF-8, a byte-order mark skipped) and also under its gzipped name ``<name>.gz``, as
PhysioNet distributes several of them. Splits are spelled ``train``/``valid``/``test`` everywhere (MIMIC-CXR's
``validate`` is mapped to ``valid``); the gaze sets take MIMIC-CXR's official split, and a row without one is
left with an empty split and counted in the summary's notes (never put in ``train``). Fixations go through the
readers' one rule (``egma_model.gaze.apply_reader_rules``): those off the image or not finite are dropped and
counted in the summary's ``gaze_rules``; a reading left without a usable fixation is written without gaze (image
and report only). A reading listed twice (same reading id, or same image and transcript) is kept once and counted.

* MIMIC-CXR-JPG (PhysioNet ``mimic-cxr-jpg`` 2.0.0/2.1.0): ``files/p<XX>/p<subject_id>/s<study_id>/<dicom_id>.jpg``,
  ``mimic-cxr-2.0.0-metadata.csv.gz`` (``dicom_id``, ``Rows``, ``Columns``: the DICOM's size) and
  ``mimic-cxr-2.0.0-split.csv.gz`` (``dicom_id``, ``split``: ``train``/``validate``/``test``), gzipped as
  published (plain names are read too). Images are looked up by ``dicom_id`` over the whole
  ``files/`` tree, so a path that differs between a gaze set and the JPG release (``.dcm`` vs ``.jpg``, a
  ``physionet.org/files/mimic-cxr/2.0.0/`` prefix, another version folder) still finds its image.
* REFLACX (PhysioNet ``reflacx-xray-localization`` 1.0.0; its documentation and its authors' readers in the
  ``ricbl/eyetracking`` repository): ``main_data/metadata_phase_<1|2|3>.csv`` (``id``, ``dicom_id``,
  ``subject_id``, ``image`` (the MIMIC-CXR DICOM path), ``split``, ``eye_tracking_data_discarded``,
  ``image_size_x``, ``image_size_y``) and one folder per reading ``main_data/<id>/`` (``fixations.csv``,
  ``timestamps_transcription.csv``, ``transcription.txt``; the raw samples are in ``gaze_data/<id>/gaze.csv``
  beside ``main_data/``). The split is MIMIC-CXR's (its split file, else REFLACX's ``split`` column).
  Fixations are in pixels of the DICOM, whose size is ``image_size_x/y``: that size goes to the manifest
  (``image_width/height``) so the gaze is mapped onto the JPG through the DICOM frame; a JPG whose aspect ratio
  differs from it is skipped and reported.
* EGD-CXR (PhysioNet ``egd-cxr`` 1.0.0; the ``cxr-eye-gaze/eye-gaze-dataset`` repository): ``master_sheet.csv``
  (``dicom_id``, ``path``, ``study_id``, ``patient_id``, the condition columns ``Normal``, ``CHF``,
  ``pneumonia``), ``fixations.csv`` (``DICOM_ID``, ``X_ORIGINAL``, ``Y_ORIGINAL``, ...: DICOM pixels) and
  ``audio_segmentation_transcripts/<dicom_id>/transcript.json``. ``X_ORIGINAL``/``Y_ORIGINAL`` hold a negative
  placeholder for looks outside the image (dropped by the reader rule). The split is MIMIC-CXR's. The DICOM size
  comes from MIMIC-CXR-JPG's metadata (``Rows``/``Columns``) when given, else from the JPG (same pixels in
  MIMIC-CXR-JPG).
* MIMIC-EYE (PhysioNet ``mimic-eye-multimodal-datasets`` 1.0.0; the ``ChihchengHsieh/MIMIC-Eye`` repository's
  path constants): ``patient_<subject_id>/CXR-JPG/s<study_id>/<dicom_id>.jpg``, ``CXR-JPG/cxr_meta.csv``
  (``dicom_id``, ``Rows``, ``Columns``), ``CXR-DICOM/s<study_id>.txt`` (the MIMIC-CXR report),
  ``EyeGaze/fixations.csv`` + ``EyeGaze/audio_segmentation_transcripts/<dicom_id>/transcript.json`` (EGD-CXR's
  columns), ``REFLACX/metadata.csv`` + ``REFLACX/main_data/<id>/`` and ``REFLACX/gaze_data/<id>/`` (REFLACX's
  files; ``REFLACX/<id>/`` is accepted too), and ``CXR-JPG/cxr_split.csv`` (``dicom_id``, ``split``: MIMIC-CXR's
  official split, also in ``spreadsheets/CXR-JPG/cxr_split.csv``) for the split of both kinds of reading.
* CheXpert 5x200: ``--selection FILE`` reads a published list as released: MedCLIP's
  ``chexpert-5x200-meta.csv`` (``imgpath``, the 14 label columns; it includes lateral views) or GLoRIA's
  ``chexpert_5x200.csv`` (``Path``, the label columns). Without it, our seeded selection from CheXpert-v1.0
  ``train.csv`` (``Path``, ``Frontal/Lateral`` and the 14 label columns) by the rule of GLoRIA's
  ``gloria/datasets/preprocess_datasets.py`` (GLoRIA samples unseeded, so its images are not reproducible):
  frontal images, blank labels read as 0, and for each of Atelectasis, Cardiomegaly, Consolidation, Edema,
  Pleural Effusion, 200 images sampled (seeded) that are positive (1) for it and 0 for every other label except
  ``No Finding``. ``--loose`` only asks the other four competition labels not to be positive. Which set a
  paper's numbers come from matters: see docs/datasets.md.
  ``chexpert`` (for the linear probe): the other frontal ``train.csv`` images as ``train`` and the frontal
  ``valid.csv`` images as ``test``, the five findings as labels with GLoRIA's uncertain-label mapping.
* RSNA Pneumonia (Kaggle ``rsna-pneumonia-detection-challenge``): ``stage_2_train_labels.csv`` (``patientId``,
  ``x``, ``y``, ``width``, ``height``, ``Target``; several rows per image when there are several boxes) and
  ``stage_2_train_images/<patientId>.dcm``. Labels ``Pneumonia``/``Normal``.
* SIIM-ACR Pneumothorax (Kaggle ``siim-acr-pneumothorax-segmentation``): ``train-rle.csv`` (``ImageId``,
  `` EncodedPixels`` -- the header has a leading space; ``-1`` = no pneumothorax; several rows per image
  with several masks) and ``dicom-images-train/<study>/<series>/<ImageId>.dcm``. Labels
  ``Pneumothorax``/``Normal``.

RSNA and SIIM split 70/15/15 into train/valid/test as GLoRIA's preprocessing does (its split is sklearn's
``train_test_split`` with ``random_state=0``; ours is a seeded permutation of the same sizes, so the same
proportions, not the same images). DICOM images are converted once to 8-bit PNG under ``<out dir>/images/``
with ``pydicom`` (in the ``model`` extra; without it those rows are skipped and the summary says so) by
``dicom_to_uint8`` (rescale, window, MONOCHROME1 inversion); a PNG/JPEG already next to the DICOM (same name) is
used as is.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import gaze as gz
from .textio import TextDecodeError, find_published, read_csv_rows, read_text

__all__ = ["Summary", "dicom_to_uint8", "read_chexpert_selection", "split_name", "prepare_reflacx", "prepare_egd_cxr",
           "prepare_mimic_eye", "prepare_chexpert_5x200",
           "prepare_chexpert",
           "prepare_rsna", "prepare_siim", "write_manifest", "main"]

COLUMNS = ["image", "report", "gaze_format", "gaze", "gaze_transcript", "dicom_id", "image_width", "image_height",
           "labels", "split", "source_id"]
CHEXPERT_COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices"]
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


# ------------------------------------------------------------------------------------------- helpers


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


def _split_sentences(text: str) -> List[str]:
    from .data import split_sentences

    return split_sentences(text or "")


def _egd_transcript(path: str) -> Tuple[Optional[str], Optional[str]]:
    """(full_text, error) of an EGD-CXR ``transcript.json``."""
    if not os.path.isfile(path):
        return None, "no transcript.json"
    try:
        tj = json.loads(read_text(path))
    except json.JSONDecodeError:
        return None, "transcript.json is not valid JSON"
    if not isinstance(tj, dict) or not isinstance(tj.get("time_stamped_text"), list):
        return None, "transcript.json has no time_stamped_text list"
    return str(tj.get("full_text") or " ".join(str(p.get("phrase", "")) for p in tj["time_stamped_text"])), None


def _egd_fixations(fixations_csv: str) -> Dict:
    """``DICOM_ID`` -> fixations as written, read once per file (a malformed cell is a PrepareError)."""
    try:
        return gz.read_egd_fixations(fixations_csv)
    except gz.GazeFormatError as e:
        raise PrepareError(str(e)) from None


def _reflacx_reading(case_dir: str, where: str, summary: Summary) -> Optional[Tuple[str, List[str]]]:
    """(transcription, sentences) of a REFLACX reading (None, reported, when the folder is unusable)."""
    if not os.path.isdir(case_dir):
        summary.skip(where, "REFLACX reading folder not found")
        return None
    if not find_published(case_dir, "fixations.csv"):
        summary.skip(where, "REFLACX reading has no fixations.csv")
        return None
    tr = os.path.join(case_dir, "transcription.txt")
    text = read_text(tr).strip() if os.path.isfile(tr) else ""
    sents = _split_sentences(text)
    if not sents:
        summary.skip(where, "REFLACX reading has no transcription")
        return None
    return text, sents


def _without_gaze(row: Dict, report: str) -> Dict:
    """A reading whose every fixation was dropped: kept as image + report, claiming no gaze."""
    return dict(row, gaze_format="", gaze="", gaze_transcript="", report=report)


# ------------------------------------------------------------------------------------------- training sets


def _reflacx_metadata(main_data: str) -> List[Tuple[str, Dict]]:
    files = sorted({f[:-3] if f.endswith(".gz") else f for f in os.listdir(main_data)
                    if f.startswith("metadata_phase_") and (f.endswith(".csv") or f.endswith(".csv.gz"))})
    if not files:
        raise PrepareError(f"{main_data}: no metadata_phase_<n>.csv (REFLACX main_data folder expected)")
    out = []
    for fn in files:
        path = os.path.join(main_data, fn)
        _, rows = _read_csv(path, ["id", "dicom_id"])
        out += [(f"{fn}: row {i + 2} (id {r.get('id')})", r) for i, r in enumerate(rows)]
    return out


def _reflacx_row(where: str, r: Dict, case_dir: str, image: Optional[str], summary: Summary,
                 split: str, dicom_size: Optional[Tuple[int, int]] = None) -> None:
    if _truthy(r.get("eye_tracking_data_discarded", "")):
        summary.skip(where, "eye_tracking_data_discarded is True (REFLACX's own quality flag)")
        return
    if not image:
        summary.skip(where, "dicom_id not found in the MIMIC-CXR-JPG images")
        return
    size = (_int(r.get("image_size_x")), _int(r.get("image_size_y")))
    if not all(size) and dicom_size:
        size = dicom_size  # MIMIC-CXR's Rows/Columns: the same DICOM the fixations were recorded on
    if not all(size):
        summary.skip(where, "image_size_x/image_size_y missing or not a number (and no DICOM size in the metadata)")
        return
    js = _image_size(image)
    if js is None:
        summary.skip(where, "JPG unreadable")
        return
    if not _same_aspect(js, size):
        summary.skip(where, "JPG aspect ratio differs from the DICOM size the fixations refer to")
        return
    reading = _reflacx_reading(case_dir, where, summary)
    if reading is None:
        return
    text, sents = reading
    try:
        rec = gz.read_reflacx(case_dir, image_size=size)
    except gz.GazeFormatError as e:
        summary.skip(f"{where}: {e}", "REFLACX gaze files malformed")
        return
    row = {"image": os.path.abspath(image), "gaze_format": "reflacx", "gaze": os.path.abspath(case_dir),
           "dicom_id": r["dicom_id"], "image_width": size[0], "image_height": size[1], "split": split,
           "source_id": r["id"]}
    keys = [("reflacx", r["id"]), ("content", row["image"], text)]
    if not summary.add(row if len(rec.fixations) else _without_gaze(row, text), sents, where=where, keys=keys):
        return
    summary.count_gaze(len(rec.fixations), rec.dropped_off_image, rec.dropped_non_finite)


def _note_missing_split(s: Summary, where_split: str) -> None:
    n = sum(1 for r in s.rows if not r.get("split"))
    if n:
        s.notes.append(f"{n} rows have no split: {where_split} (they are left out of --split train/valid/test)")


def prepare_reflacx(root: str, mimic_cxr_jpg: str) -> Summary:
    """REFLACX readings with their MIMIC-CXR-JPG images (one manifest row per reading). The split is MIMIC-CXR's
    (its split file, else REFLACX's ``split`` column, which copies it), spelled ``train``/``valid``/``test``."""
    s = Summary("reflacx")
    main_data = os.path.join(root, "main_data") if os.path.isdir(os.path.join(root, "main_data")) else root
    jpg = MimicJpg(mimic_cxr_jpg)
    for where, r in _reflacx_metadata(main_data):
        image = jpg.find(r["dicom_id"], r.get("image"))
        split = jpg.split.get(r["dicom_id"].strip()) or split_name(r.get("split"))
        _reflacx_row(where, r, os.path.join(main_data, r["id"]), image, s, split, jpg.sizes.get(r["dicom_id"]))
    _note_missing_split(s, "no mimic-cxr-2.0.0-split.csv(.gz) entry and no REFLACX split value")
    return s


def _egd_row(where: str, dicom_id: str, image: Optional[str], fixations: str, raw, transcript: str,
             size: Optional[Tuple[int, int]], labels: List[str], split: str, gaze_format: str, gaze: str,
             summary: Summary) -> None:
    if not image:
        summary.skip(where, "dicom_id not found in the MIMIC-CXR-JPG images")
        return
    if raw is None or not len(raw):
        summary.skip(where, "no fixations for this DICOM_ID in fixations.csv")
        return
    text, err = _egd_transcript(transcript)
    if err:
        summary.skip(where, err)
        return
    js = _image_size(image)
    if js is None:
        summary.skip(where, "JPG unreadable")
        return
    if size is None:
        size = js
    elif not _same_aspect(js, size):
        summary.skip(where, "JPG aspect ratio differs from the DICOM size the fixations refer to")
        return
    kept, off, non_finite = gz.apply_reader_rules(raw, size)
    row = {"image": os.path.abspath(image), "gaze_format": gaze_format, "gaze": os.path.abspath(gaze),
           "gaze_transcript": os.path.abspath(transcript) if gaze_format == "egd" else "",
           "dicom_id": dicom_id, "image_width": size[0], "image_height": size[1],
           "labels": ";".join(labels), "split": split, "source_id": dicom_id}
    keys = [("egd", dicom_id), ("content", row["image"], text)]
    if summary.add(row if len(kept) else _without_gaze(row, text), _split_sentences(text), where=where, keys=keys):
        summary.count_gaze(len(kept), off, non_finite)


def prepare_egd_cxr(root: str, mimic_cxr_jpg: str) -> Summary:
    """EGD-CXR readings (``master_sheet.csv``) with their MIMIC-CXR-JPG images; the split is MIMIC-CXR's."""
    s = Summary("egd-cxr")
    _, rows = _read_csv(os.path.join(root, "master_sheet.csv"), ["dicom_id"])
    fx = _published(os.path.join(root, "fixations.csv")) or os.path.join(root, "fixations.csv")
    raw = _egd_fixations(fx)
    jpg = MimicJpg(mimic_cxr_jpg)
    if not jpg.sizes:
        s.notes.append("no mimic-cxr-2.0.0-metadata.csv(.gz): the JPG's size is taken as the DICOM size")
    conditions = [c for c in ("Normal", "CHF", "pneumonia") if rows and c in rows[0]]
    for i, r in enumerate(rows):
        d = r["dicom_id"].strip()
        where = f"master_sheet.csv: row {i + 2} (dicom_id {d})"
        labels = [c for c in conditions if _truthy(r.get(c, ""))]
        _egd_row(where, d, jpg.find(d, r.get("path")), fx, raw.get(d),
                 os.path.join(root, "audio_segmentation_transcripts", d, "transcript.json"), jpg.sizes.get(d),
                 labels, jpg.split.get(d, ""), "egd", fx, s)
    _note_missing_split(s, "not in mimic-cxr-2.0.0-split.csv(.gz)" if jpg.split else
                        "no mimic-cxr-2.0.0-split.csv(.gz) in the MIMIC-CXR-JPG folder")
    return s


def _mimic_eye_splits(path: Optional[str]) -> Dict[str, str]:
    """``dicom_id`` -> split of a MIMIC-EYE ``cxr_split.csv`` (MIMIC-CXR-JPG's split file, per patient)."""
    if not path:
        return {}
    _, rows = _read_csv(path, ["dicom_id", "split"])
    return {r["dicom_id"].strip(): split_name(r["split"]) for r in rows}


def _mimic_eye_reflacx_case(rdir: str, reading_id: str) -> str:
    """MIMIC-EYE publishes REFLACX readings as ``REFLACX/main_data/<id>/``; ``REFLACX/<id>/`` is accepted too."""
    published = os.path.join(rdir, "main_data", reading_id)
    return published if os.path.isdir(published) else os.path.join(rdir, reading_id)


def prepare_mimic_eye(root: str) -> Summary:
    """MIMIC-EYE's patient folders: every REFLACX and EyeGaze (EGD-CXR) reading with its JPG. The split is the
    official MIMIC-CXR one that MIMIC-EYE carries in ``patient_<id>/CXR-JPG/cxr_split.csv`` (and in
    ``spreadsheets/CXR-JPG/cxr_split.csv``); REFLACX's own ``split`` column is the fallback."""
    s = Summary("mimic-eye")
    any_sizes = False
    patients = sorted(d for d in os.listdir(root) if d.startswith("patient_") and os.path.isdir(os.path.join(root, d)))
    if not patients:
        raise PrepareError(f"{root}: no patient_<subject_id> folders (MIMIC-EYE's mimic-eye/ folder expected)")
    shared_splits = _mimic_eye_splits(find_published(os.path.join(root, "spreadsheets", "CXR-JPG"), "cxr_split.csv"))
    for p in patients:
        pdir = os.path.join(root, p)
        cxr = os.path.join(pdir, "CXR-JPG")
        jpgs: Dict[str, str] = {}
        if os.path.isdir(cxr):
            for d, _, names in os.walk(cxr):
                for n in names:
                    stem, ext = os.path.splitext(n)
                    if ext.lower() in IMAGE_EXTS:
                        jpgs[stem] = os.path.join(d, n)
        splits = dict(shared_splits)
        splits.update(_mimic_eye_splits(find_published(cxr, "cxr_split.csv")))
        sizes: Dict[str, Tuple[int, int]] = {}
        meta = find_published(cxr, "cxr_meta.csv")
        if meta:
            header, rows = _read_csv(meta)
            if {"dicom_id", "Rows", "Columns"} <= set(header):
                for r in rows:
                    w, h = _int(r["Columns"]), _int(r["Rows"])
                    if w and h:
                        sizes[r["dicom_id"].strip()] = (w, h)
                        any_sizes = True
        # REFLACX readings of this patient
        rdir = os.path.join(pdir, "REFLACX")
        rmeta = find_published(rdir, "metadata.csv")
        if rmeta:
            _, rows = _read_csv(rmeta, ["id", "dicom_id"])
            for i, r in enumerate(rows):
                where = f"{p}/REFLACX/metadata.csv: row {i + 2} (id {r['id']})"
                d = r["dicom_id"].strip()
                _reflacx_row(where, r, _mimic_eye_reflacx_case(rdir, r["id"]), jpgs.get(d), s,
                             splits.get(d) or split_name(r.get("split")), sizes.get(d))
        # EyeGaze (EGD-CXR) readings of this patient
        fx = find_published(os.path.join(pdir, "EyeGaze"), "fixations.csv")
        if fx:
            try:
                raw = _egd_fixations(fx)
            except PrepareError as e:
                s.skip(f"{p}/EyeGaze/fixations.csv ({e})", "unreadable fixations.csv")
                raw = {}
            for d, fix in sorted(raw.items()):
                where = f"{p}/EyeGaze (DICOM_ID {d})"
                tj = os.path.join(pdir, "EyeGaze", "audio_segmentation_transcripts", d, "transcript.json")
                _egd_row(where, d, jpgs.get(d), fx, fix, tj, sizes.get(d), [], splits.get(d, ""), "mimic_eye", pdir, s)
    if not any_sizes:
        s.notes.append("EyeGaze rows without CXR-JPG/cxr_meta.csv Rows/Columns take the JPG's size as the DICOM size")
    _note_missing_split(s, "not in the patient's CXR-JPG/cxr_split.csv (nor spreadsheets/CXR-JPG/cxr_split.csv)")
    return s


# ------------------------------------------------------------------------------------------- evaluation sets


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


def _chexpert_image(root: str, rel: str) -> Optional[str]:
    """A CheXpert ``Path`` (``CheXpert-v1.0/train/...``, relative to the folder above the dataset's) on disk."""
    parent = os.path.dirname(os.path.abspath(root.rstrip("/")))
    cands = [os.path.join(parent, rel), os.path.join(root, rel),
             os.path.join(root, rel.split("/", 1)[1]) if "/" in rel else rel]
    return next((c for c in cands if os.path.isfile(c)), None)


def _chexpert_key(path: str) -> Optional[str]:
    """``train/patient<N>/study<M>/<view>.jpg`` (or ``valid/...``) of any spelling of a CheXpert image path:
    ``CheXpert-v1.0/train/...`` (train.csv, GLoRIA), ``./data/CheXpert/data/CheXpert-v1.0-small/train/...``
    (MedCLIP's ``imgpath``)."""
    p = path.strip().replace("\\", "/")
    cut = max(p.rfind("/train/"), p.rfind("/valid/"))
    if cut >= 0:
        return p[cut + 1:]
    return p if p.startswith(("train/", "valid/")) else None


def read_chexpert_selection(path: str) -> Tuple[str, List[Tuple[str, str, str]]]:
    """A published CheXpert 5x200 list: ``(kind, [(where, key, label)])`` with ``kind`` ``"gloria"`` (a
    ``Path`` column: GLoRIA's ``chexpert_5x200.csv``, written by ``preprocess_chexpert_5x200_data`` in
    marshuang80/gloria ``gloria/datasets/preprocess_datasets.py``; some forks name it ``chexpert_8x200.csv``) or
    ``"medclip"`` (an ``imgpath`` column: MedCLIP's ``chexpert-5x200-meta.csv``, RyanWangZf/MedCLIP
    ``local_data/``). Each row's label is the one competition column equal to 1. Rows are kept as listed,
    lateral views included (MedCLIP's list has them)."""
    header, rows = _read_csv(path, CHEXPERT_COMPETITION)
    col = "imgpath" if "imgpath" in header else "Path" if "Path" in header else None
    if col is None:
        raise PrepareError(f"{path}: neither an 'imgpath' (MedCLIP) nor a 'Path' (GLoRIA) column; found {header}")
    out = []
    for i, r in enumerate(rows):
        where = f"{os.path.basename(path)}: row {i + 2}"
        try:
            pos = [t for t in CHEXPERT_COMPETITION if float((r.get(t) or "0").strip() or 0) == 1.0]
        except ValueError:
            pos = []
        out.append((where, _chexpert_key(r[col] or "") or "", pos[0] if len(pos) == 1 else ""))
    return ("medclip" if col == "imgpath" else "gloria"), out


def _chexpert_from_selection(root: str, selection: str, s: Summary) -> Summary:
    kind, rows = read_chexpert_selection(selection)
    for where, key, label in rows:
        if not label:
            s.skip(where, "selection row without exactly one competition label equal to 1")
            continue
        image = _chexpert_image(root, "CheXpert-v1.0/" + key) if key else None
        if image is None:
            s.skip(where, "image file not found")
            continue
        s.add({"image": os.path.abspath(image), "labels": label, "split": "test", "source_id": key}, where=where,
              keys=[("chexpert", key)])
    lateral = sum(1 for r in s.rows if "lateral" in r["source_id"])
    s.notes.append(f"selection read from {os.path.basename(selection)} ({kind}'s published list); "
                   f"{lateral} lateral images in it")
    return s


def prepare_chexpert_5x200(root: str, *, n: int = 200, seed: int = 0, loose: bool = False,
                           selection: Optional[str] = None) -> Summary:
    """CheXpert 5x200: the published list ``selection`` as released (see ``read_chexpert_selection``), else our
    seeded selection from CheXpert-v1.0 ``train.csv`` (GLoRIA's rule; see the module doc)."""
    s = Summary("chexpert-5x200")
    if selection:
        return _chexpert_from_selection(root, selection, s)
    s.notes.append(f"seeded selection (seed {seed}) by GLoRIA's rule: not the images of a published list, so "
                   "zero-shot numbers are not directly comparable with papers that used one (see docs/datasets.md)")
    csv_path = os.path.join(root, "train.csv")
    header, rows = _read_csv(csv_path, ["Path", "Frontal/Lateral"] + CHEXPERT_COMPETITION)
    others = [c for c in CHEXPERT_LABELS if c in header and c != "No Finding"]

    def val(r, c):
        v = (r.get(c) or "").strip()
        return 0.0 if v == "" else float(v)  # blank = not mentioned, read as 0 (GLoRIA's fillna(0))

    pools: Dict[str, List[Tuple[str, Dict]]] = {t: [] for t in CHEXPERT_COMPETITION}
    for i, r in enumerate(rows):
        where = f"train.csv: row {i + 2}"
        if r.get("Frontal/Lateral") != "Frontal":
            continue  # not a candidate (GLoRIA keeps frontal views only); not counted as skipped
        try:
            v = {c: val(r, c) for c in others}
        except ValueError:
            s.skip(where, "a label cell is not a number")
            continue
        pos = [t for t in CHEXPERT_COMPETITION if v[t] == 1.0]
        if len(pos) != 1:
            continue
        t = pos[0]
        if loose or all(v[c] == 0.0 for c in others if c != t):
            pools[t].append((where, r))
    rng = random.Random(seed)
    for t in CHEXPERT_COMPETITION:
        pool = pools[t]
        if len(pool) < n:
            s.notes.append(f"{t}: only {len(pool)} candidates for {n}")
        for where, r in rng.sample(pool, min(n, len(pool))):
            rel = r["Path"]
            image = _chexpert_image(root, rel)
            if image is None:
                s.skip(where, "image file not found")
                continue
            s.add({"image": os.path.abspath(image), "labels": t, "split": "test", "source_id": rel})
    return s


# GLoRIA's CHEXPERT_UNCERTAIN_MAPPINGS (after the CheXpert paper): an uncertain (-1) label counts as positive
# for these and as negative for Cardiomegaly and Consolidation
CHEXPERT_UNCERTAIN_AS = {"Atelectasis": 1, "Cardiomegaly": 0, "Consolidation": 0, "Edema": 1, "Pleural Effusion": 1}


def prepare_chexpert(root: str, *, n_5x200: int = 200, seed: int = 0, selection: Optional[str] = None) -> Summary:
    """CheXpert for the linear probe: frontal ``train.csv`` images not in the 5x200 selection (same seed) as
    ``train``, frontal ``valid.csv`` images as ``test`` (GLoRIA uses the official validation set as its test
    set); labels = the competition findings present, uncertain ones mapped as GLoRIA does; none present =
    ``No Finding`` (not a probe class)."""
    s = Summary("chexpert")
    five = prepare_chexpert_5x200(root, n=n_5x200, seed=seed, selection=selection)
    taken = {_chexpert_key(r["source_id"]) for r in five.rows}
    for fn, split in (("train.csv", "train"), ("valid.csv", "test")):
        _, rows = _read_csv(os.path.join(root, fn), ["Path", "Frontal/Lateral"] + CHEXPERT_COMPETITION)
        for i, r in enumerate(rows):
            where = f"{fn}: row {i + 2}"
            if r.get("Frontal/Lateral") != "Frontal" or _chexpert_key(r["Path"]) in taken:
                continue
            labels = []
            try:
                for c in CHEXPERT_COMPETITION:
                    v = (r.get(c) or "").strip()
                    x = 0.0 if v == "" else float(v)
                    if x == 1.0 or (x == -1.0 and CHEXPERT_UNCERTAIN_AS[c] == 1):
                        labels.append(c)
            except ValueError:
                s.skip(where, "a label cell is not a number")
                continue
            image = _chexpert_image(root, r["Path"])
            if image is None:
                s.skip(where, "image file not found")
                continue
            s.add({"image": os.path.abspath(image), "labels": ";".join(labels) or "No Finding", "split": split,
                   "source_id": r["Path"]})
    what = os.path.basename(selection) if selection else f"seed {seed}"
    s.notes.append(f"{len(taken)} CheXpert 5x200 images ({what}) left out of the probe's training rows")
    return s


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


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="egma-prepare", description="Write egma-train/egma-eval manifests from the "
                                "public datasets' published layouts (see egma_model/prepare.py for files and columns)")
    sub = p.add_subparsers(dest="dataset", required=True)

    def add(name, help, jpg=False, seed=False):
        q = sub.add_parser(name, help=help)
        q.add_argument("--root", required=True, help="the dataset's folder as downloaded")
        if jpg:
            q.add_argument("--mimic-cxr-jpg", required=True, help="MIMIC-CXR-JPG folder (with files/ and the CSVs)")
        if seed:
            q.add_argument("--seed", type=int, default=0, help="sampling / split seed")
        q.add_argument("--out", required=True, help="manifest to write (.csv); the summary goes to <out>.summary.json")
        return q

    add("mimic-eye", "MIMIC-EYE patient folders (REFLACX and EyeGaze readings)")
    add("reflacx", "REFLACX with MIMIC-CXR-JPG", jpg=True)
    add("egd-cxr", "EGD-CXR with MIMIC-CXR-JPG", jpg=True)
    q = add("chexpert-5x200", "CheXpert 5x200 from CheXpert-v1.0 train.csv", seed=True)
    q.add_argument("--per-class", type=int, default=200)
    q.add_argument("--loose", action="store_true", help="only the other competition labels must not be positive")
    q.add_argument("--selection", default=None, help="a published 5x200 list read as released: MedCLIP's "
                   "chexpert-5x200-meta.csv (imgpath) or GLoRIA's chexpert_5x200.csv (Path); default: the seeded rule")
    q = add("chexpert", "CheXpert for the linear probe: train.csv minus the 5x200 images, valid.csv as test",
            seed=True)
    q.add_argument("--per-class", type=int, default=200, help="the 5x200 selection to leave out")
    q.add_argument("--selection", default=None, help="the published 5x200 list to leave out (as chexpert-5x200)")
    add("rsna", "RSNA Pneumonia (stage_2_train_labels.csv)", seed=True)
    add("siim", "SIIM-ACR Pneumothorax (train-rle.csv)", seed=True)
    _add_cache_parser(sub)
    return p


def _add_cache_parser(sub) -> None:
    from .data import GazeOptions

    d = GazeOptions()
    q = sub.add_parser("cache", help="prepare a manifest once for fast training: images at the training size, "
                       "sentences and gaze on the patch grid (egma_model/prepared.py); resumable")
    q.add_argument("--manifest", required=True, help="a manifest written by the other subcommands (or your own)")
    q.add_argument("--out", default=None, help="cache folder (default: <manifest>.cache); the manifest that "
                   "points to it is written as <manifest>.cached.csv")
    q.add_argument("--image-size", type=int, default=224, help="the image encoder's input size")
    q.add_argument("--grid", default="7x7", help="the image encoder's patch grid, HxW (egma-train prints it)")
    q.add_argument("--sigma", type=float, default=d.sigma, help="gaze Gaussian width, px of the original image")
    q.add_argument("--min-heat", type=float, default=d.min_heat, help="as egma-train --min-heat")
    q.add_argument("--gaze-resize", default=d.resize, choices=["area", "bilinear_antialias"])
    q.add_argument("--raw-gaze", action="store_true", help="as egma-train --raw-gaze")
    q.add_argument("--no-gaze", action="store_true", help="as egma-train --no-gaze")
    q.add_argument("--split-rule", default="ours", help="as egma-train --split-rule")
    q.add_argument("--rebuild", action="store_true", help="start again instead of resuming")
    q.add_argument("--no-progress", action="store_true")


def run_cache(ns) -> Dict:
    from .data import GazeOptions
    from .prepared_build import build_cache

    try:
        grid = tuple(int(v) for v in ns.grid.lower().split("x"))
        assert len(grid) == 2 and min(grid) > 0
    except (ValueError, AssertionError):
        raise PrepareError(f"--grid {ns.grid!r}: expected HxW, e.g. 7x7") from None
    opts = GazeOptions(sigma=ns.sigma, min_heat=ns.min_heat, use_raw_gaze=ns.raw_gaze, resize=ns.gaze_resize)
    return build_cache(ns.manifest, ns.out, image_size=ns.image_size, grid=grid, gaze_options=opts,
                       use_gaze=not ns.no_gaze, split_rule=ns.split_rule, progress=not ns.no_progress,
                       rebuild=ns.rebuild)


def format_cache_summary(d: Dict) -> str:
    return (f"prepared {d['rows']} rows in {d['seconds']:.1f} s: {d['bytes'] / 2**20:.1f} MiB in {d['cache']}\n"
            f"train and evaluate with --manifest {d['manifest']}")


def run(ns) -> Dict:
    out_dir = os.path.dirname(os.path.abspath(ns.out))
    if not os.path.isdir(ns.root):
        raise PrepareError(f"{ns.root}: folder not found")
    if ns.dataset == "mimic-eye":
        s = prepare_mimic_eye(ns.root)
    elif ns.dataset == "reflacx":
        s = prepare_reflacx(ns.root, ns.mimic_cxr_jpg)
    elif ns.dataset == "egd-cxr":
        s = prepare_egd_cxr(ns.root, ns.mimic_cxr_jpg)
    elif ns.dataset == "chexpert-5x200":
        s = prepare_chexpert_5x200(ns.root, n=ns.per_class, seed=ns.seed, loose=ns.loose, selection=ns.selection)
    elif ns.dataset == "chexpert":
        s = prepare_chexpert(ns.root, n_5x200=ns.per_class, seed=ns.seed, selection=ns.selection)
    elif ns.dataset == "rsna":
        s = prepare_rsna(ns.root, out_dir, seed=ns.seed)
    elif ns.dataset == "siim":
        s = prepare_siim(ns.root, out_dir, seed=ns.seed)
    else:  # pragma: no cover - argparse restricts the choices
        raise PrepareError(ns.dataset)
    return write_manifest(s, ns.out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .data import ManifestError
    from .prepared import CacheMismatchError

    ns = build_parser().parse_args(argv)
    try:
        if ns.dataset == "cache":
            print(format_cache_summary(run_cache(ns)))
            return 0
        d = run(ns)
    except (PrepareError, TextDecodeError, ManifestError, CacheMismatchError) as e:
        # a missing file, a bad column or row, bytes that are not UTF-8
        print(f"egma-prepare: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(d))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
