"""The compiled backends: ``"cpu"`` (fused C++/OpenMP) and ``"cuda"`` (fused CUDA), from ``egma_kernels._C``.

The extension (``csrc/``, built by ``setup.py``) registers four ops with ``TORCH_LIBRARY``:
``torch.ops.egma_kernels.loss_fwd / loss_bwd / filip_fwd / filip_bwd``, with CPU kernels and, when built,
CUDA kernels. This module adds what PyTorch needs around them: fake (meta) kernels so the ops trace under
``torch.compile(fullgraph=True)``, and the autograd formula (the forward op saves argmax indices and the
matched similarities; the backward op is one more fused call). One op runs per loss call.

Both backends register themselves in ``egma_kernels.backends``; they report themselves unavailable when the
extension is missing (pure-Python install) or, for ``"cuda"``, was built without CUDA kernels or no GPU is
visible. ``"cpu"`` has priority 10, so it is the default for CPU tensors once built.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Optional, Tuple

import torch

from . import _utils
from ._validation import accumulation_dtype
from .backends import Backend, register_backend
from .reference import LossTerms

# The command that builds the extension against the torch already installed, run in the source folder
# (add -e for an editable install). pip's default isolated build has no torch, so it cannot build it.
FIX_COMMAND = 'pip install "setuptools>=77" wheel ninja pybind11 && pip install --no-build-isolation .'
# Set at run time (as at build time, where it builds nothing) to say a pure-Python install is intended:
# then the missing extension is not announced on import.
ENV_SKIP_EXTENSION = "EGMA_KERNELS_SKIP_EXTENSION"


class ExtensionMissingWarning(UserWarning):
    """Issued once, on import, when ``egma_kernels._C`` (the ``cpu`` and ``cuda`` backends) cannot be loaded."""


try:  # the compiled extension is optional
    from . import _C  # noqa: F401  (loading it registers the ops)

    _BUILD_INFO = dict(_C.build_info())
    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _BUILD_INFO = {"version": None, "cuda": False, "cuda_archs": ""}
    _IMPORT_ERROR = exc


def _missing_reason() -> Optional[str]:
    """Why the extension is not loaded, in words (None when it is). A missing file makes Python's own
    message a misleading "partially initialized module (most likely due to a circular import)"."""
    if _C is not None:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not files:
        return ("the compiled extension egma_kernels._C is not installed (a plain `pip install .` builds in an "
                "isolated environment without torch and silently skips it)")
    return (f"the compiled extension {os.path.basename(files[0])} failed to load ({_IMPORT_ERROR}); it was "
            f"probably built against another torch or Python (torch here: {torch.__version__})")


def missing_message() -> Optional[str]:
    """What is missing and the command that fixes it; None when the extension is loaded."""
    why = _missing_reason()
    if why is None:
        return None
    return (f"egma_kernels: the fused 'cpu' and 'cuda' backends are unavailable: {why}. CPU tensors fall back "
            f"to the slower 'reference' backend (CUDA tensors still get 'triton'). To build them, run in the "
            f"source folder: {FIX_COMMAND}")


if _C is None and os.environ.get(ENV_SKIP_EXTENSION, "0").strip().lower() not in ("1", "true", "yes", "on"):
    # Once per process (the module is imported once); EGMA_KERNELS_SKIP_EXTENSION=1 says it is intended.
    warnings.warn(missing_message() + f" (or set {ENV_SKIP_EXTENSION}=1 if a pure-Python install is intended)",
                  ExtensionMissingWarning)

CPU_PRIORITY = 10
# backend=None/"auto" on CUDA tensors takes the Triton backend (priority 5) first: it does no host
# synchronisation when given max_seqlen (these ops copy cu_seqlens to the host on every call), and it needs
# about a third of their memory (benchmarks/scratch_memory.py measures both). Which is faster on a GPU is
# for benchmarks/gpu_check.sh to say (benchmarks/results/ holds its runs). "cuda" stays selectable by name.
CUDA_PRIORITY = 6


def extension_loaded() -> bool:
    return _C is not None


def build_info() -> dict:
    """``{"version", "cuda", "cuda_archs", "loaded"}`` of the extension; when it is not loaded also ``"error"``
    (why, in words), ``"fix"`` (the command that builds it) and ``"import_error"`` (Python's message)."""
    info = dict(_BUILD_INFO)
    info["loaded"] = _C is not None
    if _C is None:
        info["error"] = _missing_reason()
        info["fix"] = FIX_COMMAND
        info["import_error"] = str(_IMPORT_ERROR)
    return info


def cuda_kernels_built() -> bool:
    return _C is not None and bool(_BUILD_INFO.get("cuda"))


# ---------------------------------------------------------------------------------------------------------
# Fake kernels and autograd of the ops (only when the extension is loaded).

if _C is not None:
    _ops = torch.ops.egma_kernels

    @torch.library.register_fake("egma_kernels::loss_fwd")
    def _loss_fwd_fake(patch, sent, cu, scale, gaze, gaze_mask, alpha, theta, w_con, w_mlce, w_map, compat, save_idx):
        B, P, _ = patch.shape
        N = sent.shape[0]
        acc = patch.dtype if patch.dtype == torch.float64 else torch.float32
        return (
            patch.new_empty((4,), dtype=acc),
            patch.new_empty((B, B), dtype=acc),
            patch.new_empty((B, B), dtype=acc),
            patch.new_empty((B, B, P) if save_idx else (0,), dtype=torch.int32),
            patch.new_empty((B, N) if save_idx else (0,), dtype=torch.int32),
            patch.new_empty((N, P), dtype=acc),
        )

    @torch.library.register_fake("egma_kernels::loss_bwd")
    def _loss_bwd_fake(g_terms, g_i2t, g_t2i, patch, sent, cu, scale, gaze, gaze_mask, i2t, t2i, i2t_arg, t2i_arg,
                       own, alpha, theta, w_con, w_mlce, w_map, compat):
        return torch.empty_like(patch), torch.empty_like(sent), torch.empty_like(scale)

    @torch.library.register_fake("egma_kernels::filip_fwd")
    def _filip_fwd_fake(patch, sent, cu, scale, compat, save_idx):
        M, P, _ = patch.shape
        N = sent.shape[0]
        R = cu.shape[0] - 1
        acc = patch.dtype if patch.dtype == torch.float64 else torch.float32
        if save_idx:
            i2t_arg = patch.new_empty((M, R, P), dtype=torch.int32)
            t2i_arg = patch.new_empty((M, N), dtype=torch.int32)
        else:
            i2t_arg = patch.new_empty((0,), dtype=torch.int32)
            t2i_arg = patch.new_empty((0,), dtype=torch.int32)
        return patch.new_empty((M, R), dtype=acc), patch.new_empty((M, R), dtype=acc), i2t_arg, t2i_arg

    @torch.library.register_fake("egma_kernels::filip_bwd")
    def _filip_bwd_fake(g_i2t, g_t2i, patch, sent, cu, scale, i2t, t2i, i2t_arg, t2i_arg):
        return torch.empty_like(patch), torch.empty_like(sent), torch.empty_like(scale)

    def _loss_setup_context(ctx, inputs, output):
        patch, sent, cu, scale, gaze, gaze_mask, alpha, theta, w_con, w_mlce, w_map, compat, _save_idx = inputs
        terms, i2t, t2i, i2t_arg, t2i_arg, own = output
        ctx.save_for_backward(patch, sent, cu, scale, gaze, gaze_mask, terms, i2t, t2i, i2t_arg, t2i_arg, own)
        ctx.options = (alpha, theta, w_con, w_mlce, w_map, compat)
        ctx.mark_non_differentiable(i2t_arg, t2i_arg, own)

    def _loss_backward(ctx, g_terms, g_i2t, g_t2i, _g_i2t_arg, _g_t2i_arg, _g_own):
        patch, sent, cu, scale, gaze, gaze_mask, terms, i2t, t2i, i2t_arg, t2i_arg, own = ctx.saved_tensors
        g_terms = torch.zeros_like(terms) if g_terms is None else g_terms
        g_i2t = torch.zeros_like(i2t) if g_i2t is None else g_i2t
        g_t2i = torch.zeros_like(t2i) if g_t2i is None else g_t2i
        d_patch, d_sent, d_scale = _ops.loss_bwd(
            g_terms, g_i2t, g_t2i, patch, sent, cu, scale, gaze, gaze_mask, i2t, t2i, i2t_arg, t2i_arg, own,
            *ctx.options,
        )
        return (d_patch, d_sent, None, d_scale) + (None,) * 9

    torch.library.register_autograd("egma_kernels::loss_fwd", _loss_backward, setup_context=_loss_setup_context)

    def _filip_setup_context(ctx, inputs, output):
        patch, sent, cu, scale, compat, save_idx = inputs
        i2t, t2i, i2t_arg, t2i_arg = output
        ctx.save_for_backward(patch, sent, cu, scale, i2t, t2i, i2t_arg, t2i_arg)
        ctx.mark_non_differentiable(i2t_arg, t2i_arg)

    def _filip_backward(ctx, g_i2t, g_t2i, _g_a, _g_b):
        patch, sent, cu, scale, i2t, t2i, i2t_arg, t2i_arg = ctx.saved_tensors
        g_i2t = torch.zeros_like(i2t) if g_i2t is None else g_i2t
        g_t2i = torch.zeros_like(t2i) if g_t2i is None else g_t2i
        d_patch, d_sent, d_scale = _ops.filip_bwd(
            g_i2t, g_t2i, patch, sent, cu, scale, i2t, t2i, i2t_arg, t2i_arg
        )
        return d_patch, d_sent, None, d_scale, None, None

    torch.library.register_autograd("egma_kernels::filip_fwd", _filip_backward, setup_context=_filip_setup_context)

    # The backward ops compute first derivatives only: differentiating them (create_graph=True, then a second
    # backward) raises instead of torch's silent zeros with a warning.
    def _no_setup(ctx, inputs, output):
        pass

    for _op in ("loss_bwd", "filip_bwd"):
        torch.library.register_autograd(
            f"egma_kernels::{_op}", _utils.no_double_backward(_op), setup_context=_no_setup
        )

    # Output poisoning for tests lives outside the op schemas: a flag inside the extension.
    _utils.on_poison_change(_C.set_poison_outputs)


# ---------------------------------------------------------------------------------------------------------
# Backend functions (the signatures of reference.fine_grained_loss_ref / filip_similarity_ref).


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the op runs in: the CPU kernels take float32/float64 (float16/bfloat16 are upcast here, and
    autograd casts the gradients back); the CUDA kernels read float16/bfloat16/float32 directly."""
    if x.dtype == torch.float64:
        return torch.float64
    if x.device.type == "cpu" or x.dtype not in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def _backward_may_follow(*inputs: torch.Tensor) -> bool:
    """Whether the forward op must save the argmax routes: grad mode on and an input that needs a gradient."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in inputs)


def fine_grained_loss_compiled(
    patch_emb: torch.Tensor,
    sent_emb: torch.Tensor,
    cu_seqlens: torch.Tensor,
    logit_scale: torch.Tensor,
    gaze: Optional[torch.Tensor] = None,
    gaze_mask: Optional[torch.Tensor] = None,
    *,
    alpha: float = 0.5,
    map_threshold: float = 2.0 / 7.0,
    weights: Tuple[float, float, float] = (1.0, 1.0, 1.0),
    egma_compat: bool = False,
) -> LossTerms:
    """The EGMA loss through the fused op (CPU or CUDA kernel, by the device of the inputs)."""
    if _C is None:
        raise RuntimeError(f"egma_kernels._C is not built: {_IMPORT_ERROR}")
    kd = _kernel_dtype(patch_emb)
    acc = accumulation_dtype(patch_emb.dtype)
    patch = patch_emb.to(kd)
    sent = sent_emb.to(kd)
    scale = logit_scale.to(acc).reshape(())
    if gaze is not None:
        gaze = _utils.positive_gaze_in(gaze, kd)
        if gaze_mask is not None:
            gaze_mask = gaze_mask.to(torch.bool)
    else:
        gaze_mask = None
    w_con, w_mlce, w_map = (float(w) for w in weights)
    terms, i2t, t2i, _, _, _ = _ops.loss_fwd(
        patch, sent, cu_seqlens.to(torch.int32), scale, gaze, gaze_mask, float(alpha), float(map_threshold),
        w_con, w_mlce, w_map, bool(egma_compat), _backward_may_follow(patch, sent, scale),
    )
    return LossTerms(terms[0], terms[1], terms[2], terms[3], i2t, t2i)


def filip_similarity_compiled(
    patch_emb: torch.Tensor,
    sent_emb: torch.Tensor,
    cu_seqlens: torch.Tensor,
    logit_scale: torch.Tensor,
    egma_compat: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(I2T, T2I)`` of every image with every report through the fused op."""
    if _C is None:
        raise RuntimeError(f"egma_kernels._C is not built: {_IMPORT_ERROR}")
    kd = _kernel_dtype(patch_emb)
    acc = accumulation_dtype(patch_emb.dtype)
    patch = patch_emb.to(kd)
    sent = sent_emb.to(kd)
    scale = torch.as_tensor(logit_scale, device=patch.device).to(acc).reshape(())
    i2t, t2i, _, _ = _ops.filip_fwd(
        patch, sent, cu_seqlens.to(torch.int32), scale, bool(egma_compat), _backward_may_follow(patch, sent, scale)
    )
    return i2t, t2i


def _cpu_available() -> bool:
    return _C is not None


def _cuda_available() -> bool:
    return cuda_kernels_built() and torch.cuda.is_available()


def _cpu_why_unavailable() -> Optional[str]:
    return missing_message()


def _cuda_why_unavailable() -> Optional[str]:
    if _C is None:
        return missing_message()
    if not cuda_kernels_built():
        return ("the extension was built without its CUDA kernels (a CPU build of torch, no CUDA toolkit found, "
                "or EGMA_KERNELS_SKIP_CUDA=1 at build time)")
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


for _name, _device, _available, _why, _priority in (
    ("cpu", "cpu", _cpu_available, _cpu_why_unavailable, CPU_PRIORITY),
    ("cuda", "cuda", _cuda_available, _cuda_why_unavailable, CUDA_PRIORITY),
):
    register_backend(
        Backend(
            name=_name,
            loss=fine_grained_loss_compiled,  # one op: the CPU or CUDA kernel runs by the inputs' device
            similarity=filip_similarity_compiled,
            devices=(_device,),
            is_available=_available,
            why_unavailable=_why,
            priority=_priority,
        )
    )
