"""Manifests, sentence splitting, image preprocessing, the ``Dataset`` and the collate function.

Manifest: a ``.csv`` (header row) or ``.jsonl`` (one JSON object per line) file, one row per image.
Relative paths are relative to the manifest's folder. Columns:

=================  ==========================================================================================
``image``          (required) image file: PNG/JPEG (8 or 16 bit, any mode; made grey) or ``.npy`` (H, W)
``report``         report text, split into sentences by ``split_sentences``
``sentences``      alternatively the sentences: a JSON list (CSV cell) or a list (JSONL)
``gaze_format``    ``""`` (none), ``reflacx``, ``egd``, ``mimic_eye`` or ``npy``
``gaze``           reflacx: the reading's folder ``main_data/<id>``; egd: the ``fixations.csv``;
                   mimic_eye: the ``patient_<subject_id>`` folder; npy: an array ``(S, P)`` already on the
                   patch grid or ``(S, H, W)`` heatmaps in the square-padded image frame
``gaze_transcript`` egd only: the ``transcript.json`` (phrase timestamps)
``dicom_id``       egd / mimic_eye: which image's rows of ``fixations.csv``
``image_width``,   size of the image the gaze coordinates refer to (REFLACX metadata ``image_size_x/y``;
``image_height``   the DICOM size for EGD-CXR); default: the image file's size
``labels``         class names separated by ``;`` (CSV) or a list (JSONL); empty = no finding listed
``split``          free text (e.g. ``train``/``test``), used by ``--split`` filters
``cache``,         written by ``egma-prepare cache``: the preparation cache folder and this row's index in it;
``cache_row``      the dataset then reads the prepared image, sentences and gaze (``egma_model.prepared``)
=================  ==========================================================================================

With gaze but neither ``report`` nor ``sentences``, the dataset's transcript (REFLACX ``transcription.txt``,
EGD-CXR ``full_text``) gives the sentences.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from . import gaze as gz
from .sentences import (SPLIT_RULES, _splitter, split_sentences, split_sentences_egma,  # noqa: F401
                        split_sentences_medclip)
from .datasets import egd_cxr, mimic_eye, reflacx
from .textio import TextDecodeError, read_csv_rows, read_text

__all__ = [
    "ManifestError",
    "ManifestRecord",
    "load_manifest",
    "split_sentences",
    "split_sentences_egma",
    "split_sentences_medclip",
    "SPLIT_RULES",
    "load_image",
    "preprocess_image",
    "photometric_augment",
    "EGMADataset",
    "Collator",
    "GazeOptions",
]

GAZE_FORMATS = ("", "reflacx", "egd", "mimic_eye", "npy")
IMAGE_MEAN = 0.449  # grey value of the ImageNet means (the encoders take 3 equal channels)
IMAGE_STD = 0.226


class ManifestError(ValueError):
    """A bad manifest row, a missing file or a gaze that does not fit (the message names file and row)."""


@dataclass
class ManifestRecord:
    image: str
    sentences: List[str]
    gaze_format: str = ""
    gaze: Optional[str] = None
    gaze_transcript: Optional[str] = None
    dicom_id: Optional[str] = None
    gaze_size: Optional[Tuple[int, int]] = None
    labels: List[str] = field(default_factory=list)
    split: str = ""
    where: str = ""  # "<manifest>: row <n>" for error messages
    extra: Dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- manifest


def _cell(row: dict, key: str):
    v = row.get(key)
    if v is None:
        return None
    if isinstance(v, str):
        v = v.strip()
        return v or None
    return v


def load_manifest(path: str, *, check_files: bool = True, split: Optional[str] = None,
                  split_rule: str = "ours") -> List[ManifestRecord]:
    """Read a manifest (``.csv`` or ``.jsonl``); every problem raises ``ManifestError`` naming file and row.

    Rows are numbered as a user sees them: CSV data rows from 2 (row 1 is the header), JSONL lines from 1.
    ``split`` keeps only rows whose ``split`` column equals it. ``split_rule``: how ``report`` text becomes
    sentences (``"ours"``: ``split_sentences``; ``"egma"``: ``split_sentences_egma``; ``"medclip"``:
    ``split_sentences_medclip``); a ``sentences`` column is taken as given, except that the ``"egma"`` and
    ``"medclip"`` rules lowercase and re-tokenise each sentence.
    """
    splitter = _splitter(split_rule)
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: manifest not found")
    base = os.path.dirname(os.path.abspath(path))
    rows = _manifest_rows(path)
    if not rows:
        raise ManifestError(f"{path}: no rows")

    def resolve(p):
        return p if os.path.isabs(p) else os.path.join(base, p)

    records = []
    if split is not None and not any(str(_cell(r, "split") or "") == split for _, r in rows):
        present = sorted({str(_cell(r, "split") or "") for _, r in rows})
        raise ManifestError(f"{path}: no row has split {split!r} (splits present: {present})")
    for n, r in rows:
        where = f"{path}: row {n}"
        if split is not None and str(_cell(r, "split") or "") != split:
            continue
        image = _cell(r, "image")
        if not image:
            raise ManifestError(f"{where}: empty 'image'")
        image = resolve(str(image))
        if check_files and not os.path.isfile(image):
            raise ManifestError(f"{where}: image file not found: {image}")
        sentences = _row_sentences(r, where, split_rule, splitter)
        fmt, g, tr, dicom = _row_gaze(r, where, resolve, check_files)
        size = _row_size(r, where)
        labels = _row_labels(r, where)
        if not sentences and not fmt and not labels:
            # evaluation rows (zero-shot, retrieval, linear probe) need only the image and its labels
            raise ManifestError(f"{where}: no report text: give 'report' or 'sentences' (or 'labels' for a row "
                                f"used only for evaluation)")
        known = {"image", "sentences", "report", "gaze_format", "gaze", "gaze_transcript", "dicom_id",
                 "image_width", "image_height", "labels", "split"}
        extra = {k: v for k, v in r.items() if k not in known}
        if _cell(r, "cache"):  # the folder of `egma-prepare cache`, relative to the manifest like the files
            extra["cache"] = resolve(str(_cell(r, "cache")))
        records.append(ManifestRecord(image, sentences, fmt, g, tr, dicom, size, [str(x) for x in labels],
                                      str(_cell(r, "split") or ""), where, extra))
    return records


def _row_sentences(r: dict, where: str, split_rule: str, splitter) -> List[str]:
    """A row's sentences: its ``sentences`` list as given (re-split by the egma/medclip rules), else its report
    split by the rule."""
    sentences = _cell(r, "sentences")
    if sentences is None:
        return splitter(_cell(r, "report") or "")
    if isinstance(sentences, str):
        try:
            sentences = json.loads(sentences)
        except json.JSONDecodeError:
            raise ManifestError(f"{where}: 'sentences' must be a JSON list of strings") from None
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise ManifestError(f"{where}: 'sentences' must be a list of strings")
    sentences = [s.strip() for s in sentences if s.strip()]
    if split_rule in ("egma", "medclip"):
        sentences = [t for s in sentences for t in splitter(s)]
    return sentences


def _row_gaze(r: dict, where: str, resolve, check_files: bool):
    """A row's ``(gaze_format, gaze path, transcript path, dicom_id)``, each checked."""
    fmt = str(_cell(r, "gaze_format") or "").lower()
    if fmt not in GAZE_FORMATS:
        raise ManifestError(f"{where}: unknown gaze_format {fmt!r}; use one of {list(GAZE_FORMATS[1:])} or leave empty")
    g = _cell(r, "gaze")
    if fmt and not g:
        raise ManifestError(f"{where}: gaze_format {fmt!r} needs a 'gaze' path")
    if g:
        if not fmt:
            raise ManifestError(f"{where}: 'gaze' given without 'gaze_format'")
        g = resolve(str(g))
        if check_files and not os.path.exists(g):
            raise ManifestError(f"{where}: gaze path not found: {g}")
    tr = _cell(r, "gaze_transcript")
    tr = resolve(str(tr)) if tr else None
    if tr and check_files and not os.path.isfile(tr):
        raise ManifestError(f"{where}: gaze_transcript not found: {tr}")
    dicom = _cell(r, "dicom_id")
    if fmt in ("egd", "mimic_eye") and not dicom:
        raise ManifestError(f"{where}: gaze_format {fmt!r} needs 'dicom_id'")
    return fmt, g, tr, dicom


