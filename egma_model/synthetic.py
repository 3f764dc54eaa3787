"""A synthetic, gaze-annotated chest X-ray set that exercises the real data path end to end.

``generate(out_dir, n_train=2000, n_test=500, seed=0)`` writes (deterministically for a seed):

* ``images/<id>.png``: grey 8-bit chest-X-ray-like images (``width x height`` = 280 x 256 by default, not
  square, so the square padding is exercised): body, two lung fields with vessel texture and ribs, spine,
  mediastinum, heart, diaphragm domes; and at most one finding per image, at a known place:

  ==============  ======================================================================================
  Opacity         a bright blob in one lung zone (upper / middle / lower, right / left), mild to large
  Cardiomegaly    an enlarged heart (cardiothoracic ratio grows with severity)
  Effusion        fluid filling a lung base up to a meniscus, small to large, right or left
  Pneumothorax    a dark, featureless apical rim beyond a thin pleural line, small to large, right or left
  Normal          no finding
  ==============  ======================================================================================

  "Right"/"left" are the patient's sides (image left/right), as radiologists dictate.
* reports of 3-5 sentences (the finding with location and severity, plus normal statements in varied
  wording) and a dictation timeline: word timestamps, and eye tracking a radiologist would produce:
  silent scanning before dictating, then during each sentence fixations concentrated on the region the
  sentence describes (the finding box, the heart, the bases, the apices or the lungs), mixed with
  scanning fixations elsewhere and positional noise.
* the eye tracking in the public layouts the readers parse: REFLACX (``reflacx/main_data/<id>/fixations.csv``,
  ``timestamps_transcription.csv``, ``transcription.txt``, ``metadata_phase_synthetic.csv``) for most
  readings and EGD-CXR (``egd/fixations.csv`` + ``egd/audio_segmentation_transcripts/<id>/transcript.json``,
  phrase-level timestamps) for a fraction (``egd_fraction``);
* ``train.csv`` and ``test.csv`` manifests (``egma_model.data`` format), ``boxes.json`` (ground-truth finding
  box and finding sentence of every image, original pixels) and ``prompts.json`` (class prompts and
  retrieval queries with labels, for ``egma-eval``).

The generator is not tuned to favour any method: the gaze concentration (``p_target``) and noise are set
to plausible values once and are parameters.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from egma_kernels.cli_support import progress_bar

__all__ = ["CLASSES", "generate", "render_case", "SyntheticCase"]

CLASSES = ["Normal", "Opacity", "Cardiomegaly", "Effusion", "Pneumothorax"]
SEVERITY = {"Opacity": ["mild", "moderate", "extensive"], "Cardiomegaly": ["mild", "moderate", "marked"],
            "Effusion": ["small", "moderate", "large"], "Pneumothorax": ["small", "moderate", "large"]}
ZONES = ["upper", "mid", "lower"]


@dataclass
class SyntheticCase:
    image: np.ndarray  # (H, W) float in [0, 1]
    label: str
    side: Optional[str]
    zone: Optional[str]
    severity: Optional[str]
    box: Optional[Tuple[float, float, float, float]]  # x0, y0, x1, y1 (pixels) of the finding
    regions: Dict[str, Tuple[float, float, float, float]]  # anatomical regions for gaze of normal statements


def _ellipse(X, Y, cx, cy, rx, ry):
    return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2


def _smooth_noise(rng, H, W, scale):
    """Low-frequency noise by upsampling a coarse random grid (bilinear)."""
    gh, gw = max(2, H // scale), max(2, W // scale)
    g = rng.standard_normal((gh + 1, gw + 1))
    ys = np.linspace(0, gh, H)
    xs = np.linspace(0, gw, W)
    y0 = np.floor(ys).astype(int).clip(0, gh - 1)
    x0 = np.floor(xs).astype(int).clip(0, gw - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _draw_lung_finding(rng: np.random.Generator, img, X, Y, label: str, lungs, texture):
    """An opacity, effusion or pneumothorax in one lung (random side, severity and, for an opacity, zone), drawn
    into ``img``; returns ``(img, severity, side, zone, box)``."""
    H, W = img.shape
    zone = None
    sev_idx = int(rng.integers(0, 3))
    severity = SEVERITY[label][sev_idx]
    side = "right" if rng.random() < 0.5 else "left"
    cx, cy, rx, ry = lungs[side]
    inside = _ellipse(X, Y, cx, cy, rx, ry) < 1
    if label == "Opacity":
        zone = ZONES[int(rng.integers(0, 3))]
        zc = {"upper": -0.5, "mid": 0.0, "lower": 0.5}[zone]
        ox = cx + rng.uniform(-0.35, 0.35) * rx
        oy = cy + zc * ry + rng.uniform(-0.1, 0.1) * ry
        sig = [0.035, 0.05, 0.07][sev_idx]
        blob = np.exp(-0.5 * (((X - ox) / sig) ** 2 + ((Y - oy) / (sig * 1.1)) ** 2))
        blob *= 1 + 0.3 * _smooth_noise(rng, H, W, 4)
        img += (0.2 + 0.06 * sev_idx) * blob * inside
        box = ((ox - 2 * sig) * W, (oy - 2.2 * sig) * H, (ox + 2 * sig) * W, (oy + 2.2 * sig) * H)
    elif label == "Effusion":
        level = cy + ry * [0.55, 0.35, 0.1][sev_idx]
        men = level - 0.06 * ((X - cx) / rx) * (1 if side == "right" else -1)  # meniscus rises laterally
        fluid = inside & (Y > men)
        img[fluid] = 0.5 + 0.03 * texture[fluid]
        ys = np.where(fluid.any(1))[0]
        xs = np.where(fluid.any(0))[0]
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    else:  # pneumothorax: apical and lateral rim, no lung markings beyond the pleural line
        depth = [0.25, 0.4, 0.55][sev_idx]
        e = _ellipse(X, Y, cx, cy, rx, ry)
        top = Y < cy - ry * (1 - 2 * depth)
        rim = inside & top & (e > (1 - depth) ** 2 * 0.9)
        img[rim] = 0.06
        line = inside & top & (np.abs(np.sqrt(e) - (1 - depth) * 0.95) < 0.025)
        img[line] = 0.3
        m = rim | line
        ys = np.where(m.any(1))[0]
        xs = np.where(m.any(0))[0]
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return img, severity, side, zone, box


def render_case(rng: np.random.Generator, label: str, width: int = 280, height: int = 256) -> SyntheticCase:
    """Draw one image with the given finding (random side, zone, severity, anatomy jitter)."""
    W, H = width, height
    Y, X = np.mgrid[0:H, 0:W].astype(np.float64)
    X /= W
    Y /= H
    # anatomy jitter
    dx, dy = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)
    sc = rng.uniform(0.94, 1.06)
    img = np.full((H, W), 0.04)
    body = _ellipse(X, Y, 0.5 + dx, 0.58 + dy, 0.47 * sc, 0.55 * sc) < 1
    img[body] = 0.36
    # lungs: patient's right lung is on the image left
    lungs = {}
    for side, cx in (("right", 0.31), ("left", 0.69)):
        cx = 0.5 + (cx - 0.5) * sc + dx
        cy, rx, ry = 0.44 + dy, 0.15 * sc, 0.30 * sc
        lungs[side] = (cx, cy, rx, ry)
    lung_mask = np.zeros((H, W), bool)
    for cx, cy, rx, ry in lungs.values():
        lung_mask |= _ellipse(X, Y, cx, cy, rx, ry) < 1
    texture = 0.035 * _smooth_noise(rng, H, W, 6) + 0.02 * _smooth_noise(rng, H, W, 2)
    img[lung_mask] = 0.13 + texture[lung_mask]
    # ribs: faint bright arcs over the lungs
    for k in range(7):
        v0 = 0.17 + 0.085 * k + dy
        arc = np.abs(Y - (v0 + 0.05 * np.cos((X - 0.5) * 3.2))) < 0.011
        img[arc & lung_mask] += 0.07
    # mediastinum and spine
    med = (np.abs(X - 0.5 - dx) < 0.055 * sc) & (Y > 0.08 + dy) & (Y < 0.72 + dy)
    img[med] = 0.5
    # heart (towards the patient's left = image right)
    sev_idx = None
    severity = side = zone = None
    box = None
    hs = 1.0
    if label == "Cardiomegaly":
        sev_idx = int(rng.integers(0, 3))
        severity = SEVERITY[label][sev_idx]
        hs = [1.3, 1.45, 1.6][sev_idx]
    hcx, hcy = 0.55 + dx, 0.62 + dy
    hrx, hry = 0.12 * sc * hs, 0.10 * sc * (1 + (hs - 1) * 0.6)
    heart = _ellipse(X, Y, hcx, hcy, hrx, hry) < 1
    img[heart] = 0.56
    heart_box = ((hcx - hrx) * W, (hcy - hry) * H, (hcx + hrx) * W, (hcy + hry) * H)
    # diaphragm domes below each lung
    for s, (cx, cy, rx, ry) in lungs.items():
        dome = (Y > cy + ry * 0.55 + 0.06 * ((X - cx) / rx) ** 2) & (np.abs(X - cx) < rx * 1.05) & body
        img[dome & ~lung_mask] = np.maximum(img[dome & ~lung_mask], 0.58)
    spine = (np.abs(X - 0.5 - dx) < 0.025) & body
    img[spine] += 0.05
    regions = {"heart": heart_box}
    for s, (cx, cy, rx, ry) in lungs.items():
        regions[f"{s} lung"] = ((cx - rx) * W, (cy - ry) * H, (cx + rx) * W, (cy + ry) * H)
        regions[f"{s} base"] = ((cx - rx) * W, (cy + 0.35 * ry) * H, (cx + rx) * W, (cy + ry) * H)
        regions[f"{s} apex"] = ((cx - rx) * W, (cy - ry) * H, (cx + rx) * W, (cy - 0.45 * ry) * H)
    if label in ("Opacity", "Effusion", "Pneumothorax"):
        img, severity, side, zone, box = _draw_lung_finding(rng, img, X, Y, label, lungs, texture)
    elif label == "Cardiomegaly":
        box = heart_box
    # acquisition: contrast/brightness, blur-ish smoothing via noise, quantum noise
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.04, 0.04)
    img += 0.025 * rng.standard_normal((H, W))
    img = np.clip(img, 0, 1)
    if box is not None:
        box = (max(0.0, box[0]), max(0.0, box[1]), min(float(W), box[2]), min(float(H), box[3]))
    return SyntheticCase(img, label, side, zone, severity, box, regions)


# ---------------------------------------------------------------------------------------------- reports

_FINDING = {
    "Opacity": ["There is a {sev} opacity in the {side} {zone} zone.", "{Sev} airspace opacity in the {side} {zone} lung.",
                "A {sev} {side} {zone} zone opacity is seen."],
    "Cardiomegaly": ["The heart is {sev}ly enlarged.", "There is {sev} cardiomegaly.",
                     "{Sev} enlargement of the cardiac silhouette."],
    "Effusion": ["There is a {sev} {side} pleural effusion.", "{Sev} {side} effusion with blunting of the costophrenic angle.",
                 "A {sev} {side} sided pleural effusion is present."],
    "Pneumothorax": ["There is a {sev} {side} apical pneumothorax.", "{Sev} {side} pneumothorax is seen at the apex.",
                     "A {sev} {side} pneumothorax is present."],
}
_NORMAL = {
    "heart": ["The heart size is normal.", "Cardiac silhouette is within normal limits.", "Normal heart size."],
    "effusion": ["No pleural effusion.", "There is no effusion.", "The costophrenic angles are sharp."],
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."],
    "lungs": ["The lungs are otherwise clear.", "No focal consolidation.", "The lungs are clear."],
}
PROMPTS = {
    "Normal": ["no acute cardiopulmonary abnormality", "the lungs are clear", "normal chest radiograph"],
    "Opacity": ["lung opacity", "airspace opacity in the lung", "focal consolidation"],
    "Cardiomegaly": ["cardiomegaly", "the heart is enlarged", "enlarged cardiac silhouette"],
    "Effusion": ["pleural effusion", "fluid at the lung base", "blunting of the costophrenic angle"],
    "Pneumothorax": ["pneumothorax", "apical pneumothorax", "air in the pleural space"],
}


def _report(rng, case: SyntheticCase) -> Tuple[List[str], List[str], int]:
    """Sentences, the gaze target region name of each, and the finding sentence's index (-1 if none)."""
    sents: List[Tuple[str, str]] = []
    finding_idx = -1
    if case.label != "Normal":
        t = _FINDING[case.label][int(rng.integers(0, 3))]
        s = t.format(sev=case.severity, Sev=case.severity.capitalize(), side=case.side, zone=case.zone)
        sents.append((s, "finding"))
    normals = []
    if case.label != "Cardiomegaly":
        normals.append(("heart", "heart"))
    if case.label != "Effusion":
        normals.append(("effusion", "bases"))
    if case.label != "Pneumothorax":
        normals.append(("pneumothorax", "apices"))
    if case.label != "Opacity":
        normals.append(("lungs", "lungs"))
    rng.shuffle(normals)
    k = int(rng.integers(2, len(normals) + 1)) if case.label != "Normal" else len(normals)
    for key, region in normals[:k]:
        sents.append((_NORMAL[key][int(rng.integers(0, 3))], region))
    if case.label != "Normal":
        # the finding is dictated first most of the time
        if rng.random() < 0.3:
            j = int(rng.integers(1, len(sents)))
            sents[0], sents[j] = sents[j], sents[0]
        finding_idx = [r for _, r in sents].index("finding")
    return [s for s, _ in sents], [r for _, r in sents], finding_idx


