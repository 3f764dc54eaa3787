"""Tiny models, a hub cache and a MedCLIP-layout checkpoint for the egma_model tests (offline, random weights)."""

import json
import os
import shutil

import torch

from egma_model.model import TINY_BERT, TINY_HF_SWIN

COMMIT = "0123456789abcdef0123456789abcdef01234567"
WORDS = ["the heart is enlarged", "no pleural effusion", "clear lungs", "there is pneumonia", "pneumothorax",
         "atelectasis", "cardiomegaly", "edema", "consolidation", "normal chest"]


def put_in_hub_cache(cache: str, repo_id: str, src_dir: str) -> None:
    """Copy a saved model folder into a hub cache as revision ``main`` of ``repo_id``."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", COMMIT)
    shutil.copytree(src_dir, snap)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)


def save_tiny_bert(path: str, seed: int = 0) -> None:
    from transformers import BertConfig, BertModel

    from egma_model import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, save_dir=path)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(tok), **TINY_BERT)).save_pretrained(path)


def save_tiny_hf_swin(path: str, seed: int = 0) -> None:
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(seed)
    d = dict(TINY_HF_SWIN)
    d.pop("model_type")
    SwinModel(SwinConfig(**d)).save_pretrained(path)



def medclip_state_dict(swin_dir: str, bert_dir: str, *, embed_dim: int = 512, legacy_buffers: bool = True,
                       seed: int = 1):
    """A state dict in the layout of ``medclip.MedCLIPModel(vision_cls=MedCLIPVisionModelViT)``
    (medclip 0.0.3, ``modeling_medclip.py``) around the saved tiny Swin and BERT.

    The encoders' tensors are taken from their saved files (``save_pretrained`` writes the classic key
    names older transformers used); ``legacy_buffers`` adds the buffers transformers 4.x also saved
    (Swin's ``relative_position_index``, BERT's ``position_ids``), as in MedCLIP's released checkpoint.
    The projection heads are bias-free ``Linear(hidden, embed_dim)``; ``logit_scale`` is a scalar.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    sd = {}
    for prefix, d in (("vision_model.model.", swin_dir), ("text_model.model.", bert_dir)):
        for k, v in load_file(os.path.join(d, "model.safetensors")).items():
            sd[prefix + k] = v
    g = torch.Generator().manual_seed(seed)
    sc, bc = AutoConfig.from_pretrained(swin_dir), AutoConfig.from_pretrained(bert_dir)
    if legacy_buffers:
        ws = sc.window_size
        for i, depth in enumerate(sc.depths):
            for j in range(depth):
                sd[f"vision_model.model.encoder.layers.{i}.blocks.{j}.attention.self.relative_position_index"] = \
                    torch.zeros(ws * ws, ws * ws, dtype=torch.long)
        sd["text_model.model.embeddings.position_ids"] = torch.arange(bc.max_position_embeddings)[None]
    swin_width = int(sc.embed_dim * 2 ** (len(sc.depths) - 1))
    sd["vision_model.projection_head.weight"] = torch.randn(embed_dim, swin_width, generator=g) * 0.05
    sd["text_model.projection_head.weight"] = torch.randn(embed_dim, bc.hidden_size, generator=g) * 0.05
    sd["logit_scale"] = torch.tensor(3.2)
    return sd


# ------------------------------------------------------------------ fake dataset trees in the published layouts

def _img(path, w=64, h=80, seed=0, fmt=None):
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = 120 + 60 * np.sin(xx / 7.0 + seed) * np.cos(yy / 9.0) + rng.normal(0, 10, (h, w))
    Image.fromarray(np.clip(a, 0, 255).astype("uint8")).save(path, format=fmt)


def write_csv(path, header, rows):
    """Write a CSV file (header row, then rows), making its folder; a ``.gz`` path is written gzipped."""
    import csv
    import gzip

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open(path, "wt", newline="") if path.endswith(".gz") else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


REPORT = ["the heart is enlarged.", "there is no pleural effusion.", "clear lungs."]


# REFLACX fixations off the image: rounded screen-to-image positions are not clipped to the image (left of it, and
# below it), both within the first sentence's time span
REFLACX_OFF_IMAGE = [(0.3, 1.4, -40.0, 10.0), (0.5, 1.6, 60.0, 9999.0)]


