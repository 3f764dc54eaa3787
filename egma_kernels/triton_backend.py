"""The ``"triton"`` backend: fused Triton kernels (``triton_kernels.py``) registered as PyTorch custom ops.

A loss call is one custom op, ``egma_kernels::triton_loss``: its kernels compute ``I2T``, ``T2I``, the
per-report gaze-MLCE and mapping terms, the cross-entropies and the weighted total, with no torch op in
between. Its backward is a second op (``triton_loss_backward``) that takes whichever upstream gradients
exist (of the loss, of its terms, of the matrices) and launches only the kernels they need. This module
supplies the launchers; ``fused_op.py`` defines the ops around them (saved state, fake kernels, autograd),
so ``torch.compile(fullgraph=True)`` sees two opaque ops and no graph break, and eager calls run the same
launchers without the dispatcher. ``filip_similarity`` is a second pair of ops on the same kernels.

Why so few ops: at the sizes EGMA trains with (B = 40, P = 49) the GPU work of the whole loss is well
under a millisecond, and the host's cost per launched op sets the pace.

Memory safety does not depend on the value checks (``validate=False``): the kernels clamp every report's
offsets to ``0 <= start <= end <= N`` and hold at most ``max_seqlen`` (bounded by N) sentences of a
report, and the ops check the shapes and strides they index by on every call. Malformed offsets or a
too-small ``max_seqlen`` then give wrong numbers, never an access outside a tensor. The ops compute a
first derivative only: a second one (through the gradients) raises an error.

On CUDA tensors the kernels run on the GPU. With ``TRITON_INTERPRET=1`` set before import, Triton's
interpreter runs them on CPU tensors (float32/float64): that is how the tests exercise them without a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _utils
from ._validation import accumulation_dtype as _acc_dtype
from .backends import Backend, register_backend
from .fused_op import Launchers, OpInputs, OpLaunchers, define_ops
from .options import LossOptions

try:
    import triton
    import triton.language as tl

    from . import triton_kernels as K

    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the installation
    triton = None
    _TRITON_IMPORT_ERROR = exc


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    if triton is None:
        return False
    return interpreting() or torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------


def _pow2(x: int, at_least: int = 16) -> int:
    """The next power of two >= x (plain int arithmetic: triton.next_power_of_2 and
    triton.cdiv cost about 2 us a call)."""
    return max(at_least, 1 << (int(x) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Shared memory per block (opt-in maximum, bytes) of the GPU targets the AOT check compiles for. The
# H100/H200 figure is also what the configuration assumes without a device (the interpreter).
SHARED_MEMORY_LIMITS = {
    80: 166912,   # A100, A30 (and sm_87 Orin): 163 KiB
    86: 101376,   # A40, A6000, RTX 30xx: 99 KiB
    89: 101376,   # L4, L40S, RTX 40xx: 99 KiB
    90: 232448,   # H100, H200: 227 KiB
    100: 232448,  # B200: 227 KiB
    120: 101376,  # RTX 50xx: 99 KiB
}
DEFAULT_SHARED_MEMORY = SHARED_MEMORY_LIMITS[90]


@functools.lru_cache(maxsize=None)
def _device_limits(device_index: int) -> Tuple[int, int]:
    """(shared memory per block, opt-in maximum in bytes; streaming multiprocessors) of a CUDA device,
    read once per device."""
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_SHARED_MEMORY
    return int(smem), int(props.multi_processor_count)


def _shared_memory(device: torch.device) -> int:
    """The shared memory a block may use on ``device`` (the H100 figure for CPU tensors: interpreter)."""
    if device.type != "cuda":
        return DEFAULT_SHARED_MEMORY
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())[0]


# The report kernels' [BLOCK_S, BLOCK_S] tiles (BLOCK_S: the power of two >= the longest report) must stay
# within Triton's largest block of 2**20 elements: BLOCK_S = 1024 at most.
MAX_REPORT_SENTENCES = 1024


def _config(dtype: torch.dtype, P: int, D: int, max_seqlen: int, num_reports: int = 1,
            smem: int = DEFAULT_SHARED_MEMORY) -> dict:
    """Tile sizes and precision of every kernel for one problem shape on a device whose blocks may use
    ``smem`` bytes of shared memory (the AOT check uses it too, with each target's limit).

    Cached (it runs on every call): treat the returned dict as read-only. ``CONFIG_OVERRIDES`` (empty
    unless ``benchmarks/tune_triton.py`` is trying tile sizes) replaces entries of it."""
    if max_seqlen > MAX_REPORT_SENTENCES:
        raise ValueError(
            f"the triton backend takes reports of at most {MAX_REPORT_SENTENCES} sentences; the longest report "
            f"(max_seqlen) has {max_seqlen}. Use backend='cuda' or 'reference', or split the report")
    cfg = launch_config(dtype, P, D, max_seqlen, num_reports, smem, torch.get_float32_matmul_precision())
    return {**cfg, **CONFIG_OVERRIDES} if CONFIG_OVERRIDES else cfg


CONFIG_OVERRIDES: dict = {}


@functools.lru_cache(maxsize=256)
def launch_config(dtype, P, D, max_seqlen, num_reports, smem, float32_matmul_precision) -> dict:
    """The launch configuration as a pure function of the problem (input dtype, P, D, longest report,
    reports), the device's shared memory per block (bytes, opt-in maximum) and torch's float32 matmul
    precision. The shared-memory rules below are fitted to Triton 3.8's allocations (AOT compile for
    sm_80/86/89/90/100/120; tests/test_triton_aot_targets.py checks every default against each limit)."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    if interpreting() or dtype == torch.float64:
        precision = "ieee"
    elif float32_matmul_precision == "highest":
        # fp32 operands (the float32 forward, every backward product): 3xTF32 keeps float32 accuracy on
        # tensor cores. bf16/fp16 forward operands ignore it (exact products, float32 accumulation).
        precision = "tf32x3"
    else:
        # The user allowed TF32 for float32 matmuls (torch.set_float32_matmul_precision("high"/"medium")),
        # which the reference's matmuls then use too: one TF32 pass, a third of the tensor-core work.
        precision = "tf32"
    # The backward's two gradient products (dL/dA times the sentences, its transpose times the patches)
    # have float32 operands: dL/dA, and the inputs widened. For 16-bit inputs one TF32 pass is enough:
    # their patches and sentences are exact in TF32 (10-bit mantissa), dL/dA's rounding (2^-11 relative)
    # stays below that of the 16-bit gradients returned (2^-9 bfloat16, 2^-11 float16), and it is a third
    # of 3xTF32's tensor-core work and registers. float32 inputs keep the precision asked for.
    grad_precision = "tf32" if precision == "tf32x3" and dtype in (torch.float16, torch.bfloat16) else precision
    wide = 2 if dtype == torch.float64 else 1  # float64 tiles take twice the shared memory
    block_s = _pow2(max_seqlen)
    d_pad = _pow2(D)
    # Output columns per backward program (see the kernels' docstring): a [16 rows, D_OUT] accumulator in
    # the patch kernel, [BLOCK_S, D_OUT] in the sentence kernel (long reports take narrower chunks).
    # Similarity columns per forward program in units of BLOCK_S: the packed forward's tiles are
    # fwd_group * BLOCK_S columns of whole consecutive reports (32 columns, or one longest report), and so
    # are the dpatch kernel's (bwd_group). By ptxas (sm_90, D=512), 64 columns spill at 4 warps.
    # Untimed: benchmarks/tune_triton.py tries 1, 2, 4 and 8 on a GPU.
    fwd_group = max(1, (32 // wide) // block_s)
    # The dpatch kernel's [group columns, D_OUT] sentence operand stays within 64 KiB of shared memory.
    d_out = min(d_pad, 512 // wide, max(64, 16384 // (fwd_group * block_s)) // wide)
    # The dsent kernel's packed tiles, in units of BLOCK_S columns (each patch tile it loads serves all
    # their sentences): one, since two already spill 0.7-1.3 KB per thread at D=512 (ptxas, sm_90, [32, 512]
    # accumulator); benchmarks/tune_triton.py tries 2 and 4 on a GPU, where reuse may outweigh the spills.
    sent_group = 1
    sent_d_out = min(d_pad, max(64, 8192 // (sent_group * block_s)) // wide)
    # The [patch block, D] operand of the sentence-gradient kernel lives in shared memory: keep it
    # near 64 KiB (H100/H200 allow 227 KiB per block). Its [patch block, columns] gradient tile and route
    # gather stay within 2048 entries: by ptxas (sm_90, bf16, 64-column tiles of 40-sentence reports) 64 rows
    # spill 264 B per thread with saved routes and 480 B recomputing, 32 rows 0 and 12 B.
    sent_block_p = max(16, min(64, 16384 // (sent_d_out * wide), 2048 // (sent_group * block_s)))
    # The backward kernels' similarity as one dot over the whole D (see the kernels' docstring): only when
    # D is not chunked, and not for 3xTF32 float32 operands (ptxas: 3 and 15 KB spilled per thread).
    split_fp32 = precision == "tf32x3" and dtype == torch.float32
    in_bytes = torch.finfo(dtype).bits // 8
    # Pipelined similarity tiles (3 stages of [rows, BLOCK_D] + [BLOCK_D, columns] in the input dtype):
    # a narrower BLOCK_D where they would take more than 3/4 of the device's shared memory (e.g. a
    # 128-sentence float32 report: 144 KiB at BLOCK_D=64, over the 99 KiB of an sm_86/sm_89 block).
    block_d = min(64 // wide, _pow2(D))
    widest = max(min(64 // wide, _pow2(P)), sent_block_p, 16) + fwd_group * block_s
    while block_d > 16 and 3 * widest * block_d * in_bytes > 3 * smem // 4:
        block_d //= 2
    # The backward's one-dot similarity keeps both whole-D operands in shared memory: by the AOT check
    # about 1.75 x their bytes (float32 TF32 at D=512: 164 KiB, over an A100's 163 KiB).
    def one_dot_fits(rows, columns):
        return 7 * (rows + columns) * d_pad * in_bytes // 4 <= smem
    # The packed forward's patch block: 32 rows at 4 warps, the largest without spills by ptxas (sm_90, bf16
    # P=196 D=512: 64 rows spill 24-160 B per thread at 4 or 8 warps, the segmented scan over [rows, COLS]).
    fwd_block_p = min(32 // wide, _pow2(P))
    # The report kernels' [BLOCK_S, BLOCK_S] and [BLOCK_S, block] operands, pipelined by Triton's default
    # 3 stages: 64-sentence reports take 104 KiB (over 99 KiB), 128-sentence ones 192 KiB (over 163 KiB);
    # one stage halves that. 128-sentence reports need 160 KiB even then (report_fits: the loss refuses).
    report_stages = None
    if block_s >= 128 and smem < DEFAULT_SHARED_MEMORY or block_s >= 64 and smem < 128 * 1024:
        report_stages = 1
    report_fits = block_s < 128 or smem >= 160 * 1024
    return dict(
        ACC=acc,
        DOT_PRECISION=precision,
        grad_precision=grad_precision,
        BLOCK_S=block_s,
        BLOCK_D=block_d,
        D_OUT=d_out,
        D_CHUNKS=d_pad // d_out,
        sent_D_OUT=sent_d_out,
        sent_D_CHUNKS=d_pad // sent_d_out,
        D_PAD=d_pad,
        # The forward's patch block [fwd_block_p, D] and the group's sentences [columns, D] in shared memory:
        # 16-bit operands only (float32 ones, pipelined, would need up to 456 KiB by the AOT check).
        fwd_SIM_ONE_DOT=dtype in (torch.float16, torch.bfloat16) and d_pad <= 512
        and (fwd_block_p + fwd_group * block_s) * d_pad * in_bytes <= smem,
        SIM_ONE_DOT=d_out == d_pad and not split_fp32 and one_dot_fits(16, fwd_group * block_s),
        sent_SIM_ONE_DOT=sent_d_out == d_pad and not split_fp32 and one_dot_fits(sent_block_p, sent_group * block_s),
        fwd_block_p=fwd_block_p,
        fwd_group=fwd_group,
        bwd_group=fwd_group,  # the dpatch kernel's packed tiles, in units of BLOCK_S columns
        sent_group=sent_group,
        bwd_patch_rows=16,
        bwd_sent_block_p=sent_block_p,
        # Recomputing its routes (segmented scans over [rows, columns] beside the similarity), the float32
        # 3xTF32 dsent kernel takes 16-row blocks: by ptxas (sm_90, P=196 D=512) 32 rows spill 232 B per
        # thread, 16 rows 40 B.
        bwd_sent_recompute_block_p=16 if split_fp32 else sent_block_p,
        # The report kernels hold [BLOCK_S, block] tiles, [BLOCK_S, BLOCK_S] and [block, block] products: long
        # reports take narrower patch blocks (shared memory stays under the 227 KiB of an H100/H200 block).
        # By ptxas (sm_90 and sm_80, 16-sentence reports): at 8 warps 32-patch blocks spill nothing (64 spill
        # 4-16 B per thread, and 4 warps 8-212 B), except under one-pass TF32, where 64 spill nothing and 32
        # spill 4 B.
        matched_block_p=min(64 if precision == "tf32" else 32, _pow2(P), max(16, 2048 // block_s)),
        # The per-report loops of the loss-term kernels (reports, or a row of the B x B matrices).
        BLOCK_B=min(1024, _pow2(num_reports)),
        # The backward kernels hold a [rows, D] float32 accumulator: 8 warps halve its registers per thread.
        bwd_warps=8 if d_out >= 256 else 4,
        # Slices of a backward loop (see _num_slices): more programs in flight when few images or reports
        # run, each slice writing a partial gradient buffer. At most max_slices, and the partial buffers of
        # a kernel take at most partial_budget times the bytes of the gradients the backward returns.
        max_slices=16,
        partial_budget=1.0,
        # The loss's forward saves each patch's best sentence of each report (B x B x P small ints) when
        # they take at most route_budget times the gradients' bytes, and the backward then routes its
        # gradients without recomputing a similarity; otherwise (B much larger than the embedding size)
        # the backward recomputes the similarity tiles. save_route=True/False overrides the rule.
        route_budget=1.0,
        save_route=None,
        # Software-pipelining stages of the backward kernels with saved routes (None: Triton's default).
        # float32: 1, the only setting without spills by ptxas (sm_90, D=512: 3 stages spill 0.2-0.5 KB per
        # thread and take 137-205 KB of shared memory); untimed, benchmarks/tune_triton.py tries 2 and 3.
        route_bwd_stages=1 if dtype == torch.float32 else None,
        # The forward's similarity is looped over D in chunks of fwd_BLOCK_D (16-bit: one dot over D). By ptxas
        # (sm_90 and sm_80, P=196 D=512), 3xTF32 float32 spills 12-232 B per thread at 4 warps or 64-wide
        # chunks and none at 8 warps with 32-wide ones; one-pass TF32 spills 12-24 B at 8 warps, none at 4;
        # 64-column tiles (40-sentence reports, bf16 P=784 D=1024) spill 48-124 B at 4 warps, none at 8.
        fwd_warps=8 if split_fp32 or fwd_group * block_s >= 64 else 4,
        fwd_BLOCK_D=min(block_d, 32),
        report_warps=8,
        # The backward's schedule also lays out each tile's columns ([COLS, COLS] per tile, _tile_layout): by
        # ptxas (sm_90 and sm_80) 8 warps spill nothing up to 128-column tiles, 1 warp 444-3504 B there and 4
        # warps 8 B for float64 at 16 columns.
        bwd_schedule_warps=8,
        report_stages=report_stages,
        report_fits=report_fits,
        shared_memory=smem,
    )


def _index_dtype(P: int, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved best-patch indices (B x N of them): int16 halves them whenever P allows.

    Not for float64: with int16 indices, Triton 3.8 fails to lower the float64 backward kernels' dots
    for sm_90 ("fp64 don't support largeK MMA"; the AOT check catches it)."""
    return torch.int16 if P < 2**15 and dtype != torch.float64 else torch.int32


def _route_dtype(max_seqlen: int) -> torch.dtype:
    """Saved routes are indices into a report, plus BLOCK_S (the power of two >= the longest report) for
    'no sentence': one byte while BLOCK_S <= 128."""
    return torch.uint8 if _pow2(max_seqlen) <= 128 else torch.int16


def _route_shape(patch: Tensor, num_sentences: int, max_seqlen: int, for_backward: bool = True) -> Tuple[int, ...]:
    """(B, B, P) when the loss's forward saves its routes for the backward pass, else (0,) (see _config);
    (0,) when no backward pass will run (``for_backward=False``: no grad mode, or no input needs one)."""
    if not for_backward:
        return (0,)
    B, P, D = patch.shape
    cfg = _config(patch.dtype, P, D, max_seqlen, B, _shared_memory(patch.device))
    save = cfg["save_route"]
    if save is None and patch.dtype == torch.float64 and not interpreting():
        # Triton 3.8 cannot lower these float64 kernels for sm_90 ("fp64 don't support largeK MMA", caught
        # by the AOT check); float64 on a GPU is for checking, not speed.
        save = False
    if save is None:
        route_bytes = B * B * P * (1 if _route_dtype(max_seqlen) == torch.uint8 else 2)
        save = route_bytes <= cfg["route_budget"] * (B * P + num_sentences) * D * patch.element_size()
    return (B, B, P) if save else (0,)


def _seqlen_bound(max_seqlen: int, num_sentences: int) -> int:
    """``max_seqlen`` as the kernels take it: between 1 and N. No report holds more than N sentences, and
    an unchecked larger value (``validate=False``) would only grow the tiles, up to failing to compile."""
    return min(max(int(max_seqlen), 1), max(int(num_sentences), 1))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OFFSET_DTYPES = (torch.int32, torch.int64)


def _check_op_inputs(patch: Tensor, sent: Tensor, cu: Tensor, scale: Tensor, num_reports: Optional[int],
                     gaze: Optional[Tensor] = None, gaze_mask: Optional[Tensor] = None) -> None:
    """The layout the kernels index by, checked on every call of an op (a few attribute reads; the public
    functions always pass it, the ops can be called directly): shapes, contiguous tensors, dtypes and
    one device. The offsets' values need no check: the kernels clamp them.

    num_reports: the loss's B (cu has B + 1 entries), or None for the rectangular similarity."""
    dev = patch.get_device()
    ok = (
        patch.dim() == 3 and sent.dim() == 2 and cu.dim() == 1 and patch.dtype in _FLOATS and sent.dtype == patch.dtype
        and cu.dtype in _OFFSET_DTYPES and scale.numel() == 1 and scale.is_floating_point()
        and sent.get_device() == dev and cu.get_device() == dev and scale.get_device() == dev
        and patch.is_contiguous() and sent.is_contiguous() and cu.is_contiguous()
    )
    if ok:
        B, P, D = patch.shape
        N, D_sent = sent.shape
        ok = (N >= 1 and D_sent == D and patch.numel() > 0 and cu.shape[0] >= 2
              and (num_reports is None or cu.shape[0] == num_reports + 1))
    if ok and gaze is not None:
        ok = (gaze_mask is not None and gaze.shape == (N, P) and gaze_mask.shape == (B,) and gaze.is_floating_point()
              and gaze_mask.dtype == torch.bool and gaze.is_contiguous() and gaze_mask.is_contiguous()
              and gaze.get_device() == dev and gaze_mask.get_device() == dev)
    if not ok:
        raise ValueError(
            "egma_kernels triton op: inputs must be contiguous patch (B, P, D) and sent (N, D) of one float dtype, "
            "contiguous cu_seqlens (reports + 1,) int32/int64 (B + 1 entries for the "
            "loss), a one-element float logit_scale, gaze (N, P) contiguous with a bool gaze_mask (B,), all on "
            f"one device; got patch {_shape_of(patch)}, sent {_shape_of(sent)}, cu_seqlens {_shape_of(cu)}, "
            f"logit_scale {_shape_of(scale)}, gaze {_shape_of(gaze)}, gaze_mask {_shape_of(gaze_mask)}"
        )


def _check_saved(pairs) -> None:
    """The backward ops' saved tensors: each (tensor, expected shape) contiguous and of that shape."""
    for t, shape in pairs:
        if t is not None and (t.shape != shape or not t.is_contiguous()):
            raise ValueError(f"egma_kernels triton backward op: expected a contiguous tensor of shape {shape}, "
                             f"got {_shape_of(t)}")


def _shape_of(t: Optional[Tensor]) -> str:
    if t is None:
        return "None"
    return f"{tuple(t.shape)} {t.dtype} strides {t.stride()} on {t.device}"


def _check_device(*tensors: Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(
                "the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
                f"got a tensor on {t.device}"
            )


# ---------------------------------------------------------------------------------------------------
# Kernel launches (plain functions: the custom ops below wrap them)
# ---------------------------------------------------------------------------------------------------


def _pack_tiles(num_reports: int, num_sentences: int, columns: int) -> int:
    """An upper bound on the packed forward's tiles, from what the host knows (no read of the offsets):
    next fit closes a tile only when the next report does not fit, so two consecutive tiles hold more than
    ``columns`` sentences between them, and each tile holds at least one report."""
    return max(1, min(num_reports, 2 * (num_sentences // (columns + 1)) + 1))


def _launch_filip_fwd(patch, sent, cu, scale, counts, max_seqlen, *, egma_compat, write_matched, route=None):
    """I2T, T2I (images x reports), each sentence's best patch, and (loss only) the matched blocks X and,
    if ``route`` is given (a (B, B, P) buffer), each patch's best sentence of each report. With
    ``egma_compat``, also counts[0] = the longest report."""
    num_images, P, D = patch.shape
    N = sent.shape[0]
    R = cu.shape[0] - 1
    cfg = _config(patch.dtype, P, D, max_seqlen, 1, _shared_memory(patch.device))
    acc = _acc_dtype(patch.dtype)
    i2t = _utils.new_output((num_images, R), acc, patch.device)
    t2i = _utils.new_output((num_images, R), acc, patch.device)
    best_patch = _utils.new_output((num_images, N), _index_dtype(P, patch.dtype), patch.device)
    matched = _utils.new_output((N, P), acc, patch.device) if write_matched else i2t  # i2t: an unused placeholder
    # Packed tiles of whole consecutive reports (see _pack_schedule_kernel), scheduled on the device; the
    # grid is sized by the host's bound and the programs of unused tiles exit.
    columns = cfg["fwd_group"] * cfg["BLOCK_S"]
    tiles = _pack_tiles(R, N, columns)
    sched = _utils.new_output((tiles + 2,), torch.int32, patch.device)
    K._pack_schedule_kernel[(1,)](
        cu, sched, sched, sched, sched, counts, R, N, tiles, tiles, LONGEST=egma_compat, COLS=columns, COLS2=columns,
        BLOCK_B=cfg["BLOCK_B"], COLMAP=False, num_warps=1,
    )
    save_route = route is not None and route.numel() > 0
    K._filip_fwd_kernel[(num_images * tiles,)](
        patch, sent, cu, scale, counts, sched, i2t, t2i, best_patch, matched, route if save_route else i2t,
        P, D, N, R, tiles, patch.stride(0), patch.stride(1), sent.stride(0),
        EGMA_COMPAT=egma_compat, WRITE_MATCHED=write_matched, SAVE_ROUTE=save_route,
        BLOCK_P=cfg["fwd_block_p"], BLOCK_S=cfg["BLOCK_S"], BLOCK_D=cfg["fwd_BLOCK_D"], COLS=columns,
        SIM_ONE_DOT=cfg["fwd_SIM_ONE_DOT"], D_PAD=cfg["D_PAD"],
        ACC=cfg["ACC"], DOT_PRECISION=cfg["DOT_PRECISION"], num_warps=cfg["fwd_warps"],
    )
    return i2t, t2i, best_patch, matched


def _parallel_units(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; under the interpreter a "device" of 2 units keeps the
    sliced backward path tested. ``CONFIG_OVERRIDES["parallel_units"]`` replaces the count (as
    benchmarks/scratch_memory.py does, to size the buffers for a given GPU without one)."""
    if "parallel_units" in CONFIG_OVERRIDES:
        return int(CONFIG_OVERRIDES["parallel_units"])
    if device.type != "cuda":
        return 2
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())[1]


def _num_slices(programs: int, items: int, bytes_per_slice: int, budget: int, device: torch.device,
                max_slices: int) -> int:
    """How many slices to split a backward kernel's sequential loop into, for enough programs in flight.

    Each slice writes its own partial buffer (summed afterwards in a fixed order): at most ``budget`` bytes
    of them (one slice writes the gradient directly and needs none)."""
    units = _parallel_units(device)
    wanted = _cdiv(4 * units, max(1, programs))
    return int(max(1, min(wanted, items, max_slices, budget // max(1, bytes_per_slice))))


def _grad_mask(**grads) -> int:
    """The kernels' GRADS bit mask: which upstream gradients are present (not None)."""
    bits = dict(loss=K.G_LOSS, con=K.G_CON, mlce=K.G_MLCE, map=K.G_MAP, i2t=K.G_I2T, t2i=K.G_T2I)
    return sum(bits[name].value for name, g in grads.items() if g is not None)


def _launch_filip_bwd(
    patch, sent, cu, scale, counts, best_patch, max_seqlen, *, egma_compat, grads, g_loss=None, g_con=None,
    g_i2t=None, g_t2i=None, w_con=1.0, i2t=None, t2i=None, per_report=None, d_matched=None, matched=None, route=None,
):
    """dL/dpatch, dL/dsent, dL/dt through I2T, T2I (and the matched blocks' gradient ``d_matched``, if given),
    routed by the forward's saved ``route`` when it has one (which needs ``i2t``, ``t2i`` and ``matched``)."""
    num_images, P, D = patch.shape
    N = sent.shape[0]
    R = cu.shape[0] - 1
    cfg = _config(patch.dtype, P, D, max_seqlen, 1, _shared_memory(patch.device))
    acc = _acc_dtype(patch.dtype)
    elem = torch.finfo(acc).bits // 8
    unused = scale  # the pointer passed for an absent tensor; GRADS / HAS_MATCHED_GRAD keep it unread
    upstream = (
        i2t if i2t is not None else unused, t2i if t2i is not None else unused,
        per_report if per_report is not None else unused,
        g_loss if g_loss is not None else unused, g_con if g_con is not None else unused,
        g_i2t.contiguous() if g_i2t is not None else unused, g_t2i.contiguous() if g_t2i is not None else unused,
        float(w_con), best_patch, d_matched if d_matched is not None else unused,
    )
    saved_route = route is not None and route.numel() > 0
    common = dict(
        EGMA_COMPAT=egma_compat, HAS_MATCHED_GRAD=d_matched is not None, GRADS=grads, SAVED_ROUTE=saved_route,
        BLOCK_S=cfg["BLOCK_S"],
        BLOCK_D=cfg["BLOCK_D"], ACC=cfg["ACC"], DOT_PRECISION=cfg["DOT_PRECISION"], GRAD_PRECISION=cfg["grad_precision"],
        num_warps=cfg["bwd_warps"],
    )
    if saved_route and cfg["route_bwd_stages"] is not None:
        common["num_stages"] = cfg["route_bwd_stages"]
    # Partial buffers of a sliced loop: at most partial_budget x the gradients' bytes, and 256 MiB.
    budget = min(256 << 20, int(cfg["partial_budget"] * (patch.numel() + sent.numel()) * patch.element_size()))
    # Packed tiles of whole consecutive reports, as the forward's (see _pack_schedule_kernel): the dpatch
    # kernel's of the forward's width, the dsent kernel's of sent_group * BLOCK_S columns (its [columns, D]
    # accumulator), both from one launch (one program each; one schedule where the widths agree), each
    # with its column map (tiles, 2, columns): the kernels read their tiles' columns from it.
    cols_patch = cfg["bwd_group"] * cfg["BLOCK_S"]
    cols_sent = cfg["sent_group"] * cfg["BLOCK_S"]
    tiles_patch = _pack_tiles(R, N, cols_patch)
    tiles_sent = _pack_tiles(R, N, cols_sent)
    two = cols_sent != cols_patch
    sizes = [tiles_patch + 2, tiles_patch * 2 * cols_patch] + ([tiles_sent + 2, tiles_sent * 2 * cols_sent] if two else [])
    sched, colmap, *second = _utils.new_output((sum(sizes),), torch.int32, patch.device).split(sizes)
    sched_sent, colmap_sent = second if two else (sched, colmap)
    K._pack_schedule_kernel[(2 if two else 1,)](
        cu, sched, sched_sent, colmap, colmap_sent, counts, R, N, tiles_patch, tiles_sent, LONGEST=False,
        COLS=cols_patch, COLS2=cols_sent, BLOCK_B=cfg["BLOCK_B"], COLMAP=True, num_warps=cfg["bwd_schedule_warps"],
    )
    # dpatch: one program per (image, block of patch rows, slice of the tiles); 16 rows keep the
    # [rows, D] accumulator small. One slice writes the gradient in the input dtype directly.
    block_rows = cfg["bwd_patch_rows"]
    row_blocks = _cdiv(P, block_rows)
    slices = _num_slices(num_images * row_blocks, tiles_patch, num_images * P * D * elem, budget, patch.device,
                         cfg["max_slices"])
    if slices == 1:
        d_patch = _utils.new_output((num_images, P, D), patch.dtype, patch.device)
    else:
        d_patch = _utils.new_output((slices, num_images, P, D), acc, patch.device)
    chunks = cfg["D_CHUNKS"]
    d_scale_parts = _utils.new_output((slices * num_images * row_blocks * chunks,), acc, patch.device)
    K._filip_bwd_patch_kernel[(num_images, row_blocks * chunks, slices)](
        patch, sent, cu, scale, counts, sched, colmap, *upstream, matched if matched is not None else unused,
        route if saved_route else unused, d_patch, d_scale_parts,
        P, D, N, R, tiles_patch, patch.stride(0), patch.stride(1), sent.stride(0),
        BLOCK_P=block_rows, COLS=cols_patch, D_OUT=cfg["D_OUT"], D_CHUNKS=chunks,
        SIM_ONE_DOT=cfg["SIM_ONE_DOT"], **common,
    )
    if slices > 1:  # summed before the dsent kernel allocates its partials: the two never coexist
        d_patch = d_patch.sum(dim=0).to(patch.dtype)
    # dsent: one program per (packed tile, slice of the images); programs of unused tiles exit.
    slices_s = _num_slices(tiles_sent, num_images, N * D * elem, budget, patch.device, cfg["max_slices"])
    images_per_slice = _cdiv(num_images, slices_s)
    slices_s = _cdiv(num_images, images_per_slice)
    if slices_s == 1:
        d_sent = _utils.new_output((N, D), sent.dtype, sent.device)
    else:
        d_sent = _utils.new_output((slices_s, N, D), acc, patch.device)
    K._filip_bwd_sent_kernel[(tiles_sent, slices_s * cfg["sent_D_CHUNKS"])](
        patch, sent, cu, scale, counts, sched_sent, colmap_sent, *upstream, route if saved_route else unused, d_sent,
        num_images, P, D, N, R, tiles_sent, images_per_slice, patch.stride(0), patch.stride(1), sent.stride(0),
        BLOCK_P=cfg["bwd_sent_block_p" if saved_route else "bwd_sent_recompute_block_p"], COLS=cols_sent,
        D_OUT=cfg["sent_D_OUT"],
        D_CHUNKS=cfg["sent_D_CHUNKS"],
        SIM_ONE_DOT=cfg["sent_SIM_ONE_DOT"], **common,
    )
    if slices_s > 1:
        d_sent = d_sent.sum(dim=0).to(sent.dtype)
    return d_patch, d_sent, d_scale_parts.sum().to(scale.dtype)


def _stages(num_stages: Optional[int]) -> dict:
    return {} if num_stages is None else {"num_stages": num_stages}


def _check_fits(cfg: dict, max_seqlen: int) -> None:
    if not cfg["report_fits"]:
        raise ValueError(
            f"the triton backend's report kernels need 160 KiB of shared memory per block for reports of "
            f"{max_seqlen} sentences (more than 64); this GPU allows {cfg['shared_memory'] // 1024} KiB. Use "
            "backend='cuda' or 'reference', or shorter reports"
        )


def _launch_loss_fwd(
    patch, sent, cu, scale, gaze, gaze_mask, alpha, threshold, weights, egma_compat, max_seqlen, for_backward=True
):
    """Every forward kernel of the loss; returns the outputs and what the backward pass needs (the routes
    only ``for_backward``)."""
    B, P, D = patch.shape
    N = sent.shape[0]
    cfg = _config(patch.dtype, P, D, max_seqlen, B, _shared_memory(patch.device))
    _check_fits(cfg, max_seqlen)
    acc = _acc_dtype(patch.dtype)
    device = patch.device
    # counts: [longest report (egma_compat only), max(1, reports with gaze), max(1, reports mapped)]
    counts = _utils.new_output((3,), torch.int32, device)  # counts[0]: written by _launch_filip_fwd
    route = _utils.new_output(_route_shape(patch, N, max_seqlen, for_backward), _route_dtype(max_seqlen), device)
    i2t, t2i, best_patch, matched = _launch_filip_fwd(
        patch, sent, cu, scale, counts, max_seqlen, egma_compat=egma_compat, write_matched=True, route=route
    )
    has_gaze = gaze is not None
    per_report = _utils.new_output((K.PER_REPORT_ROWS.value, B), acc, device)
    sent_stats = _utils.new_output((N, K.SENT_STATS.value), acc, device)
    z1_lse = _utils.new_output((2, B, P), acc, device)
    K._report_fwd_kernel[(B,)](
        matched, gaze if has_gaze else matched, gaze_mask if has_gaze else cu, cu, i2t, t2i,
        per_report, sent_stats, z1_lse, B, N, P, float(threshold),
        HAS_GAZE=has_gaze, EGMA_COMPAT=egma_compat, BLOCK_P=cfg["matched_block_p"], BLOCK_S=cfg["BLOCK_S"],
        BLOCK_B=cfg["BLOCK_B"], ACC=cfg["ACC"], DOT_PRECISION=cfg["DOT_PRECISION"], num_warps=cfg["report_warps"],
        **_stages(cfg["report_stages"]),
    )
    loss, con, mlce, mapping = (_utils.new_output((), acc, device) for _ in range(4))
    w_con, w_mlce, w_map = weights
    K._loss_terms_kernel[(1,)](
        cu, gaze_mask if has_gaze else cu, per_report, loss, con, mlce, mapping, counts,
        B, N, float(alpha), float(w_con), float(w_mlce), float(w_map),
        HAS_GAZE=has_gaze, BLOCK_B=cfg["BLOCK_B"], ACC=cfg["ACC"],
    )
    return loss, con, mlce, mapping, i2t, t2i, best_patch, matched, per_report, sent_stats, z1_lse, counts, route


def _launch_loss_bwd(
    g_loss, g_con, g_mlce, g_map, g_i2t, g_t2i, patch, sent, cu, scale, gaze, gaze_mask,
    i2t, t2i, best_patch, matched, per_report, sent_stats, z1_lse, counts, route,
    alpha, threshold, weights, egma_compat, max_seqlen,
):
    grads = _grad_mask(loss=g_loss, con=g_con, mlce=g_mlce, map=g_map, i2t=g_i2t, t2i=g_t2i)
    w_con, w_mlce, w_map = weights
    N, P = matched.shape
    B = patch.shape[0]
    has_gaze = gaze is not None
    unused = scale
    d_matched = None
    mlce_grad = has_gaze and bool(grads & (K.G_LOSS.value | K.G_MLCE.value))
    map_grad = bool(grads & (K.G_LOSS.value | K.G_MAP.value))
    if mlce_grad or map_grad:
        cfg = _config(patch.dtype, P, 16, max_seqlen, 1, _shared_memory(patch.device))
        _check_fits(cfg, max_seqlen)
        d_matched = _utils.new_output((N, P), matched.dtype, matched.device)
        K._report_bwd_kernel[(B,)](
            matched, gaze if has_gaze else matched, gaze_mask if has_gaze else cu, cu, counts,
            g_loss if g_loss is not None else unused, g_mlce if g_mlce is not None else unused,
            g_map if g_map is not None else unused, float(w_mlce), float(w_map), float(alpha),
            sent_stats, z1_lse, d_matched, N, P, float(threshold),
            HAS_GAZE=has_gaze, GRADS=grads, BLOCK_P=cfg["matched_block_p"], BLOCK_S=cfg["BLOCK_S"],
            ACC=cfg["ACC"], DOT_PRECISION=cfg["DOT_PRECISION"], num_warps=cfg["report_warps"],
            **_stages(cfg["report_stages"]),
        )
    return _launch_filip_bwd(
        patch, sent, cu, scale, counts, best_patch, max_seqlen, egma_compat=egma_compat, grads=grads,
        g_loss=g_loss, g_con=g_con, g_i2t=g_i2t, g_t2i=g_t2i, w_con=w_con, i2t=i2t, t2i=t2i,
        per_report=per_report, d_matched=d_matched, matched=matched, route=route,
    )


# ---------------------------------------------------------------------------------------------------
# Launchers of the op contract (fused_op.py defines the ops, fake kernels and autograd around them)
# ---------------------------------------------------------------------------------------------------

# The loss forward's saved tensors (after its six public outputs), in the order _launch_loss_fwd returns them.
LOSS_SAVED = ("best_patch", "matched_sim", "per_report", "sent_stats", "z1_lse", "counts", "route")


def _check_loss_inputs(x: OpInputs) -> None:
    _check_op_inputs(x.patch, x.sent, x.cu, x.scale, x.patch.shape[0] if x.patch.dim() == 3 else None,
                     x.gaze, x.gaze_mask)


def _check_filip_inputs(x: OpInputs) -> None:
    _check_op_inputs(x.patch, x.sent, x.cu, x.scale, None)


def _loss_forward(x: OpInputs, options: LossOptions, max_seqlen: int, save: bool) -> tuple:
    """(loss, contrastive, gaze_mlce, mapping, i2t, t2i, *LOSS_SAVED); the routes only when ``save``."""
    return _launch_loss_fwd(
        *x, options.alpha, options.map_threshold, options.weights, options.egma_compat,
        _seqlen_bound(max_seqlen, x.sent.shape[0]), save,
    )


def _loss_saved(x: OpInputs, options: LossOptions, max_seqlen: int, save: bool) -> list:
    (B, P, _), N = x.patch.shape, x.sent.shape[0]
    max_seqlen = _seqlen_bound(max_seqlen, N)
    acc = _acc_dtype(x.patch.dtype)
    return [
        ((B, N), _index_dtype(P, x.patch.dtype)),  # best_patch
        ((N, P), acc),  # matched_sim: each report's sentences against its own image's patches
        ((K.PER_REPORT_ROWS.value, B), acc),  # per_report
        ((N, K.SENT_STATS.value), acc),  # sent_stats
        ((2, B, P), acc),  # z1_lse
        ((3,), torch.int32),  # counts
        (_route_shape(x.patch, N, max_seqlen, save), _route_dtype(max_seqlen)),  # route
    ]


def _loss_backward(grads, x: OpInputs, i2t: Tensor, t2i: Tensor, saved: tuple, options: LossOptions,
                   max_seqlen: int) -> tuple:
    (B, P, _), N = x.patch.shape, x.sent.shape[0]
    max_seqlen = _seqlen_bound(max_seqlen, N)
    route_shape = (B, B, P) if saved[-1].numel() else (0,)
    shapes = [(B, N), (N, P), (K.PER_REPORT_ROWS.value, B), (N, K.SENT_STATS.value), (2, B, P), (3,), route_shape]  # LOSS_SAVED
    expected = [(g, ()) for g in grads[:4]] + [(i2t, (B, B)), (t2i, (B, B))] + list(zip(saved, shapes))
    _check_saved(expected)
    if any(g is not None and g.shape != (B, B) for g in grads[4:]):
        raise ValueError("egma_kernels triton backward op: the gradients of i2t and t2i must have shape (B, B)")
    return _launch_loss_bwd(
        *grads, *x, i2t, t2i, *saved, options.alpha, options.map_threshold, options.weights, options.egma_compat,
        max_seqlen,
    )


def _filip_forward(x: OpInputs, max_seqlen: int, egma_compat: bool, save: bool) -> tuple:
    """(i2t, t2i, best patch of each sentence in each image): the best patches are written in any case."""
    _refuse_compat(egma_compat)
    i2t, t2i, best_patch, _ = _launch_filip_fwd(
        x.patch, x.sent, x.cu, x.scale, x.cu, _seqlen_bound(max_seqlen, x.sent.shape[0]), egma_compat=False,
        write_matched=False,
    )
    return i2t, t2i, best_patch


def _filip_saved(x: OpInputs, max_seqlen: int, egma_compat: bool, save: bool) -> list:
    return [((x.patch.shape[0], x.sent.shape[0]), _index_dtype(x.patch.shape[1], x.patch.dtype))]


def _filip_backward(g_i2t, g_t2i, x: OpInputs, i2t: Tensor, t2i: Tensor, saved: tuple, max_seqlen: int,
                    egma_compat: bool) -> tuple:
    _refuse_compat(egma_compat)
    M, R = x.patch.shape[0], x.cu.shape[0] - 1
    (best_patch,) = saved
    _check_saved(((best_patch, (M, x.sent.shape[0])),))
    if g_i2t is not None and g_i2t.shape != (M, R) or g_t2i is not None and g_t2i.shape != (M, R):
        raise ValueError("egma_kernels triton backward op: the gradients of i2t and t2i must have shape (M, R)")
    return _launch_filip_bwd(
        x.patch, x.sent, x.cu, x.scale, x.cu, best_patch, _seqlen_bound(max_seqlen, x.sent.shape[0]),
        egma_compat=False, grads=_grad_mask(i2t=g_i2t, t2i=g_t2i), g_i2t=g_i2t, g_t2i=g_t2i,
    )


def _refuse_compat(egma_compat: bool) -> None:
    if egma_compat:
        raise ValueError("egma_kernels triton op: the similarity has no egma_compat variant (the distributed "
                         "loss pads the reports itself)")


def prepare_inputs(x: OpInputs, check_device: bool = True) -> OpInputs:
    """Validated inputs as the ops take them: contiguous, int32 offsets, a 0-dim logit scale in the
    accumulation dtype; on a CUDA device (or the interpreter) unless ``check_device`` is off (a benchmark
    that stubs the kernel launches runs CPU tensors without the interpreter)."""
    patch, sent, cu, scale, gaze, gaze_mask = x
    if check_device:
        _check_device(patch, sent)
    scale_dtype = _acc_dtype(patch.dtype)
    if scale.dim() != 0 or scale.dtype != scale_dtype:  # validation already makes it so
        scale = scale.reshape(()).to(scale_dtype)
    if gaze is not None:
        gaze = gaze.contiguous()
        gaze_mask = gaze_mask.contiguous()
    cu = cu if cu.dtype == torch.int32 else cu.to(torch.int32)
    return OpInputs(patch.contiguous(), sent.contiguous(), cu.contiguous(), scale, gaze, gaze_mask)


def _longest_report(cu: Tensor) -> int:
    """One host read; pass max_seqlen to avoid it."""
    return int((cu[1:] - cu[:-1]).max())


LAUNCHERS = Launchers(
    loss=OpLaunchers(_loss_forward, _loss_backward, _loss_saved, len(LOSS_SAVED), check=_check_loss_inputs),
    filip=OpLaunchers(_filip_forward, _filip_backward, _filip_saved, 1, check=_check_filip_inputs),
    prepare=prepare_inputs,
    max_seqlen_of=_longest_report,
)
OPS = define_ops("triton", LAUNCHERS)
_loss_op, _filip_op = OPS.loss_op, OPS.filip_op  # egma_kernels::triton_loss, egma_kernels::triton_filip
fine_grained_loss_triton, filip_similarity_triton = OPS.loss, OPS.similarity

register_backend(
    Backend(
        name="triton",
        loss=fine_grained_loss_triton,
        similarity=filip_similarity_triton,
        devices=("cuda", "cpu") if interpreting() else ("cuda",),
        is_available=is_available,
        priority=5,
        auto_devices=("cuda",),
        wants_max_seqlen=True,
    )
)
