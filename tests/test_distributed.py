"""The loss over a torch.distributed group (gloo on the CPU) against one process on the concatenated batch.

Each test spawns its ranks once (``torch.multiprocessing``, TCP rendezvous on a free 127.0.0.1 port, 60 s
collective timeout, bounded join) and runs a batch of random ragged cases in them: uneven batches per
rank, gaze on some ranks only, ``egma_compat`` on and off, float64. Every rank wraps a small linear
encoder in DistributedDataParallel in front of the loss; its loss value, terms, I2T/T2I rows and the
DDP-averaged parameter gradients must equal, to 1e-10 relative, those of the float64 reference on the
concatenated batch in one process. The refusals (no images on a rank, D or dtype mismatched, a rank's bad
input) must raise on every rank and leave the group usable.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

import egma_kernels as ek
from egma_kernels.distributed import _zero_padded_reports, communicated_bytes
from egma_kernels.reference import filip_similarity_ref
from spawn_ranks import free_port, spawn_bounded

RTOL = 1e-10
JOIN_TIMEOUT_S = 150


# --------------------------------------------------------------------------------------------------------
# Cases: a global batch split unevenly over the ranks.


def make_case(world: int, seed: int, *, gaze: str):
    """Raw features of a global batch and its split. ``gaze``: "none", "some" (some ranks have none),
    or "all" (every rank passes gaze, with a mixed mask)."""
    g = torch.Generator().manual_seed(1000 + seed)
    Bs = [int(torch.randint(1, 4, (1,), generator=g)) for _ in range(world)]
    Bs[seed % world] += 2  # uneven
    lengths = [int(torch.randint(1, 5, (1,), generator=g)) for _ in range(sum(Bs))]
    P, Fin = 5, 6
    N = sum(lengths)
    xp = torch.randn(sum(Bs), P, Fin, generator=g, dtype=torch.float64)
    xs = torch.randn(N, Fin, generator=g, dtype=torch.float64)
    heat = torch.rand(N, P, generator=g, dtype=torch.float64) * (torch.rand(N, P, generator=g) < 0.4)
    if gaze == "none":
        with_gaze = [False] * world
    elif gaze == "all":
        with_gaze = [True] * world
    else:
        with_gaze = [r % 2 == 0 for r in range(world)]
    mask = torch.rand(sum(Bs), generator=g) < 0.7
    return dict(Bs=Bs, lengths=lengths, xp=xp, xs=xs, heat=heat, with_gaze=with_gaze, mask=mask)


def split(case, rank: int):
    """This rank's share of the case: features, cu_seqlens, gaze (or None) and gaze_mask."""
    Bs, lengths = case["Bs"], case["lengths"]
    b0, b1 = sum(Bs[:rank]), sum(Bs[: rank + 1])
    n0, n1 = sum(lengths[:b0]), sum(lengths[:b1])
    cu = F.pad(torch.cumsum(torch.tensor(lengths[b0:b1]), 0), (1, 0)).to(torch.int32)
    gaze = mask = None
    if case["with_gaze"][rank]:
        gaze, mask = case["heat"][n0:n1], case["mask"][b0:b1]
    return case["xp"][b0:b1], case["xs"][n0:n1], cu, gaze, mask


def concatenated(case):
    """The one-process equivalent: the whole batch, gaze zero and masked off where a rank had none."""
    Bs, lengths, world = case["Bs"], case["lengths"], len(case["Bs"])
    cu = F.pad(torch.cumsum(torch.tensor(lengths), 0), (1, 0)).to(torch.int32)
    if not any(case["with_gaze"]):
        return case["xp"], case["xs"], cu, None, None
    owner_rank = torch.repeat_interleave(torch.arange(world), torch.tensor(Bs))
    has = torch.tensor(case["with_gaze"])[owner_rank]
    mask = case["mask"] & has
    sent_has = torch.repeat_interleave(has, torch.tensor(lengths))
    gaze = torch.where(sent_has[:, None], case["heat"], torch.zeros_like(case["heat"]))
    return case["xp"], case["xs"], cu, gaze, mask


class Encoder(torch.nn.Module):
    """Two linear projections and a learnable log temperature, in float64."""

    def __init__(self, seed: int, D: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = torch.nn.Linear(6, D, dtype=torch.float64)
        self.sent = torch.nn.Linear(6, D, dtype=torch.float64)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(8.0), dtype=torch.float64))

    def forward(self, xp, xs):
        return F.normalize(self.patch(xp), dim=-1), F.normalize(self.sent(xs), dim=-1), self.log_scale.exp()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------------------
# What runs in each rank.