def _reflacx_reading(case_dir, dicom_size, seed=0, raw_gaze_dir=None):
    """fixations.csv, timestamps_transcription.csv and transcription.txt of one REFLACX reading, as REFLACX 1.0.0
    writes them: punctuation marks are word rows of their own, two fixations are off the image. ``raw_gaze_dir``:
    where ``gaze.csv`` goes (REFLACX publishes it as ``gaze_data/<id>/gaze.csv`` beside ``main_data/``)."""
    W, H = dicom_size
    words, t = [], 0.0
    for s in REPORT:
        for wd in s.rstrip(".").split() + ["."]:
            words.append((wd, t, t + 0.4))
            t += 0.5
    write_csv(os.path.join(case_dir, "timestamps_transcription.csv"), ["word", "timestamp_start_word", "timestamp_end_word"],
         words)
    fx = [(0.2 + i, 0.6 + i, W * (0.2 + 0.15 * ((i + seed) % 5)), H * (0.3 + 0.1 * (i % 4)), W, H) for i in range(6)]
    fx += [f + (W, H) for f in REFLACX_OFF_IMAGE]
    write_csv(os.path.join(case_dir, "fixations.csv"), ["timestamp_start_fixation", "timestamp_end_fixation", "x_position",
                                                  "y_position", "xmax_shown_from_image", "ymax_shown_from_image"], fx)
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


# EGD-CXR's placeholder for a look outside the displayed image: int(-1 * image/screen scale), about -2
EGD_OFF_IMAGE = (-2, -2)


def _egd_fixation_rows(dicom_id, dicom_size, seed=0, off_image=2, on_image=6):
    """Fixation rows of one reading; ``off_image`` long rows with the off-image placeholder fall inside the first
    sentence's span (as a radiologist looking at the worklist while dictating)."""
    W, H = dicom_size
    rows = [(dicom_id, f"{0.5 + i:.2f}", "0.3", f"{W * (0.25 + 0.1 * ((i + seed) % 5)):.1f}",
             f"{H * (0.3 + 0.1 * (i % 4)):.1f}") for i in range(on_image)]
    rows += [(dicom_id, f"{0.9 + 0.2 * k:.2f}", "0.9", *EGD_OFF_IMAGE) for k in range(off_image)]
    return rows


def _egd_transcript(path, bad=False):
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


EGD_FIX_HEADER = ["DICOM_ID", "Time (in secs)", "FPOGD", "X_ORIGINAL", "Y_ORIGINAL"]


MIMIC_SPLITS = {0: "test", 1: "validate", 3: "test", 4: "validate"}  # MIMIC-CXR's spelling; the rest "train"


def mimic_split(i):
    return MIMIC_SPLITS.get(i, "train")


def make_mimic_cxr_jpg(root, items, split_file=True):
    """items: (subject_id, study_id, dicom_id); JPG 64x80, the 'DICOM' 128x160 in the metadata. The metadata and
    split files are gzipped, as PhysioNet distributes them; ``split_file=False`` leaves the split file out."""
    meta, split = [], []
    for i, (sub, study, dicom) in enumerate(items):
        _img(os.path.join(root, "files", f"p{sub[:2]}", f"p{sub}", f"s{study}", f"{dicom}.jpg"), seed=i)
        meta.append((dicom, sub, study, "PA", 160, 128))
        split.append((dicom, study, sub, mimic_split(i)))
    write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"),
         ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"], meta)
    if split_file:
        write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), ["dicom_id", "study_id", "subject_id", "split"],
                  split)


def make_reflacx(root, mimic_items):
    """Readings of the first three MIMIC images (one discarded), plus: a reading whose folder is missing and
    one whose dicom_id is not in MIMIC-CXR-JPG."""
    md = os.path.join(root, "main_data")
    rows = []
    for i, (sub, study, dicom) in enumerate(mimic_items[:3]):
        rid = f"P10{i}R00{i}"
        _reflacx_reading(os.path.join(md, rid), (128, 160), seed=i, raw_gaze_dir=os.path.join(root, "gaze_data", rid))
        rows.append((rid, mimic_split(i), "True" if i == 2 else "False",
                     f"physionet.org/files/mimic-cxr/2.0.0/files/p{sub[:2]}/p{sub}/s{study}/{dicom}.dcm", dicom, sub,
                     128, 160))
    rows.append(("P109R009", "train", "False", "x.dcm", mimic_items[3][2], mimic_items[3][0], 128, 160))  # no folder
    rows.append(("P108R008", "train", "False", "y.dcm", "not-in-mimic", "10000099", 128, 160))
    _reflacx_reading(os.path.join(md, "P108R008"), (128, 160))
    write_csv(os.path.join(md, "metadata_phase_1.csv"), ["id", "split", "eye_tracking_data_discarded", "image", "dicom_id",
                                                   "subject_id", "image_size_x", "image_size_y"], rows)


