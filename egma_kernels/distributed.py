"""The EGMA loss over a ``torch.distributed`` process group: global negatives for data-parallel training.

``fine_grained_loss(..., group=g)`` lands here. Each of the ``K`` ranks of ``g`` holds a local batch (its
own images, their reports, optional gaze); the loss is the one of ``docs/loss.md`` on the *global* batch,
the ranks' batches concatenated in rank order. See ``docs/distributed.md`` for the contract in full.

What travels (never the patch embeddings, ``B x P x D``, the large tensor):

1. one ``all_gather`` of a small int64 row per rank (sizes, counts, flags, and the loss options ``alpha``,
   ``map_threshold``, ``weights`` and ``logit_scale`` as float64 bits: every rank must use the same ones),
   read on the host once: the only host synchronisation of the call (besides the value checks of
   ``validate``, as without a group);
2. ``all_gather`` of the report lengths (int64, padded to the largest local batch);
3. ``all_gather`` of the sentence embeddings, padded to the largest local ``N``, with autograd;
4. ``all_gather`` of this rank's ``T2I`` rows (``B_local x B``), with autograd, for the column-wise
   cross-entropy (not with ``egma_compat``, whose two cross-entropies are both row-wise);
5. ``all_reduce`` of four detached scalars, the global loss and its terms, for the returned value.

This rank's ``I2T`` and ``T2I`` rows against every report of the group come from the backend's fused
rectangular ``filip_similarity``. The gaze MLCE and the mapping term pair an image with its own report:
they are computed locally by the backend's loss, and rescaled so that their averages are global.

Gradient contract: DistributedDataParallel *averages* parameter gradients over the ranks. Each rank's
returned loss is ``K * share + (global - K * share).detach()``, where ``share`` is this rank's part of the
global loss (the parts sum to it exactly) and the collectives' backward passes sum the gradients of every
rank's share into the inputs they came from. The sum over ranks of what each rank differentiates is
therefore ``K`` times the global loss, and DDP's average is the gradient of the global loss: the same as one
process on the concatenated batch. The value every rank gets is the global loss.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._validation import Scale, accumulation_dtype, check_loss_inputs
from .backends import resolve_backend
from .reference import LossTerms

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Fields of the row each rank contributes to the size exchange; the loss options travel as the bit patterns
# of their float64 values (every rank must use the same ones; max_seqlen is each rank's own bound and may differ).
(_STATUS, _B, _N, _P, _D, _DTYPE, _LONGEST, _AT_LONGEST, _GAZE, _MAPPED, _COMPAT, _SENT_GRAD, _ANY_GRAD,
 _ALPHA, _THRESHOLD, _W_CON, _W_MLCE, _W_MAP, _SCALE) = range(19)
_FIELDS = 19
_OPTIONS = ((_ALPHA, "alpha"), (_THRESHOLD, "map_threshold"), (_W_CON, "weights[0] (w_con)"),
            (_W_MLCE, "weights[1] (w_mlce)"), (_W_MAP, "weights[2] (w_map)"), (_SCALE, "logit_scale"))
_OK, _FAILED, _EMPTY = 0, 1, 2


_DEFAULT = threading.local()


@contextlib.contextmanager
def loss_group(group):
    """Within this context, ``fine_grained_loss`` calls that pass no ``group`` use ``group`` (``None``:
    none). For code that calls the loss where the caller cannot pass the argument, e.g. inside a model's
    ``forward`` (``egma-train`` under torchrun wraps its forward pass in it). Per thread; contexts nest."""
    previous = getattr(_DEFAULT, "group", None)
    _DEFAULT.group = group
    try:
        yield group
    finally:
        _DEFAULT.group = previous


def current_group():
    """The group set by the innermost ``loss_group`` context of this thread, or ``None``."""
    return getattr(_DEFAULT, "group", None)


def _dist():
    import torch.distributed as dist

    return dist


def _all_gather_flat(output: torch.Tensor, local: torch.Tensor, group) -> None:
    """Every rank's ``local`` concatenated along dim 0 into ``output`` (``all_gather_single`` where it
    exists, the older ``all_gather_into_tensor`` otherwise)."""
    dist = _dist()
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(output, local, group=group)


def _reduce_scatter_flat(output: torch.Tensor, full: torch.Tensor, group) -> None:
    """This rank's block of the sum over the ranks of ``full`` (``reduce_scatter_single`` or the older
    ``reduce_scatter_tensor``)."""
    dist = _dist()
    getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(output, full, op=dist.ReduceOp.SUM, group=group)


def _group_rank_and_size(group) -> Tuple[int, int]:
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("group= needs torch.distributed, which this PyTorch build does not provide")
    if not dist.is_initialized():
        raise RuntimeError(
            "fine_grained_loss(group=...) needs an initialised process group: call "
            "torch.distributed.init_process_group first (torchrun sets up its environment), or pass group=None "
            "for the loss of this process's batch alone"
        )
    rank = dist.get_rank(group=group)
    if rank < 0:
        raise RuntimeError("this process is not a member of the process group passed as group=")
    return rank, dist.get_world_size(group=group)


@functools.lru_cache(maxsize=None)
def _similarity_takes_compat(fn) -> bool:
    try:
        return "egma_compat" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _packed_rows(counts: torch.Tensor, stride: int, total: int) -> torch.Tensor:
    """Indices into a ``(K * stride)`` padded gather of the rows that hold data, in rank order.

    ``counts`` (K,) int64 on the device: rank ``r`` filled rows ``r * stride : r * stride + counts[r]``.
    ``total = sum(counts)`` is known on the host, so ``repeat_interleave`` needs no synchronisation.
    """
    ranks = torch.arange(counts.shape[0], device=counts.device)
    rank_of = torch.repeat_interleave(ranks, counts, output_size=total)
    start = torch.cumsum(counts, 0) - counts
    return rank_of * stride + (torch.arange(total, device=counts.device) - start[rank_of])


class _AllGatherRows(torch.autograd.Function):
    """An all-gather along the first dimension, whose backward pass is the matching reduce-scatter (sum):
    each rank's block receives the sum over the ranks of the gradients of its gathered copy. One collective
    each way, on NCCL and gloo alike."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, world: int) -> torch.Tensor:
        ctx.group, ctx.world = group, world
        out = local.new_empty((world * local.shape[0],) + tuple(local.shape[1:]))
        _all_gather_flat(out, local.contiguous(), group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dist = _dist()
        grad = grad.contiguous()
        rows = grad.shape[0] // ctx.world
        out = grad.new_empty((rows,) + tuple(grad.shape[1:]))
        try:
            _reduce_scatter_flat(out, grad, ctx.group)
        except (RuntimeError, NotImplementedError):  # a gloo without reduce_scatter: all_reduce, keep ours
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
            rank = dist.get_rank(group=ctx.group)
            out = grad[rank * rows:(rank + 1) * rows]
        return out, None, None


def _gather_rows(local: torch.Tensor, rows: int, group, world: int, index: torch.Tensor,
                 differentiable: bool) -> torch.Tensor:
    """Every rank's ``local`` (its first dimension padded with zeros to ``rows``), concatenated in rank
    order without the padding (``index``, from ``_packed_rows``). With ``differentiable`` the gradient of
    each gathered block flows back to the rank it came from, summed over the ranks that used it."""
    pad = rows - local.shape[0]
    if pad:
        local = torch.cat([local, local.new_zeros((pad,) + tuple(local.shape[1:]))], dim=0)
    if differentiable:
        gathered = _AllGatherRows.apply(local, group, world)
    else:
        gathered = local.new_empty((world * rows,) + tuple(local.shape[1:]))
        _all_gather_flat(gathered, local.contiguous(), group)
    return gathered.index_select(0, index)


def _zero_padded_reports(
    sent: torch.Tensor, lengths: torch.Tensor, longest: int, num_padded: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``egma_compat``'s zero padding made explicit, for a backend whose similarity has no compat switch:
    one zero sentence appended to every report shorter than ``longest``. The I2T max over a padded report
    then sees the 0 of the padding; ``T2I`` over the augmented reports is multiplied back by
    ``(n_b + 1) / n_b`` (the zero sentence's best patch scores exactly 0).

    Returns the augmented sentences, their int32 ``cu_seqlens`` and the (R,) factor for ``T2I``'s columns.
    """
    padded = (lengths < longest).to(torch.int64)
    owner = torch.repeat_interleave(torch.arange(lengths.shape[0], device=lengths.device), lengths,
                                    output_size=sent.shape[0])
    shift = torch.cumsum(padded, 0) - padded  # zero sentences inserted before each report
    new_lengths = lengths + padded
    position = torch.arange(sent.shape[0], device=sent.device) + shift[owner]
    augmented = sent.new_zeros((sent.shape[0] + num_padded, sent.shape[1])).index_copy(0, position, sent)
    cu = F.pad(torch.cumsum(new_lengths, 0), (1, 0)).to(torch.int32)
    return augmented, cu, new_lengths.to(torch.float64) / lengths.to(torch.float64)


def _float_bits(values: List[float]) -> List[int]:
    return torch.tensor(values, dtype=torch.float64).view(torch.int64).tolist()


def _bits_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()


def _sizes_row(checked, egma_compat: bool, device: torch.device, options: List[float]) -> torch.Tensor:
    """This rank's row of the size exchange, built on the device (no host read): the host values, then
    ``logit_scale``'s float64 bits from the device."""
    B, P, D = checked.patch_emb.shape
    N = checked.sent_emb.shape[0]
    cu = checked.cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    longest = lengths.max()
    gaze = checked.gaze_mask.sum() if checked.gaze is not None else torch.zeros((), dtype=torch.int64, device=device)
    sent_grad = torch.is_grad_enabled() and checked.sent_emb.requires_grad
    any_grad = torch.is_grad_enabled() and (
        checked.patch_emb.requires_grad or checked.sent_emb.requires_grad or checked.logit_scale.requires_grad
    )
    known = _host_to_device(
        [_OK, B, N, P, D, _DTYPES.index(checked.patch_emb.dtype), int(egma_compat), int(sent_grad), int(any_grad)],
        device,
    )
    counts = torch.stack([longest, (lengths == longest).sum(), gaze.to(torch.int64), (lengths >= 2).sum()])
    opts = _host_to_device(_float_bits(options), device)
    scale = checked.logit_scale.detach().to(torch.float64).reshape(1).view(torch.int64)
    return torch.cat([known[:_LONGEST], counts.to(torch.int64), known[_LONGEST:], opts, scale])


def _host_to_device(values: List[int], device: torch.device) -> torch.Tensor:
    """An int64 tensor of host values on ``device``; on a GPU through pinned memory and an asynchronous
    copy (a plain copy from pageable memory would synchronise the stream)."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.int64)
    return torch.tensor(values, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


def _exchange_device(patch_emb, group) -> torch.device:
    if isinstance(patch_emb, torch.Tensor):
        return patch_emb.device
    dist = _dist()
    if dist.get_backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _refuse_mismatch(rows: List[List[int]], field: int, what: str, show=str, key=None) -> None:
    values = [row[field] for row in rows]
    keys = values if key is None else [key(v) for v in values]
    if any(k != keys[0] for k in keys):
        per_rank = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(values))
        raise ValueError(f"fine_grained_loss over a group needs the same {what} on every rank; got {per_rank}")


def fine_grained_loss_distributed(
    patch_emb: torch.Tensor,
    sent_emb: torch.Tensor,
    cu_seqlens: torch.Tensor,
    logit_scale: Scale,
    gaze: Optional[torch.Tensor],
    gaze_mask: Optional[torch.Tensor],
    *,
    group,
    alpha: float,
    map_threshold: float,
    weights: Sequence[float],
    egma_compat: bool,
    backend: Optional[str],
    validate: Optional[bool],
    max_seqlen: Optional[int],
) -> LossTerms:
    """The EGMA loss of the group's global batch, as seen by this rank (see the module docstring).

    Returns ``LossTerms`` whose four scalars carry the global values (and ``K`` times the gradient of this
    rank's share), and whose ``i2t``/``t2i`` are this rank's rows against every report, ``(B_local, B)``.
    """
    dist = _dist()
    rank, world = _group_rank_and_size(group)

    # 1. Local checks. An error is held back until every rank has reported in the size exchange, so that
    #    all ranks raise (none is left waiting in a collective).
    error: Optional[BaseException] = None
    empty = isinstance(patch_emb, torch.Tensor) and patch_emb.dim() == 3 and patch_emb.shape[0] == 0
    checked = impl = None
    if not empty:
        try:
            checked = check_loss_inputs(
                patch_emb, sent_emb, cu_seqlens, logit_scale, gaze, gaze_mask, validate=validate, max_seqlen=max_seqlen
            )
            impl = resolve_backend(backend, checked.patch_emb.device)
        except Exception as exc:  # re-raised below, after the exchange
            error = exc
    device = checked.patch_emb.device if checked is not None else _exchange_device(patch_emb, group)
    if checked is not None and error is None:
        row = _sizes_row(checked, egma_compat, device, [float(alpha), float(map_threshold), *map(float, weights)])
    else:
        row = torch.zeros(_FIELDS, dtype=torch.int64, device=device)
        row[_STATUS] = _EMPTY if empty else _FAILED

    # 2. The size exchange: the one host read of the call.
    gathered = torch.empty((world * _FIELDS,), dtype=torch.int64, device=device)
    _all_gather_flat(gathered, row, group)
    gathered = gathered.view(world, _FIELDS)
    rows = gathered.tolist()

    failed = [r for r, row_ in enumerate(rows) if row_[_STATUS] == _FAILED]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"fine_grained_loss over a group: rank(s) {failed} refused their inputs (see the error raised "
            f"there); every rank stops at the same call"
        )
    empty_ranks = [r for r, row_ in enumerate(rows) if row_[_STATUS] == _EMPTY]
    if empty_ranks:
        raise ValueError(
            f"fine_grained_loss over a group: rank(s) {empty_ranks} have no images (B=0); every rank needs at "
            f"least one image and its report at each call (e.g. drop_last=True in the distributed sampler)"
        )
    _refuse_mismatch(rows, _D, "embedding size D")
    _refuse_mismatch(rows, _DTYPE, "embedding dtype", lambda v: str(_DTYPES[v]))
    _refuse_mismatch(rows, _P, "number of patches P")
    _refuse_mismatch(rows, _COMPAT, "egma_compat", lambda v: str(bool(v)))
    for field, name in _OPTIONS:
        _refuse_mismatch(rows, field, name, lambda v: repr(_bits_float(v)), key=_bits_float)
    _refuse_mismatch(rows, _SENT_GRAD, "sent_emb.requires_grad (under grad mode)", lambda v: str(bool(v)))
    _refuse_mismatch(rows, _ANY_GRAD, "need of a backward pass (inputs requiring grad, grad mode)",
                     lambda v: str(bool(v)))

    Bs = [row_[_B] for row_ in rows]
    Ns = [row_[_N] for row_ in rows]
    B, N = sum(Bs), sum(Ns)
    B_max, N_max = max(Bs), max(Ns)
    offset = sum(Bs[:rank])
    B_local = Bs[rank]
    longest = max(row_[_LONGEST] for row_ in rows)
    at_longest = sum(row_[_AT_LONGEST] for row_ in rows if row_[_LONGEST] == longest)
    gaze_count = sum(row_[_GAZE] for row_ in rows)
    mapped_count = sum(row_[_MAPPED] for row_ in rows)
    any_grad = bool(rows[0][_ANY_GRAD])

    patch, sent, cu, scale = checked.patch_emb, checked.sent_emb, checked.cu_seqlens, checked.logit_scale
    acc = accumulation_dtype(patch.dtype)

    # 3. The global reports: lengths (no gradient) and sentence embeddings (with gradient).
    report_rows = _packed_rows(gathered[:, _B], B_max, B)
    lengths_local = (cu[1:] - cu[:-1]).to(torch.int64)
    lengths = _gather_rows(lengths_local, B_max, group, world, report_rows, differentiable=False)
    sentence_rows = _packed_rows(gathered[:, _N], N_max, N)
    sent_all = _gather_rows(sent, N_max, group, world, sentence_rows, differentiable=bool(rows[0][_SENT_GRAD]))

    # 4. This rank's image rows of I2T and T2I against every report of the group.
    similarity = impl.similarity
    extra = {"max_seqlen": longest} if impl.wants_max_seqlen else {}
    t2i_factor = None
    if not egma_compat:
        cu_all = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
        i2t, t2i = similarity(patch, sent_all, cu_all, scale, **extra)
    elif _similarity_takes_compat(similarity):
        # The backend pads to the longest report of the cu_seqlens it is given: the global longest.
        cu_all = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)
        i2t, t2i = similarity(patch, sent_all, cu_all, scale, egma_compat=True, **extra)
    else:
        sent_aug, cu_aug, t2i_factor = _zero_padded_reports(sent_all, lengths, longest, B - at_longest)
        i2t, t2i = similarity(patch, sent_aug, cu_aug, scale, **extra)
        t2i = t2i * t2i_factor.to(t2i.dtype)

    # 5. This rank's share of the contrastive term: its rows of I2T's row-wise cross-entropy, and its
    #    reports' columns of T2I's column-wise one (T2I rows gathered from every rank, with gradient).
    targets = torch.arange(offset, offset + B_local, device=device)
    i2t_part = F.cross_entropy(i2t, targets, reduction="sum")
    if egma_compat:
        t2i_part = F.cross_entropy(t2i, targets, reduction="sum")
    else:
        t2i_all = _gather_rows(t2i, B_max, group, world, report_rows, differentiable=any_grad)  # (B, B)
        t2i_part = F.cross_entropy(t2i_all[:, offset:offset + B_local].t(), targets, reduction="sum")
    contrastive = 0.5 * (i2t_part + t2i_part) / B

    # 6. The gaze MLCE and the mapping term (each image with its own report) of the local batch, their
    #    local means turned into this rank's share of the global means.
    w_con, w_mlce, w_map = (float(w) for w in weights)
    zero = torch.zeros((), dtype=acc, device=device)
    gaze_mlce = mapping = zero
    if w_mlce != 0.0 or w_map != 0.0:
        local_extra = {"max_seqlen": rows[rank][_LONGEST]} if impl.wants_max_seqlen else {}
        terms = impl.loss(
            patch, sent, cu, scale, checked.gaze, checked.gaze_mask, alpha=float(alpha),
            map_threshold=float(map_threshold), weights=(0.0, 1.0, 1.0), egma_compat=bool(egma_compat),
            **local_extra,
        )
        local_gaze, local_mapped = rows[rank][_GAZE], rows[rank][_MAPPED]
        gaze_mlce = terms.gaze_mlce * (local_gaze / max(1, gaze_count)) if local_gaze else zero
        mapping = terms.mapping * (local_mapped / max(1, mapped_count)) if local_mapped else zero

    share = w_con * contrastive + w_mlce * gaze_mlce + w_map * mapping

    # 7. The global values (for the caller's logging): one all_reduce of detached scalars, no host read.
    parts = torch.stack([share, contrastive, gaze_mlce, mapping]).detach().to(acc)
    totals = parts.clone()
    dist.all_reduce(totals, group=group)

    def globalised(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        scaled = x * world
        return scaled + (total - scaled).detach()

    return LossTerms(
        globalised(share, totals[0]),
        globalised(contrastive, totals[1]),
        globalised(gaze_mlce, totals[2]),
        globalised(mapping, totals[3]),
        i2t,
        t2i,
    )


def communicated_bytes(B: int, N: int, D: int, world: int, *, element_size: int = 4, acc_size: int = 4,
                       egma_compat: bool = False, backward: bool = True) -> int:
    """Payload bytes each rank sends per loss call (forward and, with ``backward``, backward), for local
    batches of ``B`` images and ``N`` sentences on every one of ``world`` ranks (``B``, ``N`` are the padded,
    largest local sizes when they differ). An all_gather or a reduce-scatter of a ``s``-byte block per rank
    makes each rank send ``(world - 1) * s`` bytes (ring or direct); an all_reduce of ``s`` bytes
    ``2 (world - 1) / world * s``. ``element_size``: bytes of the embeddings' dtype; ``acc_size``: of the
    accumulation dtype (8 for float64, else 4)."""
    k1 = world - 1
    sizes = k1 * _FIELDS * 8
    lengths = k1 * B * 8
    sentences = k1 * N * D * element_size
    scores = 0 if egma_compat else k1 * B * (B * world) * acc_size
    scalars = 2 * k1 * 4 * acc_size // world if world > 1 else 0
    forward = sizes + lengths + sentences + scores + scalars
    return forward + (sentences + scores if backward else 0)
