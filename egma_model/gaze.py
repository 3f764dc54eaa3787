"""From raw eye tracking to the ``gaze (N, P)`` input of the EGMA loss.

Pipeline (each step is a public function, so a user can start from whichever data they have):

1. ``detect_fixations``: velocity-threshold (I-VT) fixation detection from raw gaze samples, with a
   minimum duration; samples during saccades and blinks (missing / NaN positions) are dropped.
   Datasets that ship fixations (REFLACX ``fixations.csv``, EGD-CXR ``fixations.csv``) skip this step.
2. ``sentence_spans``: the time span of each report sentence from the dictation's word (or phrase)
   timestamps.
3. ``sentence_heatmaps``: each fixation that overlaps a sentence's span adds a Gaussian (``sigma`` in
   pixels of the original image, weight = fixation duration) to that sentence's heatmap; a sentence
   without any fixation (or without a span) falls back to the whole-report heatmap.
4. ``to_patch_grid``: area averaging onto the image encoder's patch grid, scaled to ``[0, 1]`` per
   sentence (values below ``min_heat`` set to 0, so that "gaze > 0" labels mean something).

Coordinates: fixations are in pixels of the original image ``(x right, y down)``. Images are padded to a
centred square before resizing (``egma_model.data.preprocess_image``); the heatmaps are computed in that
same square frame so that gaze stays aligned with the pixels.

Readers (``read_reflacx``, ``read_egd_cxr``, ``read_mimic_eye_egd``) turn the public datasets' files into a
``GazeRecord``; their docstrings list the files and columns they use. Every text file goes through
``egma_model.textio`` (strict UTF-8, ``.gz`` accepted). Every reader ends with ``apply_reader_rules``, the one
place that decides which fixations are usable (see ``READER_RULES_VERSION``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .textio import find_published, read_csv_rows, read_text

__all__ = [
    "GazeRecord",
    "detect_fixations",
    "sentence_spans",
    "sentence_heatmaps",
    "to_patch_grid",
    "gaze_for_sentences",
    "read_reflacx",
    "read_reflacx_metadata",
    "read_egd_cxr",
    "read_mimic_eye_egd",
    "read_egd_fixations",
    "reflacx_raw_gaze_path",
    "apply_reader_rules",
    "READER_RULES_VERSION",
    "GazeFormatError",
]


class GazeFormatError(ValueError):
    """A gaze file is missing, malformed, or does not match the report (message names file and row)."""


@dataclass
class GazeRecord:
    """Eye tracking of one reading: fixations, timed words, the image size.

    fixations: ``(F, 4)`` float array, columns ``start_s, end_s, x_px, y_px`` (original image pixels).
    words: list of ``(text, start_s, end_s)``: words or phrases of the dictation, in order.
    image_size: ``(width, height)`` of the original image in pixels.
    transcript: the dictated report text, when the dataset gives it.
    dropped_off_image, dropped_non_finite: fixations of the file that ``apply_reader_rules`` discarded.
    A reading whose every fixation was dropped (or whose fixations file has no row) has ``F == 0``: it
    carries no gaze, and ``egma-prepare`` counts it as a reading without gaze.
    """

    fixations: np.ndarray
    words: List[Tuple[str, float, float]] = field(default_factory=list)
    image_size: Tuple[int, int] = (0, 0)
    transcript: Optional[str] = None
    source: str = ""
    dropped_off_image: int = 0
    dropped_non_finite: int = 0


# ----------------------------------------------------------------------------------------------------
# 1. fixation detection


def detect_fixations(
    t: Sequence[float],
    x: Sequence[float],
    y: Sequence[float],
    *,
    velocity_threshold: float = 30.0,
    pixels_per_degree: float = 1.0,
    min_duration: float = 0.1,
) -> np.ndarray:
    """I-VT fixation detection.

    Args:
        t, x, y: raw samples (seconds, pixels). NaN / missing positions are blinks or track loss.
        velocity_threshold: a sample whose velocity from the previous sample exceeds this (in degrees
            per second when ``pixels_per_degree`` is given, else pixels per second) is a saccade sample.
        pixels_per_degree: screen/image pixels per visual degree (REFLACX gives it per sample).
        min_duration: fixations shorter than this (seconds) are dropped.

    Returns:
        ``(F, 4)`` array ``start_s, end_s, x, y`` (x, y = mean position of the fixation's samples).
    """
    t = np.asarray(t, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not (t.shape == x.shape == y.shape) or t.ndim != 1:
        raise ValueError(f"t, x, y must be 1-D of the same length, got {t.shape}, {x.shape}, {y.shape}")
    n = t.shape[0]
    if n == 0:
        return np.zeros((0, 4))
    valid = np.isfinite(x) & np.isfinite(y) & np.isfinite(t)
    slow = np.zeros(n, dtype=bool)
    dt = np.diff(t)
    dist = np.hypot(np.diff(x), np.diff(y)) / float(pixels_per_degree)
    with np.errstate(divide="ignore", invalid="ignore"):
        vel = np.where(dt > 0, dist / np.where(dt > 0, dt, 1.0), np.inf)
    # sample i (i >= 1) is slow if it and its predecessor are valid and the velocity is under threshold
    slow[1:] = valid[1:] & valid[:-1] & (vel < velocity_threshold)
    # the first sample of a run of slow samples also belongs to the fixation
    member = slow.copy()
    member[:-1] |= slow[1:] & valid[:-1]
    out = []
    i = 0
    while i < n:
        if not member[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and slow[j + 1]:
            j += 1
        if t[j] - t[i] >= min_duration:
            out.append((t[i], t[j], float(np.mean(x[i : j + 1])), float(np.mean(y[i : j + 1]))))
        i = j + 1
    return np.asarray(out, dtype=np.float64).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------------
# 2. sentence time spans

_TOKEN = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> List[str]:
    return _TOKEN.findall(text.lower())


def sentence_spans(
    sentences: Sequence[str], words: Sequence[Tuple[str, float, float]], *, lookahead: int = 8
) -> List[Optional[Tuple[float, float]]]:
    """The ``(start_s, end_s)`` span of each sentence, from the timed words (or phrases) of the dictation.

    The words are matched to the sentences' tokens in order (case and punctuation ignored; a timed
    entry may hold several tokens, e.g. EGD-CXR phrases). Tokens the dictation lacks are skipped
    (up to ``lookahead`` timed tokens ahead are searched); a sentence with no matched token gets
    ``None`` (its heatmap then falls back to the whole report).
    """
    stream: List[Tuple[str, float, float]] = []  # one entry per token
    for w, s, e in words:
        for tok in _tokens(str(w)):
            stream.append((tok, float(s), float(e)))
    spans: List[Optional[Tuple[float, float]]] = []
    pos = 0
    for sent in sentences:
        start = end = None
        for tok in _tokens(sent):
            for k in range(pos, min(pos + lookahead, len(stream))):
                if stream[k][0] == tok:
                    if start is None:
                        start = stream[k][1]
                    end = stream[k][2]
                    pos = k + 1
                    break
        spans.append(None if start is None else (start, max(end, start)))
    return spans


# ----------------------------------------------------------------------------------------------------
# 3. heatmaps


def _square_frame(image_size: Tuple[int, int]) -> Tuple[float, float, float]:
    """Side of the centred square the image is padded to and the image's offset inside it."""
    w, h = image_size
    side = float(max(w, h))
    return side, (side - w) / 2.0, (side - h) / 2.0


