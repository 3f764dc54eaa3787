"""``egma-demo``: EGMA end to end on the built-in synthetic gaze-annotated chest X-ray set, on the CPU.

1. generates the synthetic set (``egma_model.synthetic``) if absent: images, reports, eye tracking in the
   REFLACX and EGD-CXR layouts, manifests, boxes, prompts;
2. pre-trains a small model (tiny ViT at 112 px: a 7x7 patch grid, tiny BERT) with the full EGMA loss and,
   with the same seed, initialisation, data order and steps, without the gaze terms;
3. evaluates both: zero-shot accuracy / macro-F1 (fine-grained and global scoring), retrieval precision@k,
   and localisation (how often a finding sentence's most similar patch lies inside the true finding box);
4. prints one table (mean and spread over seeds), writes ``demo_results.json`` and ``demo_figure.png``
   (sentence-to-patch similarity maps next to the gaze heatmaps, and the training curves).

Examples::

    egma-demo                   # default: 2000/500 images, one seed (about 5 minutes on 2 idle cores)
    egma-demo --quick           # smoke test (under 2 minutes)
    egma-demo --seeds 0,1,2     # the spread over seeds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
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


def _heat_overlay(grey: np.ndarray, heat: Optional[np.ndarray], size) -> "Image.Image":
    from PIL import Image

    base = Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8)).convert("RGB").resize(size)
    if heat is None:
        return base
    h = np.asarray(heat, dtype=np.float64)
    h = (h - h.min()) / (h.max() - h.min() + 1e-12)
    hm = Image.fromarray((h * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    a = np.asarray(hm, dtype=np.float64)[..., None] / 255.0
    rgb = np.asarray(base, dtype=np.float64)
    col = np.concatenate([np.full_like(a, 255), 255 * a, np.zeros_like(a)], -1)
    out = rgb * (1 - 0.6 * a) + col * 0.6 * a
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _plot_curves(histories: Dict[str, List[Dict]], size=(900, 260)) -> "Image.Image":
    from PIL import Image, ImageDraw

    W, H = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    L, R, T, B = 60, 20, 25, 35
    series = {}
    for name, hist in histories.items():
        ys = [h["contrastive"] for h in hist]
        if ys:
            k = max(1, len(ys) // 50)  # smooth with a running mean
            sm = np.convolve(ys, np.ones(k) / k, mode="valid")
            series[name] = sm
    if not series:
        return im
    ymax = max(float(s.max()) for s in series.values())
    ymin = min(float(s.min()) for s in series.values())
    n = max(len(s) for s in series.values())
    d.rectangle([L, T, W - R, H - B], outline="black")
    colours = {0: (200, 30, 30), 1: (30, 80, 200)}
    for j, (name, s) in enumerate(series.items()):
        pts = [(L + (W - L - R) * i / max(1, n - 1), H - B - (H - T - B) * (v - ymin) / max(1e-9, ymax - ymin))
               for i, v in enumerate(s)]
        d.line(pts, fill=colours[j % 2], width=2)
        d.text((L + 10, T + 5 + 14 * j), f"{name}: contrastive loss (smoothed)", fill=colours[j % 2])
    d.text((5, T), f"{ymax:.2f}", fill="black")
    d.text((5, H - B - 10), f"{ymin:.2f}", fill="black")
    d.text((W // 2 - 20, H - B + 8), "training step", fill="black")
    return im


def make_figure(path, data_dir, test_records, boxes, sims_by_run: Dict[str, torch.Tensor], gaze_maps, grid,
                histories, n_show: int = 5):
    """Rows: test images with a finding; columns: image + box, gaze heatmap of the finding sentence, then each
    run's sentence-to-patch similarity map. Training curves below."""
    from PIL import Image, ImageDraw

    from .data import load_image

    cell = (168, 154)
    cols = 2 + len(sims_by_run)
    header = 40
    rows = min(n_show, len(gaze_maps))
    curves = _plot_curves(histories, size=(cell[0] * cols, 240))
    canvas = Image.new("RGB", (cell[0] * cols, header + rows * (cell[1] + 16) + curves.size[1]), "white")
    d = ImageDraw.Draw(canvas)
    titles = ["image + finding box", "gaze (finding sentence)"] + [f"similarity: {k}" for k in sims_by_run]
    for c, t in enumerate(titles):
        d.text((c * cell[0] + 4, 12), t, fill="black")
    for r in range(rows):
        rec, box, sentence = test_records[r]
        grey = load_image(rec.image)
        H, W = grey.shape
        side = max(H, W)
        sq = np.zeros((side, side))
        oy, ox = (side - H) // 2, (side - W) // 2
        sq[oy : oy + H, ox : ox + W] = grey
        y0 = header + r * (cell[1] + 16)
        img = _heat_overlay(sq, None, cell)
        dd = ImageDraw.Draw(img)
        sx, sy = cell[0] / side, cell[1] / side
        dd.rectangle([(box[0] + ox) * sx, (box[1] + oy) * sy, (box[2] + ox) * sx, (box[3] + oy) * sy], outline=(0, 255, 0))
        canvas.paste(img, (0, y0))
        canvas.paste(_heat_overlay(sq, gaze_maps[r].reshape(grid), cell), (cell[0], y0))
        for c, (k, sims) in enumerate(sims_by_run.items()):
            canvas.paste(_heat_overlay(sq, sims[r].reshape(grid).numpy(), cell), ((2 + c) * cell[0], y0))
        d.text((4, y0 + cell[1] + 2), sentence[: 26 * cols], fill="black")
    canvas.paste(curves, (0, header + rows * (cell[1] + 16)))
    canvas.save(path)