def _row_size(r: dict, where: str) -> Optional[Tuple[int, int]]:
    """The size the row's gaze coordinates refer to (``image_width``, ``image_height``), or None."""
    w, h = _cell(r, "image_width"), _cell(r, "image_height")
    if (w is None) != (h is None):
        raise ManifestError(f"{where}: give both image_width and image_height or neither")
    if w is None:
        return None
    try:
        size = (int(float(w)), int(float(h)))
    except ValueError:
        raise ManifestError(f"{where}: image_width/image_height must be numbers, got {w!r}, {h!r}") from None
    if size[0] <= 0 or size[1] <= 0:
        raise ManifestError(f"{where}: image_width/image_height must be positive, got {size}")
    return size


def _row_labels(r: dict, where: str) -> list:
    labels = _cell(r, "labels") or []
    if isinstance(labels, str):
        labels = [x.strip() for x in labels.split(";") if x.strip()]
    if not isinstance(labels, list):
        raise ManifestError(f"{where}: 'labels' must be ';'-separated names or a list")
    return labels


def _manifest_rows(path: str) -> List[Tuple[int, dict]]:
    """The rows of a manifest with the numbers a user sees, read under the one text rule
    (``egma_model.textio``: strict UTF-8, the error naming the file and byte)."""
    try:
        if path.endswith(".jsonl") or path.endswith(".json"):
            return _jsonl_rows(path, read_text(path))
        header, rows = read_csv_rows(path)
    except TextDecodeError as e:
        raise ManifestError(str(e)) from None
    if not header or "image" not in header:
        raise ManifestError(f"{path}: row 1: the header needs an 'image' column, found {header or None}")
    out = []
    for n, r in enumerate(rows, start=2):
        if None in r:
            raise ManifestError(f"{path}: row {n}: more cells than header columns")
        out.append((n, r))
    return out