def _fixation_maps(
    fix: np.ndarray, image_size: Tuple[int, int], resolution: int, sigma: float, truncate: float
) -> np.ndarray:
    """``(F, R, R)`` truncated Gaussians of each fixation (unit peak), in the square-padded frame."""
    side, ox, oy = _square_frame(image_size)
    scale = resolution / side
    centres = (np.arange(resolution) + 0.5) / scale  # cell centres in square-frame pixels
    fx = fix[:, 2:3] + ox
    fy = fix[:, 3:4] + oy
    dx = centres[None, :] - fx  # (F, R)
    dy = centres[None, :] - fy
    gx = np.exp(-0.5 * (dx / sigma) ** 2) * (np.abs(dx) <= truncate * sigma)
    gy = np.exp(-0.5 * (dy / sigma) ** 2) * (np.abs(dy) <= truncate * sigma)
    # radial truncation: keep only cells within truncate*sigma of the centre
    g = gy[:, :, None] * gx[:, None, :]
    r2 = (dy[:, :, None] ** 2 + dx[:, None, :] ** 2) / sigma**2
    return g * (r2 <= truncate**2)


def sentence_heatmaps(
    fixations: np.ndarray,
    spans: Sequence[Optional[Tuple[float, float]]],
    image_size: Tuple[int, int],
    *,
    sigma: float = 150.0,
    resolution: int = 224,
    truncate: float = 2.0,
    lead: float = 0.0,
    weight_by_duration: bool = True,
) -> Tuple[np.ndarray, np.ndarray]:
    """Per-sentence gaze heatmaps ``(S, R, R)`` in the square-padded image frame.

    Args:
        fixations: ``(F, 4)`` ``start_s, end_s, x_px, y_px``.
        spans: per sentence ``(start_s, end_s)`` or ``None``.
        image_size: ``(width, height)`` of the original image.
        sigma: Gaussian standard deviation in original-image pixels (REFLACX uses about one visual
            degree, ~100-150 px on its images).
        resolution: side ``R`` of the heatmap grid (a multiple of the patch grid keeps area averaging exact).
        truncate: each Gaussian is cut at ``truncate * sigma`` (so heat stays local).
        lead: a fixation counts for a sentence if it overlaps ``[start - lead, end]``.
        weight_by_duration: weight each Gaussian by the fixation's duration.

    Returns:
        ``(maps (S, R, R) float32, fell_back (S,) bool)``: ``fell_back[j]`` is true when sentence ``j`` had no
        fixation in its span and took the whole-report heatmap.
    """
    fixations = np.asarray(fixations, dtype=np.float64).reshape(-1, 4)
    S = len(spans)
    if image_size[0] <= 0 or image_size[1] <= 0:
        raise ValueError(f"image_size must be positive (width, height), got {image_size}")
    maps = np.zeros((S, resolution, resolution), dtype=np.float64)
    fell_back = np.zeros(S, dtype=bool)
    if fixations.shape[0] == 0:
        return maps.astype(np.float32), np.ones(S, dtype=bool)
    g = _fixation_maps(fixations, image_size, resolution, sigma, truncate)
    w = (fixations[:, 1] - fixations[:, 0]).clip(min=1e-3) if weight_by_duration else np.ones(len(fixations))
    whole = np.tensordot(w, g, axes=1)
    for j, span in enumerate(spans):
        if span is not None:
            s, e = span
            inside = (fixations[:, 1] >= s - lead) & (fixations[:, 0] <= e)
            if inside.any():
                maps[j] = np.tensordot(w[inside], g[inside], axes=1)
                continue
        maps[j] = whole
        fell_back[j] = True
    return maps.astype(np.float32), fell_back


