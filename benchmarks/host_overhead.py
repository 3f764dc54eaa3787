"""Host (Python + dispatcher) cost of one Triton-backend loss call, measured without a GPU.

    python benchmarks/host_overhead.py [--batch 40] [--patches 49] [--iters 300]

At EGMA's sizes (B=40, P=49) the loss's GPU work is a fraction of a millisecond, so what the host spends
per call (validation, the custom op's dispatch and autograd, allocations, launches) sets the pace. This
script runs the `triton` backend on CPU tensors with every kernel launch replaced by a no-op (outputs are
left as allocated), so that it times everything except the kernels and Triton's own launcher, and it
counts the torch ops a call dispatches (profiler events). CPU op costs differ from CUDA launch costs: use
it to compare versions on one machine, not as a GPU figure.
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real kernel objects, which this script then stubs out

import torch

import egma_kernels as ek
from egma_kernels import backends, triton_backend, triton_kernels
from egma_kernels.packing import cu_seqlens_from_lengths


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> None:
    for name in dir(triton_kernels):
        if name.endswith("_kernel"):
            setattr(triton_kernels, name, _NoLaunch())
    triton_backend._check_device = lambda *tensors: None
    triton_backend.interpreting = lambda: True  # CPU tensors accepted, ieee precision chosen
    getattr(getattr(triton_backend, "launch_config", None), "cache_clear", lambda: None)()
    entry = backends._REGISTRY["triton"]
    backends._REGISTRY["triton"] = dataclasses.replace(entry, devices=("cpu", "cuda"), is_available=lambda: True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--patches", type=int, default=49)
    parser.add_argument("--dim", type=int, default=64, help="embedding size (only the stubbed outputs' size depends on it)")
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    stub_kernels()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 11, (args.batch,), generator=g).tolist()
    N = sum(lengths)
    patch = torch.nn.functional.normalize(torch.randn(args.batch, args.patches, args.dim, generator=g), dim=-1)
    sent = torch.nn.functional.normalize(torch.randn(N, args.dim, generator=g), dim=-1)
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    scale = torch.tensor(14.3)
    gaze = torch.rand(N, args.patches, generator=g)
    patch.requires_grad_(True)
    sent.requires_grad_(True)

    def call():
        return ek.fine_grained_loss(patch, sent, cu, scale, gaze, backend="triton", validate=False,
                                    max_seqlen=max(lengths))

    def forward():
        with torch.no_grad():
            call()

    def forward_backward():
        patch.grad = sent.grad = None
        call().backward()

    print(f"B={args.batch} P={args.patches} N={N} torch {torch.__version__}, 1 thread, kernels stubbed")
    for fn in (forward, forward_backward):
        for _ in range(20):
            fn()
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        times.sort()
        q = lambda f: times[int(f * (len(times) - 1))] * 1e6
        with torch.profiler.profile() as prof:
            fn()
        ops = sum(1 for e in prof.events() if e.name.startswith("aten::") or "::" in e.name)
        print(f"{fn.__name__:17s} median {statistics.median(times) * 1e6:7.1f} us  (p20 {q(0.2):.1f}, p80 {q(0.8):.1f})"
              f"  profiler events {ops}")


if __name__ == "__main__":
    sys.exit(main())
