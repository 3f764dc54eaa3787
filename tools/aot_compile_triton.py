"""Compile every Triton kernel ahead of time for GPU targets, without a GPU.

    python tools/aot_compile_triton.py [--arch 90[,80,...]] [--shapes all|limits] [--resources]
                                       [--report FILE.md] [--check-code]

Run without TRITON_INTERPRET (the interpreter replaces the kernels). Prints one line per kernel variant
and exits non-zero if any fails to compile or needs more shared memory than its target allows per block
(triton_backend.SHARED_MEMORY_LIMITS; each target gets the configuration the backend picks for that
limit). ``--resources`` also runs ptxas on each kernel and prints its registers per thread and spilled
bytes. ``--report`` writes a Markdown table per kernel: registers, spills, shared memory, occupancy and
the tensor-core instructions in its SASS (cuobjdump -sass on the cubin: HMMA on sm_80-89 and sm_120,
HGMMA on sm_90, DMMA for float64, UTC*MMA on sm_100); ``--check-code`` fails on a kernel with matrix
products (tl.dot) whose SASS holds no tensor-core instruction, and on spills where none are intended
(CODE_CHECK_ARCHS).

Kernels whose constexprs, warps, stages and signature are identical on targets of one code generator
(sm_80/86/89: mma.sync) are compiled once and their shared memory checked against each target's limit.
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

from egma_kernels.triton_backend import CONFIG_OVERRIDES, SHARED_MEMORY_LIMITS, _config

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
# The variants whose shared memory is closest to some target's limit or whose configuration depends on
# it (report lengths of 64 and 128, float32 one-dot backward, the 16-bit one-dot forward): what the
# per-target test compiles.
LIMIT_SHAPES = ["bf16 P196 D512 S10", "fp32-tf32 P49 D512 S10", "fp32 P1024 D1024 S128", "fp32 P1024 D512 S64"]
SHAPES.append(("fp32 P1024 D512 S64", torch.float32, 1024, 512, 64))
# Code generator family of each target (shared memory follows the family's lowering, not the target).
FAMILY = {80: "mma_v2", 86: "mma_v2", 89: "mma_v2", 90: "wgmma", 100: "tcgen05", 120: "mma_v2_sm120"}
# Per SM: (registers, shared memory bytes, threads, blocks) for the occupancy estimate.
SM_LIMITS = {80: (65536, 167936, 2048, 32), 86: (65536, 102400, 1536, 16), 89: (65536, 102400, 1536, 24),
             90: (65536, 233472, 2048, 32), 100: (65536, 233472, 2048, 32), 120: (65536, 102400, 1536, 32)}
# --check-code: SASS checked on these targets (the lent H100/H200s and the A100); there, every kernel with
# matrix products must use tensor-core instructions, and the variants of must_not_spill must not spill.
CODE_CHECK_ARCHS = (80, 90)


def must_not_spill(arch, kernel, shape):
    """The variants tuned by ptxas to spill nothing: at 10-sentence reports (BLOCK_S 16, EGMA's size), on
    sm_90 and sm_80, the schedule, the packed forward and both report kernels; on sm_90 also the backward
    filip kernels with saved routes. (Longer reports, the recompute backward and sm_80's backward spill;
    the committed report lists them.)"""
    if arch not in CODE_CHECK_ARCHS or not shape.endswith("S10"):
        return False
    if kernel.startswith(("_pack_schedule", "_filip_fwd", "_report_", "_loss_terms")):
        return True
    return arch == 90 and kernel.startswith("_filip_bwd") and kernel.endswith(" route")


TENSOR_CORE_SASS = re.compile(r"\b(HMMA|HGMMA|DMMA|IMMA|UTC\w*MMA|QMMA|OMMA)\b")

INPUT_POINTERS = {"patch_ptr", "sent_ptr", "gaze_ptr"}
INT_POINTERS = {"cu_ptr", "smax_ptr", "counts_ptr", "sched_ptr", "sched2_ptr", "colmap_ptr", "colmap2_ptr"}
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
    columns = cfg["fwd_group"] * cfg["BLOCK_S"]  # the forward's packed tile (triton_backend._launch_filip_fwd)
    return [
        (K._pack_schedule_kernel, dict(LONGEST=True, COLS=columns, COLS2=columns, BLOCK_B=cfg["BLOCK_B"],
                                       COLMAP=False), 1),
        *[(K._filip_fwd_kernel, dict(filip, WRITE_MATCHED=True, SAVE_ROUTE=saved, BLOCK_P=cfg["fwd_block_p"],
                                     BLOCK_D=cfg["fwd_BLOCK_D"],
                                     COLS=columns, SIM_ONE_DOT=cfg["fwd_SIM_ONE_DOT"], D_PAD=cfg["D_PAD"]),
           cfg["fwd_warps"]) for saved in (True, False)],
        (K._report_fwd_kernel, dict(report, EGMA_COMPAT=True, BLOCK_B=cfg["BLOCK_B"]), cfg["report_warps"],
         cfg["report_stages"]),
        (K._loss_terms_kernel, dict(HAS_GAZE=True, BLOCK_B=cfg["BLOCK_B"], ACC=cfg["ACC"]), 4),
        (K._report_bwd_kernel, dict(report, GRADS=K.G_LOSS.value), cfg["report_warps"], cfg["report_stages"]),
        backward_schedule(cfg),
        # saved routes: not for float64 (see triton_backend._route_shape)
        *[kernel for saved in (True, False) if not (saved and cfg["ACC"] == tl.float64)
          for kernel in backward_kernels(cfg, filip, saved)],
    ]


def variant_label(consts):
    """What tells a kernel's variants apart in the report: ' route' / ' recompute' (saved or recomputed
    routes), ' backward' for the backward's schedule (two widths and column maps)."""
    if consts.get("COLMAP"):
        return " backward"
    return {True: " route", False: " recompute"}.get(consts.get("SAVED_ROUTE", consts.get("SAVE_ROUTE")), "")


