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
import dataclasses
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from egma_kernels.cli_support import HelpFormatter  # says each option's default once

from .checkpoint import CheckpointError
from .data import ManifestError
from .distributed_setup import dist_errors
from .recipes import BUILTIN_PROMPTS, NOTES, RECIPES, TRAIN, explicit_options, format_settings, resolve
from .textio import TextDecodeError
from .train import TrainArgs, TrainError, train

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


def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",")]


def build_parser() -> argparse.ArgumentParser:
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
    _add_gaze_and_data_args(p, d)
    _add_run_args(p, d)
    _add_model_source_args(p)
    _add_recipe_args(p, d)
    return p


def _add_gaze_and_data_args(p: argparse.ArgumentParser, d: TrainArgs) -> None:
    """The loss terms, the gaze heatmaps and the data loader."""
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


def _add_run_args(p: argparse.ArgumentParser, d: TrainArgs) -> None:
    """Where and how the run goes: device, checkpoints, resume, threads, ranks, profiling, memory, faults."""
    p.add_argument("--device", default=None, help="torch device (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints in <out>/checkpoint, "
                   "0 = only at the end")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint (an error when there is none; "
                   "options that change the model or the data must be the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out that holds an earlier "
                   "run's checkpoint or final model, replacing them (without it, such an --out is refused)")
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


def _add_recipe_args(p: argparse.ArgumentParser, d: TrainArgs) -> None:
    """The recipe and the options it sets (egma_model.recipes; docs/recipes.md)."""
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
    keys = list(TRAIN["ours"]) + ["warmup_steps"]
    defaults = {k: getattr(a, k) for k in keys}
    given = {k: getattr(a, k) for k in keys if k in explicit}
    settings, source = resolve(a.recipe, given, defaults)
    return dataclasses.replace(a, **settings), source


def recipe_text(a: TrainArgs, source: Dict) -> str:
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
        loss_dtype=ns.loss_dtype, skip_nonfinite=ns.skip_nonfinite, dist_timeout=ns.dist_timeout,
        overwrite=ns.overwrite))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
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
    try:
        res = train(a)
    except (ManifestError, FileNotFoundError, TrainError, CheckpointError, TextDecodeError) as e:
        print(f"egma-train: error: {e}", file=sys.stderr)
        return 2
    except dist_errors() as e:  # a rank stopped or hung: the collective gave up after --dist-timeout
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
