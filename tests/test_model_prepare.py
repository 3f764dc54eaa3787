"""egma-prepare on tiny fake trees in each dataset's published layout (written by
egma_model.datasets.registry.write_fake_trees): counts, the skipped rows and their reasons, and manifests that
egma_model.data reads (gaze included)."""

import json
import os

import pytest

from egma_model import EGMADataset, load_manifest
from egma_model.datasets._fakes import REPORT
from egma_model.datasets.registry import write_fake_trees
from egma_model.prepare import main as prepare
from egma_model.prepare import DUPLICATE


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    d = write_fake_trees(str(root))
    d["out"] = str(root / "manifests")
    return d


def _run(trees, name, *args):
    out = os.path.join(trees["out"], f"{name}.csv")
    assert prepare([name, "--out", out, *args]) == 0
    with open(out + ".summary.json") as f:
        return out, json.load(f)


def _gaze_ok(manifest, n_expected):
    recs = load_manifest(manifest)
    ds = EGMADataset(recs, grid=(7, 7), use_gaze=True)
    n = 0
    for i in range(len(ds)):
        sents, g = ds.sentences_and_gaze(i)
        if recs[i].gaze_format:
            assert g is not None and g.shape == (len(sents), 49) and float(g.max()) > 0
            n += 1
    assert n == n_expected
    return recs


def test_reflacx(trees, capsys):
    out, s = _run(trees, "reflacx", "--root", trees["reflacx"], "--mimic-cxr-jpg", trees["mimic-cxr-jpg"])
    assert "reflacx: 2 rows, 2 images" in capsys.readouterr().out
    assert s["rows"] == 2 and s["images_with_gaze"] == 2 and s["sentences"] == 6
    assert s["skipped"] == {"eye_tracking_data_discarded is True (REFLACX's own quality flag)": 1,
                            "REFLACX reading folder not found": 1,
                            "dicom_id not found in the MIMIC-CXR-JPG images": 1}
    assert s["splits"] == {"test": 1, "valid": 1}  # MIMIC-CXR's official split, "validate" spelled "valid"
    recs = _gaze_ok(out, 2)
    assert recs[0].gaze_size == (128, 160)  # the DICOM size the fixations refer to, not the JPG's 64x80
    # two fixations of each reading are off the image: dropped and counted
    assert s["gaze_rules"] == {"version": "1", "fixations_kept": 12, "fixations_dropped_off_image": 4,
                               "fixations_dropped_non_finite": 0, "readings_without_usable_fixations": 0}


def test_egd_cxr(trees):
    out, s = _run(trees, "egd-cxr", "--root", trees["egd-cxr"], "--mimic-cxr-jpg", trees["mimic-cxr-jpg"])
    # dicom-6's fixations are all off the image: its row is written without gaze (image + report)
    assert s["rows"] == 3 and s["images_with_gaze"] == 2
    assert s["skipped"] == {"transcript.json malformed": 1, DUPLICATE: 1}
    assert s["labels"] == {"Normal": 1, "CHF": 1}
    assert s["splits"] == {"test": 1, "valid": 1, "train": 1}
    assert s["gaze_rules"] == {"version": "1", "fixations_kept": 12, "fixations_dropped_off_image": 6,
                               "fixations_dropped_non_finite": 0, "readings_without_usable_fixations": 1}
    recs = _gaze_ok(out, 2)
    assert recs[0].gaze_size == (128, 160) and recs[0].gaze_format == "egd"
    no_gaze = [r for r in recs if not r.gaze_format]
    assert [r.extra["source_id"] for r in no_gaze] == ["dicom-6"] and no_gaze[0].sentences == REPORT


