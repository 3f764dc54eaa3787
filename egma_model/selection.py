"""Checkpoint selection during training: zero-shot accuracy on a labelled manifest every ``select_every``
steps, the best model kept in ``<out>/best`` (``egma-train --select-on``).

It belongs to training (it runs an evaluation while training), above ``evaluate`` and ``recipes``; the
recipes stay settings that import nothing from the model layer.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional

from .data import EGMADataset, load_manifest
from .evaluate import encode_dataset, load_prompts, zero_shot
from .recipes import BUILTIN_PROMPTS, EVAL, builtin_prompts


def load_prompt_classes(spec: str) -> Dict[str, List[str]]:
    """``{class: [prompts]}`` from a built-in set name or a prompts JSON file (``{"classes": {...}}``)."""
    if spec in BUILTIN_PROMPTS:
        return builtin_prompts(spec)
    return load_prompts(spec)["classes"]


def _looks_like_test_set(path: str, records) -> bool:
    base = os.path.basename(path).lower()
    return any(r.split == "test" for r in records) or "test" in base or "5x200" in base


class CheckpointSelector:
    """Zero-shot accuracy on a labelled manifest every ``select_every`` steps; the best model is kept in
    ``<out>/best`` with ``selection.json`` (step, accuracy, manifest, and whether this is test-set selection).

    When the manifest is the test set the kept model is chosen on the data it is scored on: the file says so
    (``"selection": "test-set selection"``) and the numbers from it are optimistic, as the authors' are."""

    def __init__(self, a, tokenizer):
        self.a, self.tokenizer = a, tokenizer
        if not a.select_prompts:
            raise ValueError("--select-on needs --select-prompts (a prompts JSON or a built-in set: "
                             f"{list(BUILTIN_PROMPTS)})")
        self.prompts = load_prompt_classes(a.select_prompts)
        recs = load_manifest(a.select_on, split=a.select_split)
        classes = list(self.prompts)
        for r in recs:  # rows outside the prompt classes are not scored
            r.labels = [c for c in r.labels if c in classes]
        self.records = recs
        self.classes = classes
        self.is_test = a.select_is_test if a.select_is_test is not None else _looks_like_test_set(a.select_on, recs)
        self.label = ("test-set selection: chosen on the set it is evaluated on, numbers are optimistic"
                      if self.is_test else "validation-set selection")
        # prompts are split into sentences as the recipe's evaluation does (ours: yes; the authors': no)
        self.split_prompts = EVAL[a.recipe]["split_prompts"] if a.recipe else True
        self.best: Optional[Dict] = None
        self.history: List[Dict] = []
        prev = os.path.join(a.out, "best", "selection.json")
        if a.resume and os.path.isfile(prev):  # a resumed run competes with the model already kept
            with open(prev) as f:
                d = json.load(f)
            self.best, self.history = d.get("best"), d.get("history", [])

    def check(self, model, step: int, device) -> Dict:
        ds = EGMADataset(self.records, image_size=model.config.image_size, grid=model.grid,
                         classes=self.classes, use_gaze=False, image_mean=model.config.image_mean,
                         image_std=model.config.image_std)
        imgs = encode_dataset(model, ds, device=device, progress=False)
        z = zero_shot(model, self.tokenizer, imgs, self.prompts, self.classes, scoring=self.a.select_scoring,
                      reduce="max", split_prompts=self.split_prompts)
        rec = {"step": step, "accuracy": z["accuracy"], "macro_f1": z["macro_f1"], "n_images": z["n_images"]}
        self.history.append(rec)
        if self.best is None or rec["accuracy"] > self.best["accuracy"]:
            self.best = rec
            out = os.path.join(self.a.out, "best")
            model.save_pretrained(out, tokenizer=self.tokenizer, extra=self._write, kind="model")
        return dict(rec, best_step=self.best["step"])

    def _write(self, out: str) -> None:
        """``selection.json`` in ``out``, replaced whole (a kill leaves the previous one)."""
        path = os.path.join(out, "selection.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"selection": self.label, "is_test_set": self.is_test, "manifest": self.a.select_on,
                       "prompts": self.a.select_prompts, "scoring": self.a.select_scoring,
                       "best": self.best, "history": self.history}, f, indent=2)
        os.replace(path + ".tmp", path)

    def finish(self) -> None:
        if self.best is None:
            return
        self._write(os.path.join(self.a.out, "best"))
        print(f"egma-train: kept step {self.best['step']} (accuracy {self.best['accuracy']:.4f}) in "
              f"{os.path.join(self.a.out, 'best')}: {self.label}", file=sys.stderr)