# ---------------------------------------------------------------------------------------------- demo


def _fmt(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def run_demo(data_dir: str, out_dir: str, *, n_train: int = 2000, n_test: int = 500, seeds: Sequence[int] = (0,),
             steps: int = 200, batch_size: int = 32, lr: float = 5e-4, image_model: str = "vit_base_patch16_224",
             image_size: int = 112, data_seed: int = 0, threads: Optional[int] = None, progress: bool = True,
             figure: bool = True) -> Dict:
    t_start = time.time()
    if threads:
        torch.set_num_threads(threads)
    if not os.path.isfile(os.path.join(data_dir, "synthetic.json")):
        print(f"egma-demo: generating the synthetic set in {data_dir} ({n_train} train / {n_test} test images)")
        t0 = time.time()
        synthetic.generate(data_dir, n_train, n_test, seed=data_seed, progress=progress)
        print(f"egma-demo: generated in {time.time() - t0:.0f} s")
    meta = json.load(open(os.path.join(data_dir, "synthetic.json")))
    width, height = meta["width"], meta["height"]
    sigma = 0.06 * max(width, height)  # about one visual degree on a real CXR reading (~150 px of ~2500)
    os.makedirs(out_dir, exist_ok=True)
    train_recs = load_manifest(os.path.join(data_dir, "train.csv"))
    test_recs = load_manifest(os.path.join(data_dir, "test.csv"))
    boxes = json.load(open(os.path.join(data_dir, "boxes.json")))
    prompts = os.path.join(data_dir, "prompts.json")
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
                          save_every=0, progress=progress)
            res = train(a, records=train_recs, cache=caches[no_gaze])
            model, tok = res["model"], res["tokenizer"]
            model.eval()
            ev = evaluate("", os.path.join(data_dir, "test.csv"), prompts, tasks=("zeroshot", "retrieval"),
                          model=model, tokenizer=tok, progress=False)
            ds = EGMADataset(test_recs, image_size=model.config.image_size, grid=model.grid, use_gaze=False)
            imgs = encode_dataset(model, ds, progress=False)
            loc = localisation_score(model, tok, data_dir, imgs, test_recs, boxes, width, height)
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
            make_figure(os.path.join(out_dir, "demo_figure.png"), data_dir, recs, boxes, sims, gm,
                        models["EGMA (gaze)"][0].grid, hist)
            results["figure"] = os.path.join(out_dir, "demo_figure.png")
    results["table"] = _table(results)
    results["elapsed_s"] = round(time.time() - t_start, 1)
    with open(os.path.join(out_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(results["table"])
    print(f"egma-demo: results in {os.path.join(out_dir, 'demo_results.json')}"
          + (f", figure {results['figure']}" if "figure" in results else "") + f" ({results['elapsed_s']:.0f} s)")
    return results


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="egma-demo", description="EGMA with and without gaze on a synthetic "
                                "gaze-annotated chest X-ray set (CPU)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="egma_demo_data", help="synthetic set folder (generated if absent)")
    p.add_argument("--out", default="egma_demo_out", help="results folder")
    p.add_argument("--quick", action="store_true", help="small set and few steps (smoke test)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 200; quick 30)")
    p.add_argument("--n-train", type=int, default=None, help="default 2000 (quick 200)")
    p.add_argument("--n-test", type=int, default=None, help="default 500 (quick 60)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-figure", action="store_true")
    ns = p.parse_args(argv)
    n_train = ns.n_train or (200 if ns.quick else 2000)
    n_test = ns.n_test or (60 if ns.quick else 500)
    steps = ns.steps or (30 if ns.quick else 200)
    data = ns.data if not ns.quick or ns.data != "egma_demo_data" else "egma_demo_data_quick"
    meta = os.path.join(data, "synthetic.json")
    if os.path.isfile(meta):
        m = json.load(open(meta))
        if (m["n_train"], m["n_test"], m["seed"]) != (n_train, n_test, ns.data_seed):
            print(f"egma-demo: error: {data} holds a set of {m['n_train']}/{m['n_test']} images (seed {m['seed']}); "
                  f"use another --data folder", file=sys.stderr)
            return 2
    run_demo(data, ns.out, n_train=n_train, n_test=n_test, seeds=[int(s) for s in ns.seeds.split(",")], steps=steps,
             batch_size=ns.batch_size, lr=ns.lr, data_seed=ns.data_seed, threads=ns.threads,
             progress=not ns.no_progress, figure=not ns.no_figure)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
