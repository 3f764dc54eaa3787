"""Small pieces of the trainer's state: the RNG state of a CUDA device, a log cut short by a kill, a
rebuilt preparation cache, tensors sharing memory in a checkpoint."""

import json
import os

import torch


def test_rng_state_reads_the_cuda_generator(monkeypatch):
    from egma_model import train_state

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(device) or torch.zeros(8))
    st = train_state.rng_state(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)] and st["cuda"].shape == (8,)


def test_truncate_log_drops_a_line_a_kill_cut_short(tmp_path):
    from egma_model.train_state import truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    truncate_log(str(log), 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]


def test_shared_memory_tensors_are_saved_as_copies(tmp_path):
    from egma_model.model import _unshared

    base = torch.arange(10.0)
    state = {"a": base[:6], "b": base[4:]}  # overlapping views at different offsets
    out = _unshared(state)
    assert out["a"].untyped_storage().data_ptr() != out["b"].untyped_storage().data_ptr()
    from safetensors.torch import save_file

    save_file(out, os.path.join(tmp_path, "w.safetensors"))  # refused for shared memory without the copy
