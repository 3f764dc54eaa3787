"""The op contract every fused backend runs under: ops, saved state, fake kernels, autograd.

A fused backend supplies plain launcher functions (``Launchers``); ``define_ops`` turns them into four
PyTorch custom ops, ``egma_kernels::<prefix>_loss``, ``<prefix>_loss_backward``, ``<prefix>_filip`` and
``<prefix>_filip_backward``, and into the loss and similarity functions the backend registers
(``backends.Backend``). Everything else is decided here, once for every backend:

* the ops' schemas. The loss op takes the six input tensors, ``options`` (``[alpha, map_threshold, w_con,
  w_mlce, w_map, save]``: one list argument, because torch's autograd wrapper of a custom op costs time per
  schema argument on every call), ``egma_compat`` and ``max_seqlen``, and returns ``(loss, contrastive,
  gaze_mlce, mapping, i2t, t2i)`` followed by the backend's saved tensors. The similarity op takes
  ``(patch, sent, cu, scale, max_seqlen, egma_compat=False, save=True)`` and returns ``(i2t, t2i)``
  followed by its saved tensors;
* what is saved for the backward pass: the inputs, ``i2t``, ``t2i`` and the backend's saved tensors (marked
  non-differentiable), and when: the launchers are told ``save`` (``backward_may_follow``: grad mode on and an
  input that needs a gradient), so that an evaluation call under ``torch.no_grad()`` writes no routes;
* the fake (meta) kernels, so that ``torch.compile(fullgraph=True)`` sees opaque ops and no graph break: the
  public outputs' shapes are fixed here, the saved tensors' shapes come from the launchers' ``*_saved``;
* the autograd formula: the backward op receives only the upstream gradients that exist (None for the
  others), the saved state and the forward's options; differentiating the backward op raises (the fused
  backends compute first derivatives only).

A new backend (or a rewrite of one's kernels) is one launcher file that builds a ``Launchers`` and calls
``define_ops``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._validation import accumulation_dtype
from .options import LossOptions
from .reference import LossTerms

NUM_LOSS_OUTPUTS = 6  # loss, contrastive, gaze_mlce, mapping, i2t, t2i
NUM_FILIP_OUTPUTS = 2  # i2t, t2i


class OpInputs(NamedTuple):
    """The loss op's tensors as the launchers receive them (``gaze``/``gaze_mask`` are both None or both set
    when they come from the public functions; the ops can be called directly with anything)."""

    patch: Tensor  # (B, P, D)
    sent: Tensor  # (N, D)
    cu: Tensor  # (R + 1,) offsets of the reports
    scale: Tensor  # 0-dim logit scale, accumulation dtype
    gaze: Optional[Tensor] = None  # (N, P)
    gaze_mask: Optional[Tensor] = None  # (B,) bool


class LossGrads(NamedTuple):
    """The upstream gradients of the loss op's public outputs; None where an output received none."""

    loss: Optional[Tensor]
    contrastive: Optional[Tensor]
    gaze_mlce: Optional[Tensor]
    mapping: Optional[Tensor]
    i2t: Optional[Tensor]
    t2i: Optional[Tensor]


SavedShapes = Sequence[Tuple[Tuple[int, ...], torch.dtype]]


class OpLaunchers(NamedTuple):
    """The launchers of one op pair (forward, backward) and the saved state between them."""

    forward: Callable
    backward: Callable
    saved: Callable  # the (shape, dtype) of each saved tensor, for the fake kernel
    saved_count: int
    # check(x: OpInputs): the layout the kernels index by, checked when the ops are called (directly, or
    # under torch.compile), before forward and backward. The public functions' eager calls skip it: their
    # inputs passed the metadata checks of _validation and the backend's prepare().
    check: Optional[Callable] = None