def _one_case(group, spec):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    case = make_case(world, spec["seed"], gaze=spec["gaze"])
    opts = dict(egma_compat=spec["compat"], weights=spec["weights"])
    ref_model = Encoder(spec["seed"])
    xp, xs, cu, gaze, mask = concatenated(case)
    p, s, t = ref_model(xp, xs)
    ref = ek.fine_grained_loss(p, s, cu, t, gaze, mask, backend="reference", return_details=True, **opts)
    ref.loss.backward()
    ref_grads = [q.grad for q in ref_model.parameters()]

    model = DDP(Encoder(spec["seed"]), process_group=group)
    xp, xs, cu, gaze, mask = split(case, rank)
    p, s, t = model(xp, xs)
    if spec.get("module"):
        loss_fn = ek.FineGrainedLoss(backend=spec["backend"], return_details=True, group=group, **opts)
        got = loss_fn(p, s, cu, t, gaze, mask)
    else:
        got = ek.fine_grained_loss(p, s, cu, t, gaze, mask, backend=spec["backend"], return_details=True,
                                   group=group, **opts)
    got.loss.backward()
    b0 = sum(case["Bs"][:rank])
    rows = slice(b0, b0 + case["Bs"][rank])
    got = type(got)(*(x.detach() for x in got))
    ref = type(ref)(*(x.detach() for x in ref))
    errors = {name: rel_err(getattr(got, name), getattr(ref, name))
              for name in ("loss", "contrastive", "gaze_mlce", "mapping") if float(getattr(ref, name)) != 0.0}
    # A term that is 0 in one process (no gaze anywhere, no report with two sentences) is exactly 0 here.
    errors["zero_terms_exact"] = float(sum(abs(float(getattr(got, n))) for n in ("gaze_mlce", "mapping")
                                           if float(getattr(ref, n)) == 0.0))
    errors["i2t_rows"] = rel_err(got.i2t, ref.i2t[rows])
    errors["t2i_rows"] = rel_err(got.t2i, ref.t2i[rows])
    for (name, q), g in zip(model.module.named_parameters(), ref_grads):
        errors[f"grad_{name}"] = rel_err(q.grad, g)
    return errors


def _refusals(rank, world):
    """Each bad setup must raise on every rank; then a good call must still work (no rank left behind)."""
    import torch.distributed as dist

    group = dist.group.WORLD
    case = make_case(world, 0, gaze="none")
    model = Encoder(0)
    xp, xs, cu, _, _ = split(case, rank)
    with torch.no_grad():
        p, s, t = model(xp, xs)
    messages = {}

    def attempt(name, *args):
        try:
            ek.fine_grained_loss(*args, backend="reference", group=group)
            messages[name] = "no error"
        except (ValueError, RuntimeError, TypeError) as exc:
            messages[name] = f"{type(exc).__name__}: {exc}"

    last = world - 1
    attempt("empty", p[:0] if rank == last else p, s, cu, t)
    attempt("dim", torch.cat([p, p[..., :1]], -1) if rank == last else p,
            torch.cat([s, s[..., :1]], -1) if rank == last else s, cu, t)
    attempt("dtype", p.float() if rank == last else p, s.float() if rank == last else s,
            cu, t.float() if rank == last else t)
    bad_cu = cu.clone()
    bad_cu[-1] += 1
    attempt("bad_input", p, s, bad_cu if rank == 0 else cu, t)
    loss = ek.fine_grained_loss(p, s, cu, t, backend="reference", group=group)
    messages["after"] = float(loss)
    return messages


def _option_refusals(rank, world):
    """Loss options that differ on the last rank must be refused on every rank, naming the option and each
    rank's value; a ``max_seqlen`` that differs (each rank's own bound) is not; then a good call works."""
    import torch.distributed as dist

    group = dist.group.WORLD
    case = make_case(world, 0, gaze="some")
    xp, xs, cu, g, m = split(case, rank)
    with torch.no_grad():
        p, s, t = Encoder(0)(xp, xs)
    last = rank == world - 1
    messages = {}

    def attempt(name, scale=t, **kw):
        try:
            loss = ek.fine_grained_loss(p, s, cu, scale, g, m, backend="reference", group=group, **kw)
            messages[name] = float(loss)
        except (ValueError, RuntimeError) as exc:
            messages[name] = f"{type(exc).__name__}: {exc}"

    attempt("alpha", alpha=0.7 if last else 0.5)
    attempt("map_threshold", map_threshold=0.3 if last else 2 / 7)
    attempt("weights", weights=(1.0, 1.0, 0.5) if last else (1.0, 1.0, 1.0))
    attempt("logit_scale", scale=t * 2 if last else t)
    lengths = (cu[1:] - cu[:-1]).tolist()
    attempt("own_max_seqlen", max_seqlen=max(lengths) + (3 if last else 0))
    attempt("after")
    if "triton" in ek.available_backends("cpu"):  # Triton's interpreter: the refusal comes before any kernel
        D = 8
        n = 1025 if last else 2  # one report longer than the triton backend takes, on the last rank only
        p_long = F.normalize(torch.randn(1, 5, D, dtype=torch.float64), dim=-1)
        s_long = F.normalize(torch.randn(n, D, dtype=torch.float64), dim=-1)
        try:
            ek.fine_grained_loss(p_long, s_long, torch.tensor([0, n], dtype=torch.int32), t, backend="triton",
                                 group=group)
            messages["triton_long_report"] = "no error"
        except (ValueError, RuntimeError) as exc:
            messages["triton_long_report"] = f"{type(exc).__name__}: {exc}"
        attempt("after_triton")
    return messages


