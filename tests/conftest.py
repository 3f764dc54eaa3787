import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The first-use self-check (egma_kernels/selfcheck.py) is off for the suite, which calls the backends
# constantly; tests/test_selfcheck.py turns it on where it tests it, with verdicts in a throwaway folder.
os.environ.setdefault("EGMA_KERNELS_FIRST_USE_CHECK", "0")
os.environ.setdefault("EGMA_KERNELS_CACHE", tempfile.mkdtemp(prefix="egma-kernels-test-cache-"))

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable is read when
# the kernels are decorated, so it must be set before egma_kernels is imported (test modules import it
# after this file).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def normalised(shape, generator, dtype=torch.float64):
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


def make_inputs(lengths, P, D, *, seed=0, gaze="all", dtype=torch.float64, scale=10.0, gaze_density=0.4):
    """Random EGMA inputs: unit-norm embeddings, sparse non-negative gaze, a positive scale.

    gaze: "none", "all" (every report has gaze) or "mixed" (a random subset, at least one with, one without).
    """
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    N = sum(lengths)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    inputs = dict(
        patch_emb=normalised((B, P, D), g, dtype),
        sent_emb=normalised((N, D), g, dtype),
        cu_seqlens=cu,
        logit_scale=torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        gaze=None,
        gaze_mask=None,
    )
    if gaze != "none":
        heat = torch.rand(N, P, generator=g, dtype=torch.float64)
        keep = torch.rand(N, P, generator=g) < gaze_density
        inputs["gaze"] = (heat * keep).to(dtype)
        if gaze == "mixed":
            mask = torch.rand(B, generator=g) < 0.5
            mask[0] = True
            if B > 1:
                mask[-1] = False
            inputs["gaze_mask"] = mask
    return inputs


# The slow tier, in one place: `python -m pytest -q -m "not slow" tests` (the README's command) leaves these
# out, `python -m pytest -v -m slow tests` runs them alone, and CI (.ci/run) runs both tiers. An entry is a
# node id relative to the repository (a file, a test function with all its parameter sets, or one parameter
# set) and why it is slow. Times: one run on 2 cores shared with other work (load about 3, 2026-12), which
# roughly doubles them; the AOT compiles on 2 idle cores. docs/building.md ("Tests") says when to add one.
SLOW_TESTS = {
    # ahead-of-time compiles of every Triton kernel variant (a subprocess, silent while it works)
    "tests/test_triton_aot_targets.py::test_every_kernel_compiles_for_sm90": "every shape, sm_90: 230 s idle",
    "tests/test_triton_aot_targets.py::test_variants_near_the_limits_fit_every_target": "6 targets: 106 s idle",
    # the Triton interpreter runs kernel programs one after another (about 2 ms per program per loop step)
    # (test_triton_packing.py's device-side schedule tests stay fast: 26 tests in about 1 s)
    "tests/test_triton_packing.py::test_packed_loss_matches_reference": "interpreter, up to 19 images, 8 cases: 54 s",
    "tests/test_triton_packing.py::test_packed_tile_widths": "interpreter, 3 tile widths: 21 s",
    "tests/test_triton_packing.py::test_packed_filip_similarity": "interpreter: 11 s",
    "tests/test_triton_packing.py::test_packed_backward_recomputing_routes": "interpreter: 66 s",
    "tests/test_triton_packing.py::test_packed_backward_tile_widths": "interpreter, 4 tile widths: 82 s",
    "tests/test_triton_packing.py::test_ties_take_the_same_route_saved_or_recomputed": "interpreter, both routes: 22 s",
    "tests/test_triton_backend.py::test_patch_grid_of_1024": "interpreter, 1024 patches: 41 s",
    "tests/test_triton_backend.py::test_routes_recomputed_in_the_backward": "interpreter, both routes, 8 cases: 45 s",
    "tests/test_triton_backend.py::test_report_groups_in_float64": "interpreter, 8 tile groupings: 35 s",
    "tests/test_triton_backend.py::test_backward_slices": "interpreter, sliced backward: 11 s",
    "tests/test_triton_backend.py::test_torch_compile_fullgraph": "torch.compile of the Triton op: 8 s",
    "tests/test_memory_safety.py::test_random_malformed_offsets[triton]": "interpreter, 200 random offsets: 40 s",
    "tests/test_memory_safety.py::test_malformed_offsets_with_checks_off[triton]": "interpreter: 16 s",
    "tests/test_triton_memory_safety.py::test_malformed_offsets_stay_in_bounds": "interpreter: 17 s",
    "tests/test_triton_memory_safety.py::test_random_malformed_offsets": "interpreter: 9 s",
    # several processes (torch.distributed over gloo on 127.0.0.1), each importing torch and the model
    "tests/test_distributed.py::test_two_and_three_ranks_match_one_process": "1, 2 and 3 ranks: 27 s",
    "tests/test_distributed_train.py": "egma-train on 2 ranks, then resumed: 15 s",
    "tests/test_model_gradcache.py::test_grad_chunk_size_composes_with_the_distributed_loss": "2 ranks: 68 s",
    # torch.compile and fresh Python processes loading encoders
    "tests/test_bench.py::test_compiled_reference_smoke": "torch.compile of the reference: 29 s",
    "tests/test_model_hub.py": "encoders saved, then loaded by hub name in fresh Python processes: 46 s",
}


def slow_reason(nodeid: str):
    """Why the test ``nodeid`` is in the slow tier, or None."""
    for entry, why in SLOW_TESTS.items():
        if nodeid == entry or nodeid.startswith(entry + "[") or nodeid.startswith(entry + "::"):
            return why
    return None


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if slow_reason(item.nodeid) is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def make():
    return make_inputs
