"""Training's data path: one DataLoader for the run (persistent workers), and the preparation cache, both
feed exactly what a single process reading the original files feeds (same losses, step for step)."""

import json
import os

import pytest

from test_model_eval import _tiny_manifest

COMMON = ["--split", "train", "--preset", "tiny", "--image-model", "vit_base_patch16_224", "--image-size", "64",
          "--batch-size", "2", "--warmup-steps", "1", "--no-progress", "--threads", "1", "--lr", "1e-3",
          "--max-steps", "9", "--save-every", "0"]  # 8 training rows at batch 2: 4 steps an epoch, 3 epochs


def _losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [(r["step"], r["epoch"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from egma_model.train_cli import main

    d = str(tmp_path_factory.mktemp("loader"))
    manifest, _ = _tiny_manifest(d)
    out = os.path.join(d, "reference")
    assert main(["--manifest", manifest, "--out", out, "--num-workers", "0"] + COMMON) == 0
    return d, manifest, _losses(out)


def test_persistent_workers_feed_the_same_batches(reference, tmp_path):
    from egma_model.train_cli import main

    _, manifest, losses = reference
    assert [e for _, e, _ in losses] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    out = str(tmp_path / "workers")
    assert main(["--manifest", manifest, "--out", out, "--num-workers", "2", "--prefetch-factor", "1"] + COMMON) == 0
    assert _losses(out) == losses  # augmentation per epoch reaches the persistent workers


def test_training_from_the_preparation_cache_equals_the_originals(reference, tmp_path):
    from egma_model.prepare import main as prepare
    from egma_model.train_cli import main

    d, manifest, losses = reference
    assert prepare(["cache", "--manifest", manifest, "--image-size", "64", "--grid", "4x4", "--no-progress"]) == 0
    cached = os.path.splitext(manifest)[0] + ".cached.csv"
    out = str(tmp_path / "cached")
    assert main(["--manifest", cached, "--out", out, "--num-workers", "0"] + COMMON) == 0
    assert _losses(out) == losses


def test_training_refuses_a_cache_built_for_another_grid(reference, tmp_path, capsys):
    from egma_model.prepare import main as prepare
    from egma_model.train_cli import main

    d, manifest, _ = reference
    folder = str(tmp_path / "c14")
    assert prepare(["cache", "--manifest", manifest, "--out", folder, "--image-size", "64", "--grid", "7x7",
                    "--no-progress"]) == 0
    cached = os.path.splitext(manifest)[0] + ".cached-c14.csv"
    capsys.readouterr()
    rc = main(["--manifest", cached, "--out", str(tmp_path / "run"), "--num-workers", "0"] + COMMON)
    err = capsys.readouterr().err
    assert rc != 0 and "grid: cache [7, 7], this run [4, 4]" in err


def test_evaluation_workers_encode_what_one_process_encodes(reference, tmp_path):
    import torch

    from egma_model.data import EGMADataset, load_manifest
    from egma_model.evaluate import encode_dataset
    from egma_model.model import EGMAModel

    d, manifest, _ = reference
    model = EGMAModel.from_pretrained(os.path.join(d, "reference", "final"))
    ds = EGMADataset(load_manifest(manifest), image_size=64, grid=model.gaze_grid)
    one = encode_dataset(model, ds, batch_size=5, progress=False)
    two = encode_dataset(model, ds, batch_size=5, progress=False, num_workers=2)
    assert one.keys() == two.keys() and len(one["patch"]) == len(ds) == 12
    for k in one:
        assert torch.equal(one[k], two[k]), k