def _target_boxes(case: SyntheticCase, region: str) -> List[Tuple[float, float, float, float]]:
    R = case.regions
    if region == "finding":
        return [case.box]
    if region == "heart":
        return [R["heart"]]
    if region == "bases":
        return [R["right base"], R["left base"]]
    if region == "apices":
        return [R["right apex"], R["left apex"]]
    return [R["right lung"], R["left lung"]]


def _dictation(rng, case: SyntheticCase, sentences, regions, W, H, p_target: float, jitter: float):
    """Word timestamps and fixations ``(start, end, x, y)``."""
    words, fix = [], []
    t = 0.0

    def scan_fixation(t):
        d = rng.uniform(0.15, 0.4)
        fix.append((t, t + d, rng.uniform(0.1, 0.9) * W, rng.uniform(0.1, 0.9) * H))
        return t + d + rng.uniform(0.02, 0.08)

    # silent reading before dictation
    t_end = rng.uniform(2.0, 4.0)
    while t < t_end:
        t = scan_fixation(t)
    for sent, region in zip(sentences, regions):
        toks = sent.split()
        start = t
        for w in toks:
            d = rng.uniform(0.22, 0.42)
            words.append((w, round(t, 3), round(t + d, 3)))
            t += d + rng.uniform(0.0, 0.06)
        end = t
        boxes = _target_boxes(case, region)
        ft = start - rng.uniform(0.0, 0.15)
        while ft < end:
            d = rng.uniform(0.15, 0.45)
            if rng.random() < p_target:
                x0, y0, x1, y1 = boxes[int(rng.integers(0, len(boxes)))]
                x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
                x += rng.normal(0, jitter * W)
                y += rng.normal(0, jitter * H)
                fix.append((ft, ft + d, float(np.clip(x, 0, W - 1)), float(np.clip(y, 0, H - 1))))
                ft += d + rng.uniform(0.02, 0.08)
            else:
                ft = scan_fixation(ft)
        t = max(t, ft) + rng.uniform(0.3, 0.9)  # pause between sentences
    fix = [(max(0.0, a), b, x, y) for a, b, x, y in fix]
    return words, fix