def make_egd_cxr(root, mimic_items):
    """EGD-CXR readings of the MIMIC images 4..7: one with a broken transcript.json, one (image 7) whose every
    fixation is off the image; image 4 is listed twice in master_sheet.csv."""
    fx, rows = [], []
    for i, (sub, study, dicom) in enumerate(mimic_items[3:7]):
        fx += _egd_fixation_rows(dicom, (128, 160), seed=i, on_image=0 if i == 3 else 6)
        _egd_transcript(os.path.join(root, "audio_segmentation_transcripts", dicom, "transcript.json"), bad=i == 2)
        rows.append((dicom, f"files/p{sub[:2]}/p{sub}/s{study}/{dicom}.dcm", study, sub, int(i == 0), int(i == 1), 0))
    rows.append(rows[0])
    write_csv(os.path.join(root, "fixations.csv"), EGD_FIX_HEADER, fx)
    write_csv(os.path.join(root, "master_sheet.csv"), ["dicom_id", "path", "study_id", "patient_id", "Normal", "CHF",
                                                 "pneumonia"], rows)


# MIMIC-EYE's per-patient CXR-JPG/cxr_split.csv (patient 0 only): the official split, MIMIC-CXR's spelling
MIMIC_EYE_SPLITS = {"d0a": "test", "d0b": "validate"}


def make_mimic_eye(root):
    """Two patients: one with a REFLACX reading (REFLACX/main_data/<id>/, gaze in REFLACX/gaze_data/<id>/), an
    EyeGaze reading and CXR-JPG/cxr_split.csv; one without cxr_split.csv, with an EyeGaze reading whose transcript
    is missing, a usable EyeGaze reading and a REFLACX row whose folder is missing."""
    for pi, sub in enumerate(["10000001", "10000002"]):
        pdir = os.path.join(root, f"patient_{sub}")
        dicoms = [f"d{pi}a", f"d{pi}b"]
        meta = []
        for j, d in enumerate(dicoms):
            _img(os.path.join(pdir, "CXR-JPG", f"s5{pi}{j}", f"{d}.jpg"), seed=10 * pi + j)
            meta.append((d, sub, f"5{pi}{j}", 160, 128))
            os.makedirs(os.path.join(pdir, "CXR-DICOM"), exist_ok=True)
            with open(os.path.join(pdir, "CXR-DICOM", f"s5{pi}{j}.txt"), "w") as f:
                f.write("FINDINGS: " + " ".join(REPORT))
        write_csv(os.path.join(pdir, "CXR-JPG", "cxr_meta.csv"), ["dicom_id", "subject_id", "study_id", "Rows", "Columns"],
             meta)
        if pi == 0:
            write_csv(os.path.join(pdir, "CXR-JPG", "cxr_split.csv"), ["dicom_id", "study_id", "subject_id", "split"],
                      [(d, f"5{pi}{j}", sub, MIMIC_EYE_SPLITS[d]) for j, d in enumerate(dicoms)])
        rid = f"P20{pi}R00{pi}"
        if pi == 0:
            _reflacx_reading(os.path.join(pdir, "REFLACX", "main_data", rid), (128, 160),
                             raw_gaze_dir=os.path.join(pdir, "REFLACX", "gaze_data", rid))
        # no image_size_x/y here: the DICOM size comes from CXR-JPG/cxr_meta.csv; REFLACX's own split column says
        # "train", the official cxr_split.csv "test"
        write_csv(os.path.join(pdir, "REFLACX", "metadata.csv"), ["id", "split", "eye_tracking_data_discarded", "dicom_id",
                                                            "subject_id"], [(rid, "train", "False", dicoms[0], sub)])
        fx = _egd_fixation_rows(dicoms[1], (128, 160))
        if pi == 1:
            fx += _egd_fixation_rows(dicoms[0], (128, 160))  # d1a: no transcript
        write_csv(os.path.join(pdir, "EyeGaze", "fixations.csv"), EGD_FIX_HEADER, fx)
        _egd_transcript(os.path.join(pdir, "EyeGaze", "audio_segmentation_transcripts", dicoms[1], "transcript.json"))


CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                   "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                   "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def make_chexpert(root, per_class=3):
    """CheXpert-v1.0/train.csv: per competition class ``per_class`` clean candidates, plus rows that the
    selection must not take (lateral, two findings, an uncertain other label) and one bad label cell."""
    comp = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    base = os.path.join(root, "CheXpert-v1.0")
    rows, n = [], 0

    def row(labels, view="Frontal", bad=False):
        nonlocal n
        n += 1
        rel = f"CheXpert-v1.0/train/patient{n:05d}/study1/view1_{view.lower()}.jpg"
        _img(os.path.join(root, rel), seed=n)
        r = [rel, "Female", 60, view, "AP"] + [""] * (len(CHEXPERT_HEADER) - 5)
        for k, v in labels.items():
            r[CHEXPERT_HEADER.index(k)] = v
        if bad:
            r[CHEXPERT_HEADER.index("Fracture")] = "abc"
        rows.append(r)

    for c in comp:
        for _ in range(per_class):
            row({c: "1.0", "No Finding": ""})
    row({"Edema": "1.0"}, view="Lateral")
    row({"Edema": "1.0", "Cardiomegaly": "1.0"})
    row({"Edema": "1.0", "Pneumonia": "-1.0"})
    row({"Edema": "1.0"}, bad=True)
    for _ in range(4):
        row({"No Finding": "1.0"})
    write_csv(os.path.join(base, "train.csv"), CHEXPERT_HEADER, rows)
    # valid.csv (the probe's test side): uncertain Edema counts as positive, uncertain Cardiomegaly as negative
    train_rows, rows = rows, []
    for labels in ({"Edema": "-1.0"}, {"Cardiomegaly": "-1.0", "Atelectasis": "1.0"}, {"No Finding": "1.0"},
                   {"Pleural Effusion": "1.0", "Consolidation": "1.0"}, {"Cardiomegaly": "1.0"}):
        row(labels)
    row({"Edema": "1.0"}, view="Lateral")
    for r in rows:
        r[0] = r[0].replace("/train/", "/valid/")
        src = os.path.join(root, r[0].replace("/valid/", "/train/"))
        os.makedirs(os.path.dirname(os.path.join(root, r[0])), exist_ok=True)
        os.replace(src, os.path.join(root, r[0]))
    write_csv(os.path.join(base, "valid.csv"), CHEXPERT_HEADER, rows)
    del train_rows
    return base


def make_rsna(root):
    """stage_2_train_labels.csv (two boxes for one positive) and PNGs named like the DICOMs; a bad Target and a
    missing image."""
    ids = [f"rsna-{i:03d}" for i in range(20)]
    rows = []
    for i, k in enumerate(ids):
        t = int(i % 3 == 0)
        rows.append((k, "10" if t else "", "20" if t else "", "30" if t else "", "40" if t else "", t))
        if i == 0:
            rows.append((k, "50", "60", "10", "10", 1))
        if i != 19:
            _img(os.path.join(root, "stage_2_train_images", f"{k}.png"), seed=i)
    rows.append(("rsna-bad", "", "", "", "", "x"))
    write_csv(os.path.join(root, "stage_2_train_labels.csv"), ["patientId", "x", "y", "width", "height", "Target"], rows)


def make_siim(root):
    """train-rle.csv (' EncodedPixels' header; -1 = none; two masks for one image) and images in
    dicom-images-train/<study>/<series>/; an empty EncodedPixels cell."""
    rows = []
    for i in range(20):
        k = f"1.2.276.0.{i}"
        rows.append((k, " -1" if i % 2 else " 387620 23 996 33"))
        if i == 1:
            rows.append((k, " 100 5"))
        _img(os.path.join(root, "dicom-images-train", f"st{i}", f"se{i}", f"{k}.png"), seed=i)
    rows.append(("1.2.276.0.99", ""))
    write_csv(os.path.join(root, "train-rle.csv"), ["ImageId", " EncodedPixels"], rows)


MIMIC_ITEMS = [(f"1{i}000001", f"5{i}00000{i}", f"dicom-{i}") for i in range(7)]


def make_all(root):
    """Every fake tree under ``root``; returns their folders."""
    d = {k: os.path.join(root, k) for k in ("mimic-cxr-jpg", "reflacx", "egd-cxr", "mimic-eye", "chexpert", "rsna",
                                            "siim")}
    make_mimic_cxr_jpg(d["mimic-cxr-jpg"], MIMIC_ITEMS)
    make_reflacx(d["reflacx"], MIMIC_ITEMS)
    make_egd_cxr(d["egd-cxr"], MIMIC_ITEMS)
    make_mimic_eye(d["mimic-eye"])
    d["chexpert"] = make_chexpert(d["chexpert"])
    make_rsna(d["rsna"])
    make_siim(d["siim"])
    return d
