"""``egma-train``: pre-train an ``EGMAModel`` from a manifest with the EGMA loss.

AdamW, cosine schedule with linear warm-up, gradient clipping, bfloat16 autocast on CUDA, checkpoint save
and resume (``<out>/checkpoint``), a progress bar with the running loss terms, a JSON-lines log
(``<out>/log.jsonl``), seeds. The final model is saved under ``<out>/final`` (``EGMAModel.from_pretrained``).

Example (CPU, tiny encoders, random init)::

    egma-train --manifest data/train.csv --out runs/tiny --preset tiny --epochs 2 --batch-size 8

Under ``torchrun --nproc_per_node K -m egma_model.train ...`` it trains with DistributedDataParallel,
``--batch-size`` per process, the contrastive term over every rank's batch (``--no-global-negatives``:
per process), logging and checkpoints on rank 0 (``docs/distributed.md``).

``--profile-steps N`` reports the time and memory of each part of a step (``egma_model.step_profile``);
``--grad-chunk-size K`` trains a large batch with the activation memory of K images (gradient caching,
``egma_model.gradcache``); ``--text-groups`` and ``--loss-dtype``: see ``EGMAConfig``.

``--recipe authors-code`` / ``--recipe paper`` set every setting of the authors' code or the paper at once
(``egma_model.recipes``, ``docs/recipes.md``); ``--print-recipe`` prints them without training.

Faults: checkpoints are atomic, self-checking folders (``egma_model.checkpoint``); ``--resume`` without a
checkpoint, or with options that change the model, the data or the optimiser, is an error, and a resumed
run repeats the uninterrupted run's steps exactly (data position, every RNG, scheduler, scaler); a NaN/inf
loss or gradient norm stops the run before the optimiser step (``--skip-nonfinite``: skip the batch); under
torchrun the ranks compare their data size, steps, vocabulary and options at start-up and stop together,
and a collective waits at most ``--dist-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import checkpoint
from .data import Collator, EGMADataset, GazeOptions, ManifestError, load_manifest
from .model import EGMAConfig, EGMAModel
from .tokenizer import build_word_tokenizer, load_tokenizer

__all__ = ["TrainArgs", "TrainError", "train", "main", "cosine_with_warmup", "set_seed"]

STATE_NAME = "trainer_state.pt"  # optimiser, scheduler, scaler, RNG states, history: read with weights_only=True
RUN_NAME = "run.json"  # the resolved options and the data's digest, compared on --resume


class TrainError(ValueError):
    """A run that cannot start or go on (no checkpoint to resume, options that differ from the checkpoint's,
    no data, ranks that disagree, a non-finite loss); the message says what and where."""


@dataclass
class TrainArgs:
    manifest: str
    out: str
    split: Optional[str] = None
    preset: str = "tiny"  # architecture: "tiny" (small random encoders) or "full" (Swin-T + Bio_ClinicalBERT size)
    image_model: Optional[str] = None
    image_size: Optional[int] = None
    image_weights: Optional[str] = None
    text_model: Optional[str] = None
    tokenizer: Optional[str] = None
    scales: Sequence[int] = (-1,)
    embed_dim: Optional[int] = None
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    clip_grad: float = 1.0
    seed: int = 0
    no_gaze: bool = False
    loss_weights: Sequence[float] = (1.0, 1.0, 1.0)
    global_weight: float = 0.0
    alpha: Optional[float] = None
    egma_compat: bool = False
    sigma: float = 150.0
    min_heat: float = 0.1
    raw_gaze: bool = False
    max_sentences: int = 16
    num_workers: int = -1  # -1: auto (see loader_settings)
    pin_memory: Optional[bool] = None  # None: auto (on for a CUDA device)
    prefetch_factor: int = 2
    persistent_workers: bool = True
    device: Optional[str] = None
    save_every: int = 500
    resume: bool = False
    progress: bool = True
    backend: Optional[str] = None
    threads: Optional[int] = None
    global_negatives: bool = True  # under torchrun: the contrastive term over every rank's batch
    # where the encoders come from (hub names, MedCLIP initialisation): see _resolve_model_source
    image_library: Optional[str] = None
    image_pretrained: bool = False
    proj_bias: Optional[bool] = None
    init_from: Optional[str] = None
    # the authors' pipeline as options (egma_model.recipes; docs/recipes.md); None = our default
    recipe: Optional[str] = None
    patch_norm: Optional[str] = None
    image_global: Optional[str] = None
    image_mean: Optional[float] = None
    image_std: Optional[float] = None
    text_pooling: Optional[str] = None
    max_length: Optional[int] = None
    split_rule: str = "ours"
    gaze_resize: str = "area"
    temperature_clamp: Optional[str] = None
    decay_all: bool = False  # weight decay on every parameter (1-D ones and the temperature too)
    warmup_ratio: Optional[float] = None  # warm-up as a fraction of all steps (overrides warmup_steps)
    warmup_epochs: Optional[float] = None  # warm-up in epochs (overrides warmup_steps)
    warmup_rule: str = "ours"  # "ours": round(), ramp from 1/warmup; "transformers": ceil(), ramp from 0
    text_padding: str = "max_length"  # last4_all pooling: sentences padded to max_length or to the batch's longest
    amp: str = "bf16"  # autocast on CUDA: bf16, fp16 (with a gradient scaler) or off
    keep_checkpoints: bool = False  # keep <out>/step-<n> at every --save-every
    select_on: Optional[str] = None  # a labelled manifest: keep the best zero-shot accuracy as <out>/best
    select_every: int = 40
    select_prompts: Optional[str] = None  # built-in set name or prompts JSON
    select_split: Optional[str] = None
    select_scoring: str = "fine"
    select_is_test: Optional[bool] = None  # None: decided from the manifest (split "test" or a test-set name)
    profile_steps: int = 0  # > 0: time and memory per part of a step (egma_model.step_profile), after a warm-up step
    text_groups: Optional[int] = None  # sentences encoded in groups of similar length (None: the model's default, 1)
    loss_dtype: Optional[str] = None  # dtype of the loss inputs (None: the model's default, float32)
    grad_chunk_size: int = 0  # > 0: gradient caching, the encoders run this many images at a time (egma_model.gradcache)
    skip_nonfinite: bool = False  # a batch whose loss or gradient is NaN/inf is skipped instead of stopping the run
    dist_timeout: float = 600.0  # seconds a collective may wait for the other ranks (the process group's timeout)


class _Distributed:
    """The process group under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), else one process.

    NCCL for CUDA devices (each rank on ``cuda:LOCAL_RANK``), gloo for the CPU. ``--batch-size`` is per
    process: the global batch is ``batch_size * world``."""

    def __init__(self, a: "TrainArgs"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if a.device:
            self.device = torch.device(a.device)
            if self.device.type == "cuda" and self.device.index is None and self.world > 1:
                self.device = torch.device("cuda", local_rank)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank if self.world > 1 else torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.group = None
        self.owns_group = False
        if self.world > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                from datetime import timedelta

                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                        timeout=timedelta(seconds=a.dist_timeout))
                self.owns_group = True
            self.group = dist.group.WORLD
        self.is_main = self.rank == 0

    def mean_of(self, values: Dict[str, float]) -> Dict[str, float]:
        """The mean over the ranks of each logged number (one all_reduce)."""
        if self.world == 1 or not values:
            return values
        import torch.distributed as dist

        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, (t / self.world).tolist()))

    def all_true(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (one all_reduce), so that the ranks stop together."""
        if self.world == 1:
            return ok
        import torch.distributed as dist

        t = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item()) == 0

    def gather_ints(self, values: List[int]) -> List[List[int]]:
        """Every rank's ``values`` (the same length on every rank), in rank order."""
        if self.world == 1:
            return [list(values)]
        import torch.distributed as dist

        local = torch.tensor(values, dtype=torch.int64, device=self.device)
        out = torch.empty(self.world * len(values), dtype=torch.int64, device=self.device)
        dist.all_gather_into_tensor(out, local)
        return out.view(self.world, len(values)).tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's indices of each global batch of an epoch's shuffle (one permutation per epoch and seed,
    the same on every rank): global batch ``s`` is ``perm[s*G:(s+1)*G]`` with ``G = batch * world``, and
    rank ``r`` takes its ``r``-th slice of ``batch``. Concatenated in rank order, the ranks' batches are
    exactly the batches of one process with ``batch * world``. Full global batches only (as ``drop_last``),
    except one process with fewer samples than a batch, which gets them all. ``set_epoch`` reshuffles;
    its ``start_batch`` skips the epoch's first batches (a resumed run continues mid-epoch without loading them)."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, tag_epoch: bool = False):
        if world > 1 and n < batch * world:
            raise ValueError(f"{n} training samples are fewer than the global batch ({batch} x {world} processes)")
        self.n, self.batch, self.rank, self.world, self.seed, self.epoch = n, batch, rank, world, seed, 0
        self.start = 0
        # tag_epoch: yield (index, epoch), so that a DataLoader kept for the whole run (persistent workers hold
        # their own copy of the dataset) still augments each epoch differently; EGMADataset takes both forms
        self.tag_epoch = tag_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch * batch_of(self)

    def __len__(self) -> int:
        full = (self.n // (self.batch * self.world)) * self.batch if self.n >= self.batch * self.world else self.n
        return max(0, full - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        G = self.batch * self.world
        if self.n < G:
            mine = perm.tolist()[self.start:]
        else:
            mine = perm[: (self.n // G) * G].view(-1, self.world, self.batch)[:, self.rank].reshape(-1).tolist()
            mine = mine[self.start:]
        return iter([(i, self.epoch) for i in mine] if self.tag_epoch else mine)


def batch_of(sampler: GlobalBatchSampler) -> int:
    """Indices per batch of this rank (the whole dataset when one process has fewer samples than a batch)."""
    return sampler.batch if sampler.n >= sampler.batch * sampler.world else sampler.n


def loader_settings(a: TrainArgs, device: torch.device, world: int) -> Dict:
    """DataLoader keyword arguments for the run's one loader.

    Workers (``--num-workers -1``, auto): none on the CPU, where the step itself uses the cores; on a GPU, the
    cores of this process's share of the machine, at most 8. Workers persist across epochs (their parsed gaze
    files and memory maps stay open) and prefetch ``--prefetch-factor`` batches each; pinned memory on CUDA.
    """
    workers = a.num_workers
    if workers < 0:
        workers = 0 if device.type != "cuda" else max(1, min(8, (os.cpu_count() or 1) // max(1, world) - 1))
    pin = device.type == "cuda" if a.pin_memory is None else bool(a.pin_memory)
    kw = {"num_workers": workers, "pin_memory": pin}
    if workers > 0:
        kw.update(persistent_workers=a.persistent_workers, prefetch_factor=a.prefetch_factor)
    return kw


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_with_warmup(step: int, total: int, warmup: int, floor: float = 0.0, rule: str = "ours") -> float:
    """Learning-rate multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine to ``floor``.

    ``rule="ours"``: the ramp is ``(step + 1) / warmup`` (the first step already has a learning rate).
    ``rule="transformers"``: transformers' ``get_cosine_schedule_with_warmup``: the ramp is ``step / warmup``
    (the first step has learning rate 0) and the cosine is ``0.5 (1 + cos(pi progress))`` with
    ``progress = (step - warmup) / max(1, total - warmup)``, not capped (``floor`` must be 0).
    """
    if rule == "transformers":
        if floor != 0.0:
            raise ValueError("the transformers warm-up rule has no floor")
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if rule != "ours":
        raise ValueError(f"unknown warm-up rule {rule!r}; use ours or transformers")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_warmup(a: TrainArgs, total: int, steps_per_epoch: int) -> int:
    """Warm-up steps: ``warmup_ratio`` of all steps, or ``warmup_epochs`` epochs, else ``warmup_steps``.

    A ratio or a number of epochs is rounded to the nearest step (``warmup_rule`` "ours") or up (``"transformers"``,
    the authors' ``math.ceil(total * warmup_ratio)``)."""
    to_int = math.ceil if a.warmup_rule == "transformers" else round
    if a.warmup_ratio is not None and a.warmup_epochs is not None:
        raise ValueError("give --warmup-ratio or --warmup-epochs, not both")
    if a.warmup_ratio is not None:
        if not 0 <= a.warmup_ratio <= 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1], got {a.warmup_ratio}")
        return int(to_int(a.warmup_ratio * total))
    if a.warmup_epochs is not None:
        return int(to_int(a.warmup_epochs * steps_per_epoch))
    return a.warmup_steps


def pads_to_max_length(text_pooling: Optional[str], text_padding: str) -> bool:
    """Whether the collator pads every sentence to ``max_length``: only the ``last4_all`` pooling (a mean over
    every position, padding included) sees the padding, and then ``text_padding`` decides ("max_length": the
    same embedding in every batch; "longest": padded to the batch's longest sentence, as the authors' collator)."""
    if text_padding not in ("max_length", "longest"):
        raise ValueError(f"unknown text padding {text_padding!r}; use max_length or longest")
    return text_pooling == "last4_all" and text_padding == "max_length"


def build_model_and_tokenizer(a: TrainArgs, texts: Sequence[str]):
    """The model and tokenizer for a run: encoders by hub name or local path when given (and MedCLIP weights
    with ``init_from``), else random encoders and a vocabulary built from the reports."""
    a = _resolve_model_source(a)
    if a.tokenizer:
        tok = load_tokenizer(a.tokenizer)
    elif a.text_model:
        tok = load_tokenizer(a.text_model)
    else:
        tok = build_word_tokenizer(texts, save_dir=None)
    kw = dict(scales=tuple(a.scales), loss_weights=tuple(a.loss_weights), global_weight=a.global_weight,
              alpha=a.alpha, egma_compat=a.egma_compat, use_gaze=not a.no_gaze, backend=a.backend,
              text_model=a.text_model, image_weights=a.image_weights)
    if a.image_size:
        kw["image_size"] = a.image_size
    if a.embed_dim:
        kw["embed_dim"] = a.embed_dim
    if not a.text_model:
        kw["vocab_size"] = len(tok)
    kw.update(_model_source_kwargs(a))
    for k in ("patch_norm", "image_global", "image_mean", "image_std", "text_pooling", "max_length",
              "temperature_clamp", "text_groups", "loss_dtype"):
        if getattr(a, k) is not None:
            kw[k] = getattr(a, k)
    if a.preset == "tiny":
        cfg = EGMAConfig.tiny(a.image_model, **kw)
    elif a.preset == "full":
        cfg = EGMAConfig(image_model=a.image_model or "swin_tiny_patch4_window7_224", **kw)
    else:
        raise ValueError(f"unknown preset {a.preset!r}: use 'tiny' or 'full'")
    model = EGMAModel(cfg)
    if a.init_from:
        _init_from_checkpoint(model, a)
    return model, tok


# ------------------------------------------------------------------ model source (hub names, MedCLIP init)


def _resolve_model_source(a: TrainArgs) -> TrainArgs:
    """``--init-from`` a MedCLIP-ViT checkpoint fills in MedCLIP's architecture where the user gave none:
    the transformers Swin-Tiny and Bio_ClinicalBERT by hub name, bias-free projections to 512."""
    from .medclip import MEDCLIP_TEXT_MODEL, MEDCLIP_VISION_MODEL

    ch = {}
    if a.image_library == "transformers" and not a.image_model and a.preset != "tiny":
        ch["image_model"] = MEDCLIP_VISION_MODEL
    if not a.init_from:
        return dataclasses.replace(a, **ch)
    if not os.path.exists(a.init_from):  # before any encoder is downloaded
        raise FileNotFoundError(f"MedCLIP checkpoint not found: {a.init_from}")
    if a.image_library is None:
        ch["image_library"] = "transformers"
    if (ch.get("image_library") or a.image_library) == "transformers" and not a.image_model:
        ch["image_model"] = MEDCLIP_VISION_MODEL
    if not a.text_model:
        ch["text_model"] = MEDCLIP_TEXT_MODEL
    if a.proj_bias is None:
        ch["proj_bias"] = False
    if a.embed_dim is None:
        ch["embed_dim"] = 512
    return dataclasses.replace(a, **ch)


def _model_source_kwargs(a: TrainArgs) -> Dict:
    kw: Dict = {}
    if a.image_library:
        kw["image_library"] = a.image_library
    if a.image_pretrained:
        kw["image_pretrained"] = True
    if a.proj_bias is not None:
        kw["proj_bias"] = a.proj_bias
    return kw


def _init_from_checkpoint(model: EGMAModel, a: TrainArgs) -> None:
    """Load a MedCLIP checkpoint into ``model``, print what was loaded, missing and unused, and keep the
    report as ``<out>/init_report.json``."""
    from .medclip import MedCLIPInitError, init_from_medclip

    try:
        rep = init_from_medclip(model, a.init_from)
    except MedCLIPInitError as e:
        print(f"egma-train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank loads; rank 0 reports
        return
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "init_report.json"), "w") as f:
        json.dump(rep, f, indent=2)
    print(f"egma-train: initialised from {a.init_from}: {len(rep['loaded'])} tensors loaded, "
          f"{len(rep['missing'])} missing (kept as initialised): {rep['missing']}, "
          f"{len(rep['unused'])} unused: {sorted(rep['unused'])}", file=sys.stderr)


def _add_model_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoder source")
    g.add_argument("--image-library", default=None, choices=["timm", "transformers"],
                   help="timm or transformers (e.g. MedCLIP's Swin; --image-model is then a hub id or folder) (default: timm)")
    g.add_argument("--image-pretrained", action="store_true",
                   help="timm: the hub's pretrained weights for --image-model (the hub cache when HF_HUB_OFFLINE=1)")
    g.add_argument("--proj-bias", default=None, choices=["yes", "no"],
                   help="bias in the projections to the embedding (default: yes; no with --init-from)")
    g.add_argument("--init-from", default=None, metavar="FILE",
                   help="a MedCLIP-ViT checkpoint (pytorch_model.bin or its folder): its weights are mapped onto the "
                        "model (Swin, Bio_ClinicalBERT, projections, temperature); missing/unused keys are listed "
                        "(default: none, the encoders' own initialisation)")


def _with_model_source(ns, a: TrainArgs) -> TrainArgs:
    return dataclasses.replace(a, image_library=ns.image_library, image_pretrained=ns.image_pretrained,
                               proj_bias=None if ns.proj_bias is None else ns.proj_bias == "yes",
                               init_from=ns.init_from)


def _rng_state(device: torch.device) -> Dict:
    """Every random source a step draws from, in a form ``torch.load(weights_only=True)`` reads back."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, list(keys), gauss], "numpy": [name, np_keys.tolist(), pos, has_gauss, cached],
          "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(s: Dict, device: torch.device) -> None:
    version, keys, gauss = s["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


# Options a resumed run may change: how long it runs, where and how it reports, how fast it computes.
_FREE_ON_RESUME = {"out", "resume", "epochs", "max_steps", "save_every", "progress", "num_workers", "device",
                   "pin_memory", "prefetch_factor", "persistent_workers",
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


def _jsonable(a: TrainArgs) -> Dict:
    return json.loads(json.dumps(dataclasses.asdict(a), default=list))


def data_digest(a: TrainArgs, records) -> Dict:
    """What identifies the training data: the manifest file's SHA-256 (its bytes, wherever it lies), the
    split and the number of rows kept."""
    import hashlib

    h = hashlib.sha256()
    if a.manifest and os.path.isfile(a.manifest):
        with open(a.manifest, "rb") as f:
            h.update(f.read())
    return {"manifest_sha256": h.hexdigest(), "split": a.split, "rows": len(records)}


def check_resume(a: TrainArgs, saved: Dict, data: Dict, ckpt: str) -> List[str]:
    """Refuse a resume whose model or data options, or whose data, differ from the checkpoint's
    (``TrainError`` naming each option with both values); returns warnings for the other changed options
    (learning rate, warm-up, ...), which a resumed run may change."""
    old, new = saved.get("args", {}), _jsonable(a)
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


def _find_resume_checkpoint(ckpt_dir: str) -> str:
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


def _load_training_state(src: str) -> Tuple[Dict, Dict]:
    with open(os.path.join(src, RUN_NAME), encoding="utf-8") as f:
        run = json.load(f)
    state = torch.load(os.path.join(src, STATE_NAME), map_location="cpu", weights_only=True)
    return run, state


def _truncate_log(log_path: str, step: int) -> None:
    """Keep the log's records up to ``step`` (a run killed after its last checkpoint logged steps that the
    resumed run does again)."""
    if not os.path.isfile(log_path):
        return
    with open(log_path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = log_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, log_path)


# What every rank compares at start-up (_agree).
_FACTS = ("rows", "steps per epoch", "total steps", "vocabulary size", "model config (crc32)", "options (crc32)",
          "resumed")


def _agree(ddp: _Distributed, error: Optional[BaseException], facts: Dict[str, int]) -> None:
    """Under torchrun: every rank compares its start-up facts (data size, steps, vocabulary, options' digest)
    and its start-up status with the others', and every rank stops with one message if they differ or if a
    rank failed (that rank raises its own error)."""
    names = ["failed"] + list(facts)
    rows = ddp.gather_ints([int(error is not None)] + [int(facts[k]) for k in facts])
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        raise TrainError(f"rank(s) {failed} failed at start-up (see the error there); every rank stops")
    diffs = []
    for i, name in enumerate(names[1:], start=1):
        values = [row[i] for row in rows]
        if any(v != values[0] for v in values):
            diffs.append(f"{name}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))
    if diffs:
        raise TrainError("the ranks disagree (every rank needs the same data and options): " + "; ".join(diffs))


def _crc(obj) -> int:
    import zlib

    return zlib.crc32(json.dumps(obj, sort_keys=True, default=str).encode())


def train(a: TrainArgs, *, records=None, model: Optional[EGMAModel] = None, tokenizer=None,
          cache: Optional[Dict] = None) -> Dict:
    """Run training; returns a summary ``{"steps", "final_loss", "history", "out"}``.

    ``records``/``model``/``tokenizer`` may be passed in (the demo does); otherwise they come from ``a``.
    ``cache``: a dict shared by runs over the same records and gaze settings (sentences and gaze computed once).
    """
    if a.threads:
        torch.set_num_threads(a.threads)
    set_seed(a.seed)
    ddp = _Distributed(a)
    try:
        return _train(a, ddp, records, model, tokenizer, cache)
    finally:
        ddp.close()


def _setup(a: TrainArgs, ddp: _Distributed, records, model, tokenizer):
    """Records, model, tokenizer and the checkpoint to resume from (``None``: a new run)."""
    ckpt_dir = os.path.join(a.out, "checkpoint")
    src = _find_resume_checkpoint(ckpt_dir) if a.resume else None
    if records is None:
        records = load_manifest(a.manifest, split=a.split, split_rule=a.split_rule)
    if not records:
        raise ManifestError(f"{a.manifest}: no rows to train on")
    if src is not None:
        model = EGMAModel.from_pretrained(src)
        tokenizer = load_tokenizer(os.path.join(src, "tokenizer"))
    elif model is None or tokenizer is None:
        model, tokenizer = build_model_and_tokenizer(a, [s for r in records for s in r.sentences])
    return records, model, tokenizer, src


def _train(a: TrainArgs, ddp: _Distributed, records, model, tokenizer, cache) -> Dict:
    device = ddp.device
    ckpt_dir = os.path.join(a.out, "checkpoint")
    error, src = None, None
    try:
        records, model, tokenizer, src = _setup(a, ddp, records, model, tokenizer)
    except Exception as e:  # raised after the ranks' start-up exchange, so that no rank waits for it
        if ddp.world == 1:
            raise
        error = e
    if error is None:
        steps_per_epoch = max(1, len(records) // (a.batch_size * ddp.world))  # full global batches only
        total = a.max_steps or steps_per_epoch * a.epochs
        args = {k: v for k, v in _jsonable(a).items() if k not in ("device", "threads")}
        facts = dict(zip(_FACTS, (len(records), steps_per_epoch, total, len(tokenizer), _crc(model.config.to_dict()),
                                  _crc(args), int(src is not None))))
    else:
        facts = dict.fromkeys(_FACTS, 0)  # the same row length on every rank; the failure flag says why
    if ddp.world > 1:
        _agree(ddp, error, facts)
    if total <= 0:
        raise TrainError(f"--max-steps/--epochs give {total} steps; nothing to train")
    os.makedirs(a.out, exist_ok=True)
    data = data_digest(a, records)
    run_info = {"args": _jsonable(a), "data": data}
    saved_state = None
    if src is not None:
        saved_run, saved_state = _load_training_state(src)
        for w in check_resume(a, saved_run, data, src):
            if ddp.is_main:
                print(f"egma-train: warning: --resume with a changed option, in effect from step {saved_state['step'] + 1}: "
                      f"{w}", file=sys.stderr)
    model.to(device)
    gg = model.gaze_grid
    ds = EGMADataset(records, image_size=model.config.image_size, grid=gg, train=True,
                     max_sentences=a.max_sentences, use_gaze=not a.no_gaze, seed=a.seed,
                     gaze_options=GazeOptions(sigma=a.sigma, min_heat=a.min_heat, use_raw_gaze=a.raw_gaze,
                                              resize=a.gaze_resize), cache=cache,
                     image_mean=model.config.image_mean, image_std=model.config.image_std, split_rule=a.split_rule)
    collate = Collator(tokenizer, max_length=model.config.max_length, num_patches=gg[0] * gg[1],
                       pad_to_max_length=pads_to_max_length(model.config.text_pooling, a.text_padding))
    sampler = GlobalBatchSampler(len(ds), a.batch_size, ddp.rank, ddp.world, a.seed, tag_epoch=True)
    # one loader for the run; its own generator: creating it draws nothing from the global RNG, which a resumed
    # run restores to the state after its last step
    loader_kw = loader_settings(a, device, ddp.world)
    loader = DataLoader(ds, batch_size=a.batch_size, sampler=sampler, collate_fn=collate,
                        generator=torch.Generator().manual_seed(a.seed), **loader_kw)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if (p.ndim < 2 or n == "logit_scale") and not a.decay_all else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
    warmup = resolve_warmup(a, total, steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, warmup,
                                                                                rule=a.warmup_rule))
    if a.amp not in ("bf16", "fp16", "off"):
        raise ValueError(f"amp must be bf16, fp16 or off, got {a.amp!r}")
    use_amp = device.type == "cuda" and a.amp != "off"
    amp_dtype = torch.float16 if a.amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and a.amp == "fp16")
    selector = None
    if a.select_on and ddp.is_main:
        from .selection import CheckpointSelector

        selector = CheckpointSelector(a, tokenizer)
    step = 0
    history: List[Dict] = []
    log_path = os.path.join(a.out, "log.jsonl")
    if saved_state is not None:
        opt.load_state_dict(saved_state["optimizer"])
        sched.load_state_dict(saved_state["scheduler"])
        if saved_state.get("scaler"):
            scaler.load_state_dict(saved_state["scaler"])
        step = int(saved_state["step"])
        history = list(saved_state.get("history", []))
        _set_rng_state(saved_state["rng"], device)
        if ddp.is_main:
            _truncate_log(log_path, step)
    if a.grad_chunk_size < 0 or a.profile_steps < 0:
        raise ValueError("--grad-chunk-size and --profile-steps must be >= 0")
    net = model
    if ddp.world > 1 and a.grad_chunk_size:
        # gradient caching runs the encoders outside one forward call: no DDP wrapper; the parameters start
        # equal on every rank and the gradients are averaged after each backward pass
        from .gradcache import broadcast_parameters

        broadcast_parameters(model)
    elif ddp.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # Under torchrun the model's loss calls run over the group (global negatives) unless turned off.
    from egma_kernels.distributed import loss_group

    group = ddp.group if a.global_negatives else None

    def save(at: int) -> None:
        """The training checkpoint at step ``at`` (rank 0 writes; every rank stops if it could not)."""
        err = None
        if ddp.is_main:
            try:
                _save(model, tokenizer, opt, sched, scaler, at, history, ckpt_dir, run_info, device)
            except checkpoint.CheckpointError as e:
                err = e
        if not ddp.all_true(err is None):
            raise err or TrainError(f"rank 0 could not write the checkpoint at step {at} (see its error)")

    log = _Log(log_path, fresh=saved_state is None) if ddp.is_main else None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = (tqdm(total=total, initial=step, desc="egma-train", disable=not a.progress, dynamic_ncols=True)
           if tqdm and ddp.is_main else None)
    running: Dict[str, float] = {}
    prof = None
    if a.profile_steps:
        from .step_profile import StepProfiler

        prof = StepProfiler(a.profile_steps, device)
    model.train()
    t0 = time.time()
    t_data = time.perf_counter()
    skipped = 0
    while step < total:
        epoch = step // steps_per_epoch
        ds.epoch = epoch
        sampler.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)
        batches = 0
        for batch in loader:
            if step >= total or step - epoch * steps_per_epoch >= steps_per_epoch:
                break
            batches += 1
            profiling = prof is not None and not prof.done
            if profiling:
                prof.begin_step()
                prof.add_time("data", time.perf_counter() - t_data)
                model.part_timer = prof
            part = prof.part if profiling else _no_part
            batch = {k: v.to(device, non_blocking=loader_kw["pin_memory"]) for k, v in batch.items()}
            opt.zero_grad(set_to_none=True)
            if a.grad_chunk_size:
                from .gradcache import average_gradients, grad_cache_step

                with loss_group(group):
                    out = grad_cache_step(
                        model, batch, a.grad_chunk_size, scale_loss=scaler.scale, part=part,
                        forward_context=lambda: torch.autocast(device_type=device.type, dtype=amp_dtype,
                                                               enabled=use_amp))
                if ddp.world > 1:
                    with part("backward"):
                        average_gradients(model.parameters())
            else:
                with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp), loss_group(group):
                    out = net(batch)
                with part("backward"):
                    scaler.scale(out["loss"]).backward()
            with part("optimizer"):
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad) if a.clip_grad > 0 else None
                bad = _nonfinite(out, None if scaler.is_enabled() else gnorm)
                skipped_why = None
                if not ddp.all_true(not bad):
                    skipped_why = _nonfinite_message(step + 1, bad)
                    if not a.skip_nonfinite:
                        raise TrainError(f"{skipped_why}; stopped before the optimiser step, nothing saved from it "
                                         f"(--skip-nonfinite skips such batches instead)")
                if skipped_why is None:
                    scaler.step(opt)
                    scaler.update()
                else:  # the batch counts as a step (the data order and schedule go on) without an update
                    opt.zero_grad(set_to_none=True)
                    skipped += 1
                    if ddp.is_main:
                        print(f"egma-train: warning: {skipped_why}; batch skipped", file=sys.stderr)
            sched.step()
            step += 1
            if profiling:
                prof.end_step(a.batch_size * ddp.world)
                model.part_timer = None
                if prof.done:
                    _report_profile(prof, a, ddp, model.config)
            rec = {"step": step, "epoch": epoch, "lr": opt.param_groups[0]["lr"],
                   **ddp.mean_of({k: float(v.detach()) for k, v in out.items() if v.dim() == 0})}
            if gnorm is not None:
                rec["grad_norm"] = float(gnorm)
            if skipped_why is not None:
                rec["skipped_batch"] = skipped_why
            rec["time_s"] = round(time.time() - t0, 3)
            history.append(rec)
            if log is not None:
                log.append(rec)
            for k in ("loss", "contrastive", "gaze_mlce", "mapping"):
                running[k] = rec[k] if k not in running else 0.9 * running[k] + 0.1 * rec[k]
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k[:4]: f"{v:.3f}" for k, v in running.items()}, refresh=False)
            if a.save_every and step % a.save_every == 0 and step < total:
                save(step)
                if a.keep_checkpoints and ddp.is_main:
                    model.save_pretrained(os.path.join(a.out, f"step-{step}"), tokenizer=tokenizer, step=step)
            if selector is not None and (step % a.select_every == 0 or step == total):
                sel = selector.check(model, step, device)
                if log is not None:
                    log.append({"step": step, "selection": sel})
                model.train()
            t_data = time.perf_counter()
        if not batches:
            raise TrainError(f"epoch {epoch} gave no batch ({len(ds)} rows, batch size {a.batch_size}); nothing to "
                             f"train on")
    if prof is not None:
        prof.close()
        if not prof.done and ddp.is_main:
            print(f"egma-train: --profile-steps {a.profile_steps}: the run ended after {len(prof.records)} "
                  f"profiled steps (plus the warm-up); nothing written", file=sys.stderr)
    if bar is not None:
        bar.close()
    save(step)
    if ddp.is_main:
        model.save_pretrained(os.path.join(a.out, "final"), tokenizer=tokenizer, step=step)
        if selector is not None:
            selector.finish()
        with open(os.path.join(a.out, "train_args.json"), "w") as f:  # the resolved settings
            json.dump(dataclasses.asdict(a), f, indent=2, default=list)
    ddp.barrier()  # every rank returns once the final model is written
    return {"steps": step, "final_loss": history[-1]["loss"] if history else None, "history": history,
            "out": a.out, "model": model, "tokenizer": tokenizer, "skipped_batches": skipped}


class _Log:
    """``<out>/log.jsonl``, one JSON record a line, each appended and closed at once (a run stopped by an
    error leaves no open file and every record written)."""

    def __init__(self, path: str, fresh: bool):
        self.path = path
        if fresh:
            open(path, "w", encoding="utf-8").close()

    def append(self, record: Dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _nonfinite(out: Dict[str, torch.Tensor], gnorm: Optional[torch.Tensor]) -> List[str]:
    """The scalar loss terms (and the gradient norm) that are NaN or infinite: one host read."""
    names = [k for k, v in out.items() if v.dim() == 0]
    values = [out[k].detach().float() for k in names]
    if gnorm is not None:
        names.append("grad_norm")
        values.append(gnorm.detach().float())
    finite = torch.isfinite(torch.stack(values)).tolist()
    return [f"{n}={float(v)}" for n, v, ok in zip(names, values, finite) if not ok]


def _nonfinite_message(step: int, bad: List[str]) -> str:
    if not bad:
        return f"step {step}: another rank's loss or gradient is not finite"
    return f"step {step}: non-finite {', '.join(bad)}"


def _no_part(name):
    return contextlib.nullcontext()


def _report_profile(prof, a: TrainArgs, ddp: _Distributed, config: EGMAConfig) -> None:
    """Rank 0 prints the step profile's table and writes it as ``<out>/step_profile.json``."""
    if not ddp.is_main:
        return
    from .step_profile import format_table

    s = prof.write(os.path.join(a.out, "step_profile.json"), preset=a.preset, batch_size=a.batch_size,
                   world=ddp.world, grad_chunk_size=a.grad_chunk_size, amp=a.amp, text_groups=config.text_groups,
                   loss_dtype=config.loss_dtype, image_model=config.image_model, image_size=config.image_size)
    print(format_table(s), file=sys.stderr)


def _save(model, tokenizer, opt, sched, scaler, step, history, ckpt_dir, run_info, device):
    """The training checkpoint, one atomic folder: the model, the tokenizer, the trainer state and the run's
    options and data digest (``egma_model.checkpoint``)."""

    def extra(folder: str) -> None:
        checkpoint.save_torch({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "scaler": scaler.state_dict(), "step": step, "history": history,
                               "rng": _rng_state(device)}, os.path.join(folder, STATE_NAME))
        with open(os.path.join(folder, RUN_NAME), "w", encoding="utf-8") as f:
            json.dump(run_info, f, indent=2)

    model.save_pretrained(ckpt_dir, tokenizer=tokenizer, step=step, extra=extra)


def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",")]


def build_parser() -> argparse.ArgumentParser:
    from egma_kernels.cli_support import HelpFormatter  # says each option's default once

    p = argparse.ArgumentParser(prog="egma-train", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=HelpFormatter)
    d = TrainArgs(manifest="", out="")
    p.add_argument("--manifest", default=None, help="training manifest (.csv or .jsonl; see egma_model.data) (default: none; "
                   "required unless --print-recipe)")
    p.add_argument("--out", default=None, help="output folder (log.jsonl, checkpoint/, final/) (default: none; required unless "
                   "--print-recipe)")
    p.add_argument("--split", default=None, help="use only manifest rows with this 'split' value (default: every row)")
    p.add_argument("--preset", default=d.preset, choices=["tiny", "full", "paper"],
                   help="architecture only: tiny (small random encoders, CPU, 64-d embeddings) or full (Swin-Tiny and a "
                   "Bio_ClinicalBERT-size text encoder, 512-d); 'paper' is a deprecated alias of full (the paper's "
                   "whole pipeline is --recipe paper)")
    p.add_argument("--image-model", default=None, help="timm model name, or with --image-library transformers a hub id or folder (default: swin_tiny_patch4_window7_224)")
    p.add_argument("--image-size", type=int, default=None, help="input image side in pixels (default: 224)")
    p.add_argument("--image-weights", default=None, help="local timm weights file for the image encoder (default: random init)")
    p.add_argument("--text-model", default=None, help="hub id (e.g. emilyalsentzer/Bio_ClinicalBERT) or local folder of a BERT-family model and its "
                   "tokenizer (default: the preset's BERT configuration, random init)")
    p.add_argument("--tokenizer", default=None, help="hub id or local folder of a tokenizer (default: the text model's, else built from the reports)")
    p.add_argument("--scales", default="-1", help="comma-separated encoder stages for the loss, e.g. 1,2,-1 for three Swin stages "
                   "(default: -1, the last)")
    p.add_argument("--embed-dim", type=int, default=None, help="projection size (default: 64 with --preset tiny, 512 "
                   "with full)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the manifest")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps (default: "
                   "--epochs full passes)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (cosine decay after warm-up)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="steps of linear learning-rate warm-up")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="gradient norm clipping threshold")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initialisation, data order and augmentation")
    p.add_argument("--no-gaze", action="store_true", help="train without the gaze terms (FILIP + mapping only)")
    p.add_argument("--loss-weights", default="1,1,1", help="weights of the contrastive, gaze MLCE and mapping terms, w_con,w_mlce,w_map")
    p.add_argument("--global-weight", type=float, default=d.global_weight, help="weight of a global CLIP term")
    p.add_argument("--alpha", type=float, default=None, help="weight of the MLCE directions (default: 0.5, or 0.8 "
                   "with --egma-compat)")
    p.add_argument("--egma-compat", action="store_true", help="reproduce the original EGMA code's loss")
    p.add_argument("--sigma", type=float, default=d.sigma, help="fixation Gaussian sigma, original-image pixels")
    p.add_argument("--min-heat", type=float, default=d.min_heat, help="patch gaze heat below this (of the map's "
                   "maximum) counts as none")
    p.add_argument("--raw-gaze", action="store_true",
                   help="REFLACX: detect fixations from gaze.csv (I-VT) instead of using fixations.csv")
    p.add_argument("--max-sentences", type=int, default=d.max_sentences, help="sentences kept per report")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader worker processes (-1: none "
                   "on the CPU, on a GPU the cores per process minus one, at most 8)")
    p.add_argument("--prefetch-factor", type=int, default=d.prefetch_factor, help="batches each worker loads ahead")
    p.add_argument("--pin-memory", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA")
    p.add_argument("--fresh-workers", action="store_true", help="start new DataLoader workers each epoch instead "
                   "of keeping them for the run")
    p.add_argument("--device", default=None, help="torch device (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints in <out>/checkpoint, "
                   "0 = only at the end")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint (an error when there is none; "
                   "options that change the model or the data must be the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--backend", default=None, help="egma_kernels backend (default: best available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--no-global-negatives", action="store_true",
                   help="under torchrun: each process's contrastive term over its own batch only (default: over every rank's batch)")
    p.add_argument("--profile-steps", type=int, default=d.profile_steps,
                   help="after one warm-up step, time and peak memory of each part of N steps (image encoder, text "
                        "encoder, loss forward, backward, optimiser) and images/s: a table on stderr and "
                        "<out>/step_profile.json; 0 = off")
    p.add_argument("--text-groups", type=int, default=None,
                   help="encode the sentences in G groups of similar length, each padded to its own longest "
                        "(the same embeddings to float rounding, less padding; 1 = one padded batch; ignored with "
                        "--text-pooling last4_all) (default: 1)")
    p.add_argument("--loss-dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="dtype of the normalised embeddings handed to the loss kernels; auto: the autocast dtype "
                        "(--amp) when autocast is on; the half-precision dtypes use the kernels' half-precision paths "
                        "at a cost in gradient accuracy measured in the README (default: float32)")
    p.add_argument("--grad-chunk-size", type=int, default=d.grad_chunk_size,
                   help="gradient caching: the encoders run K images at a time and the gradients equal the whole "
                        "batch's (large contrastive batches in little memory, one extra encoder forward pass); 0 = off")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="a batch whose loss or gradient norm is NaN/inf is skipped (counted as a step without an "
                        "update, logged) instead of stopping the run")
    p.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                   help="under torchrun: seconds a rank waits for the others in a collective before the run stops")
    _add_model_source_args(p)
    _add_recipe_args(p, d)
    return p


def _add_recipe_args(p: argparse.ArgumentParser, d: TrainArgs) -> None:
    """The recipe and the options it sets (egma_model.recipes; docs/recipes.md)."""
    from .recipes import BUILTIN_PROMPTS, RECIPES

    g = p.add_argument_group("recipe (docs/recipes.md)")
    g.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="every setting of a pipeline under one name (options given here win) (default: ours)")
    g.add_argument("--print-recipe", action="store_true", help="print the resolved settings and exit")
    g.add_argument("--patch-norm", default=None, choices=["post", "pre"],
                   help="last-stage patch tokens after (ours) or before the final LayerNorm (default: the recipe's, else post)")
    g.add_argument("--image-global", default=None, choices=["mean", "pooler"],
                   help="global image embedding: mean of projected patches (ours) or the projected pooled token "
                        "(default: the recipe's, else mean)")
    g.add_argument("--image-mean", type=float, default=None, help="image normalisation mean (default: the recipe's, else 0.449)")
    g.add_argument("--image-std", type=float, default=None, help="image normalisation std (default: the recipe's, else 0.226)")
    g.add_argument("--text-pooling", default=None, choices=["masked_mean", "last4_all"],
                   help="sentence embedding: masked mean of the last layer (ours) or mean of the last 4 layers "
                        "over all positions (default: the recipe's, else masked_mean)")
    g.add_argument("--max-length", type=int, default=None, help="tokens per sentence (default: the recipe's, else 64)")
    g.add_argument("--split-rule", default=d.split_rule, choices=["ours", "egma", "medclip"],
                   help="report -> sentences: ours (case kept), egma (numbered markers and '. ', lowercased, every "
                        "piece with a token: the authors' training dataset) or medclip (egma keeping pieces of more "
                        "than 4 tokens only)")
    g.add_argument("--text-padding", default=d.text_padding, choices=["max_length", "longest"],
                   help="with --text-pooling last4_all (a mean over every position, padding included): pad each "
                        "sentence to --max-length (its embedding does not depend on its batch) or to the batch's "
                        "longest sentence (the authors' collator); other poolings mask the padding")
    g.add_argument("--gaze-resize", default=d.gaze_resize, choices=["area", "bilinear_antialias"],
                   help="heatmaps onto the patch grid (labels are gaze > 0 after --min-heat)")
    g.add_argument("--temperature-clamp", default=None, choices=["at_use", "in_place"],
                   help="clamp the temperature to [1, 100] where it is used (ours) or in place on the parameter, as "
                        "the authors (default: the recipe's, else at_use)")
    g.add_argument("--decay-all", action=argparse.BooleanOptionalAction, default=d.decay_all,
                   help="weight decay on every parameter (1-D ones and the temperature too)")
    g.add_argument("--warmup-ratio", type=float, default=None, help="warm-up as a fraction of all steps (default: --warmup-steps)")
    g.add_argument("--warmup-epochs", type=float, default=None, help="warm-up in epochs (default: --warmup-steps)")
    g.add_argument("--warmup-rule", default=d.warmup_rule, choices=["ours", "transformers"],
                   help="ours: a warm-up ratio or epochs rounded to the nearest step, the ramp from lr/warmup at the "
                        "first step; transformers: rounded up, the ramp from lr 0 at the first step "
                        "(get_cosine_schedule_with_warmup, as the authors)")
    g.add_argument("--amp", default=d.amp, choices=["bf16", "fp16", "off"], help="autocast on CUDA")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every --save-every model as <out>/step-<n> (scorable later)")
    g.add_argument("--select-on", default=None, metavar="MANIFEST",
                   help="labelled manifest: zero-shot accuracy every --select-every steps, best kept as <out>/best "
                        "(labelled test-set selection when MANIFEST is a test set) (default: none, no selection)")
    g.add_argument("--select-every", type=int, default=d.select_every, help="steps between selection evaluations")
    g.add_argument("--select-prompts", default=None,
                   help=f"prompts JSON or a built-in set {list(BUILTIN_PROMPTS)} (default: none)")
    g.add_argument("--select-split", default=None, help="use only --select-on rows with this 'split' value (default: every row)")
    g.add_argument("--select-scoring", default=d.select_scoring, choices=["fine", "global"], help="zero-shot scoring of the selection")
    g.add_argument("--select-is-test", default=None, choices=["yes", "no"],
                   help="label the selection (default: yes when the rows' split is 'test' or the name says test/5x200)")


