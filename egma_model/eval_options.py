"""The evaluation options and settings that ``egma-eval`` and ``egma-eval --paper-table`` share: the scoring
and encoding options, the table's set options, and the recipe resolution of the evaluation settings.

Below both ``evaluate`` and ``paper_table``; it imports only the recipes.
"""

from __future__ import annotations

import argparse
from typing import Dict, Optional

from .recipes import EVAL, NOTES, explicit_options, format_settings, resolve


def resolve_eval(recipe: Optional[str], parser, argv):
    """Evaluation settings: options given > the recipe (``egma_model.recipes.EVAL``) > ours."""
    given = explicit_options(parser, argv)
    explicit = {k: given[k] for k in ("scoring", "reduce", "split_prompts") if k in given}
    settings, source = resolve(recipe, explicit, dict(EVAL["ours"]), EVAL)
    settings["prompts_from_option"] = "prompts" in given
    if "prompts" in given:
        settings["prompts"], source["prompts"] = given["prompts"], "option"
    return settings, source


def eval_recipe_text(recipe: Optional[str], settings: Dict, source: Dict) -> str:
    return format_settings(f"egma-eval settings (recipe: {recipe or 'none (ours)'})", settings, source,
                           ["scoring", "reduce", "split_prompts", "prompts"], NOTES.get(recipe or "ours", [])[-1:])


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """The scoring and encoding options that ``egma-eval`` and ``egma-eval --paper-table`` share."""
    p.add_argument("--scoring", default="fine,global", help="comma-separated scorings: fine (FILIP late interaction), global (pooled)")
    p.add_argument("--reduce", default="max", choices=["max", "mean"], help="how a class's score combines its prompts' scores")
    p.add_argument("--split-prompts", action=argparse.BooleanOptionalAction, default=True,
                   help="split each prompt into sentences first (ours); --no-split-prompts as the authors (default: split)")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved settings and exit")
    p.add_argument("--fractions", default="0.01,0.1,1", help="linear-probe label fractions")
    p.add_argument("--seeds", default="0,1,2", help="linear-probe seeds")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoding batch")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader processes that load and preprocess "
                   "the images while the model encodes")
    p.add_argument("--device", default=None, help="torch device (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# The evaluation sets of the table: egma-eval's --help lists them too (egma_model.eval_cli.build_parser).
SET_OPTIONS = (
    ("--chexpert-5x200", "manifest from egma-prepare chexpert-5x200 (default: none)"),
    ("--rsna", "manifest from egma-prepare rsna (test rows; train rows for the probe) (default: none)"),
    ("--siim", "manifest from egma-prepare siim (test rows; train rows for the probe) (default: none)"),
    ("--chexpert", "manifest from egma-prepare chexpert (its train rows -> its test rows) for the CheXpert probe "
                   "(default: none)"),
    ("--chexpert-train", "labelled CheXpert manifest for the probe's training side (default: none)"),
    ("--chexpert-test", "labelled CheXpert manifest for the probe's test side (default: none)"),
)


def add_set_options(p) -> None:
    """The table's evaluation sets (``SET_OPTIONS``) on a parser or argument group."""
    for flag, text in SET_OPTIONS:
        p.add_argument(flag, default=None, help=text)
