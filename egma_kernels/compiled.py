"""The compiled backends: ``"cpu"`` (fused C++/OpenMP) and ``"cuda"`` (fused CUDA), from ``egma_kernels._C``.

The extension (``csrc/``, built by ``setup.py``) registers four ops with ``TORCH_LIBRARY``:
``torch.ops.egma_kernels.loss_fwd / loss_bwd / filip_fwd / filip_bwd``, with CPU kernels and, when built,
CUDA kernels. Those ops are the kernels (not differentiable by themselves; fake kernels here for direct
callers). This module supplies the launchers around them (``fused_op.Launchers``: the forward saves the
argmax routes, only when a backward may follow, and the matched-pair similarities; the backward is one more
fused call); ``fused_op.py`` makes them the differentiable ops ``egma_kernels::extension_loss`` /
``extension_filip`` with their backward ops, fake kernels and autograd. One kernel op runs per loss call.

Both backends register themselves in ``egma_kernels.backends``; they report themselves unavailable when the
extension is missing (pure-Python install) or, for ``"cuda"``, was built without CUDA kernels or no GPU is
visible. ``"cpu"`` has priority 10, so it is the default for CPU tensors once built.
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _utils
from ._validation import accumulation_dtype
from .backends import Backend, register_backend
from .fused_op import Launchers, OpInputs, OpLaunchers, define_ops
from .options import LossOptions

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
# Launchers of the op contract (fused_op.py): the extension's ops run the kernels; the differentiable ops
# egma_kernels::extension_loss / extension_filip (and their backward ops) are defined around them there.


def _loss_saved(x: OpInputs, options: LossOptions, max_seqlen: int, save: bool) -> list:
    """The saved tensors of ``loss_fwd``: each patch's best sentence of each report and each sentence's best
    patch in each image (int32 routes, only when ``save``), and the matched-pair similarities (N, P)."""
    (B, P, _), N = x.patch.shape, x.sent.shape[0]
    acc = accumulation_dtype(x.patch.dtype)
    return [((B, B, P) if save else (0,), torch.int32), ((B, N) if save else (0,), torch.int32), ((N, P), acc)]


def _filip_saved(x: OpInputs, max_seqlen: int, egma_compat: bool, save: bool) -> list:
    M, P, _ = x.patch.shape
    N, R = x.sent.shape[0], x.cu.shape[0] - 1
    return [((M, R, P) if save else (0,), torch.int32), ((M, N) if save else (0,), torch.int32)]


def _loss_forward(x: OpInputs, options: LossOptions, max_seqlen: int, save: bool) -> tuple:
    terms, i2t, t2i, *saved = _ops.loss_fwd(*x, *options.op_floats, options.egma_compat, save)
    # The four terms as separate outputs (an op's outputs may not alias each other: one copy each).
    return (*(t.clone() for t in terms.unbind()), i2t, t2i, *saved)


def _loss_backward(grads, x: OpInputs, i2t: Tensor, t2i: Tensor, saved: tuple, options: LossOptions,
                   max_seqlen: int) -> tuple:
    zero = i2t.new_zeros(())
    g_terms = torch.stack([g.reshape(()) if g is not None else zero for g in grads[:4]])
    g_i2t = grads.i2t if grads.i2t is not None else torch.zeros_like(i2t)
    g_t2i = grads.t2i if grads.t2i is not None else torch.zeros_like(t2i)
    return _ops.loss_bwd(g_terms, g_i2t, g_t2i, *x, i2t, t2i, *saved, *options.op_floats, options.egma_compat)


def _filip_forward(x: OpInputs, max_seqlen: int, egma_compat: bool, save: bool) -> tuple:
    return _ops.filip_fwd(x.patch, x.sent, x.cu, x.scale, egma_compat, save)


def _filip_backward(g_i2t, g_t2i, x: OpInputs, i2t: Tensor, t2i: Tensor, saved: tuple, max_seqlen: int,
                    egma_compat: bool) -> tuple:
    g_i2t = g_i2t if g_i2t is not None else torch.zeros_like(i2t)
    g_t2i = g_t2i if g_t2i is not None else torch.zeros_like(t2i)
    return _ops.filip_bwd(g_i2t, g_t2i, x.patch, x.sent, x.cu, x.scale, i2t, t2i, *saved)


def _kernel_dtype(x: Tensor) -> torch.dtype:
    """The dtype the op runs in: the CPU kernels take float32/float64 (float16/bfloat16 are upcast here, and
    autograd casts the gradients back); the CUDA kernels read float16/bfloat16/float32 directly."""
    if x.dtype == torch.float64:
        return torch.float64
    if x.device.type == "cpu" or x.dtype not in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def _prepare(x: OpInputs) -> OpInputs:
    """Validated inputs in the kernels' dtype (the casts are differentiable), int32 offsets, a 0-dim scale in
    the accumulation dtype, gaze labels kept through the cast, no gaze_mask without gaze."""
    patch, sent, cu, scale, gaze, gaze_mask = x
    kd = _kernel_dtype(patch)
    if gaze is not None:
        gaze = _utils.positive_gaze_in(gaze, kd)
        gaze_mask = gaze_mask.to(torch.bool) if gaze_mask is not None else None
    else:
        gaze_mask = None
    scale = scale.to(accumulation_dtype(patch.dtype)).reshape(())
    return OpInputs(patch.to(kd), sent.to(kd), cu.to(torch.int32), scale, gaze, gaze_mask)


if _C is not None:
    _ops = torch.ops.egma_kernels

    # The extension's ops are kernels, not differentiable by themselves (the extension_* ops defined below
    # are): autograd passes through them, and their fake kernels serve direct callers and opcheck.
    _KERNEL_LIB = torch.library.Library("egma_kernels", "IMPL")
    for _op in ("loss_fwd", "loss_bwd", "filip_fwd", "filip_bwd"):
        _KERNEL_LIB.impl(_op, torch.library.fallthrough_kernel, "Autograd")

    @torch.library.register_fake("egma_kernels::loss_fwd")
    def _(patch, sent, cu, scale, gaze, gaze_mask, alpha, theta, w_con, w_mlce, w_map, compat, save_idx):
        (B, _, _), acc = patch.shape, accumulation_dtype(patch.dtype)
        saved = _loss_saved(OpInputs(patch, sent, cu, scale), None, 0, save_idx)
        return (patch.new_empty((4,), dtype=acc), patch.new_empty((B, B), dtype=acc),
                patch.new_empty((B, B), dtype=acc), *(patch.new_empty(s, dtype=d) for s, d in saved))

    @torch.library.register_fake("egma_kernels::filip_fwd")
    def _(patch, sent, cu, scale, compat, save_idx):
        M, R, acc = patch.shape[0], cu.shape[0] - 1, accumulation_dtype(patch.dtype)
        saved = _filip_saved(OpInputs(patch, sent, cu, scale), 0, compat, save_idx)
        return (patch.new_empty((M, R), dtype=acc), patch.new_empty((M, R), dtype=acc),
                *(patch.new_empty(s, dtype=d) for s, d in saved))

    @torch.library.register_fake("egma_kernels::loss_bwd")
    def _(g_terms, g_i2t, g_t2i, patch, sent, cu, scale, *rest):
        return torch.empty_like(patch), torch.empty_like(sent), torch.empty_like(scale)

    @torch.library.register_fake("egma_kernels::filip_bwd")
    def _(g_i2t, g_t2i, patch, sent, cu, scale, *rest):
        return torch.empty_like(patch), torch.empty_like(sent), torch.empty_like(scale)

    OPS = define_ops("extension", Launchers(
        loss=OpLaunchers(_loss_forward, _loss_backward, _loss_saved, saved_count=3),
        filip=OpLaunchers(_filip_forward, _filip_backward, _filip_saved, saved_count=2),
        prepare=_prepare,
        filip_compat=True,
    ))
    fine_grained_loss_compiled, filip_similarity_compiled = OPS.loss, OPS.similarity

    # Output poisoning for tests lives outside the op schemas: a flag inside the extension.
    _utils.on_poison_change(_C.set_poison_outputs)
else:

    def _extension_missing(*args, **kwargs):
        raise RuntimeError(f"egma_kernels._C is not built: {_IMPORT_ERROR}")

    fine_grained_loss_compiled = filip_similarity_compiled = _extension_missing


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