def backward_schedule(cfg):
    """The backward's _pack_schedule_kernel launch (triton_backend._launch_filip_bwd)."""
    columns = (cfg["bwd_group"] * cfg["BLOCK_S"], cfg["sent_group"] * cfg["BLOCK_S"])
    return (K._pack_schedule_kernel, dict(LONGEST=False, COLS=columns[0], COLS2=columns[1], BLOCK_B=cfg["BLOCK_B"],
                                          COLMAP=True), cfg["bwd_schedule_warps"])


def backward_kernels(cfg, filip, saved_route):
    bwd = dict(filip, HAS_MATCHED_GRAD=True, GRADS=K.G_LOSS.value, SAVED_ROUTE=saved_route,
               GRAD_PRECISION=cfg["grad_precision"])
    stages = cfg["route_bwd_stages"] if saved_route else None
    return [
        (K._filip_bwd_patch_kernel, dict(bwd, BLOCK_P=cfg["bwd_patch_rows"], COLS=cfg["bwd_group"] * cfg["BLOCK_S"],
                                         D_OUT=cfg["D_OUT"], D_CHUNKS=cfg["D_CHUNKS"],
                                         SIM_ONE_DOT=cfg["SIM_ONE_DOT"]), cfg["bwd_warps"], stages),
        (K._filip_bwd_sent_kernel, dict(bwd, BLOCK_P=cfg["bwd_sent_block_p" if saved_route else "bwd_sent_recompute_block_p"],
                                        COLS=cfg["sent_group"] * cfg["BLOCK_S"],
                                        D_OUT=cfg["sent_D_OUT"],
                                        D_CHUNKS=cfg["sent_D_CHUNKS"], SIM_ONE_DOT=cfg["sent_SIM_ONE_DOT"]),
         cfg["bwd_warps"], stages),
    ]


