"""REFLACX: the ``egma-prepare reflacx`` subcommand and the gaze reader of its readings.

REFLACX (PhysioNet ``reflacx-xray-localization`` 1.0.0; its documentation and its authors' readers in the
``ricbl/eyetracking`` repository): ``main_data/metadata_phase_<1|2|3>.csv`` (``id``, ``dicom_id``,
``subject_id``, ``image`` (the MIMIC-CXR DICOM path), ``split``, ``eye_tracking_data_discarded``,
``image_size_x``, ``image_size_y``) and one folder per reading ``main_data/<id>/`` (``fixations.csv``,
``timestamps_transcription.csv``, ``transcription.txt``; the raw samples are in ``gaze_data/<id>/gaze.csv``
beside ``main_data/``). The split is MIMIC-CXR's (its split file, else REFLACX's ``split`` column).
Fixations are in pixels of the DICOM, whose size is ``image_size_x/y``: that size goes to the manifest
(``image_width/height``) so the gaze is mapped onto the JPG through the DICOM frame; a JPG whose aspect ratio
differs from it is skipped and reported.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import gaze as gz
from ..gaze import GazeFormatError, GazeRecord, detect_fixations
from ..textio import find_published
from ._common import (Command, PrepareError, Summary, _image_size, _int, _note_missing_split, _read_csv,
                      _same_aspect, _split_sentences, _truthy, _without_gaze, split_name)
from ._fakes import REPORT, write_csv
from ._gaze_files import gaze_file, need_columns, number_cell, read_gaze_csv, read_gaze_text
from .mimic_cxr import FAKE_ITEMS, MimicJpg, fake_split

# ----------------------------------------------------------------------------------- the gaze reader


def read_reflacx_metadata(path: str) -> List[dict]:
    """Rows of a REFLACX ``main_data/metadata_phase_<n>.csv`` whose eye tracking was kept.

    Columns used: ``id`` (the reading's folder under ``main_data/``), ``dicom_id``, ``image`` (path of the
    DICOM in MIMIC-CXR), ``split``, ``eye_tracking_data_discarded`` (rows with ``True`` are dropped),
    ``image_size_x``, ``image_size_y``. The other columns (label certainties per finding) are kept as is.
    """
    header, rows = read_gaze_csv(path)
    need_columns(path, header, ["id"])
    keep = []
    for r in rows:
        if str(r.get("eye_tracking_data_discarded", "False")).strip().lower() in ("true", "1"):
            continue
        keep.append(r)
    return keep


def reflacx_raw_gaze_path(case_dir: str) -> str:
    """``gaze.csv`` of a REFLACX reading ``.../main_data/<id>``: REFLACX 1.0.0 publishes it as
    ``gaze_data/<id>/gaze.csv`` beside ``main_data/`` (the REFLACX PhysioNet page's file list; MIMIC-EYE keeps the
    same ``REFLACX/gaze_data/<id>/`` and ``REFLACX/main_data/<id>/`` pair). A ``gaze.csv`` inside the reading's
    own folder is used when there is one (a copy arranged by hand)."""
    case_dir = os.path.normpath(case_dir)
    own = find_published(case_dir, "gaze.csv")
    if own:
        return own
    reading = os.path.basename(case_dir)
    beside = os.path.join(os.path.dirname(os.path.dirname(case_dir)), "gaze_data", reading)
    return gaze_file(beside, "gaze.csv")


def _reflacx_raw_fixations(case_dir: str, ivt) -> np.ndarray:
    gz_path = reflacx_raw_gaze_path(case_dir)
    header, rows = read_gaze_csv(gz_path)
    need_columns(gz_path, header, ["timestamp_sample", "x_position", "y_position"])
    cols = ("timestamp_sample", "x_position", "y_position")
    t, x, y = ([number_cell(gz_path, i + 2, r, c) for i, r in enumerate(rows)] for c in cols)
    ppd = 1.0
    if "angular_resolution_x_pixels_per_degree" in header:
        c = "angular_resolution_x_pixels_per_degree"
        vals = [v for v in (number_cell(gz_path, i + 2, r, c) for i, r in enumerate(rows)) if math.isfinite(v)]
        if vals:
            ppd = float(np.median(vals))
    return detect_fixations(t, x, y, pixels_per_degree=ppd, **ivt)


def read_reflacx(case_dir: str, *, image_size: Optional[Tuple[int, int]] = None, use_raw_gaze: bool = False,
                 **ivt) -> GazeRecord:
    """One REFLACX reading: the folder ``main_data/<id>/`` of REFLACX v1.0.0.

    Files and columns used (each also accepted gzipped, ``<name>.gz``):
      * ``fixations.csv``: ``timestamp_start_fixation``, ``timestamp_end_fixation`` (seconds),
        ``x_position``, ``y_position`` (pixels of the original image).
      * ``gaze_data/<id>/gaze.csv`` beside ``main_data/`` (only with ``use_raw_gaze=True``, then run through
        ``detect_fixations``; see ``reflacx_raw_gaze_path``): ``timestamp_sample``, ``x_position``,
        ``y_position`` and, when present, ``angular_resolution_x_pixels_per_degree`` (median used as pixels
        per degree).
      * ``timestamps_transcription.csv``: ``word``, ``timestamp_start_word``, ``timestamp_end_word``
        (punctuation marks are rows of their own; they carry no token and match nothing).
      * ``transcription.txt``: the dictated report (optional).
    ``image_size`` (width, height) comes from the metadata's ``image_size_x``/``image_size_y``; without it the
    extent of ``xmax_shown_from_image``/``ymax_shown_from_image`` in ``fixations.csv`` is used. Fixations go
    through ``apply_reader_rules``.
    """
    fx_header: List[str] = []
    fx_rows: List[dict] = []
    if use_raw_gaze:
        fixations = _reflacx_raw_fixations(case_dir, ivt)
    else:
        fx_path = gaze_file(case_dir, "fixations.csv")
        fx_header, fx_rows = read_gaze_csv(fx_path)
        cols = ["timestamp_start_fixation", "timestamp_end_fixation", "x_position", "y_position"]
        need_columns(fx_path, fx_header, cols)
        fixations = np.asarray(
            [[number_cell(fx_path, i + 2, r, c) for c in cols] for i, r in enumerate(fx_rows)], dtype=np.float64
        ).reshape(-1, 4)
    words: List[Tuple[str, float, float]] = []
    ts_path = gaze_file(case_dir, "timestamps_transcription.csv")
    if os.path.isfile(ts_path):
        header, rows = read_gaze_csv(ts_path)
        need_columns(ts_path, header, ["word", "timestamp_start_word", "timestamp_end_word"])
        for i, r in enumerate(rows):
            start = number_cell(ts_path, i + 2, r, "timestamp_start_word")
            end = number_cell(ts_path, i + 2, r, "timestamp_end_word")
            if math.isfinite(start) and math.isfinite(end):  # a word without a time cannot place a sentence
                words.append((r["word"], start, end))
    transcript = None
    tr_path = os.path.join(case_dir, "transcription.txt")
    if os.path.isfile(tr_path):
        transcript = read_gaze_text(tr_path).strip()
    if image_size is None:
        if fx_rows and "xmax_shown_from_image" in fx_header and "ymax_shown_from_image" in fx_header:
            image_size = (int(max(float(r["xmax_shown_from_image"]) for r in fx_rows)),
                          int(max(float(r["ymax_shown_from_image"]) for r in fx_rows)))
        else:
            raise GazeFormatError(f"{case_dir}: image_size not given and not derivable from fixations.csv")
    return gz.reader_record(fixations, words, image_size, transcript, case_dir)


# ----------------------------------------------------------------------------------- the manifest


def _reflacx_reading(case_dir: str, where: str, summary: Summary) -> Optional[Tuple[str, List[str]]]:
    """(transcription, sentences) of a REFLACX reading (None, reported, when the folder is unusable)."""
    if not os.path.isdir(case_dir):
        summary.skip(where, "REFLACX reading folder not found")
        return None
    if not find_published(case_dir, "fixations.csv"):
        summary.skip(where, "REFLACX reading has no fixations.csv")
        return None
    tr = os.path.join(case_dir, "transcription.txt")
    try:
        text = read_gaze_text(tr).strip() if os.path.isfile(tr) else ""
    except GazeFormatError as e:
        summary.skip(f"{where}: {e}", "REFLACX gaze files malformed")
        return None
    sents = _split_sentences(text)
    if not sents:
        summary.skip(where, "REFLACX reading has no transcription")
        return None
    return text, sents


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
        rec = read_reflacx(case_dir, image_size=size)
    except GazeFormatError as e:
        summary.skip(f"{where}: {e}", "REFLACX gaze files malformed")
        return
    row = {"image": os.path.abspath(image), "gaze_format": "reflacx", "gaze": os.path.abspath(case_dir),
           "dicom_id": r["dicom_id"].strip(), "image_width": size[0], "image_height": size[1], "split": split,
           "source_id": r["id"]}
    keys = [("reflacx", r["id"]), ("content", row["image"], text)]
    if not summary.add(row if len(rec.fixations) else _without_gaze(row, text), sents, where=where, keys=keys):
        return
    summary.count_gaze(len(rec.fixations), rec.dropped_off_image, rec.dropped_non_finite)


def prepare_reflacx(root: str, mimic_cxr_jpg: str) -> Summary:
    """REFLACX readings with their MIMIC-CXR-JPG images (one manifest row per reading). The split is MIMIC-CXR's
    (its split file, else REFLACX's ``split`` column, which copies it), spelled ``train``/``valid``/``test``."""
    s = Summary("reflacx")
    main_data = os.path.join(root, "main_data") if os.path.isdir(os.path.join(root, "main_data")) else root
    jpg = MimicJpg(mimic_cxr_jpg)
    for where, r in _reflacx_metadata(main_data):
        d = r["dicom_id"].strip()
        split = jpg.split.get(d) or split_name(r.get("split"))
        image = jpg.find(d, r.get("image"))
        _reflacx_row(where, r, os.path.join(main_data, r["id"]), image, s, split, jpg.sizes.get(d))
    _note_missing_split(s, "no mimic-cxr-2.0.0-split.csv(.gz) entry and no REFLACX split value")
    return s


def _run(ns, out_dir: str) -> Summary:
    return prepare_reflacx(ns.root, ns.mimic_cxr_jpg)


COMMANDS = {"reflacx": Command("REFLACX with MIMIC-CXR-JPG", _run, mimic_cxr_jpg=True)}


# ----------------------------------------------------------------------------------- the fake tree


# REFLACX fixations off the image: rounded screen-to-image positions are not clipped to the image (left of it, and
# below it), both within the first sentence's time span
FAKE_OFF_IMAGE = [(0.3, 1.4, -40.0, 10.0), (0.5, 1.6, 60.0, 9999.0)]


def _write_fake_reading(case_dir: str, dicom_size: Tuple[int, int], seed: int = 0,
                        raw_gaze_dir: Optional[str] = None) -> None:
    """fixations.csv, timestamps_transcription.csv and transcription.txt of one REFLACX reading, as REFLACX 1.0.0
    writes them: punctuation marks are word rows of their own, two fixations are off the image. ``raw_gaze_dir``:
    where ``gaze.csv`` goes (REFLACX publishes it as ``gaze_data/<id>/gaze.csv`` beside ``main_data/``)."""
    W, H = dicom_size
    words, t = [], 0.0
    for s in REPORT:
        for wd in s.rstrip(".").split() + ["."]:
            words.append((wd, t, t + 0.4))
            t += 0.5
    write_csv(os.path.join(case_dir, "timestamps_transcription.csv"),
              ["word", "timestamp_start_word", "timestamp_end_word"], words)
    fx = [(0.2 + i, 0.6 + i, W * (0.2 + 0.15 * ((i + seed) % 5)), H * (0.3 + 0.1 * (i % 4)), W, H) for i in range(6)]
    fx += [f + (W, H) for f in FAKE_OFF_IMAGE]
    write_csv(os.path.join(case_dir, "fixations.csv"), ["timestamp_start_fixation", "timestamp_end_fixation",
                                                        "x_position", "y_position", "xmax_shown_from_image",
                                                        "ymax_shown_from_image"], fx)
    with open(os.path.join(case_dir, "transcription.txt"), "w") as f:
        f.write(" ".join(REPORT))
    if raw_gaze_dir:
        # 100 Hz samples resting on each in-image fixation, an empty cell (track loss) between them
        rows = []
        for (s, e, x, y, _, _) in fx[:6]:
            rows += [(f"{s + 0.01 * k:.2f}", x, y, 30.0) for k in range(int(round((e - s) / 0.01)))]
            rows.append((f"{e + 0.05:.2f}", "", "", 30.0))
        write_csv(os.path.join(raw_gaze_dir, "gaze.csv"), ["timestamp_sample", "x_position", "y_position",
                                                          "angular_resolution_x_pixels_per_degree"], rows)


def write_fake_tree(root: str, mimic_items: Optional[Sequence[Tuple[str, str, str]]] = None) -> None:
    """A tiny REFLACX tree in the published layout under ``root``, for tests and demos; no real data.

    Readings of the first three MIMIC-CXR-JPG images ``mimic_items`` (default: the ``mimic_cxr`` fake tree's;
    one reading discarded), plus: a reading whose folder is missing and one whose dicom_id is not in
    MIMIC-CXR-JPG."""
    mimic_items = FAKE_ITEMS if mimic_items is None else mimic_items
    md = os.path.join(root, "main_data")
    rows = []
    for i, (sub, study, dicom) in enumerate(mimic_items[:3]):
        rid = f"P10{i}R00{i}"
        _write_fake_reading(os.path.join(md, rid), (128, 160), seed=i,
                            raw_gaze_dir=os.path.join(root, "gaze_data", rid))
        rows.append((rid, fake_split(i), "True" if i == 2 else "False",
                     f"physionet.org/files/mimic-cxr/2.0.0/files/p{sub[:2]}/p{sub}/s{study}/{dicom}.dcm", dicom, sub,
                     128, 160))
    rows.append(("P109R009", "train", "False", "x.dcm", mimic_items[3][2], mimic_items[3][0], 128, 160))  # no folder
    rows.append(("P108R008", "train", "False", "y.dcm", "not-in-mimic", "10000099", 128, 160))
    _write_fake_reading(os.path.join(md, "P108R008"), (128, 160))
    write_csv(os.path.join(md, "metadata_phase_1.csv"), ["id", "split", "eye_tracking_data_discarded", "image",
                                                         "dicom_id", "subject_id", "image_size_x", "image_size_y"],
              rows)
