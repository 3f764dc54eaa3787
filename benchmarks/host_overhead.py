"""Host (Python + dispatcher) cost of one Triton-backend loss call, measured without a GPU.

    python benchmarks/host_overhead.py [--batch 40] [--patches 49] [--dim 512] [--iters 300]

At EGMA's sizes (B=40, P=49, D=512) the loss's GPU work is a fraction of a millisecond, so what the host spends
per call (validation, the custom op's dispatch and autograd, allocations, launches) sets the pace. This
script runs the `triton` backend on CPU tensors with every kernel launch replaced by a no-op (outputs are
left as allocated: the backend ``triton-stubbed``, registered through the public op contract of
``egma_kernels.fused_op``), so that it times everything except the kernels and Triton's own launcher, and
it counts the torch ops a call dispatches (profiler events). Without a GPU the launch configuration is the
one chosen for a GPU (TF32 precisions), the shared memory that of an H100. CPU op costs differ from CUDA
launch costs: use it to compare versions on one machine, not as a GPU figure.
"""

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real kernel objects, which this script then stubs out

import torch

import egma_kernels as ek
from egma_kernels import backends, fused_op, triton_backend, triton_kernels
from egma_kernels.packing import cu_seqlens_from_lengths


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


STUBBED = "triton-stubbed"


def stub_kernels() -> None:
    """Register the backend ``triton-stubbed``: the Triton backend's launchers (``triton_backend.LAUNCHERS``)
    under the op contract of ``egma_kernels.fused_op``, for CPU tensors, with every kernel launch a no-op."""
    for name in dir(triton_kernels):
        if name.endswith("_kernel"):
            setattr(triton_kernels, name, _NoLaunch())
    launchers = dataclasses.replace(
        triton_backend.LAUNCHERS, prepare=functools.partial(triton_backend.prepare_inputs, check_device=False)
    )
    ops = fused_op.define_ops("host_overhead", launchers)
    backends.register_backend(backends.Backend(
        name=STUBBED, loss=ops.loss, similarity=ops.similarity, devices=("cpu",), wants_max_seqlen=True,
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=40, help="images B (default 40)")
    parser.add_argument("--patches", type=int, default=49, help="patches per image P (default 49)")
    parser.add_argument("--dim", type=int, default=512,
                        help="embedding size D; the launch configuration depends on it (default 512)")
    parser.add_argument("--iters", type=int, default=300, help="timed calls of each kind (default 300)")
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
        return ek.fine_grained_loss(patch, sent, cu, scale, gaze, backend=STUBBED, validate=False,
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