_RECIPE_FIELDS = ("patch_norm", "image_global", "image_mean", "image_std", "text_pooling", "max_length", "split_rule",
                  "text_padding", "warmup_rule",
                  "gaze_resize", "temperature_clamp", "decay_all", "warmup_ratio", "warmup_epochs", "amp",
                  "keep_checkpoints", "select_on", "select_every", "select_prompts", "select_split", "select_scoring")


def args_from_namespace(ns) -> TrainArgs:
    a = _args_from_namespace(ns)
    extra = {k: getattr(ns, k) for k in _RECIPE_FIELDS if hasattr(ns, k)}
    extra["recipe"] = getattr(ns, "recipe", None)
    sit = getattr(ns, "select_is_test", None)
    extra["select_is_test"] = None if sit is None else sit == "yes"
    a = dataclasses.replace(a, **extra)
    if a.preset == "paper":
        print("egma-train: warning: --preset paper is deprecated and sets the architecture only; it is now "
              "--preset full. For the paper's whole pipeline use --recipe paper (see --print-recipe).",
              file=sys.stderr)
        a = dataclasses.replace(a, preset="full")
    return a


def apply_recipe(a: TrainArgs, explicit: Dict):
    """``a`` with the recipe's settings where no option was given; returns ``(args, source)``."""
    from .recipes import TRAIN, resolve

    keys = list(TRAIN["ours"]) + ["warmup_steps"]
    defaults = {k: getattr(a, k) for k in keys}
    given = {k: getattr(a, k) for k in keys if k in explicit}
    settings, source = resolve(a.recipe, given, defaults)
    return dataclasses.replace(a, **settings), source


