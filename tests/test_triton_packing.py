"""The Triton forward's packed report tiles: the device-side schedule against a plain next-fit packing, and
the packed forward (with the unchanged backward) against the float64 reference on batches whose tiles hold
several reports, one long report among short ones, one-sentence reports, and tiles just one report wide.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1)."""

import random

import pytest
import torch

import egma_kernels as ek
from backend_cases import Case, check_backend, check_filip_backend

pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = [
    pytest.mark.skipif("triton" not in ek.available_backends(), reason="triton backend unavailable"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def next_fit(lengths, columns):
    """First report of every tile: consecutive whole reports while they fit ``columns`` (at least one)."""
    starts, used = [0], 0
    for k, n in enumerate(lengths):
        if used + n > columns and used > 0:
            starts.append(k)
            used = 0
        used += n
    return starts


def run_schedule(lengths, columns, longest=True):
    from egma_kernels import triton_backend as tb
    from egma_kernels import triton_kernels as K

    R, N = len(lengths), sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    tiles = tb._pack_tiles(R, N, columns)
    sched = torch.full((tiles + 1,), -7, dtype=torch.int32, device=DEVICE)
    counts = torch.full((3,), -7, dtype=torch.int32, device=DEVICE)
    K._pack_schedule_kernel[(1,)](cu, sched, counts, R, N, tiles, LONGEST=longest, COLS=columns, BLOCK_B=16,
                                  num_warps=1)
    return sched.cpu().tolist(), counts.cpu().tolist(), tiles


LENGTH_SETS = [
    [1],
    [16],
    [1] * 40,  # one-sentence reports: 16 or 32 per tile
    [16, 16, 16],  # exact fits
    [15, 2, 15, 2, 15],  # every tile closes early: the bound's worst case
    [3, 1, 4, 2, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7],
    [1, 2, 1, 3, 30, 1, 1, 2, 4, 1, 1, 1, 2, 6, 1],  # one long report among short ones
]


@pytest.mark.parametrize("columns", [16, 32, 64])
@pytest.mark.parametrize("lengths", LENGTH_SETS + ["random"],
                         ids=lambda v: v if isinstance(v, str) else f"R{len(v)}-max{max(v)}")
def test_schedule_is_next_fit_within_the_bound(lengths, columns):
    rng = random.Random(columns)
    sets = [[rng.choice([1, 1, 2, 3, 5, columns // 2, columns]) for _ in range(rng.randint(1, 70))] for _ in range(6)] \
        if lengths == "random" else [lengths]
    for lens in sets:
        if max(lens) > columns:
            continue
        sched, counts, tiles = run_schedule(lens, columns)
        want = next_fit(lens, columns)
        assert len(want) <= tiles, (lens, columns, want, tiles)  # the host's bound holds
        assert sched == want + [len(lens)] * (tiles + 1 - len(want)), (lens, columns)
        assert counts[0] == max(lens) and counts[1:] == [-7, -7]


def test_schedule_without_longest_leaves_counts():
    sched, counts, _ = run_schedule([2, 3, 1], 16, longest=False)
    assert sched[:2] == [0, 3] and counts == [-7, -7, -7]


PACKED_CASES = [
    # a long-tailed batch: one 30-sentence report (BLOCK_S 32) among short ones, several reports per tile
    Case((1, 2, 1, 3, 30, 1, 1, 2, 4, 1, 1, 1, 2, 6, 1), P=7, D=24, gaze="mixed", seed=30),
    Case((1, 2, 1, 3, 30, 1, 1, 2, 4, 1, 1, 1, 2, 6, 1), P=7, D=24, gaze="mixed", egma_compat=True, seed=31),
    Case((1,) * 19, P=5, D=16, gaze="all", egma_compat=True, seed=32),  # one-sentence reports, two tiles
    Case((5, 9, 2, 16, 1, 7, 7, 3), P=19, D=40, gaze="none", seed=33),  # a 16-sentence report fills a tile
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", PACKED_CASES, ids=str)
def test_packed_loss_matches_reference(case, dtype):
    check_backend("triton", case, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("case, fwd_group", [(PACKED_CASES[1], 1), (PACKED_CASES[2], 1), (PACKED_CASES[2], 4)],
                         ids=lambda v: str(v) if isinstance(v, Case) else f"cols{v}xBLOCK_S")
def test_packed_tile_widths(case, fwd_group, monkeypatch):
    """Tiles of BLOCK_S columns (the longest report fills one alone; one-sentence reports 16 a tile) and of
    4 x BLOCK_S, in float64."""
    from egma_kernels import triton_backend as tb

    monkeypatch.setattr(tb, "CONFIG_OVERRIDES", {"fwd_group": fwd_group})
    check_backend("triton", case, device=DEVICE, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_packed_filip_similarity(dtype):
    check_filip_backend("triton", 3, (1, 2, 1, 3, 20, 1, 1, 2, 4, 1, 1), P=6, D=16, device=DEVICE, dtype=dtype)