@dataclass(frozen=True)
class Launchers:
    """What a fused backend supplies: plain functions that run its kernels (no autograd, no op registration).

    ``loss.forward(x: OpInputs, options: LossOptions, max_seqlen: int, save: bool)`` returns the six public
    outputs followed by ``loss.saved_count`` tensors for the backward pass (empty ones when ``save`` is false,
    if the backend can skip them). ``loss.backward(grads: LossGrads, x, i2t, t2i, saved: tuple, options,
    max_seqlen)`` returns ``(d_patch, d_sent, d_scale)``. ``loss.saved(x, options, max_seqlen, save)`` gives
    the ``(shape, dtype)`` of each saved tensor for the fake kernel (``x`` may hold fake tensors: only
    shapes and dtypes may be read).

    ``filip.forward(x, max_seqlen, egma_compat, save)`` returns ``(i2t, t2i, *saved)`` (``x.gaze`` is None);
    ``filip.backward(g_i2t, g_t2i, x, i2t, t2i, saved, max_seqlen, egma_compat)`` the three gradients;
    ``filip.saved(x, max_seqlen, egma_compat, save)`` the saved tensors' ``(shape, dtype)``.

    ``prepare(x)`` turns validated inputs (``_validation.CheckedInputs``' tensors) into what the launchers
    take (kernel dtype, contiguous memory, int32 offsets); its conversions are differentiable, outside the
    op. ``max_seqlen_of(cu)``: the longest report when the caller did not give it (None: the kernels do not
    need it and the ops receive 0).
    """

    loss: OpLaunchers
    filip: OpLaunchers
    prepare: Callable
    max_seqlen_of: Optional[Callable] = None
    # Whether the similarity's I2T can zero-pad reports as egma_compat does (``filip_similarity`` then takes
    # ``egma_compat=``; the distributed loss pads explicitly for a backend without it).
    filip_compat: bool = False


def backward_may_follow(*inputs: Tensor) -> bool:
    """Whether a forward op must save what its backward needs: grad mode on and an input that needs a gradient."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in inputs)


@functools.lru_cache(maxsize=64)
def _options(floats: Tuple[float, ...], egma_compat: bool) -> LossOptions:
    """The loss op's ``options`` list (and ``egma_compat``) as the launchers take them (``save`` dropped)."""
    alpha, map_threshold, w_con, w_mlce, w_map = (float(v) for v in floats)
    return LossOptions(alpha, map_threshold, (w_con, w_mlce, w_map), bool(egma_compat))


def _op_options(options: Sequence[float], egma_compat: bool) -> Tuple[LossOptions, bool]:
    return _options(tuple(options[:5]), bool(egma_compat)), bool(options[5])


class FusedOps(NamedTuple):
    """A backend's ops (``torch.ops`` overloads) and its functions for ``backends.Backend`` (``loss``,
    ``similarity``: validated inputs, see ``public_functions``)."""

    loss_op: object
    loss_backward_op: object
    filip_op: object
    filip_backward_op: object
    loss: Callable
    similarity: Callable


def define_ops(prefix: str, launchers: Launchers) -> FusedOps:
    """The four custom ops of a backend, with fake kernels and autograd (see the module docstring), and the
    functions that call them for ``backends.Backend``."""
    loss = _LossOps(f"egma_kernels::{prefix}_loss", launchers.loss)
    filip = _FilipOps(f"egma_kernels::{prefix}_filip", launchers.filip)
    return FusedOps(loss.forward_op, loss.backward_op, filip.forward_op, filip.backward_op,
                    *public_functions(loss, filip, launchers))


