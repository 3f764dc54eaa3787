"""Named recipes: every setting of a training and evaluation pipeline under one name.

``egma-train --recipe NAME`` and ``egma-eval --recipe NAME`` read the same table (``TRAIN``, ``EVAL``):

``ours``          this package's defaults (what you get without ``--recipe``).
``authors-code``  the authors' released code (MoMarky/EGMA): MedCLIP's transformers Swin at 256 px, patch tokens
                  before the final LayerNorm, the pooled token through the same bias-free projection, MedCLIP's
                  normalisation, their sentence rule, 77 tokens, all sentences, the last-4-layer text pooling,
                  antialiased bilinear gaze labels positive where > 0, the in-place temperature clamp with
                  weight decay on every parameter, the loss without the mapping term, 10 epochs, batch 40,
                  lr 1e-5, warm-up 10 % of the steps, fp16, checkpoint selection every 40 steps; zero-shot with
                  the global similarity, max over prompts, prompts not split into sentences.
``paper``         the NeurIPS 2024 paper's text where it differs from the code: 224 px, 50 epochs, lr 1e-6,
                  10 warm-up epochs, the mapping term trained, RSNA with 5 + 5 prompts; everything the paper
                  does not state is the code's.

An option given on the command line wins over the recipe; ``--print-recipe`` prints the resolved settings
(value and where each comes from) without training or evaluating. ``docs/recipes.md`` lists every difference
and why our default is what it is. The prompt sets here are ours, written from the rules the authors describe;
differently worded prompts will not reproduce the paper's numbers exactly.
"""

from __future__ import annotations

import json
import random
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["TRAIN", "EVAL", "NOTES", "RECIPES", "resolve", "format_settings", "builtin_prompts",
           "BUILTIN_PROMPTS", "explicit_options"]

RECIPES = ("ours", "authors-code", "paper")

_AUTHORS_CODE_TRAIN = dict(
    # model (saved in the checkpoint's egma_config.json)
    preset="full", image_library="transformers", image_size=256, patch_norm="pre", image_global="pooler",
    proj_bias=False, embed_dim=512, text_pooling="last4_all", max_length=77,
    # MedCLIP's constants (their constants.py IMG_MEAN / IMG_STD), not rounded
    image_mean=0.5862785803043838, image_std=0.27950088968644304,
    temperature_clamp="in_place", egma_compat=True,
    # loss terms (w_con, w_mlce, w_map): the released config's loss_mix is FILIP + MLCE, no mapping term
    loss_weights=(1.0, 1.0, 0.0),
    # data
    text_padding="longest",
    split_rule="egma", max_sentences=0, gaze_resize="bilinear_antialias", min_heat=0.0,
    # optimisation
    epochs=10, batch_size=40, lr=1e-5, weight_decay=1e-4, decay_all=True, warmup_ratio=0.1, warmup_epochs=None,
    warmup_rule="transformers", amp="fp16",
    # checkpoint selection (active with --select-on)
    select_every=40, select_prompts="chexpert-5x200-combos", select_scoring="global",
)

# Values of TrainArgs, by field name. "ours" lists the same keys with this package's defaults.
TRAIN: Dict[str, Dict] = {
    "ours": dict(
        preset="tiny", image_library=None, image_size=None, patch_norm=None, image_global=None, proj_bias=None,
        embed_dim=None, image_mean=None, image_std=None, text_pooling=None, max_length=None, temperature_clamp=None,
        egma_compat=False, loss_weights=(1.0, 1.0, 1.0), text_padding="max_length", split_rule="ours", max_sentences=16, gaze_resize="area", min_heat=0.1, epochs=1,
        batch_size=16, lr=1e-4, weight_decay=0.05, decay_all=False, warmup_ratio=None, warmup_epochs=None,
        warmup_rule="ours", amp="bf16", select_every=40, select_prompts=None, select_scoring="fine"),
    "authors-code": _AUTHORS_CODE_TRAIN,
    # the paper's loss has the cross-modality mapping term, the released config does not train it
    "paper": dict(_AUTHORS_CODE_TRAIN, image_size=224, epochs=50, lr=1e-6, warmup_ratio=None, warmup_epochs=10,
                  loss_weights=(1.0, 1.0, 1.0)),
}

