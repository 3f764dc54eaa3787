"""``egma-demo``: EGMA end to end on the built-in synthetic gaze-annotated chest X-ray set, on the CPU.

1. generates the synthetic set (``egma_model.synthetic``) if absent: images, reports, eye tracking in the
   REFLACX and EGD-CXR layouts, manifests, boxes, prompts;
2. pre-trains a small model (tiny ViT at 112 px: a 7x7 patch grid, tiny BERT) with the full EGMA loss and,
   with the same seed, initialisation, data order and steps, without gaze (no gaze MLCE; the contrastive
   and mapping terms stay, the mapping weights built from the similarities alone);
3. evaluates both: zero-shot accuracy / macro-F1 (fine-grained and global scoring), retrieval precision@k,
   and localisation (how often a finding sentence's most similar patch lies inside the true finding box);
4. prints one table (mean and spread over seeds), writes ``demo_results.json`` and ``demo_figure.png``
   (sentence-to-patch similarity maps next to the gaze heatmaps, and the training curves).

Examples::

    egma-demo                   # default: 2000/500 images, one seed (about 5 minutes on 2 idle cores)
    egma-demo --quick           # smoke test (under 2 minutes)
    egma-demo --seeds 0,1,2     # the spread over seeds
    egma-demo --gaze-fractions 0,0.05,0.1,0.5,1   # how much gaze is enough (synthetic data)

The synthetic set goes into ``<out>/data`` (``<out>/data_quick`` with ``--quick``) unless ``--data`` names
a folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import synthetic
from .data import EGMADataset, GazeOptions, load_manifest
from .evaluate import encode_dataset, encode_texts, evaluate
from .train import TrainArgs, train

__all__ = ["main", "run_demo", "localisation_score"]


def _patch_centres(grid, width, height):
    """Patch centres in original-image pixels (the image is padded to a centred square)."""
    gh, gw = grid
    side = max(width, height)
    ox, oy = (side - width) / 2, (side - height) / 2
    cy = (np.arange(gh) + 0.5) * side / gh - oy
    cx = (np.arange(gw) + 0.5) * side / gw - ox
    return np.stack(np.meshgrid(cx, cy), -1).reshape(-1, 2)  # (P, 2) as (x, y), row-major patches


def localisation_score(model, tokenizer, data_dir: str, images: Dict[str, torch.Tensor], records, boxes: Dict,
                       width: int, height: int, gaze_maps: Optional[List] = None) -> Dict:
    """Fraction of test findings whose sentence's most similar patch has its centre inside the finding box.

    Also reports chance (the mean fraction of patch centres inside the box) and, given the gaze maps,
    the same score for the gaze heatmap's hottest patch (an upper reference for what gaze can teach).
    """
    centres = _patch_centres(model.grid, width, height)
    sel, texts, bxs = [], [], []
    for i, r in enumerate(records):
        key = os.path.relpath(r.image, data_dir)
        b = boxes.get(key)
        if b and b["box"] is not None:
            sel.append(i)
            texts.append(b["finding_sentence"])
            bxs.append(b["box"])
    if not sel:
        return {"n": 0}
    sent = _first_sentences(encode_texts(model, tokenizer, texts)["sent"], texts)
    sims = torch.einsum("npd,nd->np", images["patch"][sel], sent)  # (n, P)
    hits, chance, ghits = [], [], []
    for k, (i, b) in enumerate(zip(sel, bxs)):
        inside = ((centres[:, 0] >= b[0]) & (centres[:, 0] <= b[2]) & (centres[:, 1] >= b[1]) & (centres[:, 1] <= b[3]))
        hits.append(bool(inside[int(sims[k].argmax())]))
        chance.append(float(inside.mean()))
        if gaze_maps is not None and gaze_maps[k] is not None:
            ghits.append(bool(inside[int(np.argmax(gaze_maps[k]))]))
    out = {"n": len(sel), "pointing_accuracy": float(np.mean(hits)), "chance": float(np.mean(chance))}
    if ghits:
        out["gaze_pointing_accuracy"] = float(np.mean(ghits))
    return out


def _first_sentences(sent, texts):
    from .data import split_sentences

    idx, pos = [], 0
    for t in texts:
        idx.append(pos)
        pos += len(split_sentences(t) or [t])
    return sent[idx]


# ---------------------------------------------------------------------------------------------- figure


def _pyplot():
    """matplotlib's pyplot on the file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    plt.rcParams.update({"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11, "legend.fontsize": 10})
    return plt


