"""Every Triton kernel variant compiled ahead of time for each GPU target (no GPU needed), with the
launch configuration the backend picks for that target's shared memory per block, must fit it; and
those configurations must give the reference's numbers (checked in the interpreter)."""

import os
import subprocess
import sys

import pytest
import torch

import egma_kernels as ek
from backend_cases import Case, check_backend

pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "aot_compile_triton.py")
# Targets Triton 3.8 compiles for: A100 (sm_80), A6000/A40 (sm_86), L40S/RTX 4090 (sm_89), H100/H200
# (sm_90), B200 (sm_100), RTX 50xx (sm_120).
TARGETS = "80,86,89,90,100,120"


def _run_tool(*args, timeout=1500):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, TOOL, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert "all kernels compiled" in result.stdout
    return result.stdout


@pytest.mark.skipif(ON_GPU, reason="compiles without a GPU; on a GPU the real tests run instead")
def test_every_kernel_compiles_for_sm90():
    """Every shape of the tool's list for the H100/H200 (the lent GPU machines)."""
    _run_tool("--arch", "90")


@pytest.mark.skipif(ON_GPU, reason="compiles without a GPU; on a GPU the real tests run instead")
def test_variants_near_the_limits_fit_every_target():
    """The shapes whose shared memory is near some target's limit or whose configuration follows it,
    for every target, each against its own limit (sm_80 163 KiB, sm_86/89/120 99 KiB, sm_90/100 227 KiB).
    Variants identical on sm_80/86/89 are compiled once (same lowering). --check-code: on sm_80 and sm_90
    every kernel with matrix products has tensor-core instructions in its SASS, and at 10-sentence reports
    the schedule, packed forward and report kernels (and on sm_90 the backward with saved routes) do not
    spill (the tool's must_not_spill)."""
    out = _run_tool("--arch", TARGETS, "--shapes", "limits", "--check-code")
    for arch in TARGETS.split(","):
        assert f"sm_{arch} " in out
    # 128-sentence float32 reports do not fit a 99 KiB block: the loss refuses them there, clearly
    assert "skip sm_86 _report_bwd_kernel" in out and "skip sm_80 _report" not in out


def test_committed_report_is_complete_and_clean():
    """benchmarks/results/compiled-code/report.md (every shape, sm_90 and sm_80) lists every kernel variant
    with the warps and stages the configuration now picks, tensor-core SASS wherever a kernel has matrix
    products, and no spill in the must_not_spill variants: a configuration change without a regenerated
    report, or a regenerated report with a new spill there, fails here (no compile: seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    report = os.path.join(ROOT, "benchmarks", "results", "compiled-code", "report.md")
    result = subprocess.run([sys.executable, TOOL, "--check-report", report], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    assert "complete and clean" in result.stdout


def test_configuration_follows_the_shared_memory():
    from egma_kernels import triton_backend as tb

    def cfg(dtype, P, D, S, smem, matmul="highest"):
        return tb.launch_config.__wrapped__(dtype, P, D, S, 64, smem, matmul)

    big, a100, small = tb.SHARED_MEMORY_LIMITS[90], tb.SHARED_MEMORY_LIMITS[80], tb.SHARED_MEMORY_LIMITS[86]
    if not tb.interpreting():
        # float32 TF32 one-dot backward (164 KiB by the AOT check) only where it fits
        assert cfg(torch.float32, 49, 512, 10, big, "high")["SIM_ONE_DOT"]
        assert not cfg(torch.float32, 49, 512, 10, a100, "high")["SIM_ONE_DOT"]
    assert cfg(torch.float32, 1024, 1024, 128, big)["BLOCK_D"] == 64
    assert cfg(torch.float32, 1024, 1024, 128, small)["BLOCK_D"] == 32
    assert cfg(torch.float32, 1024, 512, 64, small)["report_stages"] == 1
    assert cfg(torch.float32, 1024, 512, 64, a100)["report_stages"] is None
    assert cfg(torch.float32, 1024, 512, 128, a100)["report_stages"] == 1
    assert not cfg(torch.float32, 1024, 512, 128, small)["report_fits"]
    assert cfg(torch.bfloat16, 196, 512, 10, small)["fwd_SIM_ONE_DOT"]
    # EGMA's size: the same configuration on every target (nothing is near a limit there)
    assert cfg(torch.bfloat16, 49, 512, 10, small) == dict(cfg(torch.bfloat16, 49, 512, 10, big), shared_memory=small)


@pytest.mark.skipif(ON_GPU, reason="interpreter check")
@pytest.mark.parametrize("arch", [80, 86])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", [
    Case((40, 3, 1), P=20, D=100, gaze="mixed", egma_compat=True, seed=21),  # BLOCK_S 64: float32 BLOCK_D 32 on sm_86
    Case((2, 3), P=5, D=300, gaze="mixed", seed=15),
], ids=str)
def test_small_shared_memory_configurations_match_reference(arch, dtype, case, monkeypatch):
    """The loss with the configuration an sm_80 / sm_86 device gets, against the float64 reference."""
    from egma_kernels import triton_backend as tb

    if "triton" not in ek.available_backends():
        pytest.skip("triton backend unavailable")
    monkeypatch.setattr(tb, "_shared_memory", lambda device: tb.SHARED_MEMORY_LIMITS[arch])
    check_backend("triton", case, "cpu", dtype)


def test_refuses_what_does_not_fit(monkeypatch):
    from egma_kernels import triton_backend as tb
    from conftest import make_inputs

    if "triton" not in ek.available_backends():
        pytest.skip("triton backend unavailable")
    monkeypatch.setattr(tb, "_shared_memory", lambda device: tb.SHARED_MEMORY_LIMITS[86])
    inputs = make_inputs((70, 2), 3, 8, dtype=torch.float64, gaze="none")
    inputs = {k: v.cuda() if ON_GPU and isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match="160 KiB of shared memory"):
        ek.fine_grained_loss(**inputs, backend="triton")
