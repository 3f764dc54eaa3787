"""``egma-prepare``: the public datasets, as downloaded, to manifests that ``egma-train``/``egma-eval`` read.

Subcommands (each writes ``<out>`` (a CSV manifest, columns as in ``egma_model.data``) and
``<out>.summary.json``, and prints the summary: images, reports, sentences, images with gaze, rows skipped
and why)::

    egma-prepare mimic-eye  --root mimic-eye/                                   --out data/mimic_eye.csv
    egma-prepare reflacx    --root reflacx/ --mimic-cxr-jpg mimic-cxr-jpg/2.0.0/ --out data/reflacx.csv
    egma-prepare egd-cxr    --root egd-cxr/1.0.0/ --mimic-cxr-jpg mimic-cxr-jpg/2.0.0/ --out data/egd.csv
    egma-prepare chexpert-5x200 --root CheXpert-v1.0/                           --out data/chexpert_5x200.csv
    egma-prepare chexpert   --root CheXpert-v1.0/                               --out data/chexpert.csv
    egma-prepare rsna       --root rsna-pneumonia/                              --out data/rsna.csv
    egma-prepare siim       --root siim-acr/                                    --out data/siim.csv

Each dataset's layout and columns, and the owners' sources they follow, are in its module under
``egma_model/datasets/`` (docs/datasets.md has a table per dataset); ``egma_model.datasets.registry`` lists
them. Every CSV is read by ``egma_model.textio`` (strict UTF-8, a byte-order mark skipped) and also under its gzipped name ``<name>.gz``, as
PhysioNet distributes several of them. Splits are spelled ``train``/``valid``/``test`` everywhere (MIMIC-CXR's
``validate`` is mapped to ``valid``); the gaze sets take MIMIC-CXR's official split, and a row without one is
left with an empty split and counted in the summary's notes (never put in ``train``). Fixations go through the
readers' one rule (``egma_model.gaze.apply_reader_rules``): those off the image or not finite are dropped and
counted in the summary's ``gaze_rules``; a reading left without a usable fixation is written without gaze (image
and report only). A reading listed twice (same reading id, or same image and transcript) is kept once and counted.

The names that lived here stay importable from here for one release.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Sequence

from .data import GazeOptions, ManifestError
from .datasets import registry
from .datasets._common import (COLUMNS, DUPLICATE, GAZE_COUNTS, IMAGE_EXTS, SPLIT_NAMES,  # noqa: F401 (old paths)
                               DicomImages, PrepareError, Summary, dicom_to_uint8, format_summary, split_name,
                               write_manifest)
from .datasets.chexpert import (CHEXPERT_COMPETITION, CHEXPERT_LABELS, CHEXPERT_UNCERTAIN_AS,  # noqa: F401
                                prepare_chexpert, prepare_chexpert_5x200, read_chexpert_selection)
from .datasets.egd_cxr import prepare_egd_cxr  # noqa: F401
from .datasets.mimic_cxr import MimicJpg  # noqa: F401
from .datasets.mimic_eye import prepare_mimic_eye  # noqa: F401
from .datasets.reflacx import prepare_reflacx  # noqa: F401
from .datasets.rsna import prepare_rsna  # noqa: F401
from .datasets.siim import prepare_siim  # noqa: F401
from .prepared import CacheMismatchError
from .prepared_build import build_cache
from .textio import TextDecodeError

__all__ = ["Summary", "dicom_to_uint8", "read_chexpert_selection", "split_name", "prepare_reflacx", "prepare_egd_cxr",
           "prepare_mimic_eye", "prepare_chexpert_5x200",
           "prepare_chexpert",
           "prepare_rsna", "prepare_siim", "write_manifest", "main"]


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="egma-prepare", description="Write egma-train/egma-eval manifests from the "
                                "public datasets' published layouts (see egma_model/datasets/ for files and columns)")
    sub = p.add_subparsers(dest="dataset", required=True)
    for name, command in registry.commands().items():
        _add_dataset_parser(sub, name, command)
    _add_cache_parser(sub)
    return p


def _add_dataset_parser(sub, name: str, command) -> None:
    q = sub.add_parser(name, help=command.help)
    q.add_argument("--root", required=True, help="the dataset's folder as downloaded")
    if command.mimic_cxr_jpg:
        q.add_argument("--mimic-cxr-jpg", required=True, help="MIMIC-CXR-JPG folder (with files/ and the CSVs)")
    if command.seed:
        q.add_argument("--seed", type=int, default=0, help="sampling / split seed")
    q.add_argument("--out", required=True, help="manifest to write (.csv); the summary goes to <out>.summary.json")
    if command.add_arguments is not None:
        command.add_arguments(q)


def _add_cache_parser(sub) -> None:
    d = GazeOptions()
    q = sub.add_parser("cache", help="prepare a manifest once for fast training: images at the training size, "
                       "sentences and gaze on the patch grid (egma_model/prepared.py); resumable")
    q.add_argument("--manifest", required=True, help="a manifest written by the other subcommands (or your own)")
    q.add_argument("--out", default=None, help="cache folder (default: <manifest>.cache); the manifest that "
                   "points to it is written beside the manifest, as the summary says")
    q.add_argument("--image-size", type=int, default=224, help="the image encoder's input size")
    q.add_argument("--grid", default="7x7", help="the image encoder's patch grid, HxW (egma-train prints it)")
    q.add_argument("--sigma", type=float, default=d.sigma, help="gaze Gaussian width, px of the original image")
    q.add_argument("--min-heat", type=float, default=d.min_heat, help="as egma-train --min-heat")
    q.add_argument("--gaze-resize", default=d.resize, choices=["area", "bilinear_antialias"])
    q.add_argument("--raw-gaze", action="store_true", help="as egma-train --raw-gaze")
    q.add_argument("--no-gaze", action="store_true", help="as egma-train --no-gaze")
    q.add_argument("--split-rule", default="ours", help="as egma-train --split-rule")
    q.add_argument("--rebuild", action="store_true", help="start again instead of resuming")
    q.add_argument("--no-progress", action="store_true")


def run_cache(ns) -> Dict:
    try:
        grid = tuple(int(v) for v in ns.grid.lower().split("x"))
        assert len(grid) == 2 and min(grid) > 0
    except (ValueError, AssertionError):
        raise PrepareError(f"--grid {ns.grid!r}: expected HxW, e.g. 7x7") from None
    opts = GazeOptions(sigma=ns.sigma, min_heat=ns.min_heat, use_raw_gaze=ns.raw_gaze, resize=ns.gaze_resize)
    return build_cache(ns.manifest, ns.out, image_size=ns.image_size, grid=grid, gaze_options=opts,
                       use_gaze=not ns.no_gaze, split_rule=ns.split_rule, progress=not ns.no_progress,
                       rebuild=ns.rebuild)


def format_cache_summary(d: Dict) -> str:
    return (f"prepared {d['rows']} rows in {d['seconds']:.1f} s: {d['bytes'] / 2**20:.1f} MiB in {d['cache']}\n"
            f"train and evaluate with --manifest {d['manifest']}")


def run(ns) -> Dict:
    out_dir = os.path.dirname(os.path.abspath(ns.out))
    if not os.path.isdir(ns.root):
        raise PrepareError(f"{ns.root}: folder not found")
    return write_manifest(registry.commands()[ns.dataset].run(ns, out_dir), ns.out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.dataset == "cache":
            print(format_cache_summary(run_cache(ns)))
            return 0
        d = run(ns)
    except (PrepareError, TextDecodeError, ManifestError, CacheMismatchError) as e:
        # a missing file, a bad column or row, bytes that are not UTF-8
        print(f"egma-prepare: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(d))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
