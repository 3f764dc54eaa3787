"""Small tests that pin down details the broader tests would let change unnoticed: the gaze sign check on a
single entry, the gaze Gaussian's width and default, the ``min_heat`` boundary, the authors-code recipe's
checkpoint selection, the fused backends' tie rule, and every option of ``FineGrainedLoss``.

Each fails when the detail it guards is changed (checked by making the change: a sign check on every entry
instead of any, a Gaussian of half the width, another default sigma, ``>`` for ``>=``, fine scoring in the
recipe, a rightmost tie rule in the Triton kernels, a module that drops an option)."""

import inspect
import math
import os

import numpy as np
import pytest
import torch

import egma_kernels as ek
from conftest import make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------ the loss's input checks


@pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "auto"])
@pytest.mark.parametrize("where", [(0, 0), (4, 2), (-1, -1)], ids=["first", "middle", "last"])
def test_a_single_negative_gaze_entry_is_refused(where, backend):
    inputs = make_inputs([2, 3, 1], 5, 8, seed=1, gaze="all")
    gaze = inputs["gaze"].abs() + 0.1  # every entry positive but the one below
    gaze[where] = -1e-6
    with pytest.raises(ValueError, match="gaze must be >= 0"):
        ek.fine_grained_loss(**dict(inputs, gaze=gaze), backend=backend)


# ------------------------------------------------------------------ gaze heatmaps (egma_model.gaze)

# Fixation Gaussian sigma in pixels of the original image: about one visual degree on REFLACX's screens
# (egma_model.gaze.sentence_heatmaps; docs/recipes.md says the same number).
DEFAULT_SIGMA_PX = 150.0


def _normal_cdf(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_gaussian_patch_averages_match_the_analytic_integral():
    """One fixation on a 700 x 700 image, heatmap at one cell per pixel, averaged onto a 7 x 7 grid: each
    patch holds the Gaussian's mean over its 100 x 100 px square, which is a product of two normal-CDF
    differences, relative to the hottest patch (the maps are scaled to peak 1)."""
    from egma_model import gaze as gz

    sigma, x0, y0 = 60.0, 330.0, 371.0  # off the patch centre, so both axes' integrals are asymmetric
    fix = np.array([[0.0, 0.5, x0, y0]])
    maps, fell_back = gz.sentence_heatmaps(fix, [(0.0, 1.0)], (700, 700), sigma=sigma, resolution=700,
                                           truncate=8.0)  # no truncation to speak of: exp(-32)
    assert not fell_back[0]
    got = gz.to_patch_grid(maps, (7, 7), min_heat=0.0)[0].double().numpy().reshape(7, 7)

    def axis(mu):
        edges = np.arange(8) * 100.0
        return np.array([_normal_cdf((b - mu) / sigma) - _normal_cdf((a - mu) / sigma)
                         for a, b in zip(edges[:-1], edges[1:])]) / 100.0

    want = np.outer(axis(y0), axis(x0))
    want /= want.max()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)


def test_default_sigma_everywhere():
    """The default fixation width is the same number in the gaze functions, the dataset's options, egma-train's
    arguments and option, and docs/recipes.md; and a call without sigma uses it."""
    from egma_model import gaze as gz
    from egma_model.data import GazeOptions
    from egma_model.train import TrainArgs
    from egma_model.train_cli import build_parser

    for fn in (gz.sentence_heatmaps, gz.gaze_for_sentences):
        assert inspect.signature(fn).parameters["sigma"].default == DEFAULT_SIGMA_PX, fn.__name__
    assert GazeOptions().sigma == DEFAULT_SIGMA_PX
    assert TrainArgs(manifest="", out="").sigma == DEFAULT_SIGMA_PX
    assert build_parser().parse_args([]).sigma == DEFAULT_SIGMA_PX
    with open(os.path.join(ROOT, "docs", "recipes.md"), encoding="utf-8") as f:
        assert f"sigma {DEFAULT_SIGMA_PX:g} px" in f.read()

    rec = gz.GazeRecord(np.array([[0.0, 0.4, 300.0, 420.0], [0.5, 0.9, 520.0, 180.0]]),
                        [("heart", 0.0, 0.4), ("lung", 0.5, 0.9)], (800, 700))
    default = gz.gaze_for_sentences(rec, ["heart", "lung"], (7, 7))
    assert torch.equal(default, gz.gaze_for_sentences(rec, ["heart", "lung"], (7, 7), sigma=DEFAULT_SIGMA_PX))
    assert not torch.equal(default, gz.gaze_for_sentences(rec, ["heart", "lung"], (7, 7), sigma=100.0))


