"""Scratch memory of one loss call per backend, measured on the CPU (no GPU needed).

    python benchmarks/scratch_memory.py [--batch 256] [--patches 196] [--min-sent 4 --max-sent 12]
                                        [--dtype float32] [--sms 132] [--out DIR]

Scratch = the peak of bytes allocated during the call above what was allocated before it (inputs excluded),
as `egma-bench` defines it; the gradient buffers every backend returns are part of it, and shown apart.

The `triton` backend allocates the same tensors whatever runs its kernels, so it is measured here on CPU
tensors with every kernel launch replaced by a no-op (as in `host_overhead.py`): its buffers (outputs,
what it saves for the backward pass, partial sums) are allocated exactly as on a GPU with `--sms`
streaming multiprocessors (132: H100 SXM; its backward splits loops into slices by that count). Its
values are garbage and not looked at. `reference` and `cpu` (the compiled C++ backend, if built) run for
real. Allocation events come from the torch profiler (c10's CPU allocator); on a GPU, the CUDA caching
allocator rounds sizes up and library workspaces (cuBLAS) add to the reference, so treat these as the
tensors' own bytes.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_overhead import STUBBED, stub_kernels  # noqa: E402

import egma_kernels as ek  # noqa: E402
from egma_kernels import triton_backend  # noqa: E402
from egma_kernels.bench.problems import DTYPES, make_problem  # noqa: E402
from egma_kernels.bench.sweeps import Size  # noqa: E402
from egma_kernels.bench.timing import measure_memory  # noqa: E402

MiB = 2**20


def measure(backend: str, problem, max_seqlen: int) -> dict:
    args = problem.loss_args()
    device = torch.device("cpu")

    def forward():
        with torch.no_grad():
            ek.fine_grained_loss(**args, backend=backend, max_seqlen=max_seqlen)

    def forward_backward():
        ek.fine_grained_loss(**args, backend=backend, max_seqlen=max_seqlen).backward()

    forward()  # warm: caches, lazy initialisation
    problem.zero_grad()
    fwd, _ = measure_memory(forward, device)
    fwd_bwd, method = measure_memory(forward_backward, device, pre=problem.zero_grad)
    grads = sum(t.grad.numel() * t.grad.element_size() for t in problem.leaves if t.grad is not None)
    problem.zero_grad()
    return dict(backend=backend, forward_bytes=fwd, forward_backward_bytes=fwd_bwd, gradient_bytes=grads,
                method=method)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--patches", type=int, default=196)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--min-sent", type=int, default=4)
    parser.add_argument("--max-sent", type=int, default=12)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--sms", type=int, default=132, help="streaming multiprocessors of the GPU to size for")
    parser.add_argument("--max-slices", type=int, help="override the triton backward's max_slices (default: its config)")
    parser.add_argument("--backends", default=f"reference,{STUBBED},cpu",
                        help=f"backends to measure; {STUBBED} is the triton backend with its kernels stubbed (default %(default)s)")
    parser.add_argument("--out", type=Path, help="write scratch_<size>.json and .md here")
    args = parser.parse_args()

    stub_kernels()
    triton_backend.CONFIG_OVERRIDES["parallel_units"] = args.sms  # documented override (triton_backend)
    if args.max_slices is not None:
        triton_backend.CONFIG_OVERRIDES["max_slices"] = args.max_slices
    size = Size("scratch", "loss", B=args.batch, P=args.patches, D=args.dim,
                min_sent=args.min_sent, max_sent=args.max_sent)
    problem = make_problem(size, DTYPES[args.dtype], torch.device("cpu"))
    title = (f"B={size.B}, P={size.P}, D={size.D}, N={problem.N} ({args.min_sent}-{args.max_sent} sentences per "
             f"report, mean {problem.N / size.B:.1f}), {args.dtype}, gaze on every report; inputs "
             f"{problem.input_bytes() / MiB:.1f} MiB; triton sized for {args.sms} SMs"
             f"{'' if args.max_slices is None else f', max_slices={args.max_slices}'}; torch {torch.__version__}")
    print(title, flush=True)
    rows = []
    for name in args.backends.split(","):
        if name == "cpu" and "cpu" not in ek.available_backends("cpu"):
            print("cpu: not built here, skipped")
            continue
        row = measure(name, problem, problem.S_max)
        rows.append(row)
        print(f"{name:10s} forward {row['forward_bytes'] / MiB:9.2f} MiB   forward+backward "
              f"{row['forward_backward_bytes'] / MiB:9.2f} MiB (of which gradients {row['gradient_bytes'] / MiB:.2f})",
              flush=True)
    ref = next((r for r in rows if r["backend"] == "reference"), None)
    lines = [f"Scratch memory, {title}.", "", "Measured by `benchmarks/scratch_memory.py` (" + rows[0]["method"] + ").",
             "", "| backend | forward MiB | forward+backward MiB | of which gradients | without gradients | "
             "reference / this (fwd+bwd) | without gradients |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        net = r["forward_backward_bytes"] - r["gradient_bytes"]
        ratio = ratio_net = "—"
        if ref is not None:
            ratio = f"{ref['forward_backward_bytes'] / max(1, r['forward_backward_bytes']):.1f}x"
            ratio_net = f"{(ref['forward_backward_bytes'] - ref['gradient_bytes']) / max(1, net):.1f}x"
        lines.append(f"| {r['backend']}{' (the triton backend, kernels stubbed)' if r['backend'] == STUBBED else ''} | "
                     f"{r['forward_bytes'] / MiB:.2f} | {r['forward_backward_bytes'] / MiB:.2f} | "
                     f"{r['gradient_bytes'] / MiB:.2f} | {net / MiB:.2f} | {ratio} | {ratio_net} |")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"scratch_b{size.B}_p{size.P}_d{size.D}_{args.dtype}" + (
            "" if args.max_slices is None else f"_slices{args.max_slices}")
        (args.out / f"{stem}.json").write_text(json.dumps(dict(title=title, rows=rows), indent=1) + "\n")
        (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
