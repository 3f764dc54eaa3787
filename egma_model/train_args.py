"""The settings of a training run (``TrainArgs``, what ``egma-train``'s options resolve to) and its one error
type. Imports nothing from the house, so every training module can use both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


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
    overwrite: bool = False  # a new run may replace an earlier run's checkpoint and final model in --out


AMP_MODES = ("bf16", "fp16", "off")


def check_train_args(a: TrainArgs) -> None:
    """Raise ``TrainError`` naming the first setting no run can use (checked before the process group, the data
    and the model are set up, so that a typo costs no model load and writes nothing)."""
    import math

    def need(ok: bool, option: str, rule: str, value) -> None:
        if not ok:
            raise TrainError(f"{option} must be {rule}, got {value!r}")

    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    need(a.batch_size >= 1, "--batch-size", ">= 1", a.batch_size)
    need(a.epochs >= 0, "--epochs", ">= 0", a.epochs)
    need(a.max_steps is None or a.max_steps >= 0, "--max-steps", ">= 0", a.max_steps)
    need(finite(a.lr) and a.lr >= 0, "--lr", "a finite number >= 0", a.lr)
    need(finite(a.weight_decay) and a.weight_decay >= 0, "--weight-decay", "a finite number >= 0", a.weight_decay)
    need(a.warmup_steps >= 0, "--warmup-steps", ">= 0", a.warmup_steps)
    need(finite(a.clip_grad) and a.clip_grad >= 0, "--clip-grad", "a finite number >= 0 (0: off)", a.clip_grad)
    need(a.max_sentences >= 0, "--max-sentences", ">= 0 (0: all)", a.max_sentences)
    need(a.num_workers >= -1, "--num-workers", ">= -1 (-1: auto)", a.num_workers)
    need(a.prefetch_factor >= 1, "--prefetch-factor", ">= 1", a.prefetch_factor)
    need(a.save_every >= 0, "--save-every", ">= 0 (0: only at the end)", a.save_every)
    need(a.select_every >= 1, "--select-every", ">= 1", a.select_every)
    need(a.threads is None or a.threads >= 1, "--threads", ">= 1", a.threads)
    need(a.amp in AMP_MODES, "--amp", "one of " + ", ".join(AMP_MODES), a.amp)
    need(a.grad_chunk_size >= 0, "--grad-chunk-size", ">= 0 (0: off)", a.grad_chunk_size)
    need(a.profile_steps >= 0, "--profile-steps", ">= 0 (0: off)", a.profile_steps)
    need(finite(a.dist_timeout) and a.dist_timeout > 0, "--dist-timeout", "a finite number of seconds > 0",
         a.dist_timeout)
