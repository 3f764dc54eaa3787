"""MIMIC-EYE: the ``egma-prepare mimic-eye`` subcommand and the reader of its EyeGaze readings (its
REFLACX readings are read by ``reflacx``).

MIMIC-EYE (PhysioNet ``mimic-eye-multimodal-datasets`` 1.0.0; the ``ChihchengHsieh/MIMIC-Eye`` repository's
path constants): ``patient_<subject_id>/CXR-JPG/s<study_id>/<dicom_id>.jpg``, ``CXR-JPG/cxr_meta.csv``
(``dicom_id``, ``Rows``, ``Columns``), ``CXR-DICOM/s<study_id>.txt`` (the MIMIC-CXR report),
``EyeGaze/fixations.csv`` + ``EyeGaze/audio_segmentation_transcripts/<dicom_id>/transcript.json`` (EGD-CXR's
columns), ``REFLACX/metadata.csv`` + ``REFLACX/main_data/<id>/`` and ``REFLACX/gaze_data/<id>/`` (REFLACX's
files; ``REFLACX/<id>/`` is accepted too), and ``CXR-JPG/cxr_split.csv`` (``dicom_id``, ``split``: MIMIC-CXR's
official split, also in ``spreadsheets/CXR-JPG/cxr_split.csv``) for the split of both kinds of reading.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from ..gaze import GazeRecord
from ..textio import find_published
from ._common import IMAGE_EXTS, Command, PrepareError, Summary, _int, _note_missing_split, _read_csv, split_name
from ._fakes import REPORT, write_csv, write_image
from ._gaze_files import gaze_file
from .egd_cxr import (FAKE_FIXATION_HEADER, _egd_fixations, _egd_row, _fake_fixation_rows, _write_fake_transcript,
                      read_egd_cxr)
from .reflacx import _reflacx_row, _write_fake_reading

# ----------------------------------------------------------------------------------- the gaze reader


def read_mimic_eye_egd(patient_dir: str, dicom_id: str, *, image_size: Optional[Tuple[int, int]] = None) -> GazeRecord:
    """EGD-CXR as packaged in MIMIC-EYE: ``patient_<subject_id>/EyeGaze/fixations.csv`` and
    ``patient_<subject_id>/EyeGaze/audio_segmentation_transcripts/<dicom_id>/transcript.json``
    (same columns and rules as ``read_egd_cxr``)."""
    eg = os.path.join(patient_dir, "EyeGaze")
    tj = os.path.join(eg, "audio_segmentation_transcripts", dicom_id, "transcript.json")
    return read_egd_cxr(gaze_file(eg, "fixations.csv"), dicom_id, tj if os.path.isfile(tj) else None,
                        image_size=image_size)


# ----------------------------------------------------------------------------------- the manifest


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
                _egd_row(where, d, jpgs.get(d), fix, tj, sizes.get(d), [], splits.get(d, ""), "mimic_eye", pdir, s)
    if not any_sizes:
        s.notes.append("EyeGaze rows without CXR-JPG/cxr_meta.csv Rows/Columns take the JPG's size as the DICOM size")
    _note_missing_split(s, "not in the patient's CXR-JPG/cxr_split.csv (nor spreadsheets/CXR-JPG/cxr_split.csv)")
    return s


def _run(ns, out_dir: str) -> Summary:
    return prepare_mimic_eye(ns.root)


COMMANDS = {"mimic-eye": Command("MIMIC-EYE patient folders (REFLACX and EyeGaze readings)", _run)}


# ----------------------------------------------------------------------------------- the fake tree


# MIMIC-EYE's per-patient CXR-JPG/cxr_split.csv (patient 0 only): the official split, MIMIC-CXR's spelling
FAKE_SPLITS = {"d0a": "test", "d0b": "validate"}


def write_fake_tree(root: str) -> None:
    """A tiny MIMIC-EYE tree in the published layout under ``root``, for tests and demos; no real data.

    Two patients: one with a REFLACX reading (REFLACX/main_data/<id>/, gaze in REFLACX/gaze_data/<id>/), an
    EyeGaze reading and CXR-JPG/cxr_split.csv; one without cxr_split.csv, with an EyeGaze reading whose transcript
    is missing, a usable EyeGaze reading and a REFLACX row whose folder is missing."""
    for pi, sub in enumerate(["10000001", "10000002"]):
        pdir = os.path.join(root, f"patient_{sub}")
        dicoms = [f"d{pi}a", f"d{pi}b"]
        meta = []
        for j, d in enumerate(dicoms):
            write_image(os.path.join(pdir, "CXR-JPG", f"s5{pi}{j}", f"{d}.jpg"), seed=10 * pi + j)
            meta.append((d, sub, f"5{pi}{j}", 160, 128))
            os.makedirs(os.path.join(pdir, "CXR-DICOM"), exist_ok=True)
            with open(os.path.join(pdir, "CXR-DICOM", f"s5{pi}{j}.txt"), "w") as f:
                f.write("FINDINGS: " + " ".join(REPORT))
        write_csv(os.path.join(pdir, "CXR-JPG", "cxr_meta.csv"), ["dicom_id", "subject_id", "study_id", "Rows",
                                                                  "Columns"], meta)
        if pi == 0:
            write_csv(os.path.join(pdir, "CXR-JPG", "cxr_split.csv"), ["dicom_id", "study_id", "subject_id", "split"],
                      [(d, f"5{pi}{j}", sub, FAKE_SPLITS[d]) for j, d in enumerate(dicoms)])
        rid = f"P20{pi}R00{pi}"
        if pi == 0:
            _write_fake_reading(os.path.join(pdir, "REFLACX", "main_data", rid), (128, 160),
                                raw_gaze_dir=os.path.join(pdir, "REFLACX", "gaze_data", rid))
        # no image_size_x/y here: the DICOM size comes from CXR-JPG/cxr_meta.csv; REFLACX's own split column says
        # "train", the official cxr_split.csv "test"
        write_csv(os.path.join(pdir, "REFLACX", "metadata.csv"), ["id", "split", "eye_tracking_data_discarded",
                                                                  "dicom_id", "subject_id"],
                  [(rid, "train", "False", dicoms[0], sub)])
        fx = _fake_fixation_rows(dicoms[1], (128, 160))
        if pi == 1:
            fx += _fake_fixation_rows(dicoms[0], (128, 160))  # d1a: no transcript
        write_csv(os.path.join(pdir, "EyeGaze", "fixations.csv"), FAKE_FIXATION_HEADER, fx)
        _write_fake_transcript(os.path.join(pdir, "EyeGaze", "audio_segmentation_transcripts", dicoms[1],
                                            "transcript.json"))