GAZE_RESIZES = ("area", "bilinear_antialias")


def to_patch_grid(maps, grid: Tuple[int, int], *, min_heat: float = 0.1, resize: str = "area") -> torch.Tensor:
    """Resize ``(S, R, R)`` heatmaps onto a ``(gh, gw)`` patch grid: ``(S, gh*gw)`` in ``[0, 1]``.

    ``resize="area"`` (ours) averages each patch's area; ``"bilinear_antialias"`` is the authors' resize
    (``interpolate(mode="bilinear", antialias=True)``: a triangle filter as wide as the scale factor, so a
    patch also takes some heat from its neighbours' pixels). Each sentence is then scaled so its maximum is
    1; values below ``min_heat`` become 0 (an all-zero map stays 0). The loss's labels are ``gaze > 0``:
    the authors' rule is ``resize="bilinear_antialias", min_heat=0``.
    """
    if resize not in GAZE_RESIZES:
        raise ValueError(f"resize must be one of {list(GAZE_RESIZES)}, got {resize!r}")
    maps = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps, dtype=torch.float32)
    if maps.dim() != 3:
        raise ValueError(f"heatmaps must be (S, H, W), got {tuple(maps.shape)}")
    gh, gw = grid
    if resize == "bilinear_antialias":
        pooled = F.interpolate(maps.unsqueeze(1), size=(gh, gw), mode="bilinear", antialias=True,
                               align_corners=False).squeeze(1).clamp_min(0)
    elif maps.shape[1] % gh == 0 and maps.shape[2] % gw == 0:
        pooled = F.adaptive_avg_pool2d(maps.unsqueeze(1), (gh, gw)).squeeze(1)
    else:
        pooled = F.interpolate(maps.unsqueeze(1), size=(gh, gw), mode="area").squeeze(1)
    pooled = pooled.reshape(maps.shape[0], gh * gw)
    peak = pooled.amax(dim=1, keepdim=True)
    out = torch.where(peak > 0, pooled / peak.clamp_min(1e-30), torch.zeros_like(pooled))
    if min_heat > 0:
        out = torch.where(out >= min_heat, out, torch.zeros_like(out))
    return out