def test_mimic_eye(trees):
    out, s = _run(trees, "mimic-eye", "--root", trees["mimic-eye"])
    assert s["rows"] == 3 and s["images_with_gaze"] == 3
    assert s["skipped"] == {"REFLACX reading folder not found": 1, "no transcript.json": 1}
    recs = _gaze_ok(out, 3)
    assert sorted(r.gaze_format for r in recs) == ["mimic_eye", "mimic_eye", "reflacx"]
    assert all(r.gaze_size == (128, 160) for r in recs)  # DICOM Columns x Rows from cxr_meta.csv, not the JPG's
    # the official split of patient 0 (cxr_split.csv); patient 1 has none: said in the summary, not "train"
    assert {r.dicom_id: r.split for r in recs} == {"d0a": "test", "d0b": "valid", "d1b": ""}
    assert any("1 rows have no split" in n for n in s["notes"])
    assert s["gaze_rules"]["fixations_dropped_off_image"] == 2 + 2 + 2


def test_chexpert_5x200(trees):
    out, s = _run(trees, "chexpert-5x200", "--root", trees["chexpert"], "--per-class", "2")
    assert s["rows"] == 10 and s["labels"] == {c: 2 for c in ["Atelectasis", "Cardiomegaly", "Consolidation",
                                                             "Edema", "Pleural Effusion"]}
    assert s["skipped"] == {"a label cell is not a number": 1}
    recs = load_manifest(out)
    assert all("lateral" not in r.image and len(r.labels) == 1 for r in recs)
    # same seed, same selection; the loose rule also admits the row with an uncertain other label
    _, s2 = _run(trees, "chexpert-5x200", "--root", trees["chexpert"], "--per-class", "4", "--loose")
    assert s2["labels"]["Edema"] == 4 and any("only" in n for n in s2["notes"])


def test_chexpert_for_the_probe(trees):
    out, s = _run(trees, "chexpert", "--root", trees["chexpert"], "--per-class", "2")
    # train: 15 clean candidates - 10 in the 5x200 + 3 other frontal (the bad cell is in Fracture, not read
    # here) + 4 No Finding; test: the 5 frontal valid.csv rows
    assert s["splits"] == {"train": 12, "test": 5} and s["skipped"] == {}
    recs = load_manifest(out, split="test")
    assert [r.labels for r in recs] == [["Edema"], ["Atelectasis"], ["No Finding"],
                                        ["Consolidation", "Pleural Effusion"], ["Cardiomegaly"]]
    f5, _ = _run(trees, "chexpert-5x200", "--root", trees["chexpert"], "--per-class", "2")  # same seed, same images
    five = {r.extra["source_id"] for r in load_manifest(f5)}
    assert len(five) == 10
    assert not five & {r.extra["source_id"] for r in load_manifest(out, split="train")}


def test_rsna_and_siim(trees):
    out, s = _run(trees, "rsna", "--root", trees["rsna"])
    assert s["rows"] == 19 and s["labels"] == {"Pneumonia": 7, "Normal": 12}  # rsna-019 has no image
    assert s["skipped"] == {"Target is not 0 or 1 (or patientId empty)": 1, "image file not found": 1}
    assert s["splits"] == {"train": 13, "valid": 3, "test": 3} and set(s["splits"]) <= {"train", "valid", "test"}
    out, s = _run(trees, "siim", "--root", trees["siim"])
    assert s["rows"] == 20 and s["labels"] == {"Pneumothorax": 11, "Normal": 9}  # image 1: -1 and a mask
    assert s["skipped"] == {"ImageId or EncodedPixels empty": 1}
    recs = load_manifest(out)
    ds = EGMADataset(recs, grid=(7, 7), use_gaze=False, classes=["Normal", "Pneumothorax"])
    assert ds.image_tensor(0).shape == (3, 224, 224) and ds.label_vector(recs[0]).sum() == 1


def test_missing_layout_is_an_error(trees, tmp_path, capsys):
    assert prepare(["rsna", "--root", str(tmp_path), "--out", str(tmp_path / "x.csv")]) == 2
    assert "stage_2_train_labels.csv: file not found" in capsys.readouterr().err
    assert prepare(["mimic-eye", "--root", str(tmp_path), "--out", str(tmp_path / "x.csv")]) == 2
    assert "no patient_<subject_id> folders" in capsys.readouterr().err
