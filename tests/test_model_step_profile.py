"""The step profile: per-part times and memory of training steps after a warm-up step, and
``egma-train --profile-steps``."""

import json
import os
import time

import pytest
import torch

from egma_model.step_profile import StepProfiler, format_table


def test_profiler_medians_drop_the_warmup_and_sum_a_part_within_a_step():
    prof = StepProfiler(3, "cpu")
    sleeps = [0.2, 0.01, 0.02, 0.03]  # the first step is the warm-up: its long part must not count
    for s in sleeps:
        prof.begin_step()
        prof.add_time("data", 0.005)
        with prof.part("image_encoder"):
            time.sleep(s)
        with prof.part("backward"):  # two phases of one part in one step add up
            time.sleep(0.01)
        with prof.part("backward"):
            time.sleep(0.01)
        prof.end_step(images=8)
    assert prof.done and len(prof.records) == 3
    s = prof.summary(preset="x")
    assert s["preset"] == "x" and s["steps"] == 3 and s["images_per_step"] == 8
    img = s["parts"]["image_encoder"]["median_ms"]
    assert 19 <= img < 60, img  # the median of 10, 20, 30 ms, not the warm-up's 200
    assert 19 <= s["parts"]["backward"]["median_ms"] < 60
    assert s["parts"]["data"]["median_ms"] == pytest.approx(5.0)
    assert s["step_median_ms"] >= 40 and s["images_per_s"] == pytest.approx(8e3 / s["step_median_ms"])
    assert s["images_per_s_with_data"] < s["images_per_s"]
    assert s["parts"]["image_encoder"]["peak_mib"] > 0
    table = format_table(s)
    assert "image_encoder" in table and "images/s" in table
    # further steps are not recorded
    prof.begin_step()
    prof.end_step(images=8)
    assert len(prof.records) == 3


def test_the_model_times_its_own_parts():
    from egma_model import EGMAConfig, EGMAModel

    from test_model_model import _batch

    torch.manual_seed(0)
    m = EGMAModel(EGMAConfig.tiny("vit_base_patch16_224", vocab_size=60, image_size=112))
    prof = StepProfiler(1, "cpu", warmup=0)
    m.part_timer = prof
    prof.begin_step()
    out = m(_batch([2, 1], P=49, image_size=112))
    with prof.part("backward"):
        out["loss"].backward()
    prof.end_step(images=2)
    m.part_timer = None
    parts = prof.summary()["parts"]
    assert set(parts) == {"image_encoder", "text_encoder", "loss_forward", "backward"}
    assert all(v["median_ms"] > 0 for v in parts.values())
    # without a profiler attached the model runs as before
    assert torch.isfinite(m(_batch([1, 2], P=49, image_size=112))["loss"])


def _train_tiny(tmp_path, max_steps: int, profile_steps: int) -> str:
    """egma-train on a tiny manifest with --profile-steps; returns the output folder."""
    from egma_model.train_cli import main

    from test_model_eval import _tiny_manifest

    d = str(tmp_path)
    m, _ = _tiny_manifest(d)
    out = os.path.join(d, "run")
    assert main(["--manifest", m, "--split", "train", "--out", out, "--image-model", "vit_base_patch16_224",
                 "--image-size", "112", "--batch-size", "4", "--max-steps", str(max_steps),
                 "--profile-steps", str(profile_steps), "--no-progress", "--threads", "1"]) == 0
    return out


def test_egma_train_profile_steps_writes_the_table(tmp_path, capsys):
    out = _train_tiny(tmp_path, max_steps=3, profile_steps=2)
    err = capsys.readouterr().err
    assert "step profile: 2 steps after 1 warm-up" in err and "images/s" in err
    with open(os.path.join(out, "step_profile.json")) as f:
        s = json.load(f)
    assert s["steps"] == 2 and s["images_per_step"] == 4 and s["images_per_s"] > 0
    assert s["text_groups"] == 1 and s["loss_dtype"] == "float32" and s["grad_chunk_size"] == 0
    assert {"image_encoder", "text_encoder", "loss_forward", "backward", "optimizer", "data"} == set(s["parts"])


def test_too_few_steps_to_profile_says_so(tmp_path, capsys):
    out = _train_tiny(tmp_path, max_steps=1, profile_steps=2)
    assert "nothing written" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "step_profile.json"))
