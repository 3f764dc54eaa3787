"""egma_model.data: sentence splitting, manifests (and their errors), images, dataset and collate."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from egma_model import data as dm
from egma_model.tokenizer import build_word_tokenizer
from test_model_gaze import write_egd_files, write_reflacx_case


def test_split_sentences():
    text = "FINDINGS: The heart is enlarged. There is a 2.5 cm nodule in the right upper lobe!\n" \
           "No pneumothorax; no effusion. IMPRESSION:\n  Cardiomegaly, e.g. mild."
    assert dm.split_sentences(text) == [
        "The heart is enlarged.", "There is a 2.5 cm nodule in the right upper lobe!", "No pneumothorax",
        "no effusion.", "Cardiomegaly, e.g. mild."]
    assert dm.split_sentences("") == []


def _png(path, w=64, h=48, mode="L"):
    a = (np.arange(w * h).reshape(h, w) % 256).astype(np.uint8)
    Image.fromarray(a).convert(mode).save(path)
    return path


def test_image_preprocessing_pads_to_centred_square(tmp_path):
    p = _png(str(tmp_path / "a.png"), 64, 32, mode="RGB")
    img = dm.load_image(p)
    assert img.shape == (32, 64) and 0 <= img.min() and img.max() <= 1
    x = dm.preprocess_image(np.ones((32, 64), np.float32), 16)
    assert x.shape == (1, 16, 16)
    assert torch.all(x[0, :3] == 0) and torch.all(x[0, 13:] == 0) and torch.allclose(x[0, 5:11], torch.ones(6, 16))
    a16 = (np.arange(100).reshape(10, 10) * 600).astype(np.uint16)
    Image.fromarray(a16).save(str(tmp_path / "b.png"))
    assert dm.load_image(str(tmp_path / "b.png")).max() == pytest.approx(99 * 600 / 65535)
    aug = dm.photometric_augment(x, torch.Generator().manual_seed(0))
    assert aug.shape == x.shape and not torch.equal(aug, x)
    # photometric only: the padding rows stay uniform (up to the small noise), the image rows too
    assert aug[0, :3].std() < 0.05 and aug[0, 5:11].std() < 0.05 and aug[0, 5:11].mean() > aug[0, :3].mean() + 0.3


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def test_manifest_errors_name_file_and_row(tmp_path):
    d = str(tmp_path)
    _png(os.path.join(d, "a.png"))
    m = _write(os.path.join(d, "m.csv"), "image,report\na.png,Heart normal.\nmissing.png,Lungs clear.\n")
    with pytest.raises(dm.ManifestError, match=r"m\.csv: row 3: image file not found: .*missing\.png"):
        dm.load_manifest(m)
    m = _write(os.path.join(d, "m2.csv"), "image,report\na.png,\n")
    with pytest.raises(dm.ManifestError, match=r"m2\.csv: row 2: no report text"):
        dm.load_manifest(m)
    m = _write(os.path.join(d, "m3.csv"), "path,report\na.png,x.\n")
    with pytest.raises(dm.ManifestError, match=r"m3\.csv: row 1: the header needs an 'image' column"):
        dm.load_manifest(m)
    m = _write(os.path.join(d, "m4.jsonl"), '{"image": "a.png", "report": "ok."}\n{"image": "a.png", "gaze_format": "eyelink", "gaze": "a.png"}\n')
    with pytest.raises(dm.ManifestError, match=r"m4\.jsonl: row 2: unknown gaze_format 'eyelink'"):
        dm.load_manifest(m)
    m = _write(os.path.join(d, "m5.jsonl"), '{"image": "a.png", "report": "ok."}\n{"image": "a.png", "sentences": "nope"\n')
    with pytest.raises(dm.ManifestError, match=r"m5\.jsonl: row 2: not valid JSON"):
        dm.load_manifest(m)
    m = _write(os.path.join(d, "m6.csv"), 'image,report,gaze_format,gaze\na.png,ok.,egd,a.png\n')
    with pytest.raises(dm.ManifestError, match=r"m6\.csv: row 2: gaze_format 'egd' needs 'dicom_id'"):
        dm.load_manifest(m)
    with pytest.raises(dm.ManifestError, match=r"nothere\.csv: manifest not found"):
        dm.load_manifest(os.path.join(d, "nothere.csv"))


def test_mismatched_gaze_grid_names_file_and_row(tmp_path):
    d = str(tmp_path)
    _png(os.path.join(d, "a.png"))
    np.save(os.path.join(d, "g.npy"), np.ones((2, 196), np.float32))  # a 14x14 grid
    np.save(os.path.join(d, "g3.npy"), np.ones((3, 49), np.float32))  # 3 maps for 2 sentences
    m = _write(os.path.join(d, "m.csv"), "image,report,gaze_format,gaze\n"
               "a.png,Heart normal. Lungs clear.,npy,g.npy\na.png,Heart normal. Lungs clear.,npy,g3.npy\n")
    ds = dm.EGMADataset(dm.load_manifest(m), image_size=32, grid=(7, 7))
    with pytest.raises(dm.ManifestError, match=r"m\.csv: row 2: gaze .*g\.npy has 196 columns but the image encoder's grid is 7x7 = 49"):
        ds[0]
    with pytest.raises(dm.ManifestError, match=r"m\.csv: row 3: gaze .*g3\.npy has 3 sentence maps but the report has 2"):
        ds[1]
    ds14 = dm.EGMADataset(dm.load_manifest(m), image_size=32, grid=(14, 14))
    assert ds14[0]["gaze"].shape == (2, 196)


def test_dataset_and_collate_from_reflacx_and_egd(tmp_path):
    d = str(tmp_path)
    case = write_reflacx_case(os.path.join(d, "reflacx"), image_size=(2000, 1600))
    fx, tj = write_egd_files(os.path.join(d, "egd"))
    _png(os.path.join(d, "r.png"), 200, 160)  # a downsized copy: gaze frame size comes from the manifest
    _png(os.path.join(d, "e.png"), 100, 100)
    _png(os.path.join(d, "n.png"), 50, 50)
    rows = [
        {"image": "r.png", "gaze_format": "reflacx", "gaze": os.path.relpath(case, d), "image_width": 2000,
         "image_height": 1600, "labels": "Cardiomegaly;Effusion"},  # sentences from transcription.txt
        {"image": "e.png", "report": "Heart size is normal. There is a right lower lobe opacity.", "gaze_format": "egd",
         "gaze": "egd/fixations.csv", "gaze_transcript": os.path.relpath(tj, d), "dicom_id": "1a2b3c",
         "image_width": 2800, "image_height": 2800, "labels": "Pneumonia"},
        {"image": "n.png", "sentences": ["No acute disease."], "labels": []},
    ]
    m = _write(os.path.join(d, "m.jsonl"), "\n".join(json.dumps(r) for r in rows) + "\n")
    recs = dm.load_manifest(m)
    ds = dm.EGMADataset(recs, image_size=32, grid=(7, 7))
    assert ds.classes == ["Cardiomegaly", "Effusion", "Pneumonia"]
    it = ds[0]
    assert it["sentences"] == ["Mild cardiomegaly.", "Right pleural effusion."]
    assert it["gaze"].shape == (2, 49) and it["pixel_values"].shape == (3, 32, 32)
    tok = build_word_tokenizer([s for r in recs for s in r.sentences] + it["sentences"])
    batch = dm.Collator(tok, max_length=16)([ds[0], ds[1], ds[2]])
    assert batch["cu_seqlens"].tolist() == [0, 2, 4, 5] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["input_ids"].shape[0] == 5 and batch["gaze"].shape == (5, 49)
    assert batch["gaze_mask"].tolist() == [True, True, False]
    assert batch["gaze"][4].sum() == 0
    assert batch["labels"].tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 0]]
    # the tokenizer round-trips a sentence word by word
    ids = tok("right pleural effusion.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[1:-1] == ["right", "pleural", "effusion", "."]


def test_gaze_that_is_empty_is_no_gaze(tmp_path):
    """A reading whose gaze is all zero on the patch grid (an all-zero map, or a reading with no usable
    fixation left) has no gaze flag: the image counts as one without gaze, never as all-zero labels."""
    from egma_model import gaze as gz

    d = str(tmp_path)
    _png(os.path.join(d, "a.png"))
    some = np.zeros((2, 49), np.float32)
    some[0, 3] = 1.0
    np.save(os.path.join(d, "zero.npy"), np.zeros((2, 49), np.float32))
    np.save(os.path.join(d, "some.npy"), some)
    m = _write(os.path.join(d, "m.csv"), "image,report,gaze_format,gaze\n"
               "a.png,Heart normal. Lungs clear.,npy,zero.npy\na.png,Heart normal. Lungs clear.,npy,some.npy\n")
    ds = dm.EGMADataset(dm.load_manifest(m), image_size=32, grid=(7, 7))
    assert ds[0]["gaze"] is None and ds[1]["gaze"] is not None
    tok = build_word_tokenizer(["Heart normal.", "Lungs clear."])
    batch = dm.Collator(tok, num_patches=49)([ds[0], ds[1]])
    assert batch["gaze_mask"].tolist() == [False, True]
    # a reader's record with no fixation left (all of them off the image or not finite)
    rec = dm.load_manifest(m)[:1]
    ds2 = dm.EGMADataset(rec, image_size=32, grid=(7, 7))
    rec[0].gaze_format = "reflacx"
    ds2._gaze_record = lambda r: gz.GazeRecord(np.zeros((0, 4)), [("heart", 0.0, 1.0)], (64, 48))
    assert ds2[0]["gaze"] is None


def test_non_finite_npy_image_is_refused(tmp_path):
    d = str(tmp_path)
    a = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    a[3, 4] = np.nan
    np.save(os.path.join(d, "x.npy"), a)
    m = _write(os.path.join(d, "m.csv"), "image,report\nx.npy,Heart normal.\n")
    ds = dm.EGMADataset(dm.load_manifest(m), image_size=16, grid=(7, 7))
    with pytest.raises(dm.ManifestError, match=r"m\.csv: row 2: .*x\.npy.*1 non-finite pixel"):
        ds[0]


def test_manifest_text_rule_and_empty_split(tmp_path):
    """Manifests are read under egma_model.textio's rule (the error names the file and byte), and a split
    that matches no row is refused (a training run would otherwise have nothing to iterate)."""
    d = str(tmp_path)
    _png(os.path.join(d, "a.png"))
    with open(os.path.join(d, "bad.csv"), "wb") as f:
        f.write(b"image,report\na.png,Heart \xe9nlarged.\n")
    with pytest.raises(dm.ManifestError, match=r"bad\.csv: not valid UTF-8 at byte 25"):
        dm.load_manifest(os.path.join(d, "bad.csv"))
    with open(os.path.join(d, "bom.csv"), "wb") as f:
        f.write(b"\xef\xbb\xbfimage,report,split\na.png,Heart normal.,train\n")
    assert len(dm.load_manifest(os.path.join(d, "bom.csv"), split="train")) == 1
    with pytest.raises(dm.ManifestError, match=r"bom\.csv: no row has split 'val' \(splits present: \['train'\]\)"):
        dm.load_manifest(os.path.join(d, "bom.csv"), split="val")


def test_gaze_file_that_is_not_utf8_names_the_row(tmp_path):
    """A reader's text file with non-UTF-8 bytes: one error naming the manifest row, not a traceback."""
    d = str(tmp_path)
    _png(os.path.join(d, "a.png"))
    m = _write(os.path.join(d, "m.csv"), "image,report,gaze_format,gaze\na.png,Heart normal.,reflacx,a.png\n")
    ds = dm.EGMADataset(dm.load_manifest(m), image_size=32, grid=(7, 7))

    def bad_reader(rec):
        return b"transcript \xff".decode("utf-8")

    ds._gaze_record = bad_reader
    with pytest.raises(dm.ManifestError, match=r"m\.csv: row 2: .*not valid UTF-8"):
        ds[0]
