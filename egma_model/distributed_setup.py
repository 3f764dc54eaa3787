"""Training over several processes: the process group under ``torchrun`` (``Distributed``), the sampler that
gives each rank its slice of every global batch, the ranks' start-up agreement, and torch.distributed's
failure types. One process (no ``torchrun``) goes through the same calls, which then do nothing.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from .train_args import TrainArgs, TrainError

# Modules of torch.distributed with ``group=group.WORLD`` as a default argument (torch/distributed/nn/functional.py,
# torch/distributed/optim/zero_redundancy_optimizer.py, torch/distributed/fsdp/sharded_grad_scaler.py). The
# default is evaluated when the module is imported: imported while a process group is up, it holds that group for
# the rest of the process, so destroy_process_group cannot free it, and the group's gloo worker threads are still
# there at interpreter shutdown, where one that frees a finished collective's tensors aborts the process
# ("terminate called without an active exception"; the mechanism is described in pytorch/pytorch pull request
# 179291). They are imported lazily after the group is set up by DistributedDataParallel's constructor (its
# torch._dynamo import reaches torch.distributed.fsdp) and by transformers while it builds a model
# (transformers/distributed/fsdp.py). Imported before any group exists, their defaults hold ``None`` instead.
GROUP_BINDING_MODULES = ("torch.distributed.nn", "torch.distributed.optim", "torch.distributed.fsdp")


def import_group_binding_modules() -> None:
    """Import ``GROUP_BINDING_MODULES`` (if this PyTorch has torch.distributed). A script that sets up the
    process group itself for ``egma-train`` and has not imported ``egma_model.train`` yet calls it before
    ``init_process_group``; importing this module does it (so before ``Distributed`` sets up a group)."""
    if not torch.distributed.is_available():
        return
    for name in GROUP_BINDING_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a build without one of them: nothing of it can hold the group either
            pass


# Unconditionally, at import: a script that imports egma-train's modules and then sets up a group itself (as
# torch.multiprocessing.spawn workers do, with WORLD_SIZE set after the imports) is covered too. The cost is
# about 0.5 s, mostly torch.distributed.fsdp, which transformers imports anyway when it builds a model.
import_group_binding_modules()


class Distributed:
    """The process group under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), else one process.

    NCCL for CUDA devices (each rank on ``cuda:LOCAL_RANK``), gloo for the CPU. ``--batch-size`` is per
    process: the global batch is ``batch_size * world``."""

    def __init__(self, a: TrainArgs):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if a.device:
            self.device = torch.device(a.device)
            if self.device.type == "cuda" and self.device.index is None and self.world > 1:
                self.device = torch.device("cuda", local_rank)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank if self.world > 1 else torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.group = None
        self.owns_group = False
        if self.world > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                from datetime import timedelta

                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                        timeout=timedelta(seconds=a.dist_timeout))
                self.owns_group = True
            self.group = dist.group.WORLD
        self.is_main = self.rank == 0

    def mean_and_all_true(self, values: Dict[str, float], ok: bool) -> Tuple[Dict[str, float], bool]:
        """The mean over the ranks of each number in ``values``, and whether ``ok`` holds on every rank: one
        all_reduce (a step's logged terms and its finiteness check share it)."""
        if self.world == 1:
            return dict(values), ok
        import torch.distributed as dist

        t = torch.tensor(list(values.values()) + [0.0 if ok else 1.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        *sums, not_ok = t.tolist()
        return dict(zip(values, (v / self.world for v in sums))), not_ok == 0

    def all_true(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (one all_reduce), so that the ranks stop together."""
        if self.world == 1:
            return ok
        import torch.distributed as dist

        t = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item()) == 0

    def gather_ints(self, values: List[int]) -> List[List[int]]:
        """Every rank's ``values`` (the same length on every rank), in rank order."""
        if self.world == 1:
            return [list(values)]
        import torch.distributed as dist

        local = torch.tensor(values, dtype=torch.int64, device=self.device)
        out = torch.empty(self.world * len(values), dtype=torch.int64, device=self.device)
        dist.all_gather_into_tensor(out, local)
        return out.view(self.world, len(values)).tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's indices of each global batch of an epoch's shuffle (one permutation per epoch and seed,
    the same on every rank): global batch ``s`` is ``perm[s*G:(s+1)*G]`` with ``G = batch * world``, and
    rank ``r`` takes its ``r``-th slice of ``batch``. Concatenated in rank order, the ranks' batches are
    exactly the batches of one process with ``batch * world``. Full global batches only (as ``drop_last``),
    except one process with fewer samples than a batch, which gets them all. ``set_epoch`` reshuffles;
    its ``start_batch`` skips the epoch's first batches (a resumed run continues mid-epoch without loading them)."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, tag_epoch: bool = False):
        if world > 1 and n < batch * world:
            raise ValueError(f"{n} training samples are fewer than the global batch ({batch} x {world} processes)")
        self.n, self.batch, self.rank, self.world, self.seed, self.epoch = n, batch, rank, world, seed, 0
        self.start = 0
        # tag_epoch: yield (index, epoch), so that a DataLoader kept for the whole run (persistent workers hold
        # their own copy of the dataset) still augments each epoch differently; EGMADataset takes both forms
        self.tag_epoch = tag_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch * batch_of(self)

    def __len__(self) -> int:
        full = (self.n // (self.batch * self.world)) * self.batch if self.n >= self.batch * self.world else self.n
        return max(0, full - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        G = self.batch * self.world
        if self.n < G:
            mine = perm.tolist()[self.start:]
        else:
            mine = perm[: (self.n // G) * G].view(-1, self.world, self.batch)[:, self.rank].reshape(-1).tolist()
            mine = mine[self.start:]
        return iter([(i, self.epoch) for i in mine] if self.tag_epoch else mine)


def batch_of(sampler: GlobalBatchSampler) -> int:
    """Indices per batch of this rank (the whole dataset when one process has fewer samples than a batch)."""
    return sampler.batch if sampler.n >= sampler.batch * sampler.world else sampler.n


# What every rank compares at start-up (agree_at_start).
START_FACTS = ("rows", "steps per epoch", "total steps", "vocabulary size", "model config (crc32)", "options (crc32)",
          "resumed")


def agree_at_start(ddp: Distributed, error: Optional[BaseException], facts: Dict[str, int]) -> None:
    """Under torchrun: every rank compares its start-up facts (data size, steps, vocabulary, options' digest)
    and its start-up status with the others', and every rank stops with one message if they differ or if a
    rank failed (that rank raises its own error)."""
    names = ["failed"] + list(facts)
    rows = ddp.gather_ints([int(error is not None)] + [int(facts[k]) for k in facts])
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        raise TrainError(f"rank(s) {failed} failed at start-up (see the error there); every rank stops")
    diffs = []
    for i, name in enumerate(names[1:], start=1):
        values = [row[i] for row in rows]
        if any(v != values[0] for v in values):
            diffs.append(f"{name}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values)))
    if diffs:
        raise TrainError("the ranks disagree (every rank needs the same data and options): " + "; ".join(diffs))


def crc(obj) -> int:
    import zlib

    return zlib.crc32(json.dumps(obj, sort_keys=True, default=str).encode())


def dist_errors() -> tuple:
    """The exceptions of torch.distributed's failures (timeouts, lost peers), where this torch has them."""
    import torch.distributed as dist

    err = getattr(dist, "DistError", None) if dist.is_available() else None
    return (err,) if err is not None else ()