def _worker(rank, world, port, outdir, job):
    """Runs ``job["cases"]``: each spec on the group of its ``ranks`` (a subgroup, or all when absent)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        groups = {}
        for spec in job["cases"]:  # every rank creates every subgroup, in the same order
            key = tuple(spec.get("ranks", range(world)))
            if key not in groups:
                groups[key] = dist.group.WORLD if len(key) == world else dist.new_group(list(key))
        results = {"cases": [], "refusals": None}
        for spec in job["cases"]:
            key = tuple(spec.get("ranks", range(world)))
            if rank not in key:
                continue
            start = time.perf_counter()
            errors = _one_case(groups[key], spec)
            results["cases"].append({"spec": spec, "errors": errors, "seconds": time.perf_counter() - start})
        if job.get("refusals"):
            results["refusals"] = _refusals(rank, world)
        if job.get("option_refusals"):
            results["option_refusals"] = _option_refusals(rank, world)
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, job: dict, tmp_path) -> list:
    spawn_bounded(_worker, (world, free_port(), str(tmp_path), job), world, JOIN_TIMEOUT_S, "the loss cases")
    results = []
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results


def test_disagreeing_loss_options_are_refused_on_every_rank(tmp_path):
    results = run_ranks(2, {"cases": [], "option_refusals": True}, tmp_path)
    for result in results:
        msgs = result["option_refusals"]
        assert "same alpha on every rank; got rank 0: 0.5, rank 1: 0.7" in msgs["alpha"], msgs["alpha"]
        assert "same map_threshold" in msgs["map_threshold"] and "rank 1: 0.3" in msgs["map_threshold"]
        assert "same weights[2] (w_map)" in msgs["weights"] and "rank 1: 0.5" in msgs["weights"], msgs["weights"]
        assert "same logit_scale" in msgs["logit_scale"], msgs["logit_scale"]
        assert isinstance(msgs["own_max_seqlen"], float) and math.isfinite(msgs["own_max_seqlen"])
        assert msgs["after"] == msgs["own_max_seqlen"] == results[0]["option_refusals"]["after"]
        if "triton_long_report" in msgs:  # refused on every rank, the group still usable afterwards
            assert msgs["triton_long_report"].startswith("ValueError") and "at most 1024" in msgs["triton_long_report"]
            assert msgs["after_triton"] == msgs["after"]


def check_cases(results):
    worst = 0.0
    for rank, result in enumerate(results):
        for entry in result["cases"]:
            errors = entry["errors"]
            assert errors.pop("zero_terms_exact") == 0.0, (rank, entry["spec"])
            bad = {k: v for k, v in errors.items() if not v <= RTOL}
            assert not bad, f"rank {rank}, case {entry['spec']}: relative errors {bad}"
            worst = max(worst, max(errors.values()))
    return worst


def _specs(ranks, backends, seeds):
    specs = []
    for i, seed in enumerate(seeds):
        for backend in backends:
            for compat in (False, True):
                specs.append(dict(
                    ranks=list(ranks), seed=seed, backend=backend, compat=compat,
                    gaze=("some", "all", "none")[(i + compat) % 3],
                    weights=(1.0, 0.7, 1.3) if i % 2 else (1.0, 1.0, 1.0), module=(i == 1 and not compat),
                ))
    return specs


def test_two_and_three_ranks_match_one_process(tmp_path):
    """One spawn of 3 ranks: the cases over the subgroup {0, 1} (world size 2) and over all 3, on every
    backend that runs CPU tensors; then the refusals over all 3 (the last rank holds the bad input)."""
    backends = [b for b in ("reference", "cpu") if b in ek.available_backends("cpu")]
    cases = _specs((0, 1), backends, seeds=(0, 1, 2)) + _specs((0, 1, 2), backends, seeds=(3, 4))
    if "triton" in ek.available_backends("cpu"):
        # Interpreted Triton (about 20 s for its first case), in compat mode: its similarity has no
        # egma_compat switch, so this is the path of the explicit zero padding of the reports. Seed 2 has
        # uneven batches (3 and 2) and rank 1's longest report (1) is shorter than the global one (4), as
        # have seeds 0, 1 and 4 of the other compat cases: the padding must use the global longest.
        cases += [dict(ranks=[0, 1], seed=2, backend="triton", compat=c, gaze="some", weights=(1.0, 1.0, 1.0))
                  for c in (True,)]
    results = run_ranks(3, {"cases": cases, "refusals": True}, tmp_path)
    assert [len(r["cases"]) for r in results] == [sum(rank in c["ranks"] for c in cases) for rank in range(3)]
    assert check_cases(results) <= RTOL
    for rank, result in enumerate(results):
        msgs = result["refusals"]
        assert "no images" in msgs["empty"] and "rank(s) [2]" in msgs["empty"], msgs["empty"]
        assert "embedding size D" in msgs["dim"], msgs["dim"]
        assert "embedding dtype" in msgs["dtype"] and "torch.float32" in msgs["dtype"], msgs["dtype"]
        if rank == 0:
            assert "cu_seqlens[-1] must equal" in msgs["bad_input"], msgs["bad_input"]
        else:
            assert "rank(s) [0] refused their inputs" in msgs["bad_input"], msgs["bad_input"]
        assert math.isfinite(msgs["after"]) and msgs["after"] == results[0]["refusals"]["after"]


# --------------------------------------------------------------------------------------------------------
# In one process.


def test_group_needs_initialised_process_group(make):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    inputs = make((2, 1), P=3, D=4, gaze="none")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ek.fine_grained_loss(**inputs, group=object())


def test_explicit_zero_padding_matches_compat_similarity(make):
    """egma_compat's I2T padding written as zero sentences (the path for a backend without the switch)
    equals the reference's compat similarity, values and gradients."""
    inputs = make((3, 1, 4, 2, 4), P=6, D=8, gaze="none")
    patch = inputs["patch_emb"].requires_grad_()
    sent = inputs["sent_emb"].requires_grad_()
    scale = inputs["logit_scale"].requires_grad_()
    cu = inputs["cu_seqlens"]
    lengths = (cu[1:] - cu[:-1]).long()
    weights = torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def values_and_grads(i2t, t2i):
        grads = torch.autograd.grad((weights[0] * i2t + weights[1] * t2i).sum(), (patch, sent, scale))
        return [i2t.detach(), t2i.detach(), *grads]

    i2t, t2i = filip_similarity_ref(patch, sent, cu, scale, egma_compat=True)
    expected = values_and_grads(i2t, t2i)

    longest = int(lengths.max())
    sent_aug, cu_aug, factor = _zero_padded_reports(sent, lengths, longest, int((lengths < longest).sum()))
    assert cu_aug[-1] == sent_aug.shape[0] == sent.shape[0] + 3
    i2t2, t2i2 = filip_similarity_ref(patch, sent_aug, cu_aug, scale, egma_compat=False)
    t2i2 = t2i2 * factor
    got = values_and_grads(i2t2, t2i2)
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= RTOL
    # Without the padding the two differ (the test can fail).
    plain, _ = filip_similarity_ref(patch, sent, cu, scale, egma_compat=False)
    assert rel_err(plain.detach(), i2t.detach()) > 1e-3