def recipe_text(a: TrainArgs, source: Dict) -> str:
    from .recipes import NOTES, TRAIN, format_settings

    keys = list(TRAIN["ours"]) + ["warmup_steps", "clip_grad", "sigma", "init_from"]
    return format_settings(f"egma-train settings (recipe: {a.recipe or 'none (ours)'})", dataclasses.asdict(a),
                           source, keys, NOTES.get(a.recipe or "ours", []))


def _args_from_namespace(ns) -> TrainArgs:
    return _with_model_source(ns, TrainArgs(
        manifest=ns.manifest, out=ns.out, split=ns.split, preset=ns.preset, image_model=ns.image_model,
        image_size=ns.image_size, image_weights=ns.image_weights, text_model=ns.text_model, tokenizer=ns.tokenizer,
        scales=tuple(int(x) for x in ns.scales.split(",")), embed_dim=ns.embed_dim, epochs=ns.epochs,
        max_steps=ns.max_steps, batch_size=ns.batch_size, lr=ns.lr, weight_decay=ns.weight_decay,
        warmup_steps=ns.warmup_steps, clip_grad=ns.clip_grad, seed=ns.seed, no_gaze=ns.no_gaze,
        loss_weights=tuple(_floats(ns.loss_weights)), global_weight=ns.global_weight, alpha=ns.alpha,
        egma_compat=ns.egma_compat, sigma=ns.sigma, min_heat=ns.min_heat, raw_gaze=ns.raw_gaze, max_sentences=ns.max_sentences,
        num_workers=ns.num_workers, pin_memory={"auto": None, "on": True, "off": False}[ns.pin_memory],
        prefetch_factor=ns.prefetch_factor, persistent_workers=not ns.fresh_workers, device=ns.device,
        save_every=ns.save_every, resume=ns.resume,
        progress=not ns.no_progress, backend=ns.backend, threads=ns.threads,
        global_negatives=not ns.no_global_negatives, profile_steps=ns.profile_steps,
        grad_chunk_size=ns.grad_chunk_size, text_groups=ns.text_groups,
        loss_dtype=ns.loss_dtype, skip_nonfinite=ns.skip_nonfinite, dist_timeout=ns.dist_timeout))


