"""Training that survives faults, with the faults injected: a SIGKILL at chosen points of a checkpoint save
(``EGMA_TEST_CHECKPOINT_FAULT``, in a subprocess), a write that raises ``ENOSPC``, torn, altered and
foreign checkpoints, ``--resume`` without a checkpoint or with other model/data options, a split that
matches no row, a non-finite loss, and two gloo ranks that disagree. Every case must end in a one-line
error or a correct result (a resumed run's losses equal the uninterrupted run's), never in a hang, a
traceback or a lost checkpoint. Each subprocess and spawn runs under a timeout."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from spawn_ranks import free_port, spawn_bounded
from test_model_eval import _tiny_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_TIMEOUT_S = 120
STEPS = 3
COMMON = ["--split", "train", "--preset", "tiny", "--image-model", "vit_base_patch16_224", "--image-size", "64",
          "--batch-size", "2", "--warmup-steps", "1", "--no-progress", "--threads", "1", "--lr", "1e-3",
          "--max-steps", str(STEPS), "--save-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny manifest (8 training rows: 4 steps per epoch at batch 2) and an uninterrupted run's log."""
    from egma_model.train_cli import main

    d = str(tmp_path_factory.mktemp("faults"))
    manifest, _ = _tiny_manifest(d)
    reference = os.path.join(d, "reference")
    assert main(["--manifest", manifest, "--out", reference] + COMMON) == 0
    return {"dir": d, "manifest": manifest, "log": _log(reference)}


def _args(data, out, *extra):
    return ["--manifest", data["manifest"], "--out", out] + COMMON + list(extra)


def _set(args, option, value):
    """``args`` with ``option`` given ``value`` (replaced where present, the last occurrence winning)."""
    return args + [option, value]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(records):
    return [(r["step"], r["loss"], r["contrastive"], r["mapping"]) for r in records if "loss" in r]