def test_min_heat_keeps_a_value_equal_to_it():
    """Values below min_heat become 0; a value exactly at min_heat stays (0.25 and 0.5 are exact in float32)."""
    from egma_model import gaze as gz

    maps = torch.tensor([[[1.0, 0.25], [0.0, 0.5]]])  # a 2 x 2 map on a 2 x 2 grid: area averaging is the identity
    assert gz.to_patch_grid(maps, (2, 2), min_heat=0.25).tolist() == [[1.0, 0.25, 0.0, 0.5]]
    assert gz.to_patch_grid(maps, (2, 2), min_heat=0.5).tolist() == [[1.0, 0.0, 0.0, 0.5]]
    assert gz.to_patch_grid(maps, (2, 2), min_heat=0.0).tolist() == [[1.0, 0.25, 0.0, 0.5]]


# ------------------------------------------------------------------ recipes


@pytest.mark.parametrize("name", ["authors-code", "paper"])
def test_recipe_checkpoint_selection_settings(name):
    """The authors keep the best CheXpert 5x200 zero-shot accuracy, checked every 40 steps, scored with the
    global similarity (their evaluator has no fine-grained scoring) on their sampled prompt combinations
    (the authors' trainer.py, MoMarky/EGMA: Trainer_multi_evaluator, PromptClassifier); the paper recipe keeps it."""
    from egma_model.recipes import EVAL, explicit_options
    from egma_model.train_cli import apply_recipe, args_from_namespace, build_parser

    argv = ["--recipe", name]
    p = build_parser()
    a, src = apply_recipe(args_from_namespace(p.parse_args(argv)), explicit_options(p, argv))
    assert (a.select_every, a.select_prompts, a.select_scoring) == (40, "chexpert-5x200-combos", "global")
    assert all(src[k] == f"recipe {name}" for k in ("select_prompts", "select_scoring"))
    assert EVAL[name]["scoring"] == "global"
    ours, _ = apply_recipe(args_from_namespace(p.parse_args([])), {})
    assert (ours.select_prompts, ours.select_scoring) == (None, "fine")


# ------------------------------------------------------------------ the fused backends' tie rule


