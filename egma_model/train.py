"""Training: ``train(TrainArgs)`` runs the loop (``_Trainer``, whose ``run`` reads top to bottom, one named step a
line) on the model and data the settings name.

Around it: ``egma_model.train_cli`` (``egma-train``: options, recipes), ``egma_model.train_args`` (the settings),
``egma_model.distributed_setup`` (the process group, the global-batch sampler, the ranks' agreement),
``egma_model.train_state`` (checkpoints, resume checks, the log) and ``egma_model.selection`` (checkpoint
selection). ``python -m egma_model.train`` and the names that lived here stay (aliases for one release).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from egma_kernels.cli_support import progress_bar
from egma_kernels.distributed import loss_group

from . import gradcache  # gradcache's functions looked up at call time (a test counts them)
from .data import Collator, EGMADataset, GazeOptions, ManifestError, load_manifest
from .distributed_setup import START_FACTS, Distributed, GlobalBatchSampler, agree_at_start, crc
from .model import EGMAConfig, EGMAModel
from .selection import CheckpointSelector
from .step_profile import StepProfiler
from .tokenizer import build_word_tokenizer, load_tokenizer
from .train_args import TrainArgs, TrainError, check_train_args
from .train_state import (STATE_NAME, RunLog, check_resume, data_digest,  # noqa: F401  (STATE_NAME: public)
                          find_resume_checkpoint, jsonable, load_training_state, refuse_to_replace_a_run,
                          remove_earlier_run, save_checkpoint, set_rng_state, truncate_log)

__all__ = ["TrainArgs", "TrainError", "train", "main", "cosine_with_warmup", "set_seed"]


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
    except MedCLIPInitError as e:  # a TrainError, so that under torchrun the ranks' start-up agreement sees it
        raise TrainError(str(e)) from None
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank loads; rank 0 reports
        return
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "init_report.json"), "w") as f:
        json.dump(rep, f, indent=2)
    print(f"egma-train: initialised from {a.init_from}: {len(rep['loaded'])} tensors loaded, "
          f"{len(rep['missing'])} missing (kept as initialised): {rep['missing']}, "
          f"{len(rep['unused'])} unused: {sorted(rep['unused'])}", file=sys.stderr)


def train(a: TrainArgs, *, records=None, model: Optional[EGMAModel] = None, tokenizer=None,
          cache: Optional[Dict] = None) -> Dict:
    """Run training; returns a summary ``{"steps", "final_loss", "history", "out"}``.

    ``records``/``model``/``tokenizer`` may be passed in (the demo does); otherwise they come from ``a``.
    ``cache``: a dict shared by runs over the same records and gaze settings (sentences and gaze computed once);
    only DataLoader workers' own copies fill it when ``a.num_workers`` gives workers (on a GPU by default).
    """
    check_train_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    set_seed(a.seed)
    ddp = Distributed(a)
    try:
        return _Trainer(a, ddp, cache).run(records, model, tokenizer)
    finally:
        ddp.close()


def _setup(a: TrainArgs, ddp: Distributed, records, model, tokenizer):
    """Records, model, tokenizer and the checkpoint to resume from (``None``: a new run)."""
    ckpt_dir = os.path.join(a.out, "checkpoint")
    src = find_resume_checkpoint(ckpt_dir) if a.resume else None
    if not a.resume and not a.overwrite:
        refuse_to_replace_a_run(a.out)
    if records is None:
        records = load_manifest(a.manifest, split=a.split, split_rule=a.split_rule)
    if not records:
        raise ManifestError(f"{a.manifest}: no rows to train on")
    if src is not None:
        model = EGMAModel.from_pretrained(src, verify=False)  # find_resume_checkpoint verified every file
        tokenizer = load_tokenizer(os.path.join(src, "tokenizer"))
    elif model is None or tokenizer is None:
        model, tokenizer = build_model_and_tokenizer(a, [s for r in records for s in r.sentences])
    return records, model, tokenizer, src


class _Trainer:
    """One training run on this rank, from the records to the final model. ``run`` reads top to bottom: each
    line is a named step, in the order the run takes them (the order matters: a resumed run restores every
    RNG after the data and the optimiser are built, and repeats the uninterrupted run's draws exactly)."""

    def __init__(self, a: TrainArgs, ddp: Distributed, cache: Optional[Dict]):
        self.a, self.ddp, self.cache = a, ddp, cache
        self.device = ddp.device
        self.ckpt_dir = os.path.join(a.out, "checkpoint")
        self.log_path = os.path.join(a.out, "log.jsonl")
        self.skipped = 0

    def run(self, records, model, tokenizer) -> Dict:
        self._plan(records, model, tokenizer)
        self._open_run()
        self._build_data()
        self._build_optimiser()
        self._build_precision()
        self._build_selector()
        self._restore_state()
        self._wrap_for_ranks()
        self._open_reporting()
        self.model.train()
        self.t0 = time.time()
        self.t_data = time.perf_counter()
        while self.step < self.total:
            self._run_epoch()
        return self._finish()

    # ------------------------------------------------------------------------------------------- before the loop

    def _plan(self, records, model, tokenizer) -> None:
        """Records, model, tokenizer, the checkpoint to resume from, the steps; under torchrun the ranks agree
        on them (a rank that failed here makes every rank stop)."""
        a, ddp = self.a, self.ddp
        error, self.src = None, None
        try:
            self.records, self.model, self.tokenizer, self.src = _setup(a, ddp, records, model, tokenizer)
        except Exception as e:  # raised after the ranks' start-up exchange, so that no rank waits for it
            if ddp.world == 1:
                raise
            error = e
        if error is None:
            self.steps_per_epoch = max(1, len(self.records) // (a.batch_size * ddp.world))  # full global batches only
            self.total = a.max_steps or self.steps_per_epoch * a.epochs
            facts = dict(zip(START_FACTS, self._start_facts()))
        else:
            facts = dict.fromkeys(START_FACTS, 0)  # the same row length on every rank; the failure flag says why
        if ddp.world > 1:
            agree_at_start(ddp, error, facts)
        if self.total <= 0:
            raise TrainError(f"--max-steps/--epochs give {self.total} steps; nothing to train")

    def _start_facts(self) -> tuple:
        args = {k: v for k, v in jsonable(self.a).items() if k not in ("device", "threads")}
        return (len(self.records), self.steps_per_epoch, self.total, len(self.tokenizer),
                crc(self.model.config.to_dict()), crc(args), int(self.src is not None))

    def _open_run(self) -> None:
        """The output folder, the run's record (options and data digest), and the saved state of a resumed run
        (options it may change are reported)."""
        a = self.a
        os.makedirs(a.out, exist_ok=True)
        if a.overwrite and self.src is None and self.ddp.is_main:
            remove_earlier_run(a.out)  # after the ranks agreed to start: a later --resume cannot pick it up
        data = data_digest(a, self.records)
        self.run_info = {"args": jsonable(a), "data": data}
        self.saved_state = None
        if self.src is not None:
            saved_run, self.saved_state = load_training_state(self.src)
            for w in check_resume(a, saved_run, data, self.src):
                if self.ddp.is_main:
                    print(f"egma-train: warning: --resume with a changed option, in effect from step "
                          f"{self.saved_state['step'] + 1}: {w}", file=sys.stderr)

    def _build_data(self) -> None:
        """The model on its device, the dataset, this rank's sampler and the run's one loader."""
        a, model = self.a, self.model
        model.to(self.device)
        gg = model.gaze_grid
        self.ds = EGMADataset(self.records, image_size=model.config.image_size, grid=gg, train=True,
                              max_sentences=a.max_sentences, use_gaze=not a.no_gaze, seed=a.seed,
                              gaze_options=GazeOptions(sigma=a.sigma, min_heat=a.min_heat, use_raw_gaze=a.raw_gaze,
                                                       resize=a.gaze_resize), cache=self.cache,
                              image_mean=model.config.image_mean, image_std=model.config.image_std,
                              split_rule=a.split_rule)
        collate = Collator(self.tokenizer, max_length=model.config.max_length, num_patches=gg[0] * gg[1],
                           pad_to_max_length=pads_to_max_length(model.config.text_pooling, a.text_padding))
        self.sampler = GlobalBatchSampler(len(self.ds), a.batch_size, self.ddp.rank, self.ddp.world, a.seed,
                                          tag_epoch=True)
        # one loader for the run; its own generator: creating it draws nothing from the global RNG, which a resumed
        # run restores to the state after its last step
        self.loader_kw = loader_settings(a, self.device, self.ddp.world)
        self.loader = DataLoader(self.ds, batch_size=a.batch_size, sampler=self.sampler, collate_fn=collate,
                                 generator=torch.Generator().manual_seed(a.seed), **self.loader_kw)

    def _build_optimiser(self) -> None:
        """AdamW (1-D parameters and the temperature without weight decay unless --decay-all) and the warm-up
        then cosine schedule."""
        a, total = self.a, self.total
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if (p.ndim < 2 or n == "logit_scale") and not a.decay_all else decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=a.lr)
        warmup = resolve_warmup(a, total, self.steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: cosine_with_warmup(s, total, warmup,
                                                                                              rule=a.warmup_rule))

    def _build_precision(self) -> None:
        """Autocast (CUDA only) and the gradient scaler (fp16 only)."""
        a = self.a
        self.use_amp = self.device.type == "cuda" and a.amp != "off"
        self.amp_dtype = torch.float16 if a.amp == "fp16" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and a.amp == "fp16")

    def _build_selector(self) -> None:
        self.selector = None
        if self.a.select_on and self.ddp.is_main:
            self.selector = CheckpointSelector(self.a, self.tokenizer)

    def _restore_state(self) -> None:
        """A resumed run's optimiser, scheduler, scaler, step, history and every RNG; its log cut to that step."""
        self.step = 0
        self.history: List[Dict] = []
        s = self.saved_state
        if s is None:
            return
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        if s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        self.step = int(s["step"])
        self.history = list(s.get("history", []))
        set_rng_state(s["rng"], self.device)
        if self.ddp.is_main:
            truncate_log(self.log_path, self.step)

    def _wrap_for_ranks(self) -> None:
        """Under torchrun: DDP, or with gradient caching equal parameters on every rank; the loss calls run
        over the group (global negatives) unless turned off."""
        a, ddp, model = self.a, self.ddp, self.model
        self.net = model
        if ddp.world > 1 and a.grad_chunk_size:
            # gradient caching runs the encoders outside one forward call: no DDP wrapper; the parameters start
            # equal on every rank and the gradients are averaged after each backward pass
            gradcache.broadcast_parameters(model)
        elif ddp.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None)
        self.group = ddp.group if a.global_negatives else None

    def _open_reporting(self) -> None:
        """The log (rank 0), the progress bar (rank 0), the running loss terms and the step profiler."""
        a, ddp = self.a, self.ddp
        self.log = RunLog(self.log_path, fresh=self.saved_state is None) if ddp.is_main else None
        self.bar = (progress_bar(total=self.total, initial=self.step, desc="egma-train", enabled=a.progress)
                    if ddp.is_main else None)  # None without tqdm
        self.running: Dict[str, float] = {}
        self.prof = StepProfiler(a.profile_steps, self.device) if a.profile_steps else None

    # ------------------------------------------------------------------------------------------- the loop

    def _run_epoch(self) -> None:
        a, spe = self.a, self.steps_per_epoch
        epoch = self.step // spe
        self.sampler.set_epoch(epoch, start_batch=self.step - epoch * spe)
        batches = 0
        for batch in self.loader:
            if self.step >= self.total or self.step - epoch * spe >= spe:
                break
            batches += 1
            self._train_step(batch, epoch)
            self.t_data = time.perf_counter()
        if not batches:
            raise TrainError(f"epoch {epoch} gave no batch ({len(self.ds)} rows, batch size {a.batch_size}); "
                             f"nothing to train on")

    def _train_step(self, batch: Dict, epoch: int) -> None:
        profiling = self._begin_profiled_step()
        part = self.prof.part if profiling else _no_part
        batch = {k: v.to(self.device, non_blocking=self.loader_kw["pin_memory"]) for k, v in batch.items()}
        self.opt.zero_grad(set_to_none=True)
        out = self._forward_backward(batch, part)
        values, means, skipped_why = self._optimiser_step(out, part)
        self.sched.step()
        self.step += 1
        if profiling:
            self._end_profiled_step()
        self._record(values, means, skipped_why, epoch)
        self._after_step()

    def _begin_profiled_step(self) -> bool:
        prof = self.prof
        if prof is None or prof.done:
            return False
        prof.begin_step()
        prof.add_time("data", time.perf_counter() - self.t_data)
        self.model.part_timer = prof
        return True

    def _end_profiled_step(self) -> None:
        self.prof.end_step(self.a.batch_size * self.ddp.world)
        self.model.part_timer = None
        if self.prof.done:
            _report_profile(self.prof, self.a, self.ddp, self.model.config)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def _forward_backward(self, batch: Dict, part) -> Dict[str, torch.Tensor]:
        """The loss terms of the batch, their gradients in the parameters (gradient caching: chunk by chunk)."""
        if self.a.grad_chunk_size:
            with loss_group(self.group):
                out = gradcache.grad_cache_step(self.model, batch, self.a.grad_chunk_size,
                                                scale_loss=self.scaler.scale, part=part,
                                                forward_context=self._autocast)
            if self.ddp.world > 1:
                with part("backward"):
                    gradcache.average_gradients(self.model.parameters())
            return out
        with self._autocast(), loss_group(self.group):
            out = self.net(batch)
        with part("backward"):
            self.scaler.scale(out["loss"]).backward()
        return out

    def _optimiser_step(self, out: Dict[str, torch.Tensor], part):
        """Clip, check every term is finite on every rank, step (or skip the batch with --skip-nonfinite);
        returns ``(the scalar terms and grad_norm as numbers (one host read), the terms' means over the ranks,
        why the batch was skipped or None)``; the means and the check share one all_reduce."""
        a, scaler, opt = self.a, self.scaler, self.opt
        with part("optimizer"):
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.clip_grad) if a.clip_grad > 0 else None
            values = _host_values(out, gnorm)
            bad = [f"{k}={v}" for k, v in values.items() if not math.isfinite(v)
                   and not (k == "grad_norm" and scaler.is_enabled())]  # fp16's scaler handles inf gradients
            skipped_why = None
            means, all_finite = self.ddp.mean_and_all_true({k: v for k, v in values.items() if k != "grad_norm"},
                                                           not bad)
            if not all_finite:
                skipped_why = _nonfinite_message(self.step + 1, bad)
                if not a.skip_nonfinite:
                    raise TrainError(f"{skipped_why}; stopped before the optimiser step, nothing saved from it "
                                     f"(--skip-nonfinite skips such batches instead)")
            if skipped_why is None:
                scaler.step(opt)
            else:  # the batch counts as a step (the data order and schedule go on) without an update
                opt.zero_grad(set_to_none=True)
            scaler.update()  # also after a skip: fp16's scale comes down and its per-step state is reset
            if skipped_why is not None:
                self.skipped += 1
                if self.ddp.is_main:
                    print(f"egma-train: warning: {skipped_why}; batch skipped", file=sys.stderr)
        return values, means, skipped_why

    def _record(self, values: Dict[str, float], means: Dict[str, float], skipped_why: Optional[str],
                epoch: int) -> None:
        """The step's record (loss terms averaged over the ranks) in the history, the log and the bar."""
        rec = {"step": self.step, "epoch": epoch, "lr": self.opt.param_groups[0]["lr"], **means}
        if "grad_norm" in values:
            rec["grad_norm"] = values["grad_norm"]
        if skipped_why is not None:
            rec["skipped_batch"] = skipped_why
        rec["time_s"] = round(time.time() - self.t0, 3)
        self.history.append(rec)
        if self.log is not None:
            self.log.append(rec)
        for k in ("loss", "contrastive", "gaze_mlce", "mapping"):
            self.running[k] = rec[k] if k not in self.running else 0.9 * self.running[k] + 0.1 * rec[k]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k[:4]: f"{v:.3f}" for k, v in self.running.items()}, refresh=False)

    def _after_step(self) -> None:
        """The periodic checkpoint (and kept model), and the checkpoint selection's evaluation."""
        a, step = self.a, self.step
        if a.save_every and step % a.save_every == 0 and step < self.total:
            self._checkpoint(step, keep=a.keep_checkpoints)
        if self.selector is not None and (step % a.select_every == 0 or step == self.total):
            with torch.random.fork_rng(devices=[]):  # its DataLoader's seed draw leaves the run's RNG as it was
                sel = self.selector.check(self.model, step, self.device)
            if self.log is not None:
                self.log.append({"step": step, "selection": sel})
            self.model.train()

    def _checkpoint(self, at: int, keep: bool = False) -> None:
        """The training checkpoint at step ``at`` and, with ``keep``, the model as ``step-<at>`` (rank 0
        writes; every rank stops if it could not, whatever the error)."""
        err = None
        if self.ddp.is_main:
            try:
                save_checkpoint(self.model, self.tokenizer, self.opt, self.sched, self.scaler, at, self.history,
                                self.ckpt_dir, self.run_info, self.device)
                if keep:
                    self.model.save_pretrained(os.path.join(self.a.out, f"step-{at}"), tokenizer=self.tokenizer,
                                               step=at)
            except Exception as e:  # re-raised below on rank 0, after the other ranks have heard of it
                err = e
        if not self.ddp.all_true(err is None):
            raise err or TrainError(f"rank 0 could not write the checkpoint at step {at} (see its error)")

    # ------------------------------------------------------------------------------------------- after the loop

    def _finish(self) -> Dict:
        """The profiler and bar closed, the last checkpoint, the final model, the selection's record and the
        resolved settings; every rank returns once they are written."""
        a, ddp, prof = self.a, self.ddp, self.prof
        if prof is not None:
            prof.close()
            if not prof.done and ddp.is_main:
                print(f"egma-train: --profile-steps {a.profile_steps}: the run ended after {len(prof.records)} "
                      f"profiled steps (plus the warm-up); nothing written", file=sys.stderr)
        if self.bar is not None:
            self.bar.close()
        self._checkpoint(self.step)
        if ddp.is_main:
            self.model.save_pretrained(os.path.join(a.out, "final"), tokenizer=self.tokenizer, step=self.step)
            if self.selector is not None:
                self.selector.finish()
            with open(os.path.join(a.out, "train_args.json"), "w") as f:  # the resolved settings
                json.dump(dataclasses.asdict(a), f, indent=2, default=list)
        ddp.barrier()  # every rank returns once the final model is written
        history = self.history
        return {"steps": self.step, "final_loss": history[-1]["loss"] if history else None, "history": history,
                "out": a.out, "model": self.model, "tokenizer": self.tokenizer, "skipped_batches": self.skipped}


