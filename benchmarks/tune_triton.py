"""Try the Triton backend's tile sizes and warp counts on a GPU, one setting at a time, and report the best.

    python benchmarks/tune_triton.py [--out DIR] [--budget 90] [--reps 15]

The tile sizes in ``egma_kernels.triton_backend.launch_config`` were chosen without a GPU. This script
times the loss (forward, and forward+backward, CUDA events, medians) at the EGMA size (B=40, P=49, D=512)
and at B=256, P=196, D=512, in float32 and bfloat16, first with the defaults, then changing one entry of
the configuration at a time (``triton_backend.CONFIG_OVERRIDES``). Every variant's loss and gradients
are also compared with the defaults' (a variant that disagrees is a kernel bug for that tile shape, and
is reported as such). Writes ``tune.jsonl`` and ``tune.md`` to ``--out`` and stops starting new
measurements after ``--budget`` seconds. Each new variant compiles its kernels first (a few seconds).

``--dry-run`` runs the same steps without a GPU (Triton's interpreter, tiny shapes, wall-clock timing):
a check of the script itself, not of any tile size.
"""

import argparse
import json
import os
import statistics
import sys
import time

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import torch

import egma_kernels as ek
from egma_kernels import triton_backend as tb
from egma_kernels.bench.timing import measure_memory

# One entry changed at a time; values equal to the default are skipped.
CANDIDATES = {
    # 16-bit inputs: the backward's gradient products in 3xTF32, as before the one-pass default (float32
    # inputs already use it and skip this).
    "grad_precision": ["tf32x3"],
    "fwd_group": [1, 2, 4, 8],
    "bwd_group": [1, 2, 4],
    "sent_group": [1, 2, 4],
    "fwd_SIM_ONE_DOT": [False, True],
    "SIM_ONE_DOT": [False, True],
    "sent_SIM_ONE_DOT": [False, True],
    "fwd_warps": [4, 8],
    "bwd_warps": [4, 8],
    "BLOCK_D": [32, 64, 128],
    "fwd_block_p": [32, 64, 128],
    "bwd_patch_rows": [16, 32, 64],
    "bwd_sent_block_p": [16, 32, 64],
    "matched_block_p": [32, 64],
    "report_warps": [4, 8],
    "max_slices": [1, 4],  # 1: no partial gradient buffers (least memory), fewer programs at small B
    "save_route": [False],  # recompute the similarity in the backward instead of reading saved routes
    "route_bwd_stages": [1, 2, 3],
}
PROBLEMS = [("EGMA B=40 P=49", 40, 49, 512, 10), ("B=256 P=196", 256, 196, 512, 15)]
DTYPES = [torch.float32, torch.bfloat16]
DEVICE = "cuda"
if DRY_RUN:
    CANDIDATES = {"fwd_block_p": [16, 32], "bwd_warps": [4, 8]}
    PROBLEMS = [("dry B=3 P=5", 3, 5, 16, 3)]
    DTYPES = [torch.float32]
    DEVICE = "cpu"


def make_problem(B, P, D, max_len, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (B,), generator=g)
    N = int(lengths.sum())
    patch = torch.nn.functional.normalize(torch.randn(B, P, D, generator=g), dim=-1)
    sent = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    gaze = torch.rand(N, P, generator=g) * (torch.rand(N, P, generator=g) < 0.4)
    cu = ek.cu_seqlens_from_lengths(lengths)
    dev = DEVICE
    return dict(
        patch_emb=patch.to(dev, dtype).requires_grad_(True), sent_emb=sent.to(dev, dtype).requires_grad_(True),
        cu_seqlens=cu.to(dev), logit_scale=torch.tensor(1 / 0.07, device=dev), gaze=gaze.to(dev, dtype),
        max_seqlen=int(lengths.max()),
    )


def run(args):
    args["patch_emb"].grad = args["sent_emb"].grad = None
    loss = ek.fine_grained_loss(**args, backend="triton", validate=False)
    loss.backward()
    return loss.detach().clone(), args["patch_emb"].grad.clone(), args["sent_emb"].grad.clone()


