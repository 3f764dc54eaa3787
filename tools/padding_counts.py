"""Useful fraction of the Triton kernels' tensor-core work for report-length distributions (no GPU).

    python tools/padding_counts.py [--out benchmarks/results/padding/counts.md]

Counted from the launch configuration the backend picks (triton_backend._config), as multiply-accumulates
issued vs those on real (patch, sentence) pairs, per product (the D dimension is never padded at D = 512
and cancels; the report kernels, per report n_k x P, are a small part of the work and left out):
  forward  similarity  [fwd_block_p rows x tile columns] over all (image, tile) pairs
  backward dpatch      dL/dA [16 rows x tile columns] times the tile's sentences
  backward dsent       dL/dA^T [tile columns x sent_block_p rows] times the patch rows
Two layouts of the report columns:
  slots   each report in a slot of BLOCK_S columns (the power of two >= the longest report in the batch,
          at least 16), GROUP reports per tile: a tile of GROUP * BLOCK_S columns;
  packed  tiles of COLS = GROUP * BLOCK_S columns holding consecutive whole reports (next fit, the schedule
          _pack_schedule_kernel computes on the device): only the columns a tile leaves empty are padding.
          The forward and dpatch kernels take tiles of fwd_group * BLOCK_S columns, the dsent kernel of
          sent_group * BLOCK_S (its [columns, D] accumulator).
The packed grid is sized by the host's bound on the tiles (triton_backend._pack_tiles); the programs of
unused tiles exit before any product and issue no tensor-core work (their count is listed).
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from egma_kernels.bench.problems import draw_lengths  # noqa: E402
from egma_kernels.bench.sweeps import SIZES  # noqa: E402
from egma_kernels.triton_backend import _config, _pack_tiles  # noqa: E402

# Which products run on packed tiles (all of them now; the slot layout is the "before" column).
PACKED = {"forward": True, "dpatch": True, "dsent": True}


def _pad(x, block):
    return math.ceil(x / block) * block


def next_fit_tiles(lengths, columns):
    """Tiles of the next-fit packing of consecutive whole reports into ``columns`` columns."""
    tiles, used = 1, 0
    for n in lengths:
        if used + n > columns and used > 0:
            tiles, used = tiles + 1, 0
        used += n
    return tiles


def useful_fractions(lengths, P, D=512, dtype=torch.bfloat16, packed=None):
    """{product: useful fraction} for one batch of report lengths; ``packed`` maps products to layouts."""
    packed = PACKED if packed is None else packed
    B, N = len(lengths), sum(lengths)
    cfg = _config(dtype, P, D, max(lengths), B)
    S = cfg["BLOCK_S"]
    useful = P * N  # per image: every patch with every sentence

    def columns(group, pack):
        if pack:
            return next_fit_tiles(lengths, group * S) * group * S
        return math.ceil(B / group) * group * S

    out = dict(BLOCK_S=S, GROUP=cfg["fwd_group"], COLS=cfg["fwd_group"] * S, COLS_SENT=cfg["sent_group"] * S,
               tiles=next_fit_tiles(lengths, cfg["fwd_group"] * S), tile_bound=_pack_tiles(B, N, cfg["fwd_group"] * S))
    out["forward"] = useful / (_pad(P, cfg["fwd_block_p"]) * columns(cfg["fwd_group"], packed["forward"]))
    out["dpatch"] = useful / (_pad(P, cfg["bwd_patch_rows"]) * columns(cfg["bwd_group"], packed["dpatch"]))
    out["dsent"] = useful / (_pad(P, cfg["bwd_sent_block_p"]) * columns(cfg["sent_group"], packed["dsent"]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="", help="also write the table to this Markdown file (default: print only)")
    args = parser.parse_args()
    slots = {k: False for k in PACKED}
    rows = []
    cases = [("egma (B=40, 1-10 sent.)", SIZES["egma"]), ("b256-p196 (B=256, 1-10)", SIZES["b256-p196"]),
             ("egma-longtail (B=40, lognormal median 5, <=30)", SIZES["egma-longtail"])]
    for label, size in cases:
        lengths = draw_lengths(size)
        before = useful_fractions(lengths, size.P, size.D, packed=slots)
        after = useful_fractions(lengths, size.P, size.D)
        cells = " | ".join(f"{before[k]:.0%} -> {after[k]:.0%}" for k in ("forward", "dpatch", "dsent"))
        rows.append(f"| {label} | {size.P} | {max(lengths)} | {sum(lengths) / len(lengths):.1f} | {after['BLOCK_S']} "
                    f"| {after['COLS']} / {after['COLS_SENT']} | {after['tiles']} of {after['tile_bound']} | {cells} |")
    packed = ", ".join(k for k, v in PACKED.items() if v) or "none"
    text = "\n".join([
        f"Useful fraction, slots (before) -> packed tiles for: {packed}.",
        "",
        "| size | P | longest | mean | BLOCK_S | tile columns (fwd, dpatch / dsent) | fwd packed tiles of bound "
        "| forward | bwd dpatch | bwd dsent |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("# Useful fraction of the Triton kernels' tensor-core work (bfloat16, D=512)\n\n"
                    "From `python tools/padding_counts.py --out benchmarks/results/padding/counts.md` (counts from "
                    "the launch configuration, no GPU).\n\n" + text + "\n")


if __name__ == "__main__":
    main()
