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

Readers turn the public datasets' files into a ``GazeRecord``; they live next to their datasets
(``egma_model.datasets.reflacx.read_reflacx``, ``egma_model.datasets.egd_cxr.read_egd_cxr``,
``egma_model.datasets.mimic_eye.read_mimic_eye_egd``), and their docstrings list the files and columns they use.
Every reader ends with ``apply_reader_rules`` (here, through ``reader_record``), the one place that decides which
fixations are usable (see ``READER_RULES_VERSION``). The readers' names stay importable from this module for one
release.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

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


def reader_record(fixations: np.ndarray, words, image_size, transcript, source) -> GazeRecord:
    size = (int(image_size[0]), int(image_size[1]))
    kept, off, non_finite = apply_reader_rules(fixations, size)
    return GazeRecord(kept, words, size, transcript, source=source, dropped_off_image=off,
                      dropped_non_finite=non_finite)


# The readers moved next to their datasets (egma_model.datasets); their names stay importable from here for one
# release, through importlib at attribute access so that this module imports nothing above it.
_MOVED = {
    "read_reflacx": "egma_model.datasets.reflacx",
    "read_reflacx_metadata": "egma_model.datasets.reflacx",
    "reflacx_raw_gaze_path": "egma_model.datasets.reflacx",
    "read_egd_cxr": "egma_model.datasets.egd_cxr",
    "read_egd_fixations": "egma_model.datasets.egd_cxr",
    "EGD_FIXATION_COLUMNS": "egma_model.datasets.egd_cxr",
    "read_mimic_eye_egd": "egma_model.datasets.mimic_eye",
}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
