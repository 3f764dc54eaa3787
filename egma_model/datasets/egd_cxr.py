"""EGD-CXR: the ``egma-prepare egd-cxr`` subcommand and the gaze reader of its readings.

EGD-CXR (PhysioNet ``egd-cxr`` 1.0.0; the ``cxr-eye-gaze/eye-gaze-dataset`` repository): ``master_sheet.csv``
(``dicom_id``, ``path``, ``study_id``, ``patient_id``, the condition columns ``Normal``, ``CHF``,
``pneumonia``), ``fixations.csv`` (``DICOM_ID``, ``X_ORIGINAL``, ``Y_ORIGINAL``, ...: DICOM pixels) and
``audio_segmentation_transcripts/<dicom_id>/transcript.json``. ``X_ORIGINAL``/``Y_ORIGINAL`` hold a negative
placeholder for looks outside the image (dropped by the reader rule). The split is MIMIC-CXR's. The DICOM size
comes from MIMIC-CXR-JPG's metadata (``Rows``/``Columns``) when given, else from the JPG (same pixels in
MIMIC-CXR-JPG).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import gaze as gz
from ..gaze import GazeFormatError, GazeRecord
from ._common import (Command, PrepareError, Summary, _image_size, _note_missing_split, _published, _read_csv,
                      _same_aspect, _split_sentences, _truthy, _without_gaze)
from ._fakes import REPORT, write_csv
from ._gaze_files import gaze_file, need_columns, number_cell, read_gaze_csv, read_gaze_text
from .mimic_cxr import FAKE_ITEMS, MimicJpg

# ----------------------------------------------------------------------------------- the gaze reader


EGD_FIXATION_COLUMNS = ["DICOM_ID", "Time (in secs)", "FPOGD", "X_ORIGINAL", "Y_ORIGINAL"]


# Parsed EGD-CXR fixations files, newest last: EGD-CXR puts all 1,083 readings in one ``fixations.csv`` (about
# 200,000 rows), so each file is parsed once per process, not once per reading. Keyed by the file's path, size
# and modification time, so an edited file is parsed again.
_EGD_PARSED: "OrderedDict[Tuple[str, int, int], Dict[str, np.ndarray]]" = OrderedDict()


_EGD_PARSED_FILES = 4  # MIMIC-EYE has one small file per patient: keep a few, not all


def read_egd_fixations(fixations_csv: str) -> Dict[str, np.ndarray]:
    """Every reading's fixations in an EGD-CXR ``fixations.csv``: ``DICOM_ID`` -> ``(F, 4)`` ``start_s, end_s,
    x_px, y_px`` as written (before ``apply_reader_rules``; read-only arrays). Stray spaces around the IDs are
    removed. Parsed once per process and file (see ``_EGD_PARSED``)."""
    try:
        st = os.stat(fixations_csv)
        key = (os.path.realpath(fixations_csv), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None  # missing: _read_csv names the file
    if key is not None and key in _EGD_PARSED:
        _EGD_PARSED.move_to_end(key)
        return _EGD_PARSED[key]
    parsed = _parse_egd_fixations(fixations_csv)
    if key is not None:
        _EGD_PARSED[key] = parsed
        while len(_EGD_PARSED) > _EGD_PARSED_FILES:
            _EGD_PARSED.popitem(last=False)
    return parsed


def _parse_egd_fixations(fixations_csv: str) -> Dict[str, np.ndarray]:
    header, rows = read_gaze_csv(fixations_csv)
    need_columns(fixations_csv, header, EGD_FIXATION_COLUMNS)
    out: Dict[str, List[Tuple[float, float, float, float]]] = {}
    for i, r in enumerate(rows):
        t = number_cell(fixations_csv, i + 2, r, "Time (in secs)")
        d = number_cell(fixations_csv, i + 2, r, "FPOGD")
        out.setdefault(r["DICOM_ID"].strip(), []).append(
            (t - d, t, number_cell(fixations_csv, i + 2, r, "X_ORIGINAL"),
             number_cell(fixations_csv, i + 2, r, "Y_ORIGINAL")))
    parsed = {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in out.items()}
    for a in parsed.values():
        a.flags.writeable = False  # shared by every later read of the file
    return parsed


def _egd_words(transcript_json: str) -> Tuple[List[Tuple[str, float, float]], Optional[str]]:
    if not os.path.isfile(transcript_json):
        raise GazeFormatError(f"{transcript_json}: file not found")
    try:
        tj = json.loads(read_gaze_text(transcript_json))
    except json.JSONDecodeError as e:
        raise GazeFormatError(f"{transcript_json}: not valid JSON ({e})") from None
    if not isinstance(tj, dict) or not isinstance(tj.get("time_stamped_text"), list):
        raise GazeFormatError(f"{transcript_json}: no 'time_stamped_text' list")
    words = []
    for i, p in enumerate(tj["time_stamped_text"]):
        try:
            words.append((str(p["phrase"]), float(p["begin_time"]), float(p["end_time"])))
        except (KeyError, TypeError, ValueError):
            raise GazeFormatError(
                f"{transcript_json}: time_stamped_text[{i}] needs phrase, begin_time, end_time") from None
    return words, tj.get("full_text")


def read_egd_cxr(fixations_csv: str, dicom_id: str, transcript_json: Optional[str] = None, *,
                 image_size: Optional[Tuple[int, int]] = None) -> GazeRecord:
    """One reading of EGD-CXR (Karargyris et al., PhysioNet ``egd-cxr`` 1.0.0; also as MIMIC-EYE's ``EyeGaze``).

    Files and columns used:
      * ``fixations.csv`` (all readings in one file, or one patient's in MIMIC-EYE; ``fixations.csv.gz`` too):
        ``DICOM_ID`` (rows of other images are ignored), ``Time (in secs)`` (time of the row since the reading
        began, taken as the end of the fixation), ``FPOGD`` (fixation duration, s), ``X_ORIGINAL``,
        ``Y_ORIGINAL`` (fixation position in pixels of the original image; a negative placeholder when the
        radiologist looked outside the image, dropped by ``apply_reader_rules``). Start = ``Time - FPOGD``.
      * ``audio_segmentation_transcripts/<dicom_id>/transcript.json``: ``full_text`` and
        ``time_stamped_text``: a list of ``{"phrase", "begin_time", "end_time"}`` (seconds).
    ``image_size`` (width, height): the DICOM's size (EGD-CXR does not repeat it); without it, the largest
    finite ``X_ORIGINAL``/``Y_ORIGINAL`` seen bounds it (a rough fallback).
    """
    if not os.path.isfile(fixations_csv) and not fixations_csv.endswith(".gz"):
        fixations_csv = gaze_file(os.path.dirname(fixations_csv), os.path.basename(fixations_csv))
    fixations = read_egd_fixations(fixations_csv).get(dicom_id.strip())
    if fixations is None:
        raise GazeFormatError(f"{fixations_csv}: no rows with DICOM_ID {dicom_id!r}")
    words: List[Tuple[str, float, float]] = []
    transcript = None
    if transcript_json is not None:
        words, transcript = _egd_words(transcript_json)
    if image_size is None:
        xy = fixations[:, 2:][np.isfinite(fixations[:, 2:]).all(axis=1)]
        xy = xy[(xy >= 0).all(axis=1)]
        if len(xy) == 0:
            raise GazeFormatError(f"{fixations_csv}: image_size not given and no on-image fixation of {dicom_id!r}")
        image_size = (int(np.ceil(xy[:, 0].max())) + 1, int(np.ceil(xy[:, 1].max())) + 1)
    return gz.reader_record(fixations, words, image_size, transcript, f"{fixations_csv}#{dicom_id}")


# ----------------------------------------------------------------------------------- the manifest


def _egd_fixations(fixations_csv: str) -> Dict:
    """``DICOM_ID`` -> fixations as written, read once per file (a malformed cell is a PrepareError)."""
    try:
        return read_egd_fixations(fixations_csv)
    except GazeFormatError as e:
        raise PrepareError(str(e)) from None


def _egd_row(where: str, dicom_id: str, image: Optional[str], raw, transcript: str,
             size: Optional[Tuple[int, int]], labels: List[str], split: str, gaze_format: str, gaze: str,
             summary: Summary) -> None:
    if not image:
        summary.skip(where, "dicom_id not found in the MIMIC-CXR-JPG images")
        return
    if raw is None or not len(raw):
        summary.skip(where, "no fixations for this DICOM_ID in fixations.csv")
        return
    if not os.path.isfile(transcript):
        summary.skip(where, "no transcript.json")
        return
    try:  # the check training makes when it reads the same file
        words, full_text = _egd_words(transcript)
    except GazeFormatError as e:
        summary.skip(f"{where} ({e})", "transcript.json malformed")
        return
    text = str(full_text or " ".join(w for w, _, _ in words))
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
        _egd_row(where, d, jpg.find(d, r.get("path")), raw.get(d),
                 os.path.join(root, "audio_segmentation_transcripts", d, "transcript.json"), jpg.sizes.get(d),
                 labels, jpg.split.get(d, ""), "egd", fx, s)
    _note_missing_split(s, "not in mimic-cxr-2.0.0-split.csv(.gz)" if jpg.split else
                        "no mimic-cxr-2.0.0-split.csv(.gz) in the MIMIC-CXR-JPG folder")
    return s


def _run(ns, out_dir: str) -> Summary:
    return prepare_egd_cxr(ns.root, ns.mimic_cxr_jpg)


COMMANDS = {"egd-cxr": Command("EGD-CXR with MIMIC-CXR-JPG", _run, mimic_cxr_jpg=True)}


# ----------------------------------------------------------------------------------- the fake tree


# EGD-CXR's placeholder for a look outside the displayed image: int(-1 * image/screen scale), about -2
FAKE_OFF_IMAGE = (-2, -2)


# fixations.csv's header as EGD-CXR publishes it; written out here rather than taken from EGD_FIXATION_COLUMNS, so
# that the fake checks the reader's column names instead of repeating them
FAKE_FIXATION_HEADER = ["DICOM_ID", "Time (in secs)", "FPOGD", "X_ORIGINAL", "Y_ORIGINAL"]


def _fake_fixation_rows(dicom_id: str, dicom_size: Tuple[int, int], seed: int = 0, off_image: int = 2,
                        on_image: int = 6) -> List[tuple]:
    """Fixation rows of one reading; ``off_image`` long rows with the off-image placeholder fall inside the first
    sentence's span (as a radiologist looking at the worklist while dictating)."""
    W, H = dicom_size
    rows = [(dicom_id, f"{0.5 + i:.2f}", "0.3", f"{W * (0.25 + 0.1 * ((i + seed) % 5)):.1f}",
             f"{H * (0.3 + 0.1 * (i % 4)):.1f}") for i in range(on_image)]
    rows += [(dicom_id, f"{0.9 + 0.2 * k:.2f}", "0.9", *FAKE_OFF_IMAGE) for k in range(off_image)]
    return rows


def _write_fake_transcript(path: str, bad: bool = False) -> None:
    """A reading's transcript.json (``full_text``, ``time_stamped_text`` phrases with ``begin_time`` and
    ``end_time``); ``bad`` writes a file that is not JSON."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if bad:
            f.write("{not json")
            return
        phrases, t = [], 0.0
        for s in REPORT:
            phrases.append({"phrase": s, "begin_time": t, "end_time": t + 1.5})
            t += 2.0
        json.dump({"full_text": " ".join(REPORT), "time_stamped_text": phrases}, f)


def write_fake_tree(root: str, mimic_items: Optional[Sequence[Tuple[str, str, str]]] = None) -> None:
    """A tiny EGD-CXR tree in the published layout under ``root``, for tests and demos; no real data.

    Readings of the MIMIC-CXR-JPG images 4..7 of ``mimic_items`` (default: the ``mimic_cxr`` fake tree's): one
    with a broken transcript.json, one (image 7) whose every fixation is off the image; image 4 is listed twice
    in master_sheet.csv."""
    mimic_items = FAKE_ITEMS if mimic_items is None else mimic_items
    fx, rows = [], []
    for i, (sub, study, dicom) in enumerate(mimic_items[3:7]):
        fx += _fake_fixation_rows(dicom, (128, 160), seed=i, on_image=0 if i == 3 else 6)
        _write_fake_transcript(os.path.join(root, "audio_segmentation_transcripts", dicom, "transcript.json"),
                               bad=i == 2)
        rows.append((dicom, f"files/p{sub[:2]}/p{sub}/s{study}/{dicom}.dcm", study, sub, int(i == 0), int(i == 1), 0))
    rows.append(rows[0])
    write_csv(os.path.join(root, "fixations.csv"), FAKE_FIXATION_HEADER, fx)
    write_csv(os.path.join(root, "master_sheet.csv"), ["dicom_id", "path", "study_id", "patient_id", "Normal", "CHF",
                                                       "pneumonia"], rows)
