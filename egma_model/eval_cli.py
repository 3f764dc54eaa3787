"""``egma-eval``: evaluate a checkpoint on one manifest (``egma_model.evaluate``), or with ``--paper-table`` the
paper's whole table (``egma_model.paper_table``). The command line sits above both, so neither imports the
other's front end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from egma_kernels.cli_support import HelpFormatter  # says each option's default once

from .data import ManifestError
from .eval_options import SET_OPTIONS, add_eval_options, add_set_options, eval_recipe_text, resolve_eval
from .evaluate import (TASKS, EvalInputError, _check_device, _check_writable, _numbers, _one_line, default_out,
                       evaluate, format_summary)
from .paper_table import main as paper_table_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="egma-eval", description="Evaluate an EGMA checkpoint (zero-shot, retrieval, "
                                "linear probe) on one manifest, or with --paper-table the paper's whole table",
                                formatter_class=HelpFormatter,
                                epilog="--paper-table with its sets runs the paper's table instead; "
                                       "'egma-eval --paper-table --help' lists its options alone.")
    p.add_argument("--checkpoint", default=None, help="folder written by egma-train (<out>/final) (default: none; required unless --print-recipe)")
    p.add_argument("--manifest", default=None, help="test manifest with labels (default: none; required unless --print-recipe or --paper-table)")
    p.add_argument("--split", default=None, help="use only manifest rows with this 'split' value (default: every row)")
    p.add_argument("--prompts", default=None, help="JSON with class prompts and optional retrieval queries; needed by zeroshot and "
                   "retrieval (default: none)")
    p.add_argument("--tasks", default="zeroshot,retrieval", help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--train-manifest", default=None, help="labelled training manifest for the linear probe, needed by probe "
                   "(default: none)")
    p.add_argument("--train-split", default=None, help="use only --train-manifest rows with this 'split' value "
                   "(default: every row)")
    p.add_argument("--recipe", default=None, choices=["ours", "authors-code", "paper"],
                   help="scoring, reduce and prompt splitting of a recipe (docs/recipes.md); options given win (default: ours). "
                        "--prompts may name a built-in set: chexpert-5x200-combos, rsna-50v5, rsna-5v5, siim-5v5")
    p.add_argument("--out", default=None, help="write the full results JSON here; stdout gets a short table "
                   "(default: eval-<manifest name>[-<split>].json in the checkpoint folder)")
    add_eval_options(p)  # --scoring, --reduce, --split-prompts, --print-recipe, probe and encoding options
    table = p.add_argument_group("the paper's table (egma-eval --paper-table --checkpoint DIR and one or more sets)")
    table.add_argument("--paper-table", action="store_true",
                       help="evaluate on the sets below and print the paper's table beside its numbers")
    add_set_options(table)
    return p


def _run(p: argparse.ArgumentParser, ns, argv: Sequence[str]) -> int:
    """egma-eval on one manifest: inputs checked, evaluated, the table printed and the record written."""
    given = [flag for flag, _ in SET_OPTIONS if getattr(ns, flag[2:].replace("-", "_")) is not None]
    if given:
        raise EvalInputError(f"{given[0]} is a --paper-table option: add --paper-table "
                             "(egma-eval --paper-table --help)")
    if not ns.checkpoint or not ns.manifest:
        raise EvalInputError("--checkpoint and --manifest are required (or --paper-table with its sets)")
    if ns.batch_size < 1:
        raise EvalInputError(f"--batch-size must be >= 1, got {ns.batch_size}")
    if ns.num_workers < 0:
        raise EvalInputError(f"--num-workers must be >= 0, got {ns.num_workers}")
    _check_device(ns.device)
    fractions = _numbers(ns.fractions, float, "--fractions")
    seeds = _numbers(ns.seeds, int, "--seeds")
    out = ns.out or default_out(ns.checkpoint, ns.manifest, ns.split)
    _check_writable(out)
    settings, _ = resolve_eval(ns.recipe, p, argv)
    res = evaluate(ns.checkpoint, ns.manifest, ns.prompts, tasks=ns.tasks.split(","), split=ns.split,
                   train_manifest=ns.train_manifest, train_split=ns.train_split,
                   scoring=tuple(settings["scoring"].split(",")), reduce=settings["reduce"],
                   split_prompts=settings["split_prompts"], batch_size=ns.batch_size, num_workers=ns.num_workers,
                   device=ns.device, progress=not ns.no_progress, fractions=fractions, seeds=seeds)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(format_summary(res, out))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--paper-table" in argv:  # the whole paper table from egma-prepare's manifests (egma_model.paper_table)
        return paper_table_main(argv)
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.paper_table:  # an abbreviation of --paper-table
        return paper_table_main(argv)
    if ns.print_recipe:
        settings, source = resolve_eval(ns.recipe, p, argv)
        settings.pop("prompts")  # per-set built-ins apply to --paper-table; here --prompts is given
        source["prompts"] = "option" if ns.prompts else "none given (--prompts)"
        print(eval_recipe_text(ns.recipe, dict(settings, prompts=ns.prompts), source))
        return 0
    try:
        return _run(p, ns, argv)
    except (EvalInputError, ManifestError) as e:
        print(f"egma-eval: error: {_one_line(e, 2000)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
