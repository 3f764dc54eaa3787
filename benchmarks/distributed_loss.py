"""The EGMA loss over K gloo processes on the CPU against one process on the concatenated batch.

    python benchmarks/distributed_loss.py [--worlds 2,4] [--batch 64] [--patches 49] [--dim 256]
                                          [--backend cpu] [--threads 1] [--steps 15] [--compat]

A global batch of ``--batch`` images (ragged reports of 1 to 9 sentences) is split evenly over K ranks;
each rank times forward + backward of ``fine_grained_loss(..., group=WORLD)`` (a barrier before each
step; the median over the steps of the slowest rank's time). The baseline is one process computing the
loss of the whole batch (``group=None``) with the same number of threads as one rank. Reported per rank:

* bytes sent per step: counted from the sizes of the tensors the loss hands to each collective (an
  all-gather or reduce-scatter of an ``s``-byte block makes each rank send ``(K-1) s`` bytes, an all-reduce
  ``2 (K-1)/K s``), and checked against ``egma_kernels.distributed.communicated_bytes`` (the formula);
* peak memory: the growth of the resident set during the last step (``/proc/self/clear_refs`` resets the
  high-water mark; ``VmHWM`` minus ``VmRSS`` before the step), Linux only. The script re-executes itself
  with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc maps every tensor of 64 KiB or more afresh and
  returns it when freed: the growth is then the peak of the step's live tensors (not memory reused
  from an earlier step).

Gloo on one machine measures the algorithm's CPU cost and its synchronisation, not a network; on GPUs
(NCCL) the exchanged blocks are small next to the kernels' work. The CPU load of the machine is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.nn.functional as F


def make_batch(B: int, P: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 10, (B,), generator=g)
    N = int(lengths.sum())
    patch = F.normalize(torch.randn(B, P, D, generator=g), dim=-1).to(dtype)
    sent = F.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype)
    heat = torch.rand(N, P, generator=g) * (torch.rand(N, P, generator=g) < 0.3)
    return lengths, patch, sent, heat.to(dtype)


def rank_slice(lengths: torch.Tensor, rank: int, world: int):
    B = lengths.shape[0]
    per = B // world
    b0, b1 = rank * per, (rank + 1) * per
    n0, n1 = int(lengths[:b0].sum()), int(lengths[:b1].sum())
    return b0, b1, n0, n1


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def one_step(patch, sent, cu, scale, gaze, group, args):
    import egma_kernels as ek

    p = patch.detach().requires_grad_()
    s = sent.detach().requires_grad_()
    t = scale.detach().requires_grad_()
    loss = ek.fine_grained_loss(p, s, cu, t, gaze, backend=args.backend, egma_compat=args.compat,
                                validate=False, group=group)
    loss.backward()
    return loss


def measure(rank: int, world: int, args, group) -> dict:
    import torch.distributed as dist

    dtype = getattr(torch, args.dtype)
    lengths, patch, sent, heat = make_batch(args.batch, args.patches, args.dim, dtype)
    if group is not None:
        b0, b1, n0, n1 = rank_slice(lengths, rank, world)
        lengths, patch, sent, heat = lengths[b0:b1], patch[b0:b1], sent[n0:n1], heat[n0:n1]
    cu = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
    scale = torch.tensor(14.3)
    sent_bytes = counting(group is not None)
    for _ in range(2):  # warm-up
        one_step(patch, sent, cu, scale, heat, group, args)
    sent_bytes.clear()
    times = []
    for step in range(args.steps):
        if group is not None:
            dist.barrier(group=group)
        if step == args.steps - 1:
            rss0 = _rss_kib("VmRSS")
            _reset_peak()
        start = time.perf_counter()
        one_step(patch, sent, cu, scale, heat, group, args)
        times.append(time.perf_counter() - start)
    peak_kib = _rss_kib("VmHWM") - rss0
    return {
        "times": times,
        "bytes_per_step": sum(sent_bytes) / args.steps,
        "peak_rss_growth_mib": peak_kib / 1024.0,
        "B_local": int(lengths.shape[0]),
        "N_local": int(lengths.sum()),
    }


_COUNTED: list = []


def counting(enabled: bool) -> list:
    """Wrap the loss's collectives so that each call adds the bytes this rank sends to a list."""
    _COUNTED.clear()
    if not enabled:
        return _COUNTED
    import torch.distributed as dist
    from egma_kernels import distributed as D

    if getattr(D, "_bench_wrapped", False):
        return _COUNTED

    def nbytes(t):
        return t.numel() * t.element_size()

    gather, scatter, reduce = D._all_gather_flat, D._reduce_scatter_flat, dist.all_reduce

    def all_gather_flat(output, local, group):
        _COUNTED.append((dist.get_world_size(group) - 1) * nbytes(local))
        return gather(output, local, group)

    def reduce_scatter_flat(output, full, group):
        _COUNTED.append((dist.get_world_size(group) - 1) * nbytes(output))
        return scatter(output, full, group)

    def all_reduce(tensor, *a, group=None, **k):
        K = dist.get_world_size(group)
        _COUNTED.append(2 * (K - 1) * nbytes(tensor) // K)
        return reduce(tensor, *a, group=group, **k)

    D._all_gather_flat, D._reduce_scatter_flat = all_gather_flat, reduce_scatter_flat
    D._dist().all_reduce = all_reduce  # the module calls dist.all_reduce for the returned values
    D._bench_wrapped = True
    return _COUNTED


def _worker(rank, world, port, outdir, args):
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        result = measure(rank, world, args, dist.group.WORLD)
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, args) -> list:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(world, _free_port(), outdir, args), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(outdir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    return results


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and sys.platform.startswith("linux"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="2,4", help="comma-separated numbers of processes")
    parser.add_argument("--batch", type=int, default=64, help="global batch (split evenly over the ranks)")
    parser.add_argument("--patches", type=int, default=49)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--compat", action="store_true", help="egma_compat=True")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    from egma_kernels.distributed import communicated_bytes

    worlds = [int(w) for w in args.worlds.split(",")]
    for w in worlds:
        if args.batch % w:
            parser.error(f"--batch {args.batch} is not divisible by {w} processes")
    load = os.getloadavg()
    print(f"# {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min); "
          f"{args.threads} torch thread(s) per process; backend {args.backend}, {args.dtype}, "
          f"B={args.batch} global, P={args.patches}, D={args.dim}, egma_compat={args.compat}", flush=True)

    torch.set_num_threads(args.threads)
    rows = []
    one = measure(0, 1, args, None)
    rows.append({"processes": 1, "B_local": one["B_local"], "N_local_max": one["N_local"],
                 "median_ms": 1e3 * statistics.median(one["times"]), "bytes_per_rank": 0, "formula_bytes": 0,
                 "peak_mib_max": one["peak_rss_growth_mib"]})
    for world in worlds:
        results = run_world(world, args)
        step = [max(r["times"][i] for r in results) for i in range(args.steps)]
        B_local = results[0]["B_local"]
        N_max = max(r["N_local"] for r in results)
        elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
        formula = communicated_bytes(B_local, N_max, args.dim, world, element_size=elem, acc_size=elem,
                                     egma_compat=args.compat)
        rows.append({"processes": world, "B_local": B_local, "N_local_max": N_max,
                     "median_ms": 1e3 * statistics.median(step),
                     "bytes_per_rank": max(r["bytes_per_step"] for r in results), "formula_bytes": formula,
                     "peak_mib_max": max(r["peak_rss_growth_mib"] for r in results)})
    print("| processes | images / rank | max sentences / rank | step (fwd+bwd), median ms | bytes sent / rank / step "
          "(counted) | formula | peak RSS growth / rank, MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['processes']} | {r['B_local']} | {r['N_local_max']} | {r['median_ms']:.1f} | "
              f"{r['bytes_per_rank']:,.0f} | {r['formula_bytes']:,} | {r['peak_mib_max']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "load": load, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