def _moving_average(ys: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean over up to ``k`` steps (shorter at the start), same length as ``ys``."""
    c = np.cumsum(np.insert(np.asarray(ys, dtype=np.float64), 0, 0.0))
    idx = np.arange(1, len(ys) + 1)
    lo = np.maximum(0, idx - k)
    return (c[idx] - c[lo]) / (idx - lo)


LOSS_TERMS = (("loss", "total loss"), ("contrastive", "contrastive (FILIP)"), ("gaze_mlce", "gaze labels (MLCE)"),
              ("mapping", "gaze-guided mapping"))


def make_figure(path, data_dir, test_records, boxes, sims_by_run: Dict[str, torch.Tensor], gaze_maps, grid,
                histories, n_show: int = 5, caption: str = ""):
    """Rows: test images with a finding. Columns: the image with the finding box, the gaze heatmap of the finding
    sentence, then each run's sentence-to-patch similarity map, each map on the patch grid with its colour bar,
    the box and its hottest patch (x). Below: every loss term of every run against the training step."""
    plt = _pyplot()
    rows = min(n_show, len(gaze_maps))
    cols = 2 + len(sims_by_run)
    fig = plt.figure(figsize=(3.6 * max(cols, 4), 3.3 * rows + 4.2), dpi=100)
    outer = fig.add_gridspec(2, 1, height_ratios=[3.3 * rows, 3.0], hspace=0.15)
    top = outer[0].subgridspec(rows, cols, hspace=0.35, wspace=0.35)
    titles = ["image + finding box", "radiologist gaze"] + [f"similarity: {k}" for k in sims_by_run]
    for r in range(rows):
        rec, box, sentence = test_records[r]
        sq, side, bx = _square_with_box(rec.image, box)
        maps = [None, gaze_maps[r]] + [sims[r].numpy() for sims in sims_by_run.values()]
        for c in range(cols):
            ax = fig.add_subplot(top[r, c])
            _draw_panel(fig, ax, sq, side, bx, maps[c], c == 1, grid)
            if r == 0:
                ax.set_title(titles[c], fontsize=11, fontweight="bold")
            if c == 0:  # the finding sentence, on at most two lines within the panel's width
                lines = textwrap.wrap(f'"{sentence}"', 34)
                text = "\n".join(lines[:2]) + ("..." if len(lines) > 2 else "")
                ax.set_xlabel(text, fontsize=10)
    handles, k = _draw_loss_curves(fig, outer[1], histories)
    smoothing = (f"thin lines: every step; thick: moving average over {k} steps" if k > 1
                 else "every step (too few steps to smooth)")
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
               bbox_to_anchor=(0.5, 0.0), title=f"training run ({smoothing})")
    if caption:
        fig.suptitle(caption, fontsize=12, y=0.995)
    fig.subplots_adjust(left=0.04, right=0.93, top=0.95, bottom=0.075)
    fig.savefig(path)
    plt.close(fig)


def _square_with_box(image_path: str, box):
    """The image centred in a black square (the frame the maps are in), its side, and the box ``(x, y, w, h)``
    moved into that frame."""
    from .data import load_image

    grey = load_image(image_path)
    H, W = grey.shape
    side = max(H, W)
    sq = np.zeros((side, side))
    oy, ox = (side - H) // 2, (side - W) // 2
    sq[oy : oy + H, ox : ox + W] = grey
    bx = (box[0] + ox, box[1] + oy, box[2] - box[0], box[3] - box[1])
    return sq, side, bx


def _draw_panel(fig, ax, sq, side: int, bx, m, is_gaze: bool, grid) -> None:
    """One panel: the image, the map ``m`` on the patch grid (None: none) with its colour bar and its hottest
    patch (x), and the finding box."""
    from matplotlib.patches import Rectangle

    gh, gw = grid
    ax.imshow(sq, cmap="gray", extent=(0, side, side, 0), vmin=0, vmax=1)
    if m is not None:
        m = np.asarray(m, dtype=np.float64).reshape(gh, gw)
        # patches without gaze stay clear, so the anatomy shows where nobody looked
        shown = np.ma.masked_where(m <= 0, m) if is_gaze else m
        im = ax.imshow(shown, cmap="inferno", alpha=0.6, extent=(0, side, side, 0), interpolation="nearest",
                       vmin=0 if is_gaze else None)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        cb.ax.tick_params(labelsize=9)
        cb.set_label("gaze heat" if is_gaze else "cosine similarity", fontsize=9)
        k = int(np.argmax(m))
        py, px = (k // gw + 0.5) * side / gh, (k % gw + 0.5) * side / gw
        inside = bx[0] <= px <= bx[0] + bx[2] and bx[1] <= py <= bx[1] + bx[3]
        ax.plot([px], [py], marker="x", color="cyan", markersize=12, markeredgewidth=3)
        ax.set_xlabel("peak in box" if inside else "peak outside box", fontsize=10,
                      color="darkgreen" if inside else "firebrick")
    ax.add_patch(Rectangle(bx[:2], bx[2], bx[3], fill=False, edgecolor="lime", linewidth=2))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlim(0, side)
    ax.set_ylim(side, 0)


def _draw_loss_curves(fig, area, histories):
    """Every loss term of every run against the step, one panel a term; returns the legend handles and the
    moving-average width (1: every step drawn as is)."""
    from matplotlib.ticker import MaxNLocator

    bottom = area.subgridspec(1, len(LOSS_TERMS), wspace=0.3)
    n_steps = max((len(h) for h in histories.values()), default=0)
    k = max(1, n_steps // 15) if n_steps >= 20 else 1
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    handles = []
    for j, (key, label) in enumerate(LOSS_TERMS):
        ax = fig.add_subplot(bottom[0, j])
        for i, (name, hist) in enumerate(histories.items()):
            steps = np.array([h["step"] for h in hist])
            ys = np.array([h[key] for h in hist], dtype=np.float64)
            if not len(ys):
                continue
            colour = colours[i % len(colours)]
            if k > 1:
                ax.plot(steps, ys, color=colour, linewidth=0.8, alpha=0.35)
                line, = ax.plot(steps, _moving_average(ys, k), color=colour, linewidth=2.2, label=name)
            else:
                line, = ax.plot(steps, ys, color=colour, linewidth=1.8, marker=".", label=name)
            if j == 0:
                handles.append(line)
        ax.set_title(label + (" (0 without gaze)" if key == "gaze_mlce" else ""), fontsize=11)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
        if j == 0:
            ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
    return handles, k


# ---------------------------------------------------------------------------------------------- demo


def _fmt(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


class _torch_threads:
    """``torch.set_num_threads(n)`` for a block (no change for None), restored after it."""

    def __init__(self, n: Optional[int]):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def run_demo(*args, threads: Optional[int] = None, **kwargs) -> Dict:
    """The with/without-gaze comparison (see the module docstring); ``threads``: torch CPU threads meanwhile."""
    with _torch_threads(threads):
        return _run_demo(*args, **kwargs)


def _run_demo(data_dir: str, out_dir: str, *, n_train: int = 2000, n_test: int = 500, seeds: Sequence[int] = (0,),
              steps: int = 200, batch_size: int = 32, lr: float = 5e-4, image_model: str = "vit_base_patch16_224",
              image_size: int = 112, data_seed: int = 0, progress: bool = True, figure: bool = True) -> Dict:
    t_start = time.time()
    if figure and _pyplot() is None:
        print("egma-demo: no figure: it needs matplotlib (pip install matplotlib, or the [model] extra)")
        figure = False
    smoke = steps < SMOKE_STEPS
    d = _DemoData(data_dir, out_dir, n_train, n_test, data_seed, progress)
    meta, sigma, train_recs, test_recs, boxes = d.meta, d.sigma, d.train_recs, d.test_recs, d.boxes
    width, height = d.width, d.height
    runs = {"EGMA (gaze)": False, "no gaze": True}
    results: Dict = {"config": dict(n_train=len(train_recs), n_test=len(test_recs), seeds=list(seeds), steps=steps,
                                    batch_size=batch_size, lr=lr, image_model=image_model, image_size=image_size,
                                    sigma_px=sigma, data=meta, device=_device_name(),
                                    loss_backends=_backends()), "runs": {k: [] for k in runs}}
    fig_payload = None
    caches = {True: {}, False: {}}  # per no_gaze setting: sentences and gaze computed once for all seeds
    for seed in seeds:
        models = {}
        for name, no_gaze in runs.items():
            print(f"egma-demo: seed {seed}: training '{name}' for {steps} steps")
            a = TrainArgs(manifest=os.path.join(data_dir, "train.csv"), out=os.path.join(out_dir, f"seed{seed}",
                          "gaze" if not no_gaze else "nogaze"), preset="tiny", image_model=image_model,
                          image_size=image_size, max_steps=steps, batch_size=batch_size, lr=lr,
                          warmup_steps=max(1, steps // 10), seed=seed, no_gaze=no_gaze, sigma=sigma,
                          save_every=0, progress=progress, overwrite=True)
            res, ev, imgs, loc = d.train_and_score(a, train_recs, caches[no_gaze])
            model, tok = res["model"], res["tokenizer"]
            entry = {"seed": seed, "train_time_s": res["history"][-1]["time_s"] if res["history"] else 0,
                     "final_loss": res["final_loss"], "zeroshot": ev["zeroshot"], "retrieval": ev["retrieval"],
                     "localisation": loc, "history": [{k: h[k] for k in ("step", "loss", "contrastive", "gaze_mlce",
                                                                         "mapping")} for h in res["history"]]}
            results["runs"][name].append(entry)
            models[name] = (model, tok, imgs)
        if figure and fig_payload is None:
            fig_payload = (seed, models)
    # gaze localisation reference and the figure (first seed)
    gds = EGMADataset(test_recs, image_size=image_size, grid=fig_payload[1]["EGMA (gaze)"][0].grid,
                      gaze_options=GazeOptions(sigma=sigma)) if fig_payload else None
    if fig_payload:
        seed, models = fig_payload
        show = []
        for i, r in enumerate(test_recs):
            b = boxes.get(os.path.relpath(r.image, data_dir))
            if b and b["box"] is not None:
                show.append(i)
        gaze_maps = []
        for i in show:
            sents, g = gds.sentences_and_gaze(i)
            b = boxes[os.path.relpath(test_recs[i].image, data_dir)]
            gaze_maps.append(None if g is None else g[b["finding_sentence_index"]].numpy())
        gref = localisation_score(models["EGMA (gaze)"][0], models["EGMA (gaze)"][1], data_dir,
                                  models["EGMA (gaze)"][2], test_recs, boxes, width, height, gaze_maps=gaze_maps)
        results["gaze_reference"] = {"gaze_pointing_accuracy": gref.get("gaze_pointing_accuracy"),
                                     "chance": gref.get("chance")}
        if figure:
            pick = show[:: max(1, len(show) // 5)][:5]
            sims = {}
            for name, (model, tok, imgs) in models.items():
                texts = [boxes[os.path.relpath(test_recs[i].image, data_dir)]["finding_sentence"] for i in pick]
                s = encode_texts(model, tok, texts)["sent"]
                sims[name] = torch.einsum("npd,nd->np", imgs["patch"][pick], _first_sentences(s, texts))
            recs = [(test_recs[i], boxes[os.path.relpath(test_recs[i].image, data_dir)]["box"],
                     boxes[os.path.relpath(test_recs[i].image, data_dir)]["finding_sentence"]) for i in pick]
            gm = [gaze_maps[show.index(i)] for i in pick]
            hist = {k: results["runs"][k][0]["history"] for k in runs}
            caption = (f"Synthetic data (egma-demo), seed {seed}, {steps} steps on {len(train_recs)} images"
                       + (": a smoke test, the maps and curves show only that the code runs" if smoke else ""))
            make_figure(os.path.join(out_dir, "demo_figure.png"), data_dir, recs, boxes, sims, gm,
                        models["EGMA (gaze)"][0].grid, hist, caption=caption)
            results["figure"] = os.path.join(out_dir, "demo_figure.png")
    results["table"] = _table(results)
    results["smoke_test"] = smoke
    return _finish(results, t_start, os.path.join(out_dir, "demo_results.json"), smoke, steps, len(train_recs),
                   f"egma-demo: results in {os.path.join(out_dir, 'demo_results.json')}"
                   + (f", figure {results['figure']}" if "figure" in results else ""))


SMOKE_STEPS = 100  # fewer training steps than this: the numbers are a smoke test
SMOKE_NOTE = ("egma-demo: SMOKE TEST ONLY: {steps} steps on {n} images prove nothing about gaze; these numbers only "
              "show that the pipeline runs end to end (egma-demo without --quick trains 200 steps on 2000 images)")


def _ensure_data(data_dir: str, n_train: int, n_test: int, data_seed: int, progress: bool) -> None:
    """Generate the synthetic set in ``data_dir`` unless it is there, saying where and how much."""
    if os.path.isfile(os.path.join(data_dir, "synthetic.json")):
        print(f"egma-demo: using the synthetic set in {data_dir}")
        return
    print(f"egma-demo: generating the synthetic set ({n_train} train / {n_test} test images, about "
          f"{(n_train + n_test) * 0.065:.0f} MB) in {os.path.abspath(data_dir)}")
    t0 = time.time()
    synthetic.generate(data_dir, n_train, n_test, seed=data_seed, progress=progress)
    print(f"egma-demo: generated in {time.time() - t0:.0f} s")


class _DemoData:
    """The synthetic set of a demo run (generated if absent) and the evaluation every trained model gets."""

    def __init__(self, data_dir: str, out_dir: str, n_train: int, n_test: int, data_seed: int, progress: bool):
        _ensure_data(data_dir, n_train, n_test, data_seed, progress)
        self.data_dir = data_dir
        self.meta = json.load(open(os.path.join(data_dir, "synthetic.json")))
        self.width, self.height = self.meta["width"], self.meta["height"]
        # about one visual degree on a real CXR reading (~150 px of ~2500)
        self.sigma = 0.06 * max(self.width, self.height)
        os.makedirs(out_dir, exist_ok=True)
        self.train_recs = load_manifest(os.path.join(data_dir, "train.csv"))
        self.test_recs = load_manifest(os.path.join(data_dir, "test.csv"))
        self.boxes = json.load(open(os.path.join(data_dir, "boxes.json")))
        self.prompts = os.path.join(data_dir, "prompts.json")

    def train_and_score(self, a: TrainArgs, records, cache: Dict):
        """Train on ``records``; zero-shot and retrieval on the test set, the test images' embeddings and the
        localisation score of the trained model: ``(train result, evaluation, images, localisation)``."""
        res = train(a, records=records, cache=cache)
        model, tok = res["model"], res["tokenizer"]
        model.eval()
        ev = evaluate("", os.path.join(self.data_dir, "test.csv"), self.prompts, tasks=("zeroshot", "retrieval"),
                      model=model, tokenizer=tok, progress=False)
        ds = EGMADataset(self.test_recs, image_size=model.config.image_size, grid=model.grid, use_gaze=False)
        imgs = encode_dataset(model, ds, progress=False)
        loc = localisation_score(model, tok, self.data_dir, imgs, self.test_recs, self.boxes, self.width, self.height)
        return res, ev, imgs, loc


def _finish(results: Dict, t_start: float, json_path: str, smoke: bool, steps: int, n_train: int, where: str) -> Dict:
    """Time, write ``json_path``, print the smoke-test note, the table and ``where`` (what was written)."""
    results["elapsed_s"] = round(time.time() - t_start, 1)
    with open(json_path, "w") as fh:
        json.dump(results, fh, indent=1)
    if smoke:
        print(SMOKE_NOTE.format(steps=steps, n=n_train))
    print(results["table"])
    print(f"{where} ({results['elapsed_s']:.0f} s)")
    return results


def _fraction_label(f: float) -> str:
    return f"{100 * f:g}%"


def run_gaze_fractions(*args, threads: Optional[int] = None, **kwargs) -> Dict:
    """How much gaze is enough (the question of the EGMA paper's Table 4), on the synthetic set: for each
    fraction, pre-train with gaze on that share of the training images (nested subsets: the 5% are inside the
    10%), same seeds, initialisation, data order and steps, and score localisation and retrieval on the test
    set. Writes ``gaze_fractions.json``, ``gaze_fractions.md`` and ``gaze_fractions.png`` into ``out_dir``."""
    with _torch_threads(threads):
        return _run_gaze_fractions(*args, **kwargs)


def _run_gaze_fractions(data_dir: str, out_dir: str, fractions: Sequence[float], *, n_train: int = 2000,
                        n_test: int = 500, seeds: Sequence[int] = (0,), steps: int = 200, batch_size: int = 32,
                        lr: float = 5e-4, image_model: str = "vit_base_patch16_224", image_size: int = 112,
                        data_seed: int = 0, progress: bool = True) -> Dict:
    import dataclasses

    t_start = time.time()
    d = _DemoData(data_dir, out_dir, n_train, n_test, data_seed, progress)
    meta, sigma, train_recs, test_recs = d.meta, d.sigma, d.train_recs, d.test_recs
    order = np.random.default_rng(data_seed + 1).permutation(len(train_recs))
    gaze_cache: Dict = {}  # index -> (sentences, gaze) computed with gaze, shared by all runs
    per_fraction: Dict[float, List[Dict]] = {}
    for f in sorted(set(fractions), reverse=True):  # the largest first: it fills the gaze cache for the rest
        keep = set(order[: int(round(f * len(train_recs)))].tolist())
        recs = [r if i in keep else dataclasses.replace(r, gaze_format="", gaze=None, gaze_transcript=None)
                for i, r in enumerate(train_recs)]
        for seed in seeds:
            print(f"egma-demo: gaze on {_fraction_label(f)} of the training images ({len(keep)}), seed {seed}: "
                  f"training for {steps} steps")
            cache = {i: (sg[0], sg[1] if i in keep else None) for i, sg in gaze_cache.items()}
            a = TrainArgs(manifest=os.path.join(data_dir, "train.csv"),
                          out=os.path.join(out_dir, "gaze_fraction_runs", f"f{f:g}_seed{seed}"), preset="tiny",
                          image_model=image_model, image_size=image_size, max_steps=steps, batch_size=batch_size,
                          lr=lr, warmup_steps=max(1, steps // 10), seed=seed, no_gaze=False, sigma=sigma,
                          save_every=0, progress=progress, overwrite=True)
            res, ev, _, loc = d.train_and_score(a, recs, cache)
            for i, sg in cache.items():
                if i in keep:
                    gaze_cache[i] = sg
            per_fraction.setdefault(f, []).append({
                "seed": seed, "n_gaze_images": len(keep), "final_loss": res["final_loss"],
                "localisation": loc.get("pointing_accuracy"), "chance": loc.get("chance"),
                "image_to_text_p@1": ev["retrieval"]["fine"]["image_to_text_p@1"],
                "text_to_image_p@1": ev["retrieval"]["fine"]["text_to_image_p@1"],
                "zeroshot_accuracy": ev["zeroshot"]["fine"]["accuracy"]})
    fr = sorted(per_fraction)
    smoke = steps < SMOKE_STEPS
    results = {"config": dict(n_train=len(train_recs), n_test=len(test_recs), seeds=list(seeds), steps=steps,
                              batch_size=batch_size, lr=lr, image_model=image_model, image_size=image_size,
                              data=meta, device=_device_name()),
               "synthetic_data": True, "smoke_test": smoke,
               "fractions": [{"fraction": f, "runs": per_fraction[f]} for f in fr]}
    keys = [("localisation", "localisation pointing acc."), ("image_to_text_p@1", "image->text P@1 (fine)"),
            ("text_to_image_p@1", "text->image P@1 (fine)"), ("zeroshot_accuracy", "zero-shot acc. (fine)")]
    n = len(seeds)
    head = (f"| gaze on (share of {len(train_recs)} training images) | "
            + " | ".join(f"{lab} ({'mean ± sd over %d seeds' % n if n > 1 else 'seed %d' % seeds[0]})" for _, lab in keys)
            + " |")
    lines = [f"Synthetic data (egma-demo), not the EGMA paper's Table 4: {steps} steps, batch {batch_size}, "
             f"{len(test_recs)} test images; localisation chance {np.mean([r['chance'] for r in per_fraction[fr[0]]]):.3f}.",
             "", head, "|" + "---|" * (len(keys) + 1)]
    for f in fr:
        lines.append(f"| {_fraction_label(f)} ({per_fraction[f][0]['n_gaze_images']}) | "
                     + " | ".join(_fmt([r[k] for r in per_fraction[f]]) for k, _ in keys) + " |")
    results["table"] = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "gaze_fractions.md"), "w") as fh:
        fh.write(results["table"])
    plot = _plot_gaze_fractions(os.path.join(out_dir, "gaze_fractions.png"), per_fraction, results["config"], smoke)
    if plot:
        results["figure"] = plot
    return _finish(results, t_start, os.path.join(out_dir, "gaze_fractions.json"), smoke, steps, len(train_recs),
                   f"egma-demo: gaze-fraction results in {os.path.join(out_dir, 'gaze_fractions.md')} and .json"
                   + (f", plot {plot}" if plot else ""))


def _plot_gaze_fractions(path: str, per_fraction: Dict[float, List[Dict]], config: Dict, smoke: bool) -> Optional[str]:
    """Localisation and retrieval against the share of training images with gaze, titled as synthetic data."""
    plt = _pyplot()
    if plt is None:
        print("egma-demo: no gaze-fraction plot: it needs matplotlib (pip install matplotlib)")
        return None
    fr = sorted(per_fraction)
    xs = np.arange(len(fr))  # equally spaced: the fractions span two orders of magnitude

    def stats(key):
        v = np.array([[r[key] for r in per_fraction[f]] for f in fr], dtype=np.float64)
        sd = v.std(axis=1, ddof=1) if v.shape[1] > 1 else np.zeros(len(fr))
        return v.mean(axis=1), sd

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), dpi=100)
    m, sd = stats("localisation")
    axes[0].errorbar(xs, m, yerr=sd, marker="o", capsize=4, linewidth=2, color="tab:red", label="EGMA model")
    chance = float(np.mean([r["chance"] for f in fr for r in per_fraction[f]]))
    axes[0].axhline(chance, color="gray", linestyle="--", label=f"chance ({chance:.3f})")
    axes[0].set_ylabel("localisation: finding sentence's peak patch in the box")
    axes[0].set_title("localisation")
    for key, label, colour in (("image_to_text_p@1", "image -> text P@1", "tab:blue"),
                               ("text_to_image_p@1", "text -> image P@1", "tab:green")):
        m, sd = stats(key)
        axes[1].errorbar(xs, m, yerr=sd, marker="o", capsize=4, linewidth=2, color=colour, label=label)
    axes[1].set_ylabel("retrieval precision@1 (fine-grained scores)")
    axes[1].set_title("retrieval")
    for ax in axes:
        ax.set_xticks(xs)
        ax.set_xticklabels([_fraction_label(f) for f in fr])
        ax.set_xlabel("share of training images with gaze")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    seeds = config["seeds"]
    fig.suptitle("How much gaze is enough? SYNTHETIC data (egma-demo), not the EGMA paper's Table 4", fontsize=13,
                 fontweight="bold")
    fig.text(0.5, 0.01, f"{config['n_train']} synthetic training images, {config['steps']} steps, batch "
             f"{config['batch_size']}, " + (f"{len(seeds)} seeds (bars: sd over seeds)" if len(seeds) > 1 else
                                            "one seed (no spread shown)") + "; "
             f"{config['n_test']} test images. Synthetic X-rays and gaze: says nothing about real chest X-rays."
             + (" SMOKE TEST: too few steps to mean anything." if smoke else ""), ha="center", fontsize=10,
             wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 0.94))
    fig.savefig(path)
    plt.close(fig)
    return path


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _backends() -> List[str]:
    """The egma_kernels backends usable here, best first (the loss runs on the first)."""
    import egma_kernels

    return list(egma_kernels.available_backends("cuda" if torch.cuda.is_available() else "cpu", auto=True))


def _table(results) -> str:
    runs = list(results["runs"])
    rows = [
        ("zero-shot accuracy (fine)", lambda e: e["zeroshot"]["fine"]["accuracy"]),
        ("zero-shot macro-F1 (fine)", lambda e: e["zeroshot"]["fine"]["macro_f1"]),
        ("zero-shot accuracy (global)", lambda e: e["zeroshot"]["global"]["accuracy"]),
        ("zero-shot macro-F1 (global)", lambda e: e["zeroshot"]["global"]["macro_f1"]),
        ("retrieval text->image P@1 (fine)", lambda e: e["retrieval"]["fine"]["text_to_image_p@1"]),
        ("retrieval text->image P@5 (fine)", lambda e: e["retrieval"]["fine"]["text_to_image_p@5"]),
        ("retrieval text->image P@10 (fine)", lambda e: e["retrieval"]["fine"]["text_to_image_p@10"]),
        ("retrieval image->text P@1 (fine)", lambda e: e["retrieval"]["fine"]["image_to_text_p@1"]),
        ("retrieval image->text P@5 (fine)", lambda e: e["retrieval"]["fine"]["image_to_text_p@5"]),
        ("localisation pointing acc.", lambda e: e["localisation"].get("pointing_accuracy")),
    ]
    n = len(results["config"]["seeds"])
    head = f"{'metric (mean ± sd over %d seed%s)' % (n, 's' if n > 1 else ''):40s}" + "".join(f"{r:>20s}" for r in runs)
    lines = [head, "-" * len(head)]
    for label, get in rows:
        vals = []
        for r in runs:
            try:
                vals.append(_fmt([get(e) for e in results["runs"][r]]))
            except (KeyError, TypeError):
                vals.append("n/a")
        lines.append(f"{label:40s}" + "".join(f"{v:>20s}" for v in vals))
    ref = results.get("gaze_reference")
    if ref:
        g = ref["gaze_pointing_accuracy"]
        lines.append(f"localisation references: chance {ref['chance']:.3f}; the gaze heatmap's own hottest patch "
                     f"{'n/a' if g is None else format(g, '.3f')}")
    return "\n".join(lines)


def _fractions(text: str) -> List[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from egma_kernels.cli_support import HelpFormatter  # says each option's default once

    p = argparse.ArgumentParser(prog="egma-demo", formatter_class=HelpFormatter,
                                description="EGMA with and without gaze on a synthetic gaze-annotated chest X-ray set, "
                                "on the CPU: generates the set, pre-trains both models, prints and writes the "
                                "comparison and a figure. The synthetic numbers say nothing about real X-rays.")
    p.add_argument("--out", default="egma_demo_out", help="results folder: demo_results.json, demo_figure.png, the "
                   "trained models and, unless --data says otherwise, the synthetic set")
    p.add_argument("--data", default=None, help="synthetic set folder, generated if absent (default: <out>/data, "
                   "<out>/data_quick with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 200/60 images and 30 steps, well under 2 "
                   "minutes on 2 idle cores; its numbers mean nothing")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: 200, 30 with --quick)")
    p.add_argument("--n-train", type=int, default=None, help="synthetic training images (default: 2000, 200 with "
                   "--quick)")
    p.add_argument("--n-test", type=int, default=None, help="synthetic test images (default: 500, 60 with --quick)")
    p.add_argument("--batch-size", type=int, default=32, help="images per training step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic set")
    p.add_argument("--gaze-fractions", type=_fractions, default=None, metavar="F,F,...",
                   help="instead of the with/without comparison, train with gaze on each share of the training images "
                   "(e.g. 0,0.05,0.1,0.5,1; same seeds and steps) and write gaze_fractions.md/.json/.png "
                   "(default: off)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own, lowered to "
                   "the cores other work leaves idle; printed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-figure", action="store_true", help="skip demo_figure.png")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    n_train = ns.n_train or (200 if ns.quick else 2000)
    n_test = ns.n_test or (60 if ns.quick else 500)
    steps = ns.steps or (30 if ns.quick else 200)
    data = ns.data or os.path.join(ns.out, "data_quick" if ns.quick else "data")
    meta = os.path.join(data, "synthetic.json")
    if os.path.isfile(meta):
        m = json.load(open(meta))
        if (m["n_train"], m["n_test"], m["seed"]) != (n_train, n_test, ns.data_seed):
            print(f"egma-demo: error: {data} holds a set of {m['n_train']}/{m['n_test']} images (seed {m['seed']}); "
                  f"use another --data folder", file=sys.stderr)
            return 2
    threads = ns.threads
    if threads is None and not torch.cuda.is_available():
        # A shared CPU: as many threads as idle cores (torch's threads wait for each other at every op).
        from egma_kernels.cli_support import choose_threads

        threads, why = choose_threads(torch.get_num_threads())
        print(f"egma-demo: torch CPU threads: {why}")
    seeds = [int(s) for s in ns.seeds.split(",")]
    if ns.gaze_fractions is not None:
        run_gaze_fractions(data, ns.out, ns.gaze_fractions, n_train=n_train, n_test=n_test, seeds=seeds, steps=steps,
                           batch_size=ns.batch_size, lr=ns.lr, data_seed=ns.data_seed, threads=threads,
                           progress=not ns.no_progress)
        return 0
    run_demo(data, ns.out, n_train=n_train, n_test=n_test, seeds=seeds, steps=steps,
             batch_size=ns.batch_size, lr=ns.lr, data_seed=ns.data_seed, threads=threads,
             progress=not ns.no_progress, figure=not ns.no_figure)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
