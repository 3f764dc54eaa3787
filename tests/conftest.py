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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def make():
    return make_inputs
