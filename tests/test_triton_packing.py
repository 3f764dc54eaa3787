"""The Triton kernels' packed report tiles: the device-side schedule against a plain next-fit packing, and
the packed forward and backward against the float64 reference on batches whose tiles hold several reports,
one long report among short ones, one-sentence reports, and tiles just one report wide; the backward with
saved and with recomputed routes, which must agree on exact ties.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1)."""

import random

import pytest
import torch

import egma_kernels as ek
from backend_cases import Case, check_backend, check_filip_backend
from conftest import make_inputs

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
    sched = torch.full((tiles + 2,), -7, dtype=torch.int32, device=DEVICE)
    counts = torch.full((3,), -7, dtype=torch.int32, device=DEVICE)
    K._pack_schedule_kernel[(1,)](cu, sched, sched, sched, sched, counts, R, N, tiles, tiles, LONGEST=longest,
                                  COLS=columns, COLS2=columns, BLOCK_B=16, COLMAP=False, num_warps=1)
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
        assert sched == want + [len(lens)] * (tiles + 1 - len(want)) + [len(want)], (lens, columns)  # + tile count
        assert counts[0] == max(lens) and counts[1:] == [-7, -7]


def test_two_schedules_from_one_launch():
    """The backward's launch: the first program writes the tiles of one width, the second of another, each
    with its tile count after it and its column map; the second never touches counts."""
    from egma_kernels import triton_backend as tb
    from egma_kernels import triton_kernels as K

    lengths = [3, 1, 4, 2, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 1, 1, 16]
    R, N = len(lengths), sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    t32, t16 = tb._pack_tiles(R, N, 32), tb._pack_tiles(R, N, 16)
    sched = torch.full((t32 + 2,), -7, dtype=torch.int32, device=DEVICE)
    sched2 = torch.full((t16 + 2,), -7, dtype=torch.int32, device=DEVICE)
    counts = torch.full((3,), -7, dtype=torch.int32, device=DEVICE)
    maps = [torch.full((t * 2 * c,), -7, dtype=torch.int32, device=DEVICE) for t, c in ((t32, 32), (t16, 16))]
    K._pack_schedule_kernel[(2,)](cu, sched, sched2, *maps, counts, R, N, t32, t16, LONGEST=False, COLS=32,
                                  COLS2=16, BLOCK_B=16, COLMAP=True, num_warps=1)
    for got, colmap, columns, tiles in ((sched, maps[0], 32, t32), (sched2, maps[1], 16, t16)):
        want = next_fit(lengths, columns)
        assert got.cpu().tolist() == want + [R] * (tiles + 1 - len(want)) + [len(want)], columns
        # the column map: per tile, each column's sentence (-1 where unused), then its report
        colmap = colmap.view(tiles, 2, columns).cpu()
        for t, first in enumerate(want):
            reports = range(first, (want + [R])[t + 1])
            sentences = [u for k in reports for u in range(sum(lengths[:k]), sum(lengths[:k + 1]))]
            owners = [k for k in reports for _ in range(lengths[k])]
            unused = columns - len(sentences)
            assert colmap[t, 0].tolist() == sentences + [-1] * unused, (columns, t)
            assert colmap[t, 1, :len(owners)].tolist() == owners, (columns, t)
        assert (colmap[len(want):] == -7).all()  # tiles past the last are left alone
    assert counts.cpu().tolist() == [-7, -7, -7]


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


# The backward on packed tiles: the dpatch kernel's tiles (bwd_group x BLOCK_S columns) and the dsent
# kernel's (sent_group x BLOCK_S), with the forward's saved routes or with the similarity recomputed, where
# segmented scans along the columns find each row's best sentence of each report.


@pytest.mark.parametrize("case, dtype", [(PACKED_CASES[1], torch.float64), (PACKED_CASES[3], torch.float32)],
                         ids=lambda v: str(v) if isinstance(v, Case) else str(v).replace("torch.", ""))
def test_packed_backward_recomputing_routes(case, dtype, monkeypatch):
    """The routes recomputed by segmented scans (the other packed tests take the saved ones at their sizes)."""
    from egma_kernels import triton_backend as tb

    monkeypatch.setattr(tb, "CONFIG_OVERRIDES", {"save_route": False})
    check_backend("triton", case, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("save_route", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("case, bwd_group, sent_group", [(PACKED_CASES[0], 2, 1), (PACKED_CASES[2], 4, 2)],
                         ids=["long-tail-2x1", "one-sentence-4x2"])
def test_packed_backward_tile_widths(case, bwd_group, sent_group, save_route, monkeypatch):
    """In float64 (saved routes on a GPU: float32), tile widths other than the defaults: 2 x / 1 x BLOCK_S
    columns (dpatch / dsent) on a long-tailed batch (the 30-sentence report fills a dsent tile alone), and
    4 x / 2 x BLOCK_S on one-sentence reports (a dpatch tile holds up to 64 reports)."""
    from egma_kernels import triton_backend as tb

    monkeypatch.setattr(tb, "CONFIG_OVERRIDES", {"bwd_group": bwd_group, "sent_group": sent_group,
                                                 "save_route": save_route})
    # float32 for saved routes on a GPU: Triton cannot lower the float64 saved-route kernels for sm_90
    dtype = torch.float32 if ON_GPU and save_route else torch.float64
    check_backend("triton", case, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("compat", [False, True], ids=["plain", "compat"])
def test_ties_take_the_same_route_saved_or_recomputed(compat, monkeypatch):
    """Exact ties (repeated sentences inside reports): the recomputed route (a forward segmented argmax and
    a reverse segmented max) must pick the forward's saved one, the leftmost maximum, so that both paths
    give the same patch and sentence gradients. (The reference splits a tie's gradient evenly, so this
    compares the two Triton paths.) A route picking another column, or two, changes the gradients."""
    from egma_kernels import triton_backend as tb

    lengths = [3, 1, 4, 2, 5, 6, 1, 3]
    inputs = make_inputs(lengths, 7, 16, seed=40, gaze="mixed")
    sent = inputs["sent_emb"].clone()
    start = 0
    for n in lengths:  # every sentence of a report repeats the report's first or second sentence
        for j in range(1, n):
            sent[start + j] = sent[start + (j % 2)]
        start += n
    inputs["sent_emb"] = sent

    # float32 on a GPU (Triton cannot lower the float64 kernels with saved routes for sm_90)
    dtype = torch.float32 if ON_GPU else torch.float64
    inputs = {k: v.to(DEVICE, dtype=dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
              for k, v in inputs.items()}

    def grads(save_route):
        monkeypatch.setattr(tb, "CONFIG_OVERRIDES", {"save_route": save_route})
        patch = inputs["patch_emb"].clone().requires_grad_(True)
        sent = inputs["sent_emb"].clone().requires_grad_(True)
        args = dict(inputs, patch_emb=patch, sent_emb=sent)
        ek.fine_grained_loss(**args, backend="triton", egma_compat=compat).backward()
        return patch.grad, sent.grad

    saved, recomputed = grads(True), grads(False)
    for a, b in zip(saved, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-13 if dtype == torch.float64 else 1e-5, atol=1e-15)
