"""The synthetic gaze-annotated set: deterministic, parsed by the real readers, gaze on the described region;
and an egma-demo smoke run."""

import hashlib
import json
import os

import numpy as np
import pytest

from egma_model import synthetic
from egma_model.data import EGMADataset, GazeOptions, load_manifest


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("syn"))
    synthetic.generate(d, n_train=40, n_test=10, seed=3, egd_fraction=0.3, progress=False)
    return d


def _digest(d):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(d)):
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_generation_is_deterministic(small_set, tmp_path):
    synthetic.generate(str(tmp_path), n_train=40, n_test=10, seed=3, egd_fraction=0.3, progress=False)
    assert _digest(str(tmp_path)) == _digest(small_set)


def test_layouts_manifests_and_boxes(small_set):
    train = load_manifest(os.path.join(small_set, "train.csv"))
    test = load_manifest(os.path.join(small_set, "test.csv"))
    assert len(train) == 40 and len(test) == 10
    fmts = {r.gaze_format for r in train + test}
    assert fmts == {"reflacx", "egd"}  # both public layouts are written and parsed
    boxes = json.load(open(os.path.join(small_set, "boxes.json")))
    prompts = json.load(open(os.path.join(small_set, "prompts.json")))
    assert set(prompts["classes"]) == set(synthetic.CLASSES) and len(prompts["queries"]) == 50
    for r in train:
        b = boxes[os.path.relpath(r.image, small_set)]
        assert r.labels == [b["label"]]
        assert (b["box"] is None) == (b["label"] == "Normal")
        assert r.sentences == b["sentences"]


def test_gaze_of_finding_sentences_lands_in_the_finding_box(small_set):
    """Through the real readers and heatmap pipeline, the finding sentence's hottest patch is in its box
    far more often than chance (the generator puts 70% of a sentence's fixations on its region)."""
    recs = load_manifest(os.path.join(small_set, "train.csv"))
    boxes = json.load(open(os.path.join(small_set, "boxes.json")))
    ds = EGMADataset(recs, image_size=112, grid=(7, 7), gaze_options=GazeOptions(sigma=0.06 * 280))
    from egma_model.demo import _patch_centres

    centres = _patch_centres((7, 7), 280, 256)
    hits, chance = [], []
    for i, r in enumerate(recs):
        b = boxes[os.path.relpath(r.image, small_set)]
        if b["box"] is None:
            continue
        sents, g = ds.sentences_and_gaze(i)
        assert g.shape == (len(sents), 49) and float(g.max()) == pytest.approx(1.0)
        x0, y0, x1, y1 = b["box"]
        inside = (centres[:, 0] >= x0) & (centres[:, 0] <= x1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1)
        hits.append(bool(inside[int(g[b["finding_sentence_index"]].argmax())]))
        chance.append(inside.mean())
    assert len(hits) >= 20
    assert np.mean(hits) > 0.6 and np.mean(hits) > 4 * np.mean(chance)


def test_images_look_like_a_chest(small_set):
    from egma_model.data import load_image

    recs = load_manifest(os.path.join(small_set, "test.csv"))
    img = load_image(recs[0].image)
    assert img.shape == (256, 280)
    # lungs (dark) at mid-height left and right of a bright mediastinum; background darker than the body
    assert img[110, 85] < img[110, 140] and img[110, 195] < img[110, 140]
    assert img[5, 5] < img[230, 140]


def test_demo_smoke(tmp_path):
    from egma_model.demo import run_demo

    import torch

    threads = torch.get_num_threads()
    # one thread: tiny models, and a shared CPU (torch's threads wait for each other at every op)
    res = run_demo(str(tmp_path / "data"), str(tmp_path / "out"), n_train=24, n_test=12, seeds=[0], steps=2,
                   batch_size=8, progress=False, threads=1)
    assert torch.get_num_threads() == threads  # restored
    for name in ("EGMA (gaze)", "no gaze"):
        e = res["runs"][name][0]
        assert 0 <= e["zeroshot"]["fine"]["accuracy"] <= 1 and len(e["history"]) == 2
        assert 0 <= e["localisation"].get("pointing_accuracy", 0) <= 1
    assert res["runs"]["no gaze"][0]["history"][0]["gaze_mlce"] == 0.0
    assert res["runs"]["EGMA (gaze)"][0]["history"][0]["gaze_mlce"] > 0.0
    assert os.path.isfile(tmp_path / "out" / "demo_figure.png")
    assert "zero-shot accuracy (fine)" in res["table"]
    saved = json.load(open(tmp_path / "out" / "demo_results.json"))
    assert saved["config"]["steps"] == 2 and saved["smoke_test"] is True


def test_demo_cli_puts_its_data_under_out_and_labels_a_smoke_test(tmp_path, monkeypatch, capsys):
    from egma_model.demo import main

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    rc = main(["--out", str(out), "--n-train", "16", "--n-test", "8", "--steps", "2", "--batch-size", "8",
               "--threads", "1", "--no-progress", "--no-figure"])
    assert rc == 0
    assert os.listdir(cwd) == []  # nothing in the working directory
    assert os.path.isfile(out / "data" / "synthetic.json")
    printed = capsys.readouterr().out
    assert f"in {out / 'data'}" in printed  # says where the set goes
    assert "SMOKE TEST ONLY: 2 steps" in printed and printed.index("SMOKE TEST") < printed.index("localisation")


def test_gaze_fractions(tmp_path):
    from egma_model.demo import run_gaze_fractions

    res = run_gaze_fractions(str(tmp_path / "data"), str(tmp_path / "out"), [1, 0, 0.5], n_train=16, n_test=8,
                             seeds=[0], steps=2, batch_size=8, progress=False, threads=1)
    rows = res["fractions"]
    assert [r["fraction"] for r in rows] == [0, 0.5, 1]
    assert [r["runs"][0]["n_gaze_images"] for r in rows] == [0, 8, 16]
    for r in rows:
        assert 0 <= r["runs"][0]["localisation"] <= 1 and 0 <= r["runs"][0]["image_to_text_p@1"] <= 1
    # no gaze at all trains without the gaze term: its loss is the no-gaze run's (MLCE 0)
    assert res["synthetic_data"] and "not the EGMA paper's Table 4" in res["table"]
    for name in ("gaze_fractions.md", "gaze_fractions.json", "gaze_fractions.png"):
        assert os.path.isfile(tmp_path / "out" / name), name
    assert "| 50% (8) |" in open(tmp_path / "out" / "gaze_fractions.md").read()