def _fused_backends(device):
    return [b for b in ("cpu", "cuda", "triton") if b in ek.available_backends(device)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy on masked lanes
@pytest.mark.parametrize("compat", [False, True], ids=["plain", "compat"])
def test_fused_backends_route_ties_alike(compat):
    """Exact ties in both maxima (repeated sentences in a report, repeated patches in an image): every fused
    backend sends a tie's gradient to the same (leftmost) index, so their gradients agree. The reference
    splits a tie evenly and is left out; a backend that took the rightmost or another maximiser fails here.
    Without a GPU the Triton kernels run in the interpreter (small shapes) against the cpu backend."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = _fused_backends(device)
    if len(backends) < 2:
        pytest.skip(f"needs two fused backends on {device}, have {backends}")
    lengths = [3, 1, 4, 2]
    inputs = make_inputs(lengths, 20, 16, seed=7, gaze="mixed")
    sent, patch = inputs["sent_emb"].clone(), inputs["patch_emb"].clone()
    start = 0
    for n in lengths:  # in each report of 3+ sentences, the last repeats the first
        if n >= 3:
            sent[start + n - 1] = sent[start]
        start += n
    # in each image, patches 4 and 18 repeat patch 1 (the best patch of 6 image-sentence pairs here): with 20
    # patches the Triton forward's float64 patch blocks are 16 wide (a float32 block on a GPU holds all), so
    # the tie is within a block and across two, where the kernel carries the running maximum
    patch[:, 4] = patch[:, 18] = patch[:, 1]
    # float64 on the CPU; float32 on a GPU (Triton cannot lower its float64 saved-route kernels for sm_90)
    dtype = torch.float64 if device == "cpu" else torch.float32
    inputs = {k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
              for k, v in dict(inputs, sent_emb=sent, patch_emb=patch).items()}

    def grads(backend):
        p = inputs["patch_emb"].clone().requires_grad_(True)
        s = inputs["sent_emb"].clone().requires_grad_(True)
        ek.fine_grained_loss(**dict(inputs, patch_emb=p, sent_emb=s), backend=backend, egma_compat=compat).backward()
        return p.grad, s.grad

    first = grads(backends[0])
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    for b in backends[1:]:
        for name, x, y in zip(("patch", "sentence"), first, grads(b)):
            torch.testing.assert_close(y, x, **tol, msg=lambda m: f"{name} gradients {b} vs {backends[0]}: {m}")


# ------------------------------------------------------------------ FineGrainedLoss


def test_module_holds_exactly_the_functions_keyword_options():
    from egma_kernels.modules import _OPTION_NAMES

    params = inspect.signature(ek.fine_grained_loss).parameters
    keywords = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} - {"max_seqlen"}
    assert set(_OPTION_NAMES) == keywords
    assert set(_OPTION_NAMES) <= set(inspect.signature(ek.FineGrainedLoss).parameters)


# option -> a value other than its default that changes the loss on the inputs below
VALUE_OPTIONS = {"alpha": 0.3, "map_threshold": 0.6, "weights": (0.7, 1.3, 2.0), "egma_compat": True}


@pytest.mark.parametrize("option", sorted(VALUE_OPTIONS))
def test_module_matches_the_function_for_each_option(option):
    inputs = make_inputs([2, 3, 1, 4], 6, 8, seed=5, gaze="mixed")
    value = VALUE_OPTIONS[option]
    want = ek.fine_grained_loss(**inputs, **{option: value}, return_details=True)
    got = ek.FineGrainedLoss(**{option: value}, return_details=True)(**inputs)
    for term in ("loss", "contrastive", "gaze_mlce", "mapping", "i2t", "t2i"):
        assert torch.equal(getattr(got, term), getattr(want, term)), term
    default = ek.fine_grained_loss(**inputs)
    assert not torch.equal(want.loss, default), f"{option}={value!r} does not change the loss here"


def test_module_passes_backend_validate_and_return_details():
    inputs = make_inputs([2, 3, 1], 4, 8, seed=6, gaze="all")
    ref = ek.FineGrainedLoss(backend="reference")(**inputs)
    assert torch.equal(ref, ek.fine_grained_loss(**inputs, backend="reference"))
    with pytest.raises(ValueError, match="no_such_backend"):
        ek.FineGrainedLoss(backend="no_such_backend")(**inputs)
    bad = dict(inputs, gaze=-inputs["gaze"] - 1.0)
    with pytest.raises(ValueError, match="gaze must be >= 0"):
        ek.FineGrainedLoss()(**bad)
    ek.FineGrainedLoss(validate=False, backend="reference")(**bad)  # the value checks are skipped
    assert isinstance(ek.FineGrainedLoss(return_details=True)(**inputs), ek.LossTerms)
    assert torch.is_tensor(ek.FineGrainedLoss()(**inputs))


# ------------------------------------------------------------------ the test tiers


def test_every_slow_entry_names_an_existing_test():
    """conftest.SLOW_TESTS names files and test functions: a renamed test would drop silently into the fast
    tier (and the README's test time), so each entry must still name one."""
    import re

    from conftest import SLOW_TESTS

    for entry in SLOW_TESTS:
        path, _, func = entry.partition("::")
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:  # FileNotFoundError names a stale file
            source = f.read()
        if func:
            name = func.split("[")[0]
            assert re.search(rf"^def {re.escape(name)}\(", source, flags=re.M), f"SLOW_TESTS: {entry} is not a test"