def sass_summary(compiled, arch):
    """(registers, spilled bytes, tensor-core instructions {mnemonic: count}) from the cubin's metadata
    and its SASS (cuobjdump -sass; None where the tool is missing)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    regs, spills = resources(compiled, arch)
    if not os.path.exists(tool):
        return regs, spills, None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    counts = {}
    for m in TENSOR_CORE_SASS.finditer(sass):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return regs, spills, counts


def occupancy(arch, regs, shared, num_warps):
    """Resident warps per SM over the SM's maximum (registers, shared memory, threads, blocks)."""
    sm_regs, sm_shared, sm_threads, sm_blocks = SM_LIMITS[arch]
    threads = 32 * num_warps
    by_regs = sm_regs // max(1, ((regs + 7) // 8 * 8) * threads)
    by_shared = sm_shared // max(1, shared + 1024) if shared else sm_blocks
    blocks = max(0, min(by_regs, by_shared, sm_threads // threads, sm_blocks))
    return blocks * threads / sm_threads


def uses_dot(fn):
    return "tl.dot(" in fn.src or fn.__name__ in ("_filip_fwd_kernel",)


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
    parser.add_argument("--arch", default="90", help="comma-separated compute capabilities, e.g. 80,86,89,90 (default: 90)")
    parser.add_argument("--shapes", default="all", choices=["all", "limits"],
                        help="every shape, or only those near a target's shared-memory limit (LIMIT_SHAPES; default: all)")
    parser.add_argument("--resources", action="store_true", help="print registers and spills (runs ptxas; default: off)")
    parser.add_argument("--report", default="", help="write a Markdown table of the compiled code here (default: none)")
    parser.add_argument("--check-code", action="store_true",
                        help="fail on spills where none are allowed, or on a kernel with matrix products but no tensor-core SASS (default: off)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a launch-configuration entry (triton_backend.CONFIG_OVERRIDES), e.g. "
                             "--set sent_group=1; repeatable (default: none)")
    parser.add_argument("--merge", action="store_true",
                        help="with --report: keep the rows of an existing report that this run did not compile "
                             "(default: off, the report holds this run's rows only)")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this (default: all)")
    parser.add_argument("--shape", default="", help="compile only shapes whose name contains this (default: all)")
    parser.add_argument("--stages", type=int, default=0, help="num_stages for every kernel (default: Triton's)")
    parser.add_argument("--expect-triton", default="",
                        help="fail unless the imported triton's version starts with this (CI's 3.6 check; default: any)")
    parser.add_argument("--check-report", default="", metavar="FILE",
                        help="compile nothing: check that a committed report (--report) lists every variant of "
                             "CODE_CHECK_ARCHS with the current warps and stages, tensor-core SASS wherever the "
                             "kernel has products, and no spill where must_not_spill (default: none)")
    args = parser.parse_args()
    if args.check_report:
        sys.exit(check_report(args.check_report))
    if not triton.__version__.startswith(args.expect_triton):
        sys.exit(f"expected triton {args.expect_triton}, imported {triton.__version__} from {triton.__file__}")
    for item in args.set:
        key, value = item.split("=", 1)
        CONFIG_OVERRIDES[key] = {"True": True, "False": False}.get(value) if value in ("True", "False") else int(value)
    failures = 0
    compiled_by_key = {}
    rows = []
    shapes = [s for s in SHAPES if (args.shapes == "all" or s[0] in LIMIT_SHAPES) and args.shape in s[0]]
    for arch in [int(a) for a in args.arch.split(",")]:
        limit = SHARED_MEMORY_LIMITS[arch]
        target = GPUTarget("cuda", arch, 32)
        for name, dtype, P, D, max_seqlen in shapes:
            torch.set_float32_matmul_precision("high" if "tf32 " in name else "highest")
            cfg = _config(dtype, P, D, max_seqlen, num_reports=64, smem=limit)
            variant = (TYPE_NAMES[dtype], "fp64" if dtype == torch.float64 else "fp32")
            for fn, consts, num_warps, *stages in kernels(cfg):
                if args.only not in fn.__name__:
                    continue
                route = variant_label(consts)
                label = f"sm_{arch} {fn.__name__ + route:36s} {name:22s}"
                if fn.__name__.startswith("_report") and not cfg["report_fits"]:
                    print(f"skip {label} refused at launch on this target (report_fits=False)")
                    continue
                options = {"num_warps": num_warps}
                if args.stages or (stages and stages[0]):
                    options["num_stages"] = args.stages or stages[0]
                sig = signature(fn, variant)
                key = (FAMILY.get(arch, arch), fn.__name__, tuple(sorted(consts.items(), key=str)),
                       tuple(sorted(options.items())), tuple(sig.items()))
                reuse = key in compiled_by_key and not args.report
                same = f" (same code as sm_{compiled_by_key[key][1]})" if reuse and compiled_by_key[key][1] != arch else ""
                start = time.time()
                try:
                    if reuse:
                        compiled = compiled_by_key[key][0]
                    else:
                        src = ASTSource(fn=fn, signature=sig,
                                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
                        compiled = triton.compile(src, target=target, options=options)
                        compiled_by_key[key] = (compiled, arch)
                    shared = compiled.metadata.shared
                    bad = shared > limit
                    extra = ""
                    if args.resources:
                        regs, spills = resources(compiled, arch)
                        extra = f"  warps={num_warps} regs={regs} spill={spills}B"
                    if args.report or (args.check_code and arch in CODE_CHECK_ARCHS):
                        regs, spills, tc = sass_summary(compiled, arch)
                        occ = occupancy(arch, regs, shared, num_warps)
                        dots = uses_dot(fn)
                        tc_text = "n/a (no cuobjdump)" if tc is None else (
                            ", ".join(f"{k} x{v}" for k, v in sorted(tc.items())) or "none")
                        spill_free = must_not_spill(arch, fn.__name__ + route, name)
                        code_bad = args.check_code and ((spill_free and spills > 0) or (dots and tc is not None and not tc))
                        bad = bad or code_bad
                        extra += f"  regs={regs} spill={spills}B occupancy={occ:.0%} tensor-core: {tc_text}"
                        rows.append((arch, fn.__name__ + route, name, num_warps, options.get("num_stages", "default"),
                                     regs, spills, shared, limit, occ, dots, tc_text, "FAIL" if code_bad or shared > limit else "ok"))
                    failures += bad
                    print(f"{'FAIL' if bad else 'ok  '} {label} {time.time() - start:5.1f}s  "
                          f"shared={shared}B of {limit}B{same}{extra}", flush=True)
                except Exception as exc:  # report every failure, then fail
                    failures += 1
                    print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    if args.report:
        write_report(args.report, rows, merge=args.merge)
    print(f"{failures} failed" if failures else f"all kernels compiled (triton {triton.__version__})")
    sys.exit(1 if failures else 0)


def check_report(path):
    """0 if the report at ``path`` is complete, current and clean for CODE_CHECK_ARCHS (see --check-report),
    else 1, with one line per problem."""
    with open(path) as f:
        rows = {_row_key(line): [c.strip() for c in line.strip().strip("|").split("|")]
                for line in f if line.startswith("| sm_")}
    problems = []
    for arch in CODE_CHECK_ARCHS:
        for name, dtype, P, D, max_seqlen in SHAPES:
            torch.set_float32_matmul_precision("high" if "tf32 " in name else "highest")
            cfg = _config(dtype, P, D, max_seqlen, num_reports=64, smem=SHARED_MEMORY_LIMITS[arch])
            for fn, consts, num_warps, *stages in kernels(cfg):
                if fn.__name__.startswith("_report") and not cfg["report_fits"]:
                    continue
                key = (f"sm_{arch}", fn.__name__ + variant_label(consts), name)
                cells = rows.get(key)
                if cells is None:
                    problems.append(f"{' '.join(key)}: missing")
                    continue
                stage = str(stages[0]) if stages and stages[0] else "default"
                if cells[3] != str(num_warps) or cells[4] != stage:
                    problems.append(f"{' '.join(key)}: compiled with {cells[3]} warps, {cells[4]} stages; the "
                                    f"configuration now has {num_warps}, {stage} (regenerate the report)")
                if must_not_spill(arch, key[1], name) and cells[6] != "0":
                    problems.append(f"{' '.join(key)}: spills {cells[6]} B per thread")
                if cells[10] == "yes" and cells[11] == "none":
                    problems.append(f"{' '.join(key)}: matrix products without tensor-core SASS")
                if cells[12] != "ok":
                    problems.append(f"{' '.join(key)}: {cells[12]}")
    print("\n".join(problems) if problems else f"report {path}: complete and clean")
    return 1 if problems else 0


def _row_key(line):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    return tuple(cells[:3])  # (target, kernel, shape)


def write_report(path, rows, merge=False):
    """The Markdown table of ``rows``; with ``merge``, the rows of the existing file at ``path`` that were not
    compiled this time are kept (a kernel's new row replaces its old one, a kernel new to a (target, shape)
    goes before that pair's first row, rows of kernels that no longer exist are dropped)."""
    lines = [
        f"# Compiled Triton kernels (triton {triton.__version__}, AOT, no GPU)",
        "",
        "Written by `python tools/aot_compile_triton.py --report`: per kernel variant, the configuration the",
        "backend picks for the target's shared memory per block; registers and spills from the cubin,",
        "tensor-core instructions counted in its SASS (`cuobjdump -sass`), occupancy = resident warps per SM",
        "over the SM's maximum (registers, shared memory, threads, blocks per SM). `dot`: the kernel has",
        "matrix products (tl.dot), so its SASS must hold tensor-core instructions.",
        "",
        "| target | kernel | shape | warps | stages | regs | spill B | shared B | limit B | occupancy | dot | tensor-core SASS | |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = []
    for arch, kernel, shape, warps, stages, regs, spills, shared, limit, occ, dots, tc, status in rows:
        table.append(f"| sm_{arch} | {kernel} | {shape} | {warps} | {stages} | {regs} | {spills} | {shared} | {limit} "
                     f"| {occ:.0%} | {'yes' if dots else 'no'} | {tc} | {status} |")
    if merge and os.path.exists(path):
        new = {_row_key(line): line for line in table}
        with open(path) as f:
            old = [line.rstrip("\n") for line in f if line.startswith("| sm_")]
        exists = {name for name in dir(K) if name.startswith("_")}
        merged = []
        for line in old:
            key = _row_key(line)
            if key[1].split()[0] not in exists:
                continue
            for k in [k for k in new if k[0] == key[0] and k[2] == key[2] and k not in map(_row_key, old)]:
                merged.append(new.pop(k))
            merged.append(new.pop(key, line))
        table = merged + list(new.values())
    lines += table
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
