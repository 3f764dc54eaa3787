"""Useful fraction of the Triton kernels' tensor-core work for report-length distributions (no GPU).

    python tools/padding_counts.py [--out benchmarks/results/padding/README.md]

The similarity and gradient products run on tiles: a report occupies BLOCK_S columns (the power of two
>= the longest report in the batch, at least 16), GROUP reports share a program, and patch rows come in
blocks. Counted here from the launch configuration the backend picks (triton_backend._config), as
multiply-accumulates issued vs those on real (patch, sentence) pairs, per product:
  forward  similarity  [fwd_block_p x GROUP*BLOCK_S] tiles over all (image, report group) pairs
  backward dpatch      dL/dA [16 x GROUP*BLOCK_S] times the group's sentences
  backward dsent       dL/dA^T [sent_group*BLOCK_S x sent_block_p] times the patch rows
(the D dimension is never padded at D = 512 and cancels). The report kernels (per report, n_k x P) are
a small part of the work and left out.
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from egma_kernels.bench.problems import draw_lengths  # noqa: E402
from egma_kernels.bench.sweeps import SIZES  # noqa: E402
from egma_kernels.triton_backend import _config  # noqa: E402


def _pad(x, block):
    return math.ceil(x / block) * block


def useful_fractions(lengths, P, D=512, dtype=torch.bfloat16):
    B = len(lengths)
    cfg = _config(dtype, P, D, max(lengths), B)
    S, G = cfg["BLOCK_S"], cfg["fwd_group"]
    groups = math.ceil(B / G)
    real_cols = sum(lengths)  # per image: every sentence of every report
    fwd = (P * real_cols) / (_pad(P, cfg["fwd_block_p"]) * groups * G * S)
    bwd_patch = (P * real_cols) / (_pad(P, cfg["bwd_patch_rows"]) * math.ceil(B / cfg["bwd_group"]) * cfg["bwd_group"] * S)
    sg = cfg["sent_group"]
    bwd_sent = (P * real_cols) / (_pad(P, cfg["bwd_sent_block_p"]) * math.ceil(B / sg) * sg * S)
    return dict(BLOCK_S=S, GROUP=G, forward=fwd, dpatch=bwd_patch, dsent=bwd_sent)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    cases = [("egma (B=40, 1-10 sent.)", SIZES["egma"]), ("b256-p196 (B=256, 1-10)", SIZES["b256-p196"]),
             ("egma-longtail (B=40, lognormal median 5, <=30)", SIZES["egma-longtail"])]
    for label, size in cases:
        lengths = draw_lengths(size)
        f = useful_fractions(lengths, size.P, size.D)
        rows.append(f"| {label} | {size.P} | {max(lengths)} | {sum(lengths) / len(lengths):.1f} | {f['BLOCK_S']} "
                    f"| {f['GROUP']} | {f['forward']:.0%} | {f['dpatch']:.0%} | {f['dsent']:.0%} |")
    text = "\n".join([
        "| size | P | longest | mean | BLOCK_S | GROUP | forward | bwd dpatch | bwd dsent |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("# Useful fraction of the Triton kernels' tensor-core work (bfloat16, D=512)\n\n"
                    "From `python tools/padding_counts.py` (counts from the launch configuration, no GPU).\n\n"
                    + text + "\n")


if __name__ == "__main__":
    main()