def _main(argv, capsys):
    """``egma-train`` in this process: (exit status, stderr)."""
    from egma_model.train_cli import main

    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def _subprocess_train(argv, fault=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("EGMA_TEST_CHECKPOINT_FAULT", None)
    if fault:
        env["EGMA_TEST_CHECKPOINT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "egma_model.train"] + argv, env=env, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)


def _one_line_error(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("egma-train: error: "), err
    return lines[-1]


# ------------------------------------------------------------------------------------ kills and full disks


@pytest.mark.parametrize("point", ["after_weights", pytest.param("before_manifest", marks=pytest.mark.slow),
                                   pytest.param("before_swap", marks=pytest.mark.slow), "mid_swap"])
def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resume_is_exact(data, point, capsys):
    """SIGKILL during the second save (step 2): the step-1 checkpoint survives (in place, or as
    ``checkpoint.previous`` when the kill fell between the two renames), and ``--resume`` continues from it
    to the uninterrupted run's losses, exactly, with the log's steps 1 2 3."""
    from egma_model import checkpoint

    out = os.path.join(data["dir"], f"kill-{point}")
    proc = _subprocess_train(_args(data, out), fault=f"{point}:kill:2")
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = os.path.join(out, "checkpoint")
    src = checkpoint.resolve(ckpt)
    assert checkpoint.verify(src)["step"] == 1
    assert (src == ckpt) == (point != "mid_swap")
    rc, err = _main(_args(data, out, "--resume"), capsys)
    assert rc == 0, err
    assert _losses(_log(out)) == _losses(data["log"])
    assert checkpoint.verify(ckpt)["step"] == STEPS
    assert not [e for e in os.listdir(out) if ".tmp-" in e or e.endswith(checkpoint.PREVIOUS_SUFFIX)]


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(data, capsys, monkeypatch):
    """The weights' write raises ENOSPC at the second save: one line naming the checkpoint and the cause,
    exit 2, the step-1 checkpoint intact and nothing half-written beside it; the resume is exact."""
    from egma_model import checkpoint

    calls = {"n": 0}
    real = checkpoint.write_bytes

    def write_bytes(path, blob):
        calls["n"] += 1 if path.endswith("model.safetensors") else 0
        if calls["n"] == 2 and path.endswith("model.safetensors"):
            with open(path, "wb") as f:  # part of the file, then the disk is full
                f.write(bytes(blob)[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, blob)

    monkeypatch.setattr(checkpoint, "write_bytes", write_bytes)
    out = os.path.join(data["dir"], "enospc")
    rc, err = _main(_args(data, out), capsys)
    line = _one_line_error(err)
    assert rc == 2 and "cannot write checkpoint" in line and "No space left on device" in line, err
    assert "previous checkpoint there is kept" in line
    assert checkpoint.verify(os.path.join(out, "checkpoint"))["step"] == 1
    assert not os.path.exists(os.path.join(out, "final"))
    assert not [e for e in os.listdir(out) if ".tmp-" in e]
    monkeypatch.setattr(checkpoint, "write_bytes", real)
    rc, err = _main(_args(data, out, "--resume"), capsys)
    assert rc == 0, err
    assert _losses(_log(out)) == _losses(data["log"])


@contextlib.contextmanager
def _small_disk(path, size):
    """A tmpfs of ``size`` mounted at ``path`` (skips the test where mounting is not allowed)."""
    os.makedirs(path)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a small tmpfs here: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)  # lazy: even while a file is open


def test_a_real_full_disk_keeps_the_previous_checkpoint(data, tmp_path, capsys):
    """A 3.5 MB file system: the first training checkpoint (about 2.3 MB) fits, the second does not beside
    it. The run stops with one line naming the cause; the first checkpoint is intact, no temporary folder
    is left behind."""
    from egma_model import checkpoint

    with _small_disk(str(tmp_path / "disk"), "3500k") as disk:
        out = os.path.join(disk, "run")
        rc, err = _main(_args(data, out), capsys)
        line = _one_line_error(err)
        assert rc == 2 and "No space left on device" in line and "previous checkpoint there is kept" in line, err
        assert checkpoint.verify(os.path.join(out, "checkpoint"))["step"] == 1
        assert not [e for e in os.listdir(out) if ".tmp-" in e]


# ------------------------------------------------------------------------------------ checkpoints on load


def test_torn_altered_foreign_and_old_checkpoints(data, tmp_path, capsys):
    from egma_model.checkpoint import CheckpointError
    from egma_model.model import EGMAModel

    final = os.path.join(data["dir"], "reference", "final")
    model = EGMAModel.from_pretrained(final)
    weights = os.path.join(final, "model.safetensors")
    with open(weights, "rb") as f:
        blob = f.read()
    # truncated
    torn = str(tmp_path / "torn")
    model.save_pretrained(torn)
    with open(os.path.join(torn, "model.safetensors"), "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"torn checkpoint: model\.safetensors has \d+ bytes, the manifest says"):
        EGMAModel.from_pretrained(torn)
    # one byte changed, same size
    altered = str(tmp_path / "altered")
    model.save_pretrained(altered)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with open(os.path.join(altered, "model.safetensors"), "wb") as f:
        f.write(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"altered checkpoint: model\.safetensors does not match its SHA-256"):
        EGMAModel.from_pretrained(altered)
    # a manifest of another format
    foreign = str(tmp_path / "foreign")
    model.save_pretrained(foreign)
    with open(os.path.join(foreign, "checkpoint.json"), "w") as f:
        json.dump({"format": "something-else", "files": {}}, f)
    with pytest.raises(CheckpointError, match=r"not an EGMA checkpoint manifest"):
        EGMAModel.from_pretrained(foreign)
    # the format before manifests (a pickled state dict, read with weights_only): loads; truncated: refused
    old = str(tmp_path / "old")
    os.makedirs(old)
    with open(os.path.join(old, "egma_config.json"), "w") as f:
        json.dump(model._saved_config(), f)
    torch.save(model.state_dict(), os.path.join(old, "egma_model.pt"))
    loaded = EGMAModel.from_pretrained(old)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with open(os.path.join(old, "egma_model.pt"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(old, "egma_model.pt")) // 2)
    with pytest.raises(CheckpointError, match=r"egma_model\.pt: unreadable weights \(truncated"):
        EGMAModel.from_pretrained(old)
    # egma-train --resume on a torn training checkpoint: one line, the file named
    out = str(tmp_path / "run")
    os.makedirs(out)
    import shutil

    shutil.copytree(os.path.join(data["dir"], "reference", "checkpoint"), os.path.join(out, "checkpoint"))
    with open(os.path.join(out, "checkpoint", "trainer_state.pt"), "r+b") as f:
        f.truncate(100)
    rc, err = _main(_args(data, out, "--resume"), capsys)
    assert rc == 2 and "torn checkpoint: trainer_state.pt has 100 bytes" in _one_line_error(err)


# ------------------------------------------------------------------------------------ honest resume


def test_resume_without_a_checkpoint_is_an_error_and_touches_nothing(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    rc, err = _main(_args(data, out, "--resume"), capsys)
    assert rc == 2 and "--resume: no checkpoint in" in _one_line_error(err)
    assert not os.path.exists(os.path.join(out, "final"))
    # an earlier run's log and final model, its checkpoint gone: both stay as they were
    import shutil

    shutil.copytree(os.path.join(data["dir"], "reference"), out, dirs_exist_ok=True)
    shutil.rmtree(os.path.join(out, "checkpoint"))
    before = {n: open(os.path.join(out, n), "rb").read() for n in ("log.jsonl", "final/model.safetensors")}
    rc, err = _main(_args(data, out, "--resume"), capsys)
    assert rc == 2 and "no checkpoint" in _one_line_error(err)
    assert before == {n: open(os.path.join(out, n), "rb").read() for n in before}


def test_resume_refuses_other_model_or_data_options(data, tmp_path, capsys):
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(os.path.join(data["dir"], "reference"), out)
    for option, value, named in (("--embed-dim", "32", "--embed-dim None -> 32"),
                                 ("--preset", "full", "--preset 'tiny' -> 'full'"),
                                 ("--batch-size", "4", "--batch-size 2 -> 4"),
                                 ("--lr", "5e-4", "--lr 0.001 -> 0.0005")):  # the optimiser state would win
        rc, err = _main(_set(_args(data, out, "--resume", "--max-steps", "4"), option, value), capsys)
        line = _one_line_error(err)
        assert rc == 2 and "other model/data/optimiser options" in line and named in line, line
    changed = os.path.join(data["dir"], "changed.csv")
    with open(data["manifest"]) as f, open(changed, "w") as g:
        g.write(f.read().replace("Small left effusion", "Small right effusion"))
    args = _args(data, out, "--resume", "--max-steps", "4")
    args[args.index("--manifest") + 1] = changed
    rc, err = _main(args, capsys)
    assert rc == 2 and "--manifest: its content differs" in _one_line_error(err)
    # an option that takes effect from the resumed step (the warm-up) may change: reported, then the run goes on
    rc, err = _main(_args(data, out, "--resume", "--max-steps", "4", "--warmup-steps", "2"), capsys)
    assert rc == 0 and "changed option, in effect from step 4: --warmup-steps 1 -> 2" in err, err
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------ runs that cannot progress


def test_split_with_no_row_stops_with_one_line(data, tmp_path):
    """In a subprocess under a timeout: the run used to spin forever here."""
    out = str(tmp_path / "run")
    proc = _subprocess_train(_args(data, out)[:-len(COMMON)] + ["--split", "validation"] + COMMON[2:])
    line = _one_line_error(proc.stderr)
    assert proc.returncode == 2 and "no row has split 'validation'" in line and "['test', 'train']" in line, line


def _nan_from_call(monkeypatch, first_bad: int):
    """The model's mapping term (and so the loss) is NaN from the ``first_bad``-th forward pass on."""
    from egma_model.model import EGMAModel

    real, calls = EGMAModel._loss, {"n": 0}

    def loss(self, emb, batch, return_details):
        out = real(self, emb, batch, return_details)
        calls["n"] += 1
        if calls["n"] >= first_bad:
            out["mapping"] = out["mapping"] * float("nan")
            out["loss"] = out["loss"] + out["mapping"]
        return out

    monkeypatch.setattr(EGMAModel, "_loss", loss)


def test_nonfinite_loss_stops_the_run_without_saving_nan_weights(data, tmp_path, capsys, monkeypatch):
    from egma_model import checkpoint
    from egma_model.model import EGMAModel

    _nan_from_call(monkeypatch, 2)
    out = str(tmp_path / "run")
    rc, err = _main(_args(data, out), capsys)
    line = _one_line_error(err)
    assert rc == 2 and "step 2: non-finite loss=nan" in line and "mapping=nan" in line, line
    assert "contrastive" not in line  # the finite terms are not blamed
    assert not os.path.exists(os.path.join(out, "final"))
    ckpt = os.path.join(out, "checkpoint")
    assert checkpoint.verify(ckpt)["step"] == 1
    assert all(torch.isfinite(p).all() for p in EGMAModel.from_pretrained(ckpt).parameters())
    assert [r["step"] for r in _log(out)] == [1]


def test_skip_nonfinite_goes_on(data, tmp_path, capsys, monkeypatch):
    from egma_model.model import EGMAModel

    _nan_from_call(monkeypatch, 3)
    out = str(tmp_path / "run")
    rc, err = _main(_args(data, out, "--skip-nonfinite"), capsys)
    assert rc == 0 and "step 3: non-finite loss=nan" in err and "batch skipped" in err, err
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and "skipped_batch" in log[2] and "skipped_batch" not in log[1]
    final = EGMAModel.from_pretrained(os.path.join(out, "final"))
    assert all(torch.isfinite(p).all() for p in final.parameters())


# ------------------------------------------------------------------------------------ ranks that disagree


def _rank_worker(rank, world, port, outdir, runs):
    """One rank under the environment torchrun sets: each argument list of ``runs[rank]`` through
    egma-train's ``main``, its exit status and stderr written for the test."""
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from egma_model.train_cli import main

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    results = []
    try:
        for argv in runs[rank]:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(argv)
            results.append({"rc": rc, "err": err.getvalue()})
    finally:
        dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_ranks_that_disagree_stop_together(data, tmp_path):
    """Two gloo ranks: other --max-steps on rank 1, then a manifest rank 1 cannot read. Every rank stops
    at start-up with one message (the failing rank with its own error), within the join timeout."""
    outs = [str(tmp_path / "steps"), str(tmp_path / "missing")]
    base = [a for a in COMMON if a not in ("--max-steps", str(STEPS))]
    same = ["--manifest", data["manifest"], "--out"]
    runs = [
        [same + [outs[0]] + base + ["--max-steps", "2"], same + [outs[1]] + base + ["--max-steps", "2"]],
        [same + [outs[0]] + base + ["--max-steps", "3"],
         ["--manifest", os.path.join(data["dir"], "absent.csv"), "--out", outs[1]] + base + ["--max-steps", "2"]],
    ]
    spawn_bounded(_rank_worker, (2, free_port(), str(tmp_path), runs), 2, 150, "egma-train with disagreeing ranks")
    res = []
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            res.append(json.load(f))
    for rank in range(2):
        steps = res[rank][0]
        line = _one_line_error(steps["err"])
        assert steps["rc"] == 2 and "the ranks disagree" in line and "total steps: rank 0: 2, rank 1: 3" in line, line
    assert res[1][1]["rc"] == 2 and "absent.csv: manifest not found" in _one_line_error(res[1][1]["err"])
    line = _one_line_error(res[0][1]["err"])
    assert res[0][1]["rc"] == 2 and "rank(s) [1] failed at start-up" in line, line
    assert not os.path.exists(os.path.join(outs[0], "final"))


# ------------------------------------------------------------------------------------ the loss library


def test_triton_refuses_reports_longer_than_its_largest_block():
    """A report of more than 1024 sentences is refused with the limit named, before any kernel compiles
    (its [BLOCK_S, BLOCK_S] tiles would exceed Triton's largest block)."""
    pytest.importorskip("triton")
    from egma_kernels import triton_backend

    assert triton_backend._config(torch.float32, 49, 64, 1024)["BLOCK_S"] == 1024
    with pytest.raises(ValueError, match=r"at most 1024 sentences; the longest report \(max_seqlen\) has 1025"):
        triton_backend._config(torch.float32, 49, 64, 1025)


def _lonely_worker(rank, world, port, outdir, argv):
    """Rank 0 runs egma-train (which sets up the process group); rank 1 never joins (a dead rank)."""
    if rank == 1:
        return
    os.environ.update(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from egma_model.train_cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    with open(os.path.join(outdir, "rank0.json"), "w") as f:
        json.dump({"rc": rc, "err": err.getvalue()}, f)


def test_a_rank_that_never_answers_stops_the_run_after_dist_timeout(data, tmp_path):
    out = str(tmp_path / "run")
    argv = _args(data, out, "--dist-timeout", "3")
    spawn_bounded(_lonely_worker, (2, free_port(), str(tmp_path), argv), 2, 60, "egma-train with a dead rank")
    with open(tmp_path / "rank0.json") as f:
        res = json.load(f)
    line = _one_line_error(res["err"])
    assert res["rc"] == 2 and "process group failed" in line and "--dist-timeout 3 s" in line, line


_GROUP_HOLDERS_SCRIPT = r"""
import json, os, sys
from datetime import timedelta

import egma_model.train  # imports egma_model.distributed_setup, as egma-train and a user's script do
import torch
import torch.distributed as dist

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
from egma_model.model import EGMAConfig, EGMAModel

EGMAModel(EGMAConfig.tiny(image_size=32, vocab_size=50))  # transformers' lazy imports happen here
torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # and DDP's (torch._dynamo)
pg = dist.group.WORLD
holders = []
for name, module in list(sys.modules.items()):
    if not name.startswith("torch.distributed") or module is None:
        continue
    for attr, obj in list(vars(module).items()):
        funcs = [obj] + ([v for v in vars(obj).values() if callable(v)] if isinstance(obj, type) else [])
        for f in funcs:
            defaults = list(getattr(f, "__defaults__", None) or ()) + list((getattr(f, "__kwdefaults__", None) or {}).values())
            if any(d is pg for d in defaults):
                holders.append(f"{name}.{attr}")
del pg
dist.destroy_process_group()
print(json.dumps(sorted(set(holders))))
"""


def test_the_process_group_is_freed_by_destroy_process_group():
    """No function default holds the process group after a model is built and wrapped in DDP under it
    (transformers and DDP import torch.distributed.nn and fsdp lazily, whose ``group=group.WORLD`` defaults
    would bind the live group; the group then outlives ``destroy_process_group`` and its gloo threads can
    abort the process at exit)."""
    proc = subprocess.run([sys.executable, "-c", _GROUP_HOLDERS_SCRIPT, str(free_port())], capture_output=True,
                          text=True, timeout=240, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("option,value,says", [
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--epochs", "-1", "--epochs must be >= 0"),
    ("--max-steps", "-2", "--max-steps must be >= 0"),
    ("--lr", "nan", "--lr must be a finite number >= 0"),
    ("--clip-grad", "-1", "--clip-grad must be"),
    ("--prefetch-factor", "0", "--prefetch-factor must be >= 1"),
    ("--num-workers", "-2", "--num-workers must be >= -1"),
    ("--grad-chunk-size", "-1", "--grad-chunk-size must be >= 0"),
    ("--profile-steps", "-1", "--profile-steps must be >= 0"),
    ("--dist-timeout", "0", "--dist-timeout must be a finite number of seconds > 0"),
    ("--dist-timeout", "inf", "--dist-timeout must be a finite number of seconds > 0"),
    ("--threads", "0", "--threads must be >= 1"),
])
def test_an_unusable_setting_is_one_line_before_any_model_is_built(option, value, says, tmp_path, capsys,
                                                                   monkeypatch):
    """Checked before the data and the model are set up: one line, exit status 2, nothing written."""
    from egma_model import train as train_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the settings were checked")

    monkeypatch.setattr(train_module, "build_model_and_tokenizer", no_model)
    manifest, _ = _tiny_manifest(str(tmp_path))
    out = str(tmp_path / "run")
    rc, err = _main(_set(["--manifest", manifest, "--out", out] + COMMON, option, value), capsys)
    assert rc == 2
    assert says in _one_line_error(err)
    assert not os.path.exists(out)


def test_resume_reads_each_checkpoint_file_once(data, tmp_path, capsys, monkeypatch):
    """``--resume`` hashes each file of the checkpoint it resumes from once (resolve verifies; the model load
    does not verify again), and still refuses an altered one (test_torn_altered_foreign_and_old_checkpoints)."""
    import collections
    import shutil

    from egma_model import checkpoint

    out = str(tmp_path / "run")
    shutil.copytree(os.path.join(data["dir"], "reference"), out)
    ckpt = os.path.join(out, "checkpoint")
    files = checkpoint.verify(ckpt)["files"]
    hashed = collections.Counter()
    real = checkpoint.file_sha256

    def counting(path):
        hashed[os.path.relpath(os.path.abspath(path), ckpt)] += 1
        return real(path)

    monkeypatch.setattr(checkpoint, "file_sha256", counting)
    rc, err = _main(_set(_args(data, out, "--resume"), "--max-steps", str(STEPS + 1)), capsys)
    assert rc == 0, err
    assert {rel: hashed[rel] for rel in files} == {rel: 1 for rel in files}


def test_a_new_run_does_not_replace_an_earlier_run_unless_told(data, tmp_path, capsys):
    """Without --resume, an --out holding an earlier run's checkpoint or models is refused (one line, nothing
    touched); --overwrite starts over and leaves no folder of the earlier run behind."""
    import shutil

    from egma_model import checkpoint

    out = str(tmp_path / "run")
    shutil.copytree(os.path.join(data["dir"], "reference"), out)
    for name in ("checkpoint.previous", "best", "step-2"):  # as a killed save, a selection, --keep-checkpoints
        shutil.copytree(os.path.join(out, "final"), os.path.join(out, name))
    earlier = ("checkpoint/", "checkpoint.previous/", "final/", "best/", "step-2/")

    def digests():
        return {os.path.relpath(os.path.join(d, f), out): checkpoint.file_sha256(os.path.join(d, f))
                for d, _, files in os.walk(out) for f in files}

    before = digests()
    rc, err = _main(_args(data, out), capsys)
    assert rc == 2
    line = _one_line_error(err)
    assert "holds an earlier run" in line and all(n in line for n in earlier) and "--overwrite" in line, line
    assert digests() == before

    rc, err = _main(_set(_args(data, out, "--overwrite"), "--max-steps", "1"), capsys)
    assert rc == 0, err
    assert not [n for n in ("checkpoint.previous", "best", "step-2") if os.path.exists(os.path.join(out, n))]
    assert checkpoint.verify(os.path.join(out, "checkpoint"))["step"] == 1
    assert [r["step"] for r in _log(out) if "loss" in r] == [1]