def gaze_for_sentences(
    record: GazeRecord,
    sentences: Sequence[str],
    grid: Tuple[int, int],
    *,
    sigma: float = 150.0,
    resolution: Optional[int] = None,
    min_heat: float = 0.1,
    lead: float = 0.0,
    resize: str = "area",
) -> torch.Tensor:
    """The whole pipeline for one reading: ``(S, gh*gw)`` gaze of each sentence on each patch."""
    if resolution is None:
        resolution = max(grid) * max(1, int(math.ceil(112 / max(grid))))
    spans = sentence_spans(sentences, record.words)
    maps, _ = sentence_heatmaps(record.fixations, spans, record.image_size, sigma=sigma, resolution=resolution, lead=lead)
    return to_patch_grid(maps, grid, min_heat=min_heat, resize=resize)


# ----------------------------------------------------------------------------------------------------
# the readers' rule for usable fixations

# Bump when ``apply_reader_rules`` or what a reader passes to it changes: a cache of gaze built from the
# readers' output must be keyed on this string so that it is rebuilt.
READER_RULES_VERSION = "1"


def apply_reader_rules(fixations: np.ndarray, image_size: Tuple[int, int]) -> Tuple[np.ndarray, int, int]:
    """The usable fixations of a reading: ``(kept (F', 4), n_off_image, n_non_finite)``.

    A fixation ``start_s, end_s, x_px, y_px`` is dropped, and counted, when
      * any of its four values is NaN or infinite (``n_non_finite``): an empty cell in a dataset's CSV is
        read as NaN (that is how pandas, which wrote these files, saves a missing value); or
      * its position is outside ``[0, width) x [0, height)`` of the original image (``n_off_image``). EGD-CXR
        writes a negative placeholder (``int(-1 * scale)``, about -2) into ``X_ORIGINAL``/``Y_ORIGINAL`` when
        the radiologist looked outside the displayed image and its own heatmap code skips those rows
        (cxr-eye-gaze/eye-gaze-dataset, DataProcessing/DataPostProcessing/
        map_eye_gaze_from_screen_to_image_coordinates.py and create_heatmap_images_and_or_videos.py);
        REFLACX's positions are rounded screen-to-image mappings that are not clipped to the image, and
        its authors' example filter keeps fixations on the image (ricbl/eyetracking,
        examples_and_paper_numbers/filter_fixations.py).
    Text that is not a number is not covered here: the readers refuse it, naming file, row and column.
    """
    fix = np.asarray(fixations, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(fix).all(axis=1)
    w, h = image_size
    x, y = fix[:, 2], fix[:, 3]
    with np.errstate(invalid="ignore"):
        on_image = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    keep = finite & on_image
    return fix[keep], int((finite & ~on_image).sum()), int((~finite).sum())


def _record(fixations: np.ndarray, words, image_size, transcript, source) -> GazeRecord:
    size = (int(image_size[0]), int(image_size[1]))
    kept, off, non_finite = apply_reader_rules(fixations, size)
    return GazeRecord(kept, words, size, transcript, source=source, dropped_off_image=off,
                      dropped_non_finite=non_finite)


# ----------------------------------------------------------------------------------------------------
# readers


def _published(folder: str, name: str) -> str:
    """``folder/name`` as published or gzipped (the plain path when neither exists, for the error message)."""
    return find_published(folder, name) or os.path.join(folder, name)


def _read_csv(path: str) -> Tuple[List[str], List[dict]]:
    if not os.path.isfile(path):
        raise GazeFormatError(f"{path}: file not found")
    return read_csv_rows(path)


def _need(path: str, header: List[str], cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in header]
    if missing:
        raise GazeFormatError(f"{path}: missing column(s) {missing}; found {header}")


def _float(path: str, row_no: int, row: dict, col: str) -> float:
    """A number cell; an empty cell is NaN (a missing value as pandas writes it), text is an error."""
    v = row.get(col)
    if v is not None and v.strip() == "":
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise GazeFormatError(f"{path}: row {row_no}: column {col!r} is not a number: {row.get(col)!r}") from None


def read_reflacx_metadata(path: str) -> List[dict]:
    """Rows of a REFLACX ``main_data/metadata_phase_<n>.csv`` whose eye tracking was kept.

    Columns used: ``id`` (the reading's folder under ``main_data/``), ``dicom_id``, ``image`` (path of the
    DICOM in MIMIC-CXR), ``split``, ``eye_tracking_data_discarded`` (rows with ``True`` are dropped),
    ``image_size_x``, ``image_size_y``. The other columns (label certainties per finding) are kept as is.
    """
    header, rows = _read_csv(path)
    _need(path, header, ["id"])
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
    return _published(beside, "gaze.csv")


def _reflacx_raw_fixations(case_dir: str, ivt) -> np.ndarray:
    gz_path = reflacx_raw_gaze_path(case_dir)
    header, rows = _read_csv(gz_path)
    _need(gz_path, header, ["timestamp_sample", "x_position", "y_position"])
    cols = ("timestamp_sample", "x_position", "y_position")
    t, x, y = ([_float(gz_path, i + 2, r, c) for i, r in enumerate(rows)] for c in cols)
    ppd = 1.0
    if "angular_resolution_x_pixels_per_degree" in header:
        c = "angular_resolution_x_pixels_per_degree"
        vals = [v for v in (_float(gz_path, i + 2, r, c) for i, r in enumerate(rows)) if math.isfinite(v)]
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
        fx_path = _published(case_dir, "fixations.csv")
        fx_header, fx_rows = _read_csv(fx_path)
        cols = ["timestamp_start_fixation", "timestamp_end_fixation", "x_position", "y_position"]
        _need(fx_path, fx_header, cols)
        fixations = np.asarray(
            [[_float(fx_path, i + 2, r, c) for c in cols] for i, r in enumerate(fx_rows)], dtype=np.float64
        ).reshape(-1, 4)
    words: List[Tuple[str, float, float]] = []
    ts_path = _published(case_dir, "timestamps_transcription.csv")
    if os.path.isfile(ts_path):
        header, rows = _read_csv(ts_path)
        _need(ts_path, header, ["word", "timestamp_start_word", "timestamp_end_word"])
        for i, r in enumerate(rows):
            start = _float(ts_path, i + 2, r, "timestamp_start_word")
            end = _float(ts_path, i + 2, r, "timestamp_end_word")
            if math.isfinite(start) and math.isfinite(end):  # a word without a time cannot place a sentence
                words.append((r["word"], start, end))
    transcript = None
    tr_path = os.path.join(case_dir, "transcription.txt")
    if os.path.isfile(tr_path):
        transcript = read_text(tr_path).strip()
    if image_size is None:
        if fx_rows and "xmax_shown_from_image" in fx_header and "ymax_shown_from_image" in fx_header:
            image_size = (int(max(float(r["xmax_shown_from_image"]) for r in fx_rows)),
                          int(max(float(r["ymax_shown_from_image"]) for r in fx_rows)))
        else:
            raise GazeFormatError(f"{case_dir}: image_size not given and not derivable from fixations.csv")
    return _record(fixations, words, image_size, transcript, case_dir)


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
    header, rows = _read_csv(fixations_csv)
    _need(fixations_csv, header, EGD_FIXATION_COLUMNS)
    out: Dict[str, List[Tuple[float, float, float, float]]] = {}
    for i, r in enumerate(rows):
        t = _float(fixations_csv, i + 2, r, "Time (in secs)")
        d = _float(fixations_csv, i + 2, r, "FPOGD")
        out.setdefault(r["DICOM_ID"].strip(), []).append(
            (t - d, t, _float(fixations_csv, i + 2, r, "X_ORIGINAL"), _float(fixations_csv, i + 2, r, "Y_ORIGINAL")))
    parsed = {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in out.items()}
    for a in parsed.values():
        a.flags.writeable = False  # shared by every later read of the file
    return parsed


def _egd_words(transcript_json: str) -> Tuple[List[Tuple[str, float, float]], Optional[str]]:
    if not os.path.isfile(transcript_json):
        raise GazeFormatError(f"{transcript_json}: file not found")
    try:
        tj = json.loads(read_text(transcript_json))
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
        fixations_csv = _published(os.path.dirname(fixations_csv), os.path.basename(fixations_csv))
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
    return _record(fixations, words, image_size, transcript, f"{fixations_csv}#{dicom_id}")


def read_mimic_eye_egd(patient_dir: str, dicom_id: str, *, image_size: Optional[Tuple[int, int]] = None) -> GazeRecord:
    """EGD-CXR as packaged in MIMIC-EYE: ``patient_<subject_id>/EyeGaze/fixations.csv`` and
    ``patient_<subject_id>/EyeGaze/audio_segmentation_transcripts/<dicom_id>/transcript.json``
    (same columns and rules as ``read_egd_cxr``)."""
    eg = os.path.join(patient_dir, "EyeGaze")
    tj = os.path.join(eg, "audio_segmentation_transcripts", dicom_id, "transcript.json")
    return read_egd_cxr(_published(eg, "fixations.csv"), dicom_id, tj if os.path.isfile(tj) else None,
                        image_size=image_size)