# ---------------------------------------------------------------------------------------------- writer

_REFLACX_FIX_COLS = ["timestamp_start_fixation", "timestamp_end_fixation", "x_position", "y_position",
                     "pupil_area_normalized", "angular_resolution_x_pixels_per_degree",
                     "angular_resolution_y_pixels_per_degree", "window_width", "window_level",
                     "xmin_shown_from_image", "ymin_shown_from_image", "xmax_shown_from_image", "ymax_shown_from_image"]
_EGD_COLS = ["DICOM_ID", "CXR-JPG", "Time (in secs)", "FPOGX", "FPOGY", "FPOGS", "FPOGD", "FPOGID", "FPOGV",
             "X_ORIGINAL", "Y_ORIGINAL"]


def _phrases(words, rng):
    """Group words into EGD-CXR-like phrases (2-4 words) with their begin/end times."""
    out, i = [], 0
    while i < len(words):
        k = int(rng.integers(2, 5))
        chunk = words[i : i + k]
        out.append({"phrase": " ".join(w for w, _, _ in chunk).lower(), "begin_time": chunk[0][1],
                    "end_time": chunk[-1][2]})
        i += k
    return out


def generate(out_dir: str, n_train: int = 2000, n_test: int = 500, *, seed: int = 0, width: int = 280,
             height: int = 256, egd_fraction: float = 0.25, p_target: float = 0.7, jitter: float = 0.02,
             class_probs: Optional[Sequence[float]] = None, progress: bool = True) -> Dict:
    """Write the synthetic set to ``out_dir`` (see the module docstring); returns a summary dict."""
    rng = np.random.default_rng(seed)
    probs = np.asarray(class_probs if class_probs is not None else [0.2] * 5, dtype=np.float64)
    probs = probs / probs.sum()
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    main = os.path.join(out_dir, "reflacx", "main_data")
    os.makedirs(main, exist_ok=True)
    egd_dir = os.path.join(out_dir, "egd")
    os.makedirs(os.path.join(egd_dir, "audio_segmentation_transcripts"), exist_ok=True)
    from PIL import Image

    n = n_train + n_test
    manifest_cols = ["image", "report", "gaze_format", "gaze", "gaze_transcript", "dicom_id", "image_width",
                     "image_height", "labels", "split"]
    rows = {"train": [], "test": []}
    meta_rows, egd_rows, boxes = [], [], {}
    for i in progress_bar(range(n), desc="synthetic CXR", enabled=progress):
        split = "train" if i < n_train else "test"
        label = CLASSES[int(rng.choice(len(CLASSES), p=probs))]
        case = render_case(rng, label, width, height)
        sents, regions, fidx = _report(rng, case)
        words, fix = _dictation(rng, case, sents, regions, width, height, p_target, jitter)
        cid = f"S{seed:02d}{i:06d}"
        img_rel = f"images/{cid}.png"
        Image.fromarray((case.image * 255).round().astype(np.uint8)).save(os.path.join(out_dir, img_rel))
        report = " ".join(sents)
        if rng.random() < egd_fraction:
            egd_rows += _write_egd_reading(egd_dir, cid, img_rel, fix, words, report, rng, width, height)
            g = ["egd", "egd/fixations.csv", f"egd/audio_segmentation_transcripts/{cid}/transcript.json", cid]
        else:
            _write_reflacx_reading(os.path.join(main, cid), fix, words, report, width, height)
            meta_rows.append([cid, split, "False", img_rel, cid, width, height])
            g = ["reflacx", f"reflacx/main_data/{cid}", "", ""]
        rows[split].append([img_rel, report, g[0], g[1], g[2], g[3], width, height, label, split])
        boxes[img_rel] = {"label": label, "side": case.side, "zone": case.zone, "severity": case.severity,
                          "box": None if case.box is None else [round(v, 2) for v in case.box],
                          "finding_sentence_index": fidx, "finding_sentence": sents[fidx] if fidx >= 0 else None,
                          "sentences": sents}
    _write_tables(out_dir, egd_dir, main, egd_rows, meta_rows, rows, manifest_cols, boxes)
    queries = _retrieval_queries(seed)
    with open(os.path.join(out_dir, "prompts.json"), "w") as f:
        json.dump({"classes": PROMPTS, "multi_label": False, "queries": queries}, f, indent=1)
    summary = {"n_train": n_train, "n_test": n_test, "seed": seed, "width": width, "height": height,
               "egd_fraction": egd_fraction, "p_target": p_target, "jitter": jitter, "classes": CLASSES}
    with open(os.path.join(out_dir, "synthetic.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _write_egd_reading(egd_dir: str, cid: str, img_rel: str, fix, words, report: str, rng: np.random.Generator,
                       width: int, height: int) -> List[list]:
    """One reading in EGD-CXR's layout: its transcript.json written, its fixations.csv rows returned."""
    rows = []
    for j, (a, b, x, y) in enumerate(fix):
        rows.append([cid, img_rel, round(b, 4), round(x / width, 5), round(y / height, 5), round(a, 4),
                     round(b - a, 4), j + 1, 1, round(x, 2), round(y, 2)])
    tdir = os.path.join(egd_dir, "audio_segmentation_transcripts", cid)
    os.makedirs(tdir, exist_ok=True)
    with open(os.path.join(tdir, "transcript.json"), "w") as f:
        json.dump({"full_text": report, "time_stamped_text": _phrases(words, rng)}, f)
    return rows


def _write_reflacx_reading(d: str, fix, words, report: str, width: int, height: int) -> None:
    """One reading in REFLACX's layout: ``main_data/<id>/`` with its fixations, word times and transcription."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "fixations.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_REFLACX_FIX_COLS)
        for a, b, x, y in fix:
            w.writerow([round(a, 4), round(b, 4), round(x, 2), round(y, 2), 1.0, 10.0, 10.0, 1.0, 0.5,
                        0, 0, width, height])
    with open(os.path.join(d, "timestamps_transcription.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["word", "timestamp_start_word", "timestamp_end_word"])
        w.writerows(words)
    with open(os.path.join(d, "transcription.txt"), "w") as f:
        f.write(report)


def _write_tables(out_dir: str, egd_dir: str, main: str, egd_rows, meta_rows, rows, manifest_cols, boxes) -> None:
    """EGD-CXR's fixations.csv, REFLACX's metadata, the train/test manifests and boxes.json."""
    with open(os.path.join(egd_dir, "fixations.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_EGD_COLS)
        w.writerows(egd_rows)
    with open(os.path.join(main, "metadata_phase_synthetic.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "split", "eye_tracking_data_discarded", "image", "dicom_id", "image_size_x", "image_size_y"])
        w.writerows(meta_rows)
    for split in ("train", "test"):
        with open(os.path.join(out_dir, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(manifest_cols)
            w.writerows(rows[split])
    with open(os.path.join(out_dir, "boxes.json"), "w") as f:
        json.dump(boxes, f)


def _retrieval_queries(seed: int) -> List[Dict]:
    """Retrieval queries: fresh report-style sentences per class (not tied to a test image), from their own RNG."""
    qrng = np.random.default_rng(seed + 10_000)
    queries = []
    for c in CLASSES:
        for _ in range(10):
            case = SyntheticCase(np.zeros((1, 1)), c, "right" if qrng.random() < 0.5 else "left",
                                 ZONES[int(qrng.integers(0, 3))], None, None, {})
            if c != "Normal":
                case.severity = SEVERITY[c][int(qrng.integers(0, 3))]
                text = _FINDING[c][int(qrng.integers(0, 3))].format(
                    sev=case.severity, Sev=case.severity.capitalize(), side=case.side, zone=case.zone)
            else:
                text = " ".join(_NORMAL[k][int(qrng.integers(0, 3))] for k in ("heart", "lungs", "effusion"))
            queries.append({"text": text, "label": c})
    return queries