# Evaluation settings: egma-eval's --scoring/--reduce, whether prompts are split into sentences, and the
# built-in prompt set per evaluation set of --paper-table.
EVAL: Dict[str, Dict] = {
    "ours": dict(scoring="fine,global", reduce="max", split_prompts=True,
                 prompts={"chexpert-5x200": "simple", "rsna": "simple", "siim": "simple"}),
    "authors-code": dict(scoring="global", reduce="max", split_prompts=False,
                         prompts={"chexpert-5x200": "chexpert-5x200-combos", "rsna": "rsna-50v5",
                                  "siim": "siim-5v5"}),
    "paper": dict(scoring="global", reduce="max", split_prompts=False,
                  prompts={"chexpert-5x200": "chexpert-5x200-combos", "rsna": "rsna-5v5", "siim": "siim-5v5"}),
}

NOTES: Dict[str, List[str]] = {
    "ours": [],
    "authors-code": [
        "give --init-from <MedCLIP-ViT pytorch_model.bin>: the authors start from MedCLIP's weights (both towers, "
        "projections, temperature); without it the encoders are MedCLIP's architecture with the hub's/random weights",
        "--select-on <CheXpert 5x200 manifest> reproduces their checkpoint choice, which is made on the test set "
        "itself (labelled 'test-set selection' in <out>/best/selection.json): numbers from it are optimistic",
        "their heatmap renderer is not released: fixation heatmaps stay ours (--sigma, duration weighting)",
        "EGMA's RSNA result (accuracy 76.97, F1 43.49) is what always predicting the majority class scores "
        "(F1 = a / (1 + a) at a = 0.7697); a correct evaluation need not reproduce it",
    ],
}
NOTES["paper"] = [
    "the paper does not state image normalisation, text pooling, batch size, precision or checkpoint choice: "
    "those are the authors' code's",
] + NOTES["authors-code"]


def _check(name: str) -> None:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; use one of {list(RECIPES)}")


_WARMUP = ("warmup_steps", "warmup_ratio", "warmup_epochs")


def resolve(name: Optional[str], explicit: Dict, defaults: Dict, table: Dict[str, Dict] = TRAIN
            ) -> Tuple[Dict, Dict[str, str]]:
    """Settings for a run: explicit options win, then the recipe, then ``defaults``.

    ``explicit``: the options the user gave (name -> value); ``defaults``: every setting's default.
    Returns ``(settings, source)`` with ``source[name]`` one of ``"option"``, ``"recipe <name>"``,
    ``"default"``. A warm-up given in any form on the command line replaces the recipe's warm-up.
    """
    out = dict(defaults)
    src = {k: "default" for k in defaults}
    if name:
        _check(name)
        recipe = table[name]
        warmup_given = any(k in explicit for k in _WARMUP)
        for k, v in recipe.items():
            if k in explicit or (warmup_given and k in _WARMUP):
                continue
            out[k] = v
            src[k] = f"recipe {name}"
    for k, v in explicit.items():
        out[k] = v
        src[k] = "option"
    return out, src


def explicit_options(parser, argv: Sequence[str]) -> Dict:
    """The options given on the command line (dest -> parsed value), defaults left out."""
    import argparse

    saved = []
    for act in parser._actions:
        saved.append((act, act.default, act.required))
        act.default = argparse.SUPPRESS
        act.required = False
    try:
        ns, _ = parser.parse_known_args(list(argv))
    finally:
        for act, d, r in saved:
            act.default, act.required = d, r
    return vars(ns)


def format_settings(title: str, settings: Dict, source: Dict[str, str], keys: Optional[Sequence[str]] = None,
                    notes: Sequence[str] = ()) -> str:
    """A plain-text table of settings with where each value comes from."""
    keys = list(keys) if keys is not None else list(settings)
    w = max(len(k) for k in keys) if keys else 0
    lines = [title]
    for k in keys:
        v = settings.get(k)
        lines.append(f"  {k:<{w}}  {json.dumps(v) if not isinstance(v, str) else v:<24}  ({source.get(k, 'default')})")
    if notes:
        lines.append("notes:")
        lines += [f"  - {n}" for n in notes]
    return "\n".join(lines)


# ------------------------------------------------------------------ built-in prompt sets (ours)

