"""Compile every Triton kernel ahead of time for a GPU target, without a GPU (docs/building.md).

    python tests/tools/aot_compile_triton.py [--arch 90] [--resources]

Run without TRITON_INTERPRET (the interpreter replaces the kernels). Prints one line per kernel variant
and exits non-zero if any fails to compile. ``--resources`` also runs ptxas on each kernel and prints
its registers per thread and spilled bytes: the one performance signal to be had without a GPU.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels that this script compiles")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from egma_kernels import triton_kernels as K

import torch

from egma_kernels.triton_backend import CONFIG_OVERRIDES, _config

# (name, input dtype, P, D, longest report): the launch configurations to compile, from the same
# _config() the backend uses at run time.
SHAPES = [
    ("bf16 P196 D512 S10", torch.bfloat16, 196, 512, 10),
    ("bf16 P784 D1024 S40", torch.bfloat16, 784, 1024, 40),
    ("fp16 P49 D512 S10", torch.float16, 49, 512, 10),
    ("fp32 P196 D512 S10", torch.float32, 196, 512, 10),
    ("fp32-tf32 P49 D512 S10", torch.float32, 49, 512, 10),  # under set_float32_matmul_precision("high")
    ("fp64 P49 D512 S10", torch.float64, 49, 512, 10),
    ("fp32 P1024 D1024 S128", torch.float32, 1024, 1024, 128),  # a 128-sentence report: narrower blocks
]
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
# H100/H200: 227 KiB of shared memory per block at most.
MAX_SHARED = 227 * 1024

INPUT_POINTERS = {"patch_ptr", "sent_ptr", "gaze_ptr"}
INT_POINTERS = {"cu_ptr", "smax_ptr", "counts_ptr"}
INT16_POINTERS = {"best_patch_ptr"}  # int16 whenever P < 2**15 (int32 for float64)
BOOL_POINTERS = {"gaze_mask_ptr"}
UINT8_POINTERS = {"route_ptr"}  # uint8 while the longest report is <= 128 sentences (int16 beyond)
OUTPUT_IN_INPUT_DTYPE = {"d_patch_ptr", "d_sent_ptr"}  # written in the input dtype when not sliced
FLOAT_SCALARS = {"threshold", "alpha", "w_con", "w_mlce", "w_map"}


def kernels(cfg):
    """(kernel, constexprs, num_warps) as the backend launches them (the gradients of the loss alone), the
    filip and backward kernels with saved routes and with recomputed ones."""
    common = dict(ACC=cfg["ACC"], DOT_PRECISION=cfg["DOT_PRECISION"], BLOCK_S=cfg["BLOCK_S"])
    filip = dict(common, EGMA_COMPAT=True, BLOCK_D=cfg["BLOCK_D"])
    report = dict(common, HAS_GAZE=True, BLOCK_P=cfg["matched_block_p"])
    return [
        (K._longest_report_kernel, dict(BLOCK_B=cfg["BLOCK_B"]), 4),
        *[(K._filip_fwd_kernel, dict(filip, WRITE_OWN=True, SAVE_ROUTE=saved, BLOCK_P=cfg["fwd_block_p"],
                                     GROUP=cfg["fwd_group"], SIM_ONE_DOT=cfg["fwd_SIM_ONE_DOT"], D_PAD=cfg["D_PAD"]),
           cfg["fwd_warps"]) for saved in (True, False)],
        (K._report_fwd_kernel, dict(report, EGMA_COMPAT=True, BLOCK_B=cfg["BLOCK_B"]), cfg["report_warps"]),
        (K._loss_terms_kernel, dict(HAS_GAZE=True, BLOCK_B=cfg["BLOCK_B"], ACC=cfg["ACC"]), 4),
        (K._report_bwd_kernel, dict(report, GRADS=K.G_LOSS.value), cfg["report_warps"]),
        # saved routes: not for float64 (see triton_backend._route_shape)
        *[kernel for saved in (True, False) if not (saved and cfg["ACC"] == tl.float64)
          for kernel in backward_kernels(cfg, filip, saved)],
    ]


def backward_kernels(cfg, filip, saved_route):
    bwd = dict(filip, HAS_OWN_GRAD=True, GRADS=K.G_LOSS.value, SAVED_ROUTE=saved_route,
               GRAD_PRECISION=cfg["grad_precision"])
    stages = cfg["route_bwd_stages"] if saved_route else None
    return [
        (K._filip_bwd_patch_kernel, dict(bwd, BLOCK_P=cfg["bwd_patch_rows"], GROUP=cfg["bwd_group"],
                                         D_OUT=cfg["D_OUT"], D_CHUNKS=cfg["D_CHUNKS"],
                                         SIM_ONE_DOT=cfg["SIM_ONE_DOT"]), cfg["bwd_warps"], stages),
        (K._filip_bwd_sent_kernel, dict(bwd, BLOCK_P=cfg["bwd_sent_block_p"], GROUP=cfg["sent_group"],
                                        D_OUT=cfg["sent_D_OUT"],
                                        D_CHUNKS=cfg["sent_D_CHUNKS"], SIM_ONE_DOT=cfg["sent_SIM_ONE_DOT"]),
         cfg["bwd_warps"], stages),
    ]


def resources(compiled, arch):
    """(registers per thread, spilled bytes) from ptxas on the kernel's PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        suffix = "a" if arch == 90 else ""
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill stores", out)
    return (int(regs[0]) if regs else -1), (int(spills[0]) if spills else -1)