class _OpPair:
    """A forward op and its backward op around one ``OpLaunchers``: the schemas, the fake kernels, the
    autograd formula (the backward op's own autograd raises: no second derivative), and ``eager``, an
    ``autograd.Function`` running the same implementation without the dispatcher.

    ``eager`` exists for host time: in eager mode the custom op's dispatch and Python autograd wrapper cost
    more than the rest of a call. It runs the same launchers, saves the same state and calls the same
    backward; ``public_functions`` takes it outside ``torch.compile`` and outside any ``TorchDispatchMode``
    (fake tensors, flop counters), which must see the op. With ``create_graph=True`` its backward goes
    through the backward op, whose autograd raises on a second derivative."""

    num_outputs: int  # public outputs before the saved tensors
    num_inputs: int  # the forward's leading tensors (OpInputs' fields)
    patch_at: int  # where the backward op's arguments hold them

    def __init__(self, qualname: str, launchers: OpLaunchers):
        self.launchers = launchers
        n = launchers.saved_count
        saved = ", ".join(f"Tensor saved{i}" for i in range(n))
        outputs = ", ".join(["Tensor"] * (self.num_outputs + n))
        self.forward_op = _define(qualname, f"({self.forward_args}) -> ({outputs})", self._checked(self.forward, 0),
                                  self.forward_fake)
        self.backward_op = _define(qualname + "_backward", self.backward_schema.format(saved=saved),
                                   self._checked(self.backward_impl, self.patch_at), self.backward_fake)
        torch.library.register_autograd(self.forward_op, self.backward, setup_context=self.setup_context)
        torch.library.register_autograd(self.backward_op, _no_second_derivative(self.backward_op.name()),
                                        setup_context=_no_setup)
        pair = self

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):  # with ctx (no separate setup_context): apply then binds no signature
                output = pair.forward(*inputs)
                pair.setup_context(ctx, inputs, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                run = pair.backward_op if torch.is_grad_enabled() else pair.backward_impl
                return pair.backward_with(run, ctx, grads)

        Eager.__name__ = "Eager_" + qualname.replace("::", "_")
        self.eager = Eager.apply

    def _checked(self, impl: Callable, at: int) -> Callable:
        """``impl`` preceded by the launchers' layout check of the op's tensors ``args[at:at + num_inputs]``."""
        check, n = self.launchers.check, self.num_inputs
        if check is None:
            return impl

        def checked(*args):
            check(OpInputs(*args[at:at + n]))
            return impl(*args)

        return checked

    def backward(self, ctx, *grads):
        return self.backward_with(self.backward_op, ctx, grads)

    def backward_fake(self, *args):
        return tuple(torch.empty_like(args[self.patch_at + i]) for i in (0, 1, 3))  # patch, sent, scale


class _LossOps(_OpPair):
    num_outputs = NUM_LOSS_OUTPUTS
    num_inputs = 6
    patch_at = 6
    forward_args = ("Tensor patch, Tensor sent, Tensor cu, Tensor scale, Tensor? gaze, Tensor? gaze_mask, "
                    "float[] options, bool egma_compat, int max_seqlen")
    backward_schema = (
        "(Tensor? g_loss, Tensor? g_contrastive, Tensor? g_gaze_mlce, Tensor? g_mapping, Tensor? g_i2t, "
        "Tensor? g_t2i, Tensor patch, Tensor sent, Tensor cu, Tensor scale, Tensor? gaze, Tensor? gaze_mask, "
        "Tensor i2t, Tensor t2i, {saved}, float[] options, bool egma_compat, int max_seqlen) "
        "-> (Tensor, Tensor, Tensor)"
    )

    def forward(self, patch, sent, cu, scale, gaze, gaze_mask, options, egma_compat, max_seqlen):
        opts, save = _op_options(options, egma_compat)
        x = OpInputs(patch, sent, cu, scale, gaze, gaze_mask)
        return tuple(self.launchers.forward(x, opts, max_seqlen, save))

    def forward_fake(self, patch, sent, cu, scale, gaze, gaze_mask, options, egma_compat, max_seqlen):
        opts, save = _op_options(options, egma_compat)
        B, R = patch.shape[0], cu.shape[0] - 1
        acc = accumulation_dtype(patch.dtype)
        public = [patch.new_empty((), dtype=acc) for _ in range(4)]
        public += [patch.new_empty((B, R), dtype=acc), patch.new_empty((B, R), dtype=acc)]
        saved = self.launchers.saved(OpInputs(patch, sent, cu, scale, gaze, gaze_mask), opts, max_seqlen, save)
        return (*public, *(patch.new_empty(shape, dtype=dtype) for shape, dtype in saved))

    def backward_impl(self, *args):
        n = self.launchers.saved_count
        grads, x, (i2t, t2i) = LossGrads(*args[:6]), OpInputs(*args[6:12]), args[12:14]
        saved, (options, egma_compat, max_seqlen) = args[14:14 + n], args[14 + n:]
        opts, _ = _op_options(options, egma_compat)
        return tuple(self.launchers.backward(grads, x, i2t, t2i, saved, opts, max_seqlen))

    def setup_context(self, ctx, inputs, output):
        patch, sent, cu, scale, gaze, gaze_mask, *options = inputs
        ctx.mark_non_differentiable(*output[NUM_LOSS_OUTPUTS:])
        ctx.set_materialize_grads(False)  # absent upstream gradients stay None: the kernels skip their terms
        ctx.save_for_backward(patch, sent, cu, scale, gaze, gaze_mask, *output[4:])  # i2t, t2i, saved
        ctx.options = options

    @staticmethod
    def backward_with(run, ctx, grads):
        grads = grads[:NUM_LOSS_OUTPUTS]
        if all(g is None for g in grads):
            return (None,) * 9
        d_patch, d_sent, d_scale = run(*grads, *ctx.saved_tensors, *ctx.options)
        return (d_patch, d_sent, None, d_scale) + (None,) * 5


class _FilipOps(_OpPair):
    num_outputs = NUM_FILIP_OUTPUTS
    num_inputs = 4
    patch_at = 2
    forward_args = ("Tensor patch, Tensor sent, Tensor cu, Tensor scale, int max_seqlen, bool egma_compat=False, "
                    "bool save=True")
    backward_schema = (
        "(Tensor? g_i2t, Tensor? g_t2i, Tensor patch, Tensor sent, Tensor cu, Tensor scale, Tensor i2t, "
        "Tensor t2i, {saved}, int max_seqlen, bool egma_compat) -> (Tensor, Tensor, Tensor)"
    )

    def forward(self, patch, sent, cu, scale, max_seqlen, egma_compat=False, save=True):
        return tuple(self.launchers.forward(OpInputs(patch, sent, cu, scale), max_seqlen, egma_compat, save))

    def forward_fake(self, patch, sent, cu, scale, max_seqlen, egma_compat=False, save=True):
        M, R = patch.shape[0], cu.shape[0] - 1
        acc = accumulation_dtype(patch.dtype)
        saved = self.launchers.saved(OpInputs(patch, sent, cu, scale), max_seqlen, egma_compat, save)
        return (patch.new_empty((M, R), dtype=acc), patch.new_empty((M, R), dtype=acc),
                *(patch.new_empty(shape, dtype=dtype) for shape, dtype in saved))

    def backward_impl(self, g_i2t, g_t2i, patch, sent, cu, scale, i2t, t2i, *rest):
        *saved, max_seqlen, egma_compat = rest
        x = OpInputs(patch, sent, cu, scale)
        return tuple(self.launchers.backward(g_i2t, g_t2i, x, i2t, t2i, tuple(saved), max_seqlen, egma_compat))

    def setup_context(self, ctx, inputs, output):
        patch, sent, cu, scale, max_seqlen, egma_compat, _save = inputs
        ctx.mark_non_differentiable(*output[NUM_FILIP_OUTPUTS:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(patch, sent, cu, scale, *output)
        ctx.options = (max_seqlen, egma_compat)

    @staticmethod
    def backward_with(run, ctx, grads):
        g_i2t, g_t2i = grads[:NUM_FILIP_OUTPUTS]
        if g_i2t is None and g_t2i is None:
            return (None,) * 7
        d_patch, d_sent, d_scale = run(g_i2t, g_t2i, *ctx.saved_tensors, *ctx.options)
        return d_patch, d_sent, None, d_scale, None, None, None


def _no_second_derivative(op_name: str) -> Callable:
    def backward(ctx, *grads):
        raise RuntimeError(
            f"egma_kernels: the {op_name} op has no second derivative (a double backward / create_graph=True "
            "was differentiated through the fused loss); use backend='reference' for higher-order gradients"
        )

    return backward


def _no_setup(ctx, inputs, output) -> None:
    pass


def _define(qualname: str, schema: str, impl: Callable, fake: Callable):
    """A custom op from an explicit schema (the launchers' saved-tensor count varies by backend); returns the
    ``torch.ops`` overload, which is called directly (one Python layer less than the ``CustomOpDef``)."""
    op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op._opoverload


def _through_dispatcher() -> bool:
    """Whether a call must go through the op rather than its eager ``autograd.Function``: while
    ``torch.compile`` traces, and while a ``TorchDispatchMode`` (fake tensors, flop counters) is active."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def public_functions(loss: _OpPair, filip: _OpPair, launchers: Launchers) -> Tuple[Callable, Callable]:
    """The backend's loss and similarity functions (the signatures of ``reference.fine_grained_loss_ref`` /
    ``filip_similarity_ref``, plus ``max_seqlen``), taking validated inputs."""
    loss_op, loss_eager, filip_op, filip_eager = loss.forward_op, loss.eager, filip.forward_op, filip.eager
    prepare, max_seqlen_of = launchers.prepare, launchers.max_seqlen_of

    def fine_grained_loss_fused(
        patch_emb: Tensor,
        sent_emb: Tensor,
        cu_seqlens: Tensor,
        logit_scale: Tensor,
        gaze: Optional[Tensor] = None,
        gaze_mask: Optional[Tensor] = None,
        *,
        options: Optional[LossOptions] = None,
        max_seqlen: Optional[int] = None,
        **option_kwargs,
    ) -> LossTerms:
        """The EGMA loss through the backend's fused op. ``options``: a ``LossOptions``, or its fields as
        keywords (``alpha``, ``map_threshold``, ``weights``, ``egma_compat``) for callers that spell them out."""
        if options is None:
            options = LossOptions(**option_kwargs) if option_kwargs else LossOptions()
        patch, sent, cu, scale, gaze, gaze_mask = prepare(OpInputs(patch_emb, sent_emb, cu_seqlens, logit_scale,
                                                                   gaze, gaze_mask))
        if max_seqlen is None:
            max_seqlen = max_seqlen_of(cu) if max_seqlen_of is not None else 0
        save = backward_may_follow(patch, sent, scale)
        run = loss_op if _through_dispatcher() else loss_eager
        out = run(patch, sent, cu, scale, gaze, gaze_mask, [*options.op_floats, float(save)], options.egma_compat,
                  int(max_seqlen))
        return LossTerms(*out[:NUM_LOSS_OUTPUTS])

    def similarity(patch_emb, sent_emb, cu_seqlens, logit_scale, egma_compat=False, max_seqlen=None):
        patch, sent, cu, scale, _, _ = prepare(OpInputs(patch_emb, sent_emb, cu_seqlens, logit_scale))
        if max_seqlen is None:
            max_seqlen = max_seqlen_of(cu) if max_seqlen_of is not None else 0
        save = backward_may_follow(patch, sent, scale)
        run = filip_op if _through_dispatcher() else filip_eager
        i2t, t2i, *_ = run(patch, sent, cu, scale, int(max_seqlen), bool(egma_compat), save)
        return i2t, t2i

    if launchers.filip_compat:

        def filip_similarity_fused(
            patch_emb: Tensor, sent_emb: Tensor, cu_seqlens: Tensor, logit_scale: Tensor, egma_compat: bool = False,
            max_seqlen: Optional[int] = None,
        ) -> Tuple[Tensor, Tensor]:
            """``(I2T, T2I)`` of every image with every report through the backend's fused op."""
            return similarity(patch_emb, sent_emb, cu_seqlens, logit_scale, egma_compat, max_seqlen)

    else:

        def filip_similarity_fused(
            patch_emb: Tensor, sent_emb: Tensor, cu_seqlens: Tensor, logit_scale: Tensor,
            max_seqlen: Optional[int] = None,
        ) -> Tuple[Tensor, Tensor]:
            """``(I2T, T2I)`` of every image with every report through the backend's fused op."""
            return similarity(patch_emb, sent_emb, cu_seqlens, logit_scale, False, max_seqlen)

    return fine_grained_loss_fused, filip_similarity_fused