def _jsonl_rows(path: str, text: str) -> List[Tuple[int, dict]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: row {n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{path}: row {n}: expected a JSON object")
        rows.append((n, obj))
    return rows


# ------------------------------------------------------------------------------------------- images


def load_image(path: str) -> np.ndarray:
    """A grey image as float32 ``(H, W)`` in ``[0, 1]`` (8/16-bit PNG/JPEG in any mode, or ``.npy``)."""
    if path.endswith(".npy"):
        a = np.load(path).astype(np.float32)
        if a.ndim == 3:
            a = a.mean(-1)
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:  # min/max would be NaN and the whole image silently black
            raise ValueError(f"{path}: {bad} non-finite pixel value(s) (NaN or inf)")
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im, dtype=np.float32)
            return a / (65535.0 if a.max() > 255 else 255.0)
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def preprocess_image(img: np.ndarray, size: int) -> torch.Tensor:
    """Pad to a centred square (black), resize to ``size`` (bilinear, antialiased): ``(1, size, size)`` in [0, 1]."""
    h, w = img.shape
    side = max(h, w)
    sq = np.zeros((side, side), dtype=np.float32)
    oy, ox = (side - h) // 2, (side - w) // 2
    sq[oy : oy + h, ox : ox + w] = img
    t = torch.from_numpy(sq)[None, None]
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=side > size,
                                        align_corners=False)
    return t[0].clamp(0, 1)