def _host_values(out: Dict[str, torch.Tensor], gnorm: Optional[torch.Tensor]) -> Dict[str, float]:
    """The scalar loss terms (and the gradient norm, when clipping computed it) as numbers: one host read."""
    names = [k for k, v in out.items() if v.dim() == 0]
    tensors = [out[k].detach().double() for k in names]
    if gnorm is not None:
        names.append("grad_norm")
        tensors.append(gnorm.detach().double())
    return dict(zip(names, torch.stack(tensors).tolist())) if tensors else {}


def _nonfinite_message(step: int, bad: List[str]) -> str:
    if not bad:
        return f"step {step}: another rank's loss or gradient is not finite"
    return f"step {step}: non-finite {', '.join(bad)}"


def _no_part(name):
    return contextlib.nullcontext()


def _report_profile(prof, a: TrainArgs, ddp: Distributed, config: EGMAConfig) -> None:
    """Rank 0 prints the step profile's table and writes it as ``<out>/step_profile.json``."""
    if not ddp.is_main:
        return
    from .step_profile import format_table

    s = prof.write(os.path.join(a.out, "step_profile.json"), preset=a.preset, batch_size=a.batch_size,
                   world=ddp.world, grad_chunk_size=a.grad_chunk_size, amp=a.amp, text_groups=config.text_groups,
                   loss_dtype=config.loss_dtype, image_model=config.image_model, image_size=config.image_size)
    print(format_table(s), file=sys.stderr)


# egma-train's command line moved to egma_model.train_cli (above this module); its names stay importable from
# here for one release, through importlib so that no import points back up.
_MOVED = {name: "egma_model.train_cli" for name in ("main", "build_parser", "args_from_namespace", "apply_recipe",
                                                     "recipe_text")}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # pragma: no cover (python -m egma_model.train, as under torchrun)
    sys.exit(__getattr__("main")())
