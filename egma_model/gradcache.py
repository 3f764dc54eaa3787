"""Gradient caching: the parameter gradients of one large contrastive batch with the activation memory of
a chunk (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021).

``grad_cache_step(model, batch, chunk_size)``:

1. the embeddings (``EGMAModel.embed``) of the whole batch, ``chunk_size`` images at a time (each chunk
   with its reports' sentences, split at ``cu_seqlens``), without an autograd graph; the RNG state at the
   start of each chunk is kept;
2. the embeddings concatenated into leaf tensors that require a gradient, the loss of the whole batch on
   them (``EGMAModel.loss_from_embeddings``) and its backward pass: the gradients of the loss with respect
   to every embedding, and ``logit_scale``'s gradient (the only parameter the loss uses);
3. the encoders re-run chunk by chunk, with the chunk's RNG state restored first (dropout draws the same
   masks as in 1.), and ``torch.autograd.backward(embeddings, their gradients)``: each chunk adds its share
   to the encoders' parameter gradients.

By the chain rule the accumulated gradients are those of the loss of the whole batch, when the encoders
treat the examples of a batch independently (LayerNorm, no BatchNorm) and the RNG replays: with dropout,
equal to one graph over the chunks computed in the same order. The memory of the encoders' activations is
that of one chunk; the embeddings of the whole batch (``B x P x D`` per scale) are kept, twice (values and
gradients). The price is a second forward pass of the encoders.

With the distributed loss (``egma_kernels.distributed.loss_group``), step 2 is the only place the ranks
communicate in the loss: wrap the call in ``loss_group(group)`` as for a plain forward pass. There is no
DistributedDataParallel wrapper to average the gradients across the ranks: ``average_gradients`` does it
after the step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["grad_cache_step", "chunk_bounds", "slice_batch", "average_gradients", "broadcast_parameters"]

_SENTENCE_KEYS = ("input_ids", "attention_mask", "gaze")
_IMAGE_KEYS = ("pixel_values", "gaze_mask", "index", "labels")


def chunk_bounds(n_images: int, chunk_size: int) -> List[Tuple[int, int]]:
    """``[(i0, i1), ...]``: consecutive image ranges of ``chunk_size`` (the last one may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(i, min(i + chunk_size, n_images)) for i in range(0, n_images, chunk_size)]


def slice_batch(batch: Dict[str, torch.Tensor], i0: int, i1: int, cu: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Images ``i0:i1`` of a collated batch with their reports' sentences (``cu``: ``cu_seqlens`` on the host)."""
    s0, s1 = cu[i0], cu[i1]
    out = {}
    for k, v in batch.items():
        if k in _IMAGE_KEYS:
            out[k] = v[i0:i1]
        elif k in _SENTENCE_KEYS:
            out[k] = v[s0:s1]
        elif k == "cu_seqlens":
            out[k] = v[i0:i1 + 1] - v[i0]
        else:
            out[k] = v
    return out


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _flatten(emb: Dict[str, object]) -> List[Optional[torch.Tensor]]:
    """``embed``'s output as a flat list: the patch embeddings per scale, the pooled one (or None), the sentences."""
    return list(emb["patch"]) + [emb["pooled"], emb["sent"]]


def _unflatten(flat: Sequence[Optional[torch.Tensor]]) -> Dict[str, object]:
    return {"patch": list(flat[:-2]), "pooled": flat[-2], "sent": flat[-1]}


def grad_cache_step(model, batch: Dict[str, torch.Tensor], chunk_size: int, *,
                    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    scale_loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    part: Optional[Callable[[str], contextlib.AbstractContextManager]] = None) -> Dict[str, torch.Tensor]:
    """One step's forward and backward passes with gradient caching; returns the loss terms (detached).

    ``model``: an ``EGMAModel`` (not a DistributedDataParallel wrapper). Gradients are accumulated into the
    parameters' ``.grad`` as ``loss.backward()`` would (zero them before). ``forward_context``: entered
    around every forward pass (autocast). ``scale_loss``: applied to the loss before its backward pass
    (a gradient scaler's ``scale``). ``part``: the step profiler's timing context for the backward phases.
    """
    part = part or (lambda name: contextlib.nullcontext())
    pv = batch["pixel_values"]
    device = pv.device
    cu = [int(x) for x in batch["cu_seqlens"].tolist()]
    bounds = chunk_bounds(pv.shape[0], chunk_size)
    chunks = [slice_batch(batch, i0, i1, cu) for i0, i1 in bounds]
    states, pieces = [], []
    with torch.no_grad():
        for c in chunks:
            states.append(_rng_state(device))
            with forward_context():
                pieces.append(_flatten(model.embed(c)))
    leaves = [None if p[0] is None else torch.cat(p).detach().requires_grad_(True) for p in zip(*pieces)]
    del pieces
    with forward_context():
        out = model.loss_from_embeddings(_unflatten(leaves), batch)
    loss = out["loss"]
    with part("backward"):
        (scale_loss(loss) if scale_loss is not None else loss).backward()
    # each leaf's gradient, cut at the chunks' boundaries (images for patches and pooled, sentences for sent)
    cuts_img = [i1 - i0 for i0, i1 in bounds]
    cuts_sent = [cu[i1] - cu[i0] for i0, i1 in bounds]
    grads = []
    for j, leaf in enumerate(leaves):
        if leaf is None or leaf.grad is None:
            grads.append(None)
        else:
            grads.append(leaf.grad.split(cuts_sent if j == len(leaves) - 1 else cuts_img))
    end_state = _rng_state(device)
    for ci, (c, state) in enumerate(zip(chunks, states)):
        _set_rng_state(state, device)
        with forward_context():
            emb = _flatten(model.embed(c))
        pairs = [(e, g[ci]) for e, g in zip(emb, grads) if e is not None and g is not None]
        with part("backward"):
            torch.autograd.backward([e for e, _ in pairs], [g for _, g in pairs])
    _set_rng_state(end_state, device)
    return {k: v.detach() for k, v in out.items()}


def average_gradients(parameters, group=None) -> None:
    """Replace every parameter's gradient by its mean over the ranks of ``group`` (what
    DistributedDataParallel does after a backward pass): one ``all_reduce`` per dtype over the flattened
    gradients (a missing gradient counts as zeros)."""
    import torch.distributed as dist

    params = [p for p in parameters if p.requires_grad]
    world = dist.get_world_size(group)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def broadcast_parameters(module: torch.nn.Module, src: int = 0, group=None) -> None:
    """Rank ``src``'s parameters and buffers on every rank (DistributedDataParallel does it at construction)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src, group=group)