def photometric_augment(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Brightness, contrast, gamma and noise jitter; no geometric change, so gaze stays aligned."""
    r = torch.rand(4, generator=generator)
    x = x.clamp(0, 1) ** (0.7 + 0.6 * r[0])
    mean = x.mean()
    x = (x - mean) * (0.8 + 0.4 * r[1]) + mean + (r[2] - 0.5) * 0.2
    x = x + 0.02 * r[3] * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def normalize_image(x: torch.Tensor, mean: float = IMAGE_MEAN, std: float = IMAGE_STD) -> torch.Tensor:
    """``(1, H, W)`` in [0, 1] -> ``(3, H, W)`` normalised for the encoders (``(x - mean) / std``; ours
    0.449/0.226, MedCLIP's 0.5862785803043838/0.27950088968644304)."""
    return ((x - mean) / std).expand(3, -1, -1).contiguous()


# ------------------------------------------------------------------------------------------- dataset


@dataclass
class GazeOptions:
    """Gaze heatmap settings (see ``egma_model.gaze``)."""

    sigma: float = 150.0  # px of the original image
    min_heat: float = 0.1
    lead: float = 0.0
    resolution: Optional[int] = None
    use_raw_gaze: bool = False  # REFLACX: detect fixations from gaze.csv instead of fixations.csv
    resize: str = "area"  # onto the patch grid: "area" (ours) or "bilinear_antialias" (the authors')


class EGMADataset(Dataset):
    """Images, sentences and per-sentence gaze ``(S, P)`` on the encoder's patch ``grid``.

    Items: ``{"pixel_values" (3,H,W), "sentences" list[str], "gaze" (S,P) or None, "labels" (C,) or None,
    "index"}``. Gaze is computed on first use and cached.
    """

    def __init__(self, records: Sequence[ManifestRecord], *, image_size: int = 224, grid: Tuple[int, int] = (7, 7),
                 train: bool = False, classes: Optional[Sequence[str]] = None, max_sentences: int = 16,
                 gaze_options: Optional[GazeOptions] = None, use_gaze: bool = True, seed: int = 0,
                 cache: Optional[Dict] = None, image_mean: float = IMAGE_MEAN, image_std: float = IMAGE_STD,
                 split_rule: str = "ours", prepared: bool = True):
        self.records = list(records)
        self.image_mean, self.image_std = float(image_mean), float(image_std)
        self.image_size = image_size
        self.grid = tuple(grid)
        self.train = train
        self.max_sentences = max_sentences  # 0 or None: all sentences
        self.gaze_options = gaze_options or GazeOptions()
        self.use_gaze = use_gaze
        self.seed = seed
        self.epoch = 0
        if classes is None:
            classes = sorted({c for r in self.records for c in r.labels})
        self.classes = list(classes)
        # sentences and gaze per row; pass the same dict to datasets over the same records, grid and gaze
        # options (e.g. several training runs) to compute the gaze once
        self._cache: Dict[int, Tuple[List[str], Optional[torch.Tensor]]] = {} if cache is None else cache
        # rows of a manifest written by `egma-prepare cache` read their image, sentences and gaze from it
        self._prepared = self._open_prepared(split_rule) if prepared else None

    def _open_prepared(self, split_rule: str):
        with_cache = [r for r in self.records if "cache" in r.extra]
        if not with_cache:
            return None
        if len(with_cache) != len(self.records):
            raise ManifestError(f"{with_cache[0].where}: some rows name a preparation cache and some do not; use "
                                f"the manifest `egma-prepare cache` wrote, or the original one")
        folders = {r.extra["cache"] for r in with_cache}
        if len(folders) > 1:
            raise ManifestError(f"{with_cache[0].where}: rows name {len(folders)} preparation caches; one is expected")
        from .prepared import CacheMismatchError, cache_settings, open_cache

        try:
            cache = open_cache(folders.pop())
            wanted = cache_settings(image_size=self.image_size, grid=self.grid, gaze_options=self.gaze_options,
                                    use_gaze=self.use_gaze, split_rule=split_rule)
            if not self.use_gaze:  # a cache with gaze serves a run without it: its gaze is not read
                wanted["use_gaze"] = cache.meta["settings"].get("use_gaze")
            cache.check(wanted)
        except CacheMismatchError as e:
            raise ManifestError(f"{with_cache[0].where}: {e}") from None
        rows = []
        for r in self.records:
            try:
                row = int(r.extra["cache_row"])
            except (KeyError, TypeError, ValueError):
                raise ManifestError(f"{r.where}: 'cache' without an integer 'cache_row'") from None
            if not 0 <= row < len(cache.rows):
                raise ManifestError(f"{r.where}: cache_row {row} is outside the cache's {len(cache.rows)} rows")
            rows.append(row)
        return cache, rows

    def __len__(self) -> int:
        return len(self.records)

    def _gaze_record(self, rec: ManifestRecord) -> gz.GazeRecord:
        size = rec.gaze_size
        if size is None:
            from PIL import Image

            if rec.image.endswith(".npy"):
                a = np.load(rec.image, mmap_mode="r")
                size = (a.shape[1], a.shape[0])
            else:
                with Image.open(rec.image) as im:
                    size = im.size
        opts = self.gaze_options
        if rec.gaze_format == "reflacx":
            return reflacx.read_reflacx(rec.gaze, image_size=size, use_raw_gaze=opts.use_raw_gaze)
        if rec.gaze_format == "egd":
            return egd_cxr.read_egd_cxr(rec.gaze, rec.dicom_id, rec.gaze_transcript, image_size=size)
        if rec.gaze_format == "mimic_eye":
            return mimic_eye.read_mimic_eye_egd(rec.gaze, rec.dicom_id, image_size=size)
        raise AssertionError(rec.gaze_format)

    def sentences_and_gaze(self, i: int) -> Tuple[List[str], Optional[torch.Tensor]]:
        """The sentences of row ``i`` and their gaze ``(S, P)`` (None without gaze); cached."""
        if i in self._cache:
            return self._cache[i]
        if self._prepared is not None:
            cache, rows = self._prepared
            sentences, g = cache.sentences_and_gaze(rows[i])
            g = g if self.use_gaze else None
        else:
            sentences, g = self._sentences_and_gaze_from_files(i)
        if not sentences:
            raise ManifestError(f"{self.records[i].where}: no sentences")
        if self.max_sentences and len(sentences) > self.max_sentences:
            sentences = sentences[: self.max_sentences]
            g = None if g is None else g[: self.max_sentences]
        if g is not None and not bool(g.any()):
            # no usable gaze (no fixation left after the readers' rules, none on the image): the image has
            # no gaze, rather than all-zero labels under a gaze flag
            g = None
        self._cache[i] = (sentences, g)
        return sentences, g

    def _sentences_and_gaze_from_files(self, i: int) -> Tuple[List[str], Optional[torch.Tensor]]:
        rec = self.records[i]
        sentences = list(rec.sentences)
        g = None
        if rec.gaze_format and self.use_gaze:
            try:
                if rec.gaze_format == "npy":
                    g = self._npy_gaze(rec, sentences)
                else:
                    gr = self._gaze_record(rec)
                    if not sentences:
                        sentences = split_sentences(gr.transcript or "")
                    if not sentences:
                        raise ManifestError(f"{rec.where}: no report text and no transcript in {rec.gaze}")
                    o = self.gaze_options
                    g = gz.gaze_for_sentences(gr, sentences, self.grid, sigma=o.sigma, resolution=o.resolution,
                                              min_heat=o.min_heat, lead=o.lead, resize=o.resize)
            except (gz.GazeFormatError, TextDecodeError) as e:  # the readers' files: bad layout or not UTF-8
                raise ManifestError(f"{rec.where}: {e}") from None
            except UnicodeDecodeError as e:  # a reader that decodes without textio's rule names no file
                raise ManifestError(f"{rec.where}: a gaze file under {rec.gaze} is not valid UTF-8 ({e})") from None
        return sentences, g

    def _npy_gaze(self, rec: ManifestRecord, sentences: List[str]) -> torch.Tensor:
        a = np.load(rec.gaze)
        P = self.grid[0] * self.grid[1]
        if a.ndim == 3:
            g = gz.to_patch_grid(a.astype(np.float32), self.grid, min_heat=self.gaze_options.min_heat,
                                 resize=self.gaze_options.resize)
        elif a.ndim == 2:
            if a.shape[1] != P:
                raise ManifestError(f"{rec.where}: gaze {rec.gaze} has {a.shape[1]} columns but the image encoder's "
                                    f"grid is {self.grid[0]}x{self.grid[1]} = {P} patches")
            g = torch.as_tensor(a, dtype=torch.float32)
        else:
            raise ManifestError(f"{rec.where}: gaze {rec.gaze} must be (S, P) or (S, H, W), got shape {a.shape}")
        if g.shape[0] != len(sentences):
            raise ManifestError(f"{rec.where}: gaze {rec.gaze} has {g.shape[0]} sentence maps but the report has "
                                f"{len(sentences)} sentences")
        if not torch.isfinite(g).all() or (g < 0).any():
            raise ManifestError(f"{rec.where}: gaze {rec.gaze} has negative or non-finite values")
        return g

    def label_vector(self, rec: ManifestRecord) -> Optional[torch.Tensor]:
        if not self.classes:
            return None
        v = torch.zeros(len(self.classes))
        for c in rec.labels:
            if c not in self.classes:
                raise ManifestError(f"{rec.where}: label {c!r} is not one of the classes {self.classes}")
            v[self.classes.index(c)] = 1.0
        return v

    def image_tensor(self, i: int, augment: Optional[bool] = None, epoch: Optional[int] = None) -> torch.Tensor:
        """Row ``i``'s image for the encoders; with augmentation, seeded by (seed, epoch, i) only."""
        x = self._prepared[0].image(self._prepared[1][i]) if self._prepared is not None else self._load_image(i)
        if self.train if augment is None else augment:
            e = self.epoch if epoch is None else epoch
            gen = torch.Generator().manual_seed(hash((self.seed, e, i)) & 0x7FFFFFFF)
            x = photometric_augment(x, gen)
        return normalize_image(x, self.image_mean, self.image_std)

    def _load_image(self, i: int) -> torch.Tensor:
        rec = self.records[i]
        try:
            img = load_image(rec.image)
        except FileNotFoundError:
            raise ManifestError(f"{rec.where}: image file not found: {rec.image}") from None
        except Exception as e:  # unreadable image
            raise ManifestError(f"{rec.where}: cannot read image {rec.image}: {e}") from None
        return preprocess_image(img, self.image_size)

    def __getitem__(self, key) -> Dict:
        """``key``: a row, or ``(row, epoch)`` (what a sampler yields for a DataLoader kept for the whole run:
        its workers hold copies of the dataset, so the epoch of the augmentation travels with the index)."""
        i, epoch = key if isinstance(key, tuple) else (key, None)
        sentences, g = self.sentences_and_gaze(i)
        return {"pixel_values": self.image_tensor(i, epoch=epoch), "sentences": sentences, "gaze": g,
                "labels": self.label_vector(self.records[i]), "index": i}


class Collator:
    """Batch items into the loss's layout: tokenised sentences packed in report order, ``cu_seqlens``,
    ``gaze (N, P)`` (zeros for reports without gaze) and ``gaze_mask (B,)``."""

    def __init__(self, tokenizer, max_length: int = 64, num_patches: Optional[int] = None,
                 pad_to_max_length: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        # a pooling over every position (text_pooling "last4_all") needs the same padding in every batch
        self.padding = "max_length" if pad_to_max_length else True
        self.num_patches = num_patches

    def __call__(self, items: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        sentences = [s for it in items for s in it["sentences"]]
        tok = self.tokenizer(sentences, padding=self.padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        lengths = [len(it["sentences"]) for it in items]
        cu = torch.zeros(len(items) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        P = self.num_patches
        for it in items:
            if it["gaze"] is not None:
                if P is None:
                    P = it["gaze"].shape[1]
                elif it["gaze"].shape[1] != P:
                    raise ValueError(f"gaze grids differ within a batch: {it['gaze'].shape[1]} vs {P} patches")
        batch = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
                 "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"], "cu_seqlens": cu,
                 "index": torch.tensor([it["index"] for it in items])}
        mask = torch.tensor([it["gaze"] is not None for it in items])
        if P is not None and bool(mask.any()):
            batch["gaze"] = torch.cat([it["gaze"] if it["gaze"] is not None else torch.zeros(n, P)
                                       for it, n in zip(items, lengths)])
            batch["gaze_mask"] = mask
        if all(it["labels"] is not None for it in items):
            batch["labels"] = torch.stack([it["labels"] for it in items])
        return batch
