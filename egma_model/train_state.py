"""What a training run keeps on disk: the checkpoint with the trainer state (optimiser, scheduler, scaler,
every RNG, history) and the run's options and data digest, the checks that a ``--resume`` continues the same
run, and the JSON-lines log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from typing import Dict, List, Tuple

import numpy as np
import torch

from . import checkpoint
from .train_args import TrainArgs, TrainError


STATE_NAME = "trainer_state.pt"  # optimiser, scheduler, scaler, RNG states, history: read with weights_only=True


RUN_NAME = "run.json"  # the resolved options and the data's digest, compared on --resume


def rng_state(device: torch.device) -> Dict:
    """Every random source a step draws from, in a form ``torch.load(weights_only=True)`` reads back."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, list(keys), gauss], "numpy": [name, np_keys.tolist(), pos, has_gauss, cached],
          "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(s: Dict, device: torch.device) -> None:
    version, keys, gauss = s["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


# Options a resumed run may change: how long it runs, where and how it reports, how fast it computes.
_FREE_ON_RESUME = {"out", "resume", "overwrite", "epochs", "max_steps", "save_every", "progress", "num_workers",
                   "device", "pin_memory", "prefetch_factor", "persistent_workers",
                   "threads", "keep_checkpoints", "profile_steps", "backend", "dist_timeout", "skip_nonfinite",
                   "select_on", "select_every", "select_prompts", "select_split", "select_scoring", "select_is_test",
                   "manifest"}  # the manifest's content is compared through its digest, not its path


# Options that change the model, the data or its order, or that the restored optimiser and scheduler state
# would silently override (learning rate, weight decay and its parameter groups): a resumed run with another
# value is refused. The others (warm-up, clipping, autocast, ...) take effect from the resumed step, reported.
_FIXED_ON_RESUME = {"lr", "weight_decay", "decay_all", "split", "preset", "image_model", "image_size", "image_weights", "text_model", "tokenizer", "scales",
                    "embed_dim", "batch_size", "seed", "no_gaze", "loss_weights", "global_weight", "alpha",
                    "egma_compat", "sigma", "min_heat", "raw_gaze", "max_sentences", "image_library",
                    "image_pretrained", "proj_bias", "init_from", "recipe", "patch_norm", "image_global", "image_mean",
                    "image_std", "text_pooling", "max_length", "split_rule", "gaze_resize", "temperature_clamp",
                    "text_padding", "text_groups", "loss_dtype", "global_negatives"}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def jsonable(a: TrainArgs) -> Dict:
    return json.loads(json.dumps(dataclasses.asdict(a), default=list))


def data_digest(a: TrainArgs, records) -> Dict:
    """What identifies the training data: the manifest file's SHA-256 (its bytes, wherever it lies), the
    split and the number of rows kept."""
    import hashlib

    present = a.manifest and os.path.isfile(a.manifest)
    digest = checkpoint.file_sha256(a.manifest) if present else hashlib.sha256().hexdigest()
    return {"manifest_sha256": digest, "split": a.split, "rows": len(records)}


def check_resume(a: TrainArgs, saved: Dict, data: Dict, ckpt: str) -> List[str]:
    """Refuse a resume whose model or data options, or whose data, differ from the checkpoint's
    (``TrainError`` naming each option with both values); returns warnings for the other changed options
    (learning rate, warm-up, ...), which a resumed run may change."""
    old, new = saved.get("args", {}), jsonable(a)
    fixed, other = [], []
    for k in sorted(set(old) | set(new)):
        if k in _FREE_ON_RESUME or old.get(k) == new.get(k):
            continue
        (fixed if k in _FIXED_ON_RESUME else other).append(f"{_option(k)} {old.get(k)!r} -> {new.get(k)!r}")
    was = saved.get("data", {})
    if was.get("manifest_sha256") != data["manifest_sha256"]:
        fixed.append(f"--manifest: its content differs from the checkpoint's (SHA-256 {data['manifest_sha256'][:12]}, "
                     f"was {str(was.get('manifest_sha256'))[:12]})")
    elif was.get("rows") != data["rows"]:
        fixed.append(f"rows used {was.get('rows')} -> {data['rows']}")
    if fixed:
        raise TrainError(f"--resume: {ckpt} was trained with other model/data/optimiser options: {'; '.join(fixed)}; give the "
                         f"checkpoint's options (in {os.path.join(ckpt, RUN_NAME)}) or train into a new --out")
    return other


# What a run leaves in --out that a later run could take for its own: its checkpoint (and the one a killed save
# left as .previous), its final model, the model its checkpoint selection kept, and the models --keep-checkpoints
# kept as step-<n>
_RUN_FOLDERS = ("checkpoint", "checkpoint" + checkpoint.PREVIOUS_SUFFIX, "final", "best")


def _earlier_run_folders(out: str) -> List[str]:
    if not os.path.isdir(out):
        return []
    kept = sorted(n for n in os.listdir(out) if n.startswith("step-") and n[5:].isdigit())
    return [n for n in _RUN_FOLDERS + tuple(kept) if os.path.isdir(os.path.join(out, n))]


def remove_earlier_run(out: str) -> None:
    """Remove an earlier run's checkpoint and models from ``out`` (``--overwrite``), so that the new run's
    folder holds no checkpoint or model of another run."""
    for name in _earlier_run_folders(out):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def refuse_to_replace_a_run(out: str) -> None:
    """``TrainError`` when ``out`` holds an earlier run's checkpoint or models, which a new run (no
    ``--resume``) would replace or mix with its own."""
    held = _earlier_run_folders(out)
    if held:
        raise TrainError(f"{out} holds an earlier run ({', '.join(h + '/' for h in held)}); --resume continues it, "
                         f"--overwrite starts a new run in its place, or give another --out")


def find_resume_checkpoint(ckpt_dir: str) -> str:
    """The verified checkpoint folder to resume from (``checkpoint.resolve``); ``TrainError`` when there is
    none, ``CheckpointError`` when it is torn, foreign or from before checkpoints had a manifest."""
    if not os.path.isdir(ckpt_dir) and not os.path.isdir(ckpt_dir + checkpoint.PREVIOUS_SUFFIX):
        raise TrainError(f"--resume: no checkpoint in {ckpt_dir}; train without --resume to start a new run")
    if (os.path.isfile(os.path.join(ckpt_dir, STATE_NAME))
            and not os.path.isfile(os.path.join(ckpt_dir, checkpoint.MANIFEST_NAME))
            and not os.path.isdir(ckpt_dir + checkpoint.PREVIOUS_SUFFIX)):
        raise checkpoint.CheckpointError(
            f"{ckpt_dir}: written by an older egma-train (no {checkpoint.MANIFEST_NAME}); it cannot be resumed "
            f"exactly. Start a new run (its weights load with EGMAModel.from_pretrained)")
    src = checkpoint.resolve(ckpt_dir)
    if not os.path.isfile(os.path.join(src, STATE_NAME)):
        raise checkpoint.CheckpointError(f"{src}: a model checkpoint, not a training one (no {STATE_NAME}); "
                                         f"--resume needs <out>/checkpoint")
    return src


def load_training_state(src: str) -> Tuple[Dict, Dict]:
    with open(os.path.join(src, RUN_NAME), encoding="utf-8") as f:
        run = json.load(f)
    state = torch.load(os.path.join(src, STATE_NAME), map_location="cpu", weights_only=True)
    return run, state


def truncate_log(log_path: str, step: int) -> None:
    """Keep the log's records up to ``step`` (a run killed after its last checkpoint logged steps that the
    resumed run does again)."""
    if not os.path.isfile(log_path):
        return
    def kept(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:  # the line a kill cut short
            return False

    with open(log_path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and kept(ln)]
    tmp = log_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, log_path)


class RunLog:
    """``<out>/log.jsonl``, one JSON record a line, each appended and closed at once (a run stopped by an
    error leaves no open file and every record written)."""

    def __init__(self, path: str, fresh: bool):
        self.path = path
        if fresh:
            open(path, "w", encoding="utf-8").close()

    def append(self, record: Dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def save_checkpoint(model, tokenizer, opt, sched, scaler, step, history, ckpt_dir, run_info, device):
    """The training checkpoint, one atomic folder: the model, the tokenizer, the trainer state and the run's
    options and data digest (``egma_model.checkpoint``)."""

    def extra(folder: str) -> None:
        checkpoint.save_torch({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "scaler": scaler.state_dict(), "step": step, "history": history,
                               "rng": rng_state(device)}, os.path.join(folder, STATE_NAME))
        with open(os.path.join(folder, RUN_NAME), "w", encoding="utf-8") as f:
            json.dump(run_info, f, indent=2)

    model.save_pretrained(ckpt_dir, tokenizer=tokenizer, step=step, extra=extra)