# CheXpert 5x200: each class's prompts are combinations of a severity, a finding phrase and a location,
# sampled without replacement (seeded). The vocabularies are ours.
_CHEXPERT_PARTS: Dict[str, Tuple[List[str], List[str], List[str]]] = {
    "Atelectasis": (
        ["", "minimal", "mild", "moderate", "patchy", "linear"],
        ["atelectasis", "subsegmental atelectasis", "plate-like atelectasis", "volume loss"],
        ["at the left lung base", "at the right lung base", "at both lung bases", "in the left lower lobe",
         "in the right middle lobe", "in the lingula"]),
    "Cardiomegaly": (
        ["", "mild", "moderate", "marked", "stable"],
        ["cardiomegaly", "enlargement of the cardiac silhouette", "enlarged heart", "increased heart size"],
        ["", "with a left ventricular configuration", "unchanged from the prior study", "on this frontal view",
         "with a widened mediastinum"]),
    "Consolidation": (
        ["", "small", "focal", "patchy", "dense", "multifocal"],
        ["consolidation", "airspace consolidation", "airspace opacity", "consolidative opacity"],
        ["in the right lower lobe", "in the left lower lobe", "in the right upper lobe", "in the left upper lobe",
         "in the lingula", "at the lung bases"]),
    "Edema": (
        ["", "mild", "moderate", "severe", "interstitial", "worsening"],
        ["pulmonary edema", "edema", "vascular congestion", "interstitial edema"],
        ["", "in both lungs", "with perihilar predominance", "with Kerley B lines", "bilaterally"]),
    "Pleural Effusion": (
        ["", "small", "trace", "moderate", "large", "loculated"],
        ["pleural effusion", "effusion", "pleural fluid", "layering pleural effusion"],
        ["on the left", "on the right", "bilaterally", "at the left costophrenic angle",
         "at the right costophrenic angle"]),
}

_PNEUMONIA_PARTS = (
    ["", "early", "multifocal", "patchy", "developing", "extensive", "lobar"],
    ["pneumonia", "opacity concerning for pneumonia", "consolidation consistent with pneumonia",
     "airspace disease compatible with infection", "infectious process"],
    ["in the right lower lobe", "in the left lower lobe", "in the right upper lobe", "in the left upper lobe",
     "in the lingula", "in the right middle lobe", "in both lungs"],
)
_NO_FINDING = ["no acute cardiopulmonary process", "the lungs are clear", "no focal consolidation",
               "normal chest radiograph", "no evidence of pneumonia"]
_PNEUMONIA_5 = ["pneumonia", "findings consistent with pneumonia", "focal consolidation concerning for pneumonia",
                "airspace opacity in keeping with pneumonia", "lobar pneumonia"]
_PNEUMOTHORAX_5 = ["pneumothorax", "there is a pneumothorax", "a small apical pneumothorax",
                   "a large pneumothorax with mediastinal shift", "visible pleural line with absent lung markings"]
_NO_PNEUMOTHORAX_5 = ["no pneumothorax", "the lungs are clear", "no acute cardiopulmonary process",
                      "normal chest radiograph", "no pleural abnormality"]


def _combos(parts, n: int, rng: random.Random) -> List[str]:
    sev, core, loc = parts
    allc = [" ".join(w for w in (s, c, l) if w) for s in sev for c in core for l in loc]
    allc = sorted(set(allc))
    return allc if len(allc) <= n else rng.sample(allc, n)


def builtin_prompts(name: str, *, n: int = 50, seed: int = 0) -> Dict[str, List[str]]:
    """A built-in prompt set ``{class: [prompts]}``:

    ``chexpert-5x200-combos``: per class ``n`` sampled severity x finding x location combinations;
    ``rsna-50v5``: ``n`` pneumonia combinations against 5 "no finding" phrases (the authors' code's sizes);
    ``rsna-5v5``, ``siim-5v5``: 5 + 5 phrases (the paper's sizes); ``simple``: see ``--paper-table``'s
    defaults (``egma_model.paper_table.DEFAULT_PROMPTS``, per set).
    """
    rng = random.Random(seed)
    if name == "chexpert-5x200-combos":
        return {c: _combos(p, n, rng) for c, p in _CHEXPERT_PARTS.items()}
    if name == "rsna-50v5":
        return {"Normal": list(_NO_FINDING), "Pneumonia": _combos(_PNEUMONIA_PARTS, n, rng)}
    if name == "rsna-5v5":
        return {"Normal": list(_NO_FINDING), "Pneumonia": list(_PNEUMONIA_5)}
    if name == "siim-5v5":
        return {"Normal": list(_NO_PNEUMOTHORAX_5), "Pneumothorax": list(_PNEUMOTHORAX_5)}
    raise ValueError(f"unknown built-in prompt set {name!r}; use one of {list(BUILTIN_PROMPTS)}")


BUILTIN_PROMPTS = ("chexpert-5x200-combos", "rsna-50v5", "rsna-5v5", "siim-5v5")


# Names that moved to the training side (egma_model.selection); kept importable from here for one release.
# importlib at attribute access, so that this settings module imports nothing above it.
_MOVED = {"CheckpointSelector": "egma_model.selection", "load_prompt_classes": "egma_model.selection"}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