def signature(fn, variant):
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in INPUT_POINTERS:
            sig[p.name] = "*" + variant[0]
        elif p.name in INT_POINTERS:
            sig[p.name] = "*i32"
        elif p.name in INT16_POINTERS:
            sig[p.name] = "*i32" if variant[0] == "fp64" else "*i16"  # as triton_backend._index_dtype
        elif p.name in BOOL_POINTERS:
            sig[p.name] = "*i1"
        elif p.name in UINT8_POINTERS:
            sig[p.name] = "*u8"
        elif p.name in OUTPUT_IN_INPUT_DTYPE:
            sig[p.name] = "*" + variant[0]
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
    parser.add_argument("--resources", action="store_true", help="print registers and spills (runs ptxas)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a launch-configuration entry (triton_backend.CONFIG_OVERRIDES), e.g. "
                             "--set sent_group=1; repeatable")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    parser.add_argument("--stages", type=int, default=0, help="num_stages for every kernel (default: Triton's)")
    parser.add_argument("--expect-triton", default="",
                        help="fail unless the imported triton's version starts with this (CI's 3.6 check)")
    args = parser.parse_args()
    if not triton.__version__.startswith(args.expect_triton):
        sys.exit(f"expected triton {args.expect_triton}, imported {triton.__version__} from {triton.__file__}")
    for item in args.set:
        key, value = item.split("=", 1)
        CONFIG_OVERRIDES[key] = {"True": True, "False": False}.get(value) if value in ("True", "False") else int(value)
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, dtype, P, D, max_seqlen in SHAPES:
        torch.set_float32_matmul_precision("high" if "tf32 " in name else "highest")
        cfg = _config(dtype, P, D, max_seqlen, num_reports=64)
        variant = (TYPE_NAMES[dtype], "fp64" if dtype == torch.float64 else "fp32")
        for fn, consts, num_warps, *stages in kernels(cfg):
            if args.only not in fn.__name__:
                continue
            src = ASTSource(
                fn=fn,
                signature=signature(fn, variant),
                constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
            )
            start = time.time()
            try:
                options = {"num_warps": num_warps}
                if args.stages or (stages and stages[0]):
                    options["num_stages"] = args.stages or stages[0]
                compiled = triton.compile(src, target=target, options=options)
                shared = compiled.metadata.shared
                status = "ok  " if shared <= MAX_SHARED else "FAIL"
                failures += shared > MAX_SHARED
                extra = ""
                if args.resources:
                    regs, spills = resources(compiled, args.arch)
                    extra = f"  warps={num_warps} regs={regs} spill={spills}B"
                route = {True: " route", False: " recompute"}.get(consts.get("SAVED_ROUTE", consts.get("SAVE_ROUTE")), "")
                print(f"{status} sm_{args.arch} {fn.__name__ + route:36s} {name:22s} {time.time() - start:5.1f}s  "
                      f"shared={shared}B{extra}")
            except Exception as exc:  # report every failure, then fail
                failures += 1
                print(f"FAIL sm_{args.arch} {fn.__name__:26s} {name}: {type(exc).__name__}: {str(exc)[:2000]}")
    print(f"{failures} failed" if failures else f"all kernels compiled (triton {triton.__version__})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
