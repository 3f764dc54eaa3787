"""``egma-train --preset tiny`` under 2 gloo processes (as torchrun would start them) against one process
with the same global batch; then a resume of the 2-process run."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from spawn_ranks import free_port, spawn_bounded
from test_model_eval import _tiny_manifest

JOIN_TIMEOUT_S = 240


def _no_dropout():
    """Dropout draws differ between one process and two: turn it off so the runs can match."""
    from egma_model import model

    model.TINY_BERT.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _worker(rank, world, port, runs):
    """One rank: the environment torchrun sets, then ``egma-train`` once per argument list in ``runs``
    (the process group is set up here, so that the runs share it; egma-train uses an existing one)."""
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _no_dropout()
    from egma_model.train_cli import main

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    try:
        for argv in runs:
            assert main(argv) == 0
    finally:
        dist.destroy_process_group()


def _spawn(world, runs):
    spawn_bounded(_worker, (world, free_port(), runs), world, JOIN_TIMEOUT_S, "egma-train")


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_match_one_process_and_resume(tmp_path, monkeypatch):
    from egma_model import model as model_module
    from egma_model.model import EGMAModel
    from egma_model.train_cli import main

    d = str(tmp_path)
    manifest, _ = _tiny_manifest(d)  # 8 training rows
    common = ["--manifest", manifest, "--split", "train", "--preset", "tiny", "--image-model",
              "vit_base_patch16_224", "--image-size", "112", "--warmup-steps", "1", "--no-progress",
              "--threads", "1", "--lr", "1e-3"]
    two, resumed = os.path.join(d, "two"), os.path.join(d, "resumed")
    # Run 1: 3 steps. Run 2: 2 steps into another folder, then resumed from its checkpoint to step 4 (the
    # resumed run must restore every rank: a rank left at another step would desynchronise the collectives).
    _spawn(2, [common + ["--out", two, "--batch-size", "2", "--max-steps", "3"],
               common + ["--out", resumed, "--batch-size", "2", "--max-steps", "2"],
               common + ["--out", resumed, "--batch-size", "2", "--max-steps", "4", "--resume"]])

    monkeypatch.setattr(model_module, "TINY_BERT", dict(model_module.TINY_BERT))
    _no_dropout()
    one = os.path.join(d, "one")
    assert main(common + ["--out", one, "--batch-size", "4", "--max-steps", "3"]) == 0

    log_two, log_one = _log(two), _log(one)
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one] == [1, 2, 3]
    worst_loss = 0.0
    for a, b in zip(log_two, log_one):
        for key in ("loss", "contrastive", "gaze_mlce", "mapping"):
            assert abs(a[key] - b[key]) <= 2e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
            worst_loss = max(worst_loss, abs(a[key] - b[key]))
    p_two = dict(EGMAModel.from_pretrained(os.path.join(two, "final")).named_parameters())
    p_one = dict(EGMAModel.from_pretrained(os.path.join(one, "final")).named_parameters())
    worst = max(float((p_two[k] - p_one[k]).detach().abs().max()) for k in p_one)
    assert worst <= 5e-5, worst
    # The runs trained (the comparison is not of two untouched initialisations).
    assert log_one[0]["loss"] != log_one[-1]["loss"]

    log_resumed = _log(resumed)
    assert [r["step"] for r in log_resumed] == [1, 2, 3, 4] and np.isfinite(log_resumed[-1]["loss"])
    print(f"2 vs 1 process: worst loss difference {worst_loss:.2e}, worst parameter difference {worst:.2e}")