def time_ms(fn, reps):
    if DRY_RUN:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(problem, reps):
    def forward():
        with torch.no_grad():
            ek.fine_grained_loss(**problem, backend="triton", validate=False)

    def forward_backward():
        problem["patch_emb"].grad = problem["sent_emb"].grad = None
        ek.fine_grained_loss(**problem, backend="triton", validate=False).backward()

    scratch, _ = measure_memory(forward_backward, problem["patch_emb"].device)  # gradients included
    return time_ms(forward, reps), time_ms(forward_backward, reps), scratch


def agrees(got, want):
    return all(torch.allclose(a.float(), b.float(), rtol=2e-3, atol=1e-5) for a, b in zip(got, want))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tune-out")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds; no new measurement starts after it")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dry-run", action="store_true", help="check the script without a GPU (interpreter)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not DRY_RUN:
        sys.exit("tune_triton.py needs a CUDA GPU (or --dry-run)")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    device = "cpu (dry run, interpreter)" if DRY_RUN else torch.cuda.get_device_name()
    records = []
    # The defaults on every problem first, then each variant on every problem in turn (most promising
    # settings first), so that a short budget still compares whole rows.
    problems = []
    for name, B, P, D, max_len in PROBLEMS:
        for dtype in DTYPES:
            problem = make_problem(B, P, D, max_len, dtype)
            tb.CONFIG_OVERRIDES.clear()
            defaults = tb._config(dtype, P, D, problem["max_seqlen"], B, tb._shared_memory(torch.device("cuda")))
            problems.append((name, dtype, problem, defaults, run(problem)))
    variants = [(None, None)] + [(k, v) for k, vs in CANDIDATES.items() for v in vs]
    with open(os.path.join(args.out, "tune.jsonl"), "w") as log:
        for key, value in variants:
            for name, dtype, problem, defaults, want in problems:
                if key is not None and defaults.get(key) == value:
                    continue
                if time.time() - start > args.budget:
                    break
                tb.CONFIG_OVERRIDES.clear()
                if key is not None:
                    tb.CONFIG_OVERRIDES[key] = value
                rec = dict(device=device, problem=name, dtype=str(dtype).replace("torch.", ""), key=key, value=value,
                           default=defaults.get(key) if key else None)
                try:
                    ok = agrees(run(problem), want)
                    fwd, fwd_bwd, scratch = measure(problem, args.reps)
                    rec.update(fwd_ms=round(fwd, 4), fwd_bwd_ms=round(fwd_bwd, 4), scratch_mib=round(scratch / 2**20, 2),
                               agrees_with_default=ok)
                except Exception as exc:  # a tile shape that does not fit (shared memory, registers)
                    rec.update(error=f"{type(exc).__name__}: {str(exc)[:200]}")
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(rec, flush=True)
    tb.CONFIG_OVERRIDES.clear()
    write_table(records, os.path.join(args.out, "tune.md"), device)


def write_table(records, path, device):
    lines = [f"# Triton tile settings, {device}", "",
             "| problem | dtype | setting | fwd ms | fwd+bwd ms | vs default (fwd+bwd) | fwd+bwd scratch MiB | agrees |",
             "|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in records:
        if r["key"] is None and "fwd_bwd_ms" in r:
            base[(r["problem"], r["dtype"])] = r["fwd_bwd_ms"]
    for r in records:
        setting = "defaults" if r["key"] is None else f"{r['key']}={r['value']} (default {r['default']})"
        if "error" in r:
            lines.append(f"| {r['problem']} | {r['dtype']} | {setting} | | | {r['error'][:60]} | | |")
            continue
        ref = base.get((r["problem"], r["dtype"]))
        ratio = f"{ref / r['fwd_bwd_ms']:.2f}x" if ref else ""
        lines.append(f"| {r['problem']} | {r['dtype']} | {setting} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {ratio} "
                     f"| {r['scratch_mib']:.1f} | {'yes' if r['agrees_with_default'] else 'NO'} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
