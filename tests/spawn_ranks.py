"""Spawning gloo ranks for the distributed tests: a free loopback port and a bounded join.

Each rank imports ``egma_model.distributed_setup.GROUP_BINDING_MODULES`` before its worker sets up a process
group: torch.distributed modules whose ``group=group.WORLD`` defaults would otherwise bind the live group when
DistributedDataParallel (through its lazy torch._dynamo import) or transformers import them later, which keeps
the group alive past ``destroy_process_group`` and can abort the rank at exit (see that module).
"""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(rank: int, worker, args: tuple) -> None:
    from egma_model.distributed_setup import import_group_binding_modules

    import_group_binding_modules()
    worker(rank, *args)


def spawn_bounded(worker, args: tuple, world: int, timeout_s: float, what: str) -> None:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes; raise if they are not all done within
    ``timeout_s`` (then kill them) or if one fails (torch.multiprocessing re-raises its error)."""
    import torch.multiprocessing as mp

    context = mp.spawn(_rank_entry, args=(worker, args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} on {world} processes did not finish within {timeout_s} s")
    finally:
        for proc in context.processes:
            if proc.is_alive():
                proc.kill()