def _dist_errors() -> tuple:
    """The exceptions of torch.distributed's failures (timeouts, lost peers), where this torch has them."""
    import torch.distributed as dist

    err = getattr(dist, "DistError", None) if dist.is_available() else None
    return (err,) if err is not None else ()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    from .checkpoint import CheckpointError
    from .recipes import explicit_options
    from .textio import TextDecodeError

    a, source = apply_recipe(args_from_namespace(ns), explicit_options(parser, argv))
    if ns.print_recipe:
        print(recipe_text(a, source))
        return 0
    if not ns.manifest or not ns.out:
        parser.error("--manifest and --out are required")
    if a.recipe and int(os.environ.get("RANK", "0")) == 0:
        print(recipe_text(a, source), file=sys.stderr)
        if a.recipe != "ours" and not a.init_from:
            print(f"egma-train: warning: --recipe {a.recipe} without --init-from: the authors start from MedCLIP's "
                  f"weights; these encoders are not MedCLIP's", file=sys.stderr)
    if not a.dist_timeout > 0:
        parser.error(f"--dist-timeout must be positive, got {a.dist_timeout}")
    try:
        res = train(a)
    except (ManifestError, FileNotFoundError, TrainError, CheckpointError, TextDecodeError) as e:
        print(f"egma-train: error: {e}", file=sys.stderr)
        return 2
    except _dist_errors() as e:  # a rank stopped or hung: the collective gave up after --dist-timeout
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"egma-train: error: the process group failed (a rank stopped, or did not answer within "
              f"--dist-timeout {a.dist_timeout:g} s): {first}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": res["steps"], "final_loss": res["final_loss"],
                          "model": os.path.join(ns.out, "final")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
