"""Compile every Triton kernel ahead of time for a GPU target, without a GPU (shared BUILD_NOTES).

    python tests/tools/aot_compile_triton.py [--arch 90]

Run without TRITON_INTERPRET (the interpreter replaces the kernels). Prints one line per kernel variant
and exits non-zero if any fails to compile.
"""

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels that this script compiles")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from egma_kernels import triton_kernels as K

import torch

from egma_kernels.triton_backend import _config

# (name, input dtype, P, D, longest report): the launch configurations to compile, from the same
# _config() the backend uses at run time.
SHAPES = [
    ("bf16 P196 D512 S10", torch.bfloat16, 196, 512, 10),
    ("bf16 P784 D1024 S40", torch.bfloat16, 784, 1024, 40),
    ("fp16 P49 D512 S10", torch.float16, 49, 512, 10),
    ("fp32 P196 D512 S10", torch.float32, 196, 512, 10),
    ("fp64 P49 D512 S10", torch.float64, 49, 512, 10),
]
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
# H100/H200: 227 KiB of shared memory per block at most.
MAX_SHARED = 227 * 1024

INPUT_POINTERS = {"patch_ptr", "sent_ptr", "gaze_ptr"}
INT_POINTERS = {"cu_ptr", "smax_ptr", "best_patch_ptr", "gaze_mask_ptr"}
FLOAT_SCALARS = {"threshold"}


def kernels(cfg):
    common = dict(ACC=cfg["ACC"], DOT_PRECISION=cfg["DOT_PRECISION"], BLOCK_S=cfg["BLOCK_S"])
    filip = dict(common, EGMA_COMPAT=True, BLOCK_D=cfg["BLOCK_D"])
    return [
        (K._filip_fwd_kernel, dict(filip, WRITE_OWN=True, BLOCK_P=cfg["fwd_block_p"])),
        (K._filip_bwd_patch_kernel, dict(filip, HAS_OWN_GRAD=True, BLOCK_P=cfg["bwd_patch_rows"], D_PAD=cfg["D_PAD"])),
        (K._filip_bwd_sent_kernel, dict(filip, HAS_OWN_GRAD=True, BLOCK_P=cfg["bwd_sent_block_p"], D_PAD=cfg["D_PAD"])),
        (K._matched_fwd_kernel, dict(common, HAS_GAZE=True, BLOCK_P=cfg["matched_block_p"])),
        (K._matched_bwd_kernel, dict(common, HAS_GAZE=True, BLOCK_P=cfg["matched_block_p"])),
    ]


def signature(fn, variant):
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in INPUT_POINTERS:
            sig[p.name] = "*" + variant[0]
        elif p.name in INT_POINTERS:
            sig[p.name] = "*i32"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + variant[1]
        elif p.name in FLOAT_SCALARS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, dtype, P, D, max_seqlen in SHAPES:
        cfg = _config(dtype, P, D, max_seqlen)
        variant = (TYPE_NAMES[dtype], "fp64" if dtype == torch.float64 else "fp32")
        for fn, consts in kernels(cfg):
            src = ASTSource(
                fn=fn,
                signature=signature(fn, variant),
                constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
            )
            start = time.time()
            try:
                compiled = triton.compile(src, target=target)
                shared = compiled.metadata.shared
                status = "ok  " if shared <= MAX_SHARED else "FAIL"
                failures += shared > MAX_SHARED
                print(f"{status} sm_{args.arch} {fn.__name__:26s} {name:22s} {time.time() - start:5.1f}s  "
                      f"shared={shared}B")
            except Exception as exc:  # report every failure, then fail
                failures += 1
                print(f"FAIL sm_{args.arch} {fn.__name__:26s} {name}: {type(exc).__name__}: {str(exc)[:2000]}")
    print(f"{failures} failed" if failures else "all kernels compiled")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