def test_communicated_bytes_formula():
    # B=40, N=200, D=512 bf16 (2 bytes), K=4: sizes + lengths + 2x sentences + 2x scores + scalars.
    k1 = 3
    expected = k1 * 19 * 8 + k1 * 40 * 8 + 2 * k1 * 200 * 512 * 2 + 2 * k1 * 40 * 160 * 4 + 2 * k1 * 16 // 4
    assert communicated_bytes(40, 200, 512, 4, element_size=2) == expected
    assert communicated_bytes(40, 200, 512, 1) == 0


def test_loss_group_context_sets_the_default_group(make):
    """``loss_group`` makes calls without ``group`` run over the context's group (here an uninitialised
    one, so the call is refused: proof that it was dispatched), nests, and restores on exit."""
    import torch.distributed as dist

    from egma_kernels.distributed import current_group, loss_group

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    inputs = make((2, 1), P=3, D=4, gaze="none")
    plain = ek.fine_grained_loss(**inputs, backend="reference")
    marker = object()
    with loss_group(marker):
        assert current_group() is marker
        with loss_group(None):
            assert current_group() is None
            assert torch.equal(ek.fine_grained_loss(**inputs, backend="reference"), plain)
        with pytest.raises(RuntimeError, match="init_process_group"):
            ek.fine_grained_loss(**inputs, backend="reference")
    assert current_group() is None
