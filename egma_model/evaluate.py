"""``egma-eval``: zero-shot classification, image-text retrieval and linear probing of a trained EGMA model.

Prompts file (JSON)::

    {"classes": {"Atelectasis": ["atelectasis at the left base", "..."], "Cardiomegaly": ["..."]},
     "multi_label": false,
     "queries": [{"text": "there is a small left pleural effusion.", "label": "Effusion"}, ...]}

``queries`` (optional) are the retrieval texts (paper: reports of the CheXpert 8x200 classes); without
them the class prompts are the queries. Scoring is global (cosine of pooled embeddings) or fine-grained
(``egma_kernels.filip_similarity``: mean of its image-to-text and text-to-image scores).

Example::

    egma-eval --checkpoint runs/tiny/final --manifest data/test.csv --prompts data/prompts.json \\
        --tasks zeroshot,retrieval,probe --train-manifest data/train.csv --out runs/tiny/eval.json

The command prints a short table (task, scoring, metric, value) and writes the full record (confusion
matrices, per-class AUROCs, per-seed probe values) as JSON to ``--out`` (default: ``eval-<manifest>.json``
in the checkpoint folder). Every input is checked before any image is encoded: a bad one stops the command
with a one-line error naming the file or option (exit status 2).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import egma_kernels

from .data import EGMADataset, ManifestError, load_manifest, split_sentences
from .model import EGMAModel

__all__ = [
    "accuracy", "macro_f1", "confusion_matrix", "precision_at_k", "auroc", "mean_auroc",
    "encode_dataset", "encode_texts", "similarity", "zero_shot", "retrieval", "linear_probe",
    "EvalInputError", "TASKS", "load_checkpoint", "format_summary",
]

TASKS = ("zeroshot", "retrieval", "probe")
SCORINGS = ("fine", "global")


class EvalInputError(ValueError):
    """A bad egma-eval input (option, prompts file, checkpoint), found before any image is encoded; the
    message names the option or file."""


# ------------------------------------------------------------------------------------------- metrics


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if y_true.size else float("nan")


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def macro_f1(y_true, y_pred, num_classes: Optional[int] = None) -> float:
    """Mean over classes of ``F1 = 2TP / (2TP + FP + FN)``, over the classes present in ``y_true`` or
    ``y_pred`` (scikit-learn's convention)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = num_classes or int(max(y_true.max(initial=0), y_pred.max(initial=0)) + 1)
    cm = confusion_matrix(y_true, y_pred, n)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    present = (cm.sum(0) + cm.sum(1)) > 0
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    return float(f1[present].mean()) if present.any() else float("nan")


def precision_at_k(sim, query_labels, gallery_labels, k: int) -> float:
    """Mean over queries of the fraction of the ``k`` most similar gallery items sharing the query's label.

    ``sim``: ``(Q, G)``; ties are broken by gallery order (stable sort).
    """
    sim = np.asarray(sim, dtype=np.float64)
    q, g = np.asarray(query_labels), np.asarray(gallery_labels)
    k = min(k, sim.shape[1])
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float((g[order] == q[:, None]).mean())


def auroc(scores, labels) -> float:
    """Binary AUROC (probability a positive outscores a negative, ties count 1/2); NaN with one class."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def mean_auroc(scores, labels) -> Tuple[float, List[float]]:
    """Mean AUROC over the columns (classes) of ``(M, C)`` scores and 0/1 labels; classes with one value skipped."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    per = [auroc(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
    valid = [a for a in per if not np.isnan(a)]
    return (float(np.mean(valid)) if valid else float("nan")), per


# ------------------------------------------------------------------------------------------- encoding


def _progress(it, total, desc, enabled):
    from egma_kernels.cli_support import progress_bar

    return progress_bar(it, total=total, desc=desc, enabled=enabled, leave=False)


class _EvalImages(torch.utils.data.Dataset):
    """A dataset's images without augmentation, for a DataLoader (workers load and preprocess them)."""

    def __init__(self, dataset: EGMADataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.image_tensor(i, augment=False)


@torch.no_grad()
def encode_dataset(model: EGMAModel, dataset: EGMADataset, *, batch_size: int = 32, device=None,
                   progress: bool = True, num_workers: int = 0) -> Dict[str, torch.Tensor]:
    """``{"patch" (M,P,D) normalised, "global" (M,D), "pooled" (M,C) backbone features, "labels" (M,C)}``.

    ``num_workers``: DataLoader processes that load and preprocess the images (0: this process)."""
    model.eval()
    device = device or next(model.parameters()).device
    patch, pooled, labels, glob = [], [], [], []
    idx = list(range(len(dataset)))
    chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    loader = torch.utils.data.DataLoader(_EvalImages(dataset), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
    for ch, x in zip(_progress(chunks, len(chunks), "encode images", progress), loader):
        x = x.to(device, non_blocking=True)
        if model.config.image_global == "pooler":
            feats, pool_tok = model._image_features(x, with_pooled=True)
            feats = feats[0]
            glob.append(model.image_proj[0](pool_tok).float().cpu())
        else:
            feats = model._image_features(x)[0]
        pooled.append(feats.float().mean((2, 3)).cpu())
        tok = model.image_proj[0](feats.flatten(2).transpose(1, 2)).float()
        patch.append(tok.cpu())
        if dataset.classes:
            labels.append(torch.stack([dataset.label_vector(dataset.records[i]) for i in ch]))
    raw = torch.cat(patch)
    g = torch.cat(glob) if glob else raw.mean(1)  # the model's global embedding (encode_image_global)
    out = {"patch": F.normalize(raw, dim=-1), "global": F.normalize(g, dim=-1), "pooled": torch.cat(pooled)}
    if labels:
        out["labels"] = torch.cat(labels)
    return out


@torch.no_grad()
def encode_texts(model: EGMAModel, tokenizer, texts: Sequence[str], *, batch_size: int = 128,
                 device=None, split: bool = True) -> Dict[str, torch.Tensor]:
    """Texts split into sentences (``split=False``: each text is one sentence, as the authors' prompts are):
    ``{"sent" (N,D), "cu_seqlens" (T+1,), "global" (T,D)}``."""
    model.eval()
    device = device or next(model.parameters()).device
    padding = "max_length" if model.config.text_pooling == "last4_all" else True
    sents, lengths = [], []
    for t in texts:
        s = (split_sentences(t) or [t]) if split else [t]
        sents += s
        lengths.append(len(s))
    emb = []
    for i in range(0, len(sents), batch_size):
        tok = tokenizer(sents[i : i + batch_size], padding=padding, truncation=True, max_length=model.config.max_length,
                        return_tensors="pt").to(device)
        emb.append(model.encode_sentences(tok["input_ids"], tok["attention_mask"], normalize=False).float().cpu())
    raw = torch.cat(emb)
    cu = egma_kernels.cu_seqlens_from_lengths(lengths)
    from .model import _segment_mean

    return {"sent": F.normalize(raw, dim=-1), "cu_seqlens": cu, "global": F.normalize(_segment_mean(raw, cu), dim=-1)}


def similarity(images: Dict[str, torch.Tensor], texts: Dict[str, torch.Tensor], scoring: str = "fine") -> torch.Tensor:
    """``(M, T)`` image-text scores: ``global`` cosine, or ``fine`` = (i2t + t2i) / 2 of ``filip_similarity``."""
    if scoring == "global":
        return images["global"] @ texts["global"].t()
    if scoring == "fine":
        i2t, t2i = egma_kernels.filip_similarity(images["patch"], texts["sent"], texts["cu_seqlens"], 1.0)
        return 0.5 * (i2t + t2i)
    raise ValueError(f"scoring must be 'global' or 'fine', got {scoring!r}")


# ------------------------------------------------------------------------------------------- tasks


def zero_shot(model, tokenizer, images: Dict[str, torch.Tensor], class_prompts: Dict[str, List[str]],
              image_classes: Sequence[str], *, scoring: str = "fine", reduce: str = "max",
              multi_label: bool = False, split_prompts: bool = True) -> Dict:
    """Zero-shot classification: each class's score = ``reduce`` (max or mean) over its prompts' scores.

    ``split_prompts``: a prompt is split into sentences first (ours); False keeps each prompt one sentence
    (the authors' protocol, with ``scoring="global"`` and ``reduce="max"``).

    Single-label: images whose label set has exactly one of the prompt classes are scored (accuracy, macro-F1,
    confusion matrix over the prompt classes). Multi-label: mean AUROC over classes.
    """
    names = list(class_prompts)
    texts, owner = [], []
    for c, ps in enumerate(names):
        for p in class_prompts[ps]:
            texts.append(p)
            owner.append(c)
    sim = similarity(images, encode_texts(model, tokenizer, texts, split=split_prompts), scoring)
    owner_t = torch.tensor(owner)
    scores = torch.stack([(sim[:, owner_t == c].amax(1) if reduce == "max" else sim[:, owner_t == c].mean(1))
                          for c in range(len(names))], dim=1)
    labels = images["labels"].numpy()
    cols = [image_classes.index(n) if n in image_classes else None for n in names]
    res: Dict = {"classes": names, "scoring": scoring, "reduce": reduce, "split_prompts": split_prompts}
    ind = np.stack([labels[:, c] if c is not None else np.zeros(len(labels)) for c in cols], 1)
    if multi_label:
        res["mean_auroc"], res["auroc"] = mean_auroc(scores.numpy(), ind)
        return res
    keep = ind.sum(1) == 1  # images with exactly one of the prompt classes
    y_true = ind[keep].argmax(1)
    y_pred = scores[torch.from_numpy(keep)].argmax(1).numpy()
    res.update(n_images=int(keep.sum()), accuracy=accuracy(y_true, y_pred),
               macro_f1=macro_f1(y_true, y_pred, len(names)),
               confusion_matrix=confusion_matrix(y_true, y_pred, len(names)).tolist())
    return res


def retrieval(model, tokenizer, images: Dict[str, torch.Tensor], image_labels: Sequence[str], queries: Sequence[Dict],
              *, scoring: str = "fine", ks: Sequence[int] = (1, 5, 10), split_prompts: bool = True) -> Dict:
    """Precision@k in both directions; relevant = same class (image label vs query label)."""
    texts = [q["text"] for q in queries]
    q_labels = [q["label"] for q in queries]
    sim = similarity(images, encode_texts(model, tokenizer, texts, split=split_prompts), scoring).numpy()
    res = {"scoring": scoring, "n_images": len(image_labels), "n_queries": len(texts)}
    for k in ks:
        res[f"image_to_text_p@{k}"] = precision_at_k(sim, image_labels, q_labels, k)
        res[f"text_to_image_p@{k}"] = precision_at_k(sim.T, q_labels, image_labels, k)
    return res


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, multi_label: bool, *, steps: int = 100, wd: float = 1e-3):
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    xs = (x - mean) / std
    C = y.shape[1]
    w = torch.zeros(x.shape[1], C, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = xs @ w + b
        loss = (F.binary_cross_entropy_with_logits(logits, y) if multi_label
                else F.cross_entropy(logits, y.argmax(1))) + wd * (w ** 2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    if x.numel() < 1_000_000:  # tiny problems run far faster on one thread than on a busy pool
        torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return lambda z: (((z - mean) / std) @ w + b).detach()


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, fractions: Sequence[float] = (0.01, 0.1, 1.0),
                 seeds: Sequence[int] = (0, 1, 2), multi_label: bool = False) -> Dict:
    """Logistic regression on frozen features with a fraction of the training labels; mean AUROC (one-vs-rest
    for single-label) on the test set, mean and std over ``seeds`` (the subsets are drawn per seed)."""
    res = {}
    n = train_feats.shape[0]
    for frac in fractions:
        vals = []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            m = max(2, int(round(frac * n)))
            idx = torch.randperm(n, generator=g)[:m]
            predict = _fit_logistic(train_feats[idx].float(), train_labels[idx].float(), multi_label)
            logits = predict(test_feats.float())
            sc = torch.sigmoid(logits) if multi_label else torch.softmax(logits, 1)
            vals.append(mean_auroc(sc.numpy(), test_labels.numpy())[0])
        res[f"{frac:g}"] = {"auroc_mean": float(np.nanmean(vals)), "auroc_std": float(np.nanstd(vals)),
                            "per_seed": vals, "n_train": max(2, int(round(frac * n)))}
    return res


# ------------------------------------------------------------------------------------------- CLI


def _one_line(error: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (some, e.g. ``load_state_dict``'s, span many), cut at ``limit``."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_prompts(path: str) -> Dict:
    """A prompts JSON file, or a built-in set by name (``egma_model.recipes.BUILTIN_PROMPTS``)."""
    from .recipes import BUILTIN_PROMPTS, builtin_prompts

    if path in BUILTIN_PROMPTS:
        return {"classes": builtin_prompts(path)}
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: prompts file not found")
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(d, dict) or not isinstance(d.get("classes"), dict) or not d["classes"]:
        raise ManifestError(f"{path}: needs 'classes': {{class name: [prompts]}}")
    for c, ps in d["classes"].items():
        if not isinstance(ps, list) or not ps or not all(isinstance(p, str) for p in ps):
            raise ManifestError(f"{path}: classes[{c!r}] must be a non-empty list of strings")
    if not isinstance(d.get("queries", []), list):
        raise ManifestError(f"{path}: 'queries' must be a list of {{'text': ..., 'label': ...}}")
    for i, q in enumerate(d.get("queries", [])):
        if not isinstance(q, dict) or not isinstance(q.get("text"), str) or "label" not in q:
            raise ManifestError(f"{path}: queries[{i}] needs 'text' (a string) and 'label'")
    if not isinstance(d.get("multi_label", False), bool):
        raise ManifestError(f"{path}: 'multi_label' must be true or false, got {d['multi_label']!r}")
    return d


def load_checkpoint(checkpoint: str):
    """``(model, tokenizer)`` from a folder written by egma-train. A folder that cannot be read as one (missing,
    a weights file cut short, another model's files) raises ``EvalInputError`` naming it."""
    from .tokenizer import load_tokenizer

    if not os.path.isdir(checkpoint):
        raise EvalInputError(f"{checkpoint}: checkpoint folder not found")
    tokenizer_dir = os.path.join(checkpoint, "tokenizer")
    try:
        model = EGMAModel.from_pretrained(checkpoint)
        if not os.path.isdir(tokenizer_dir):  # load_tokenizer would take the path for a hub id
            raise FileNotFoundError(f"no tokenizer folder {tokenizer_dir}")
        tokenizer = load_tokenizer(tokenizer_dir)
    # OSError: a missing or unreadable file; ValueError (JSON errors among them) and RuntimeError: a truncated
    # or foreign weights file, weights that do not fit the configuration; EOFError and UnpicklingError: a
    # weights file cut short inside its pickle.
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise EvalInputError(f"{checkpoint}: cannot load the checkpoint ({type(e).__name__}: {_one_line(e)})") from None
    return model, tokenizer


def check_tasks(tasks: Sequence[str], *, prompts: Optional[str], train_manifest: Optional[str]) -> List[str]:
    """The tasks, each known and with the inputs it needs (``EvalInputError`` otherwise)."""
    tasks = [t.strip() for t in tasks if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise EvalInputError(f"--tasks: unknown task(s) {unknown or tasks}; "
                             f"use a comma-separated list of {', '.join(TASKS)}")
    for task in ("zeroshot", "retrieval"):
        if task in tasks and not prompts:
            raise EvalInputError(f"--tasks {task} needs --prompts (a prompts JSON file or a built-in set)")
    if "probe" in tasks and not train_manifest:
        raise EvalInputError("--tasks probe needs --train-manifest (a labelled training manifest)")
    return tasks


def _rows(manifest: str, split: Optional[str], option: str):
    """The manifest's rows (of ``split``); ``load_manifest`` raises when none is left, naming the splits the file
    has (``option``: the flag that chose ``split``, kept for the callers)."""
    return load_manifest(manifest, split=split)


def _check_prompt_classes(pr: Dict, recs, manifest: str) -> None:
    """Zero-shot and retrieval score images against the prompt classes: at least one image must carry one."""
    labels = {c for r in recs for c in r.labels}
    if not labels & set(pr["classes"]):
        raise EvalInputError(f"{manifest}: no image is labelled with a prompt class {sorted(pr['classes'])}; "
                             f"the manifest's labels: {sorted(labels)[:20]}")


def evaluate(checkpoint: str, manifest: str, prompts: Optional[str] = None, *, tasks=("zeroshot", "retrieval"),
             split: Optional[str] = None, train_manifest: Optional[str] = None, train_split: Optional[str] = None,
             scoring=("fine", "global"), reduce: str = "max", split_prompts: bool = True, batch_size: int = 32,
             num_workers: int = 0, device=None, progress: bool = True, fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2), model=None, tokenizer=None) -> Dict:
    """Run the chosen tasks; returns a JSON-able dict. Every input (tasks, scorings, prompts, manifests, the
    checkpoint) is read and checked before any image is encoded: ``EvalInputError`` or ``ManifestError``."""
    tasks = check_tasks(tasks, prompts=prompts, train_manifest=train_manifest)
    bad = [s for s in scoring if s not in SCORINGS]
    if bad or not scoring:
        raise EvalInputError(f"--scoring: unknown scoring(s) {bad or list(scoring)}; use fine, global")
    pr = load_prompts(prompts) if prompts else None
    recs = _rows(manifest, split, "--split")
    if pr is not None and {"zeroshot", "retrieval"} & set(tasks):
        _check_prompt_classes(pr, recs, manifest)
    trecs = _rows(train_manifest, train_split, "--train-split") if "probe" in tasks else None
    if model is None:
        model, tokenizer = load_checkpoint(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    classes = sorted({c for r in recs for c in r.labels} | (set(pr["classes"]) if pr else set()))
    ds = EGMADataset(recs, image_size=model.config.image_size, grid=model.grid, classes=classes,
                     use_gaze=False, image_mean=model.config.image_mean, image_std=model.config.image_std)
    images = encode_dataset(model, ds, batch_size=batch_size, device=device, progress=progress,
                            num_workers=num_workers)
    out: Dict = {"checkpoint": checkpoint, "manifest": manifest, "n_images": len(ds)}
    multi = bool(pr.get("multi_label", False)) if pr else False
    for task in tasks:
        if task == "zeroshot":
            out["zeroshot"] = {s: zero_shot(model, tokenizer, images, pr["classes"], classes, scoring=s,
                                            reduce=reduce, multi_label=multi, split_prompts=split_prompts)
                               for s in scoring}
        elif task == "retrieval":
            queries = pr.get("queries") or [{"text": p, "label": c} for c, ps in pr["classes"].items() for p in ps]
            lab = images["labels"].numpy()
            keep = lab.sum(1) == 1
            img_labels = [classes[int(np.argmax(r))] for r in lab[keep]]
            sub = {k: v[torch.from_numpy(keep)] for k, v in images.items()}
            out["retrieval"] = {s: retrieval(model, tokenizer, sub, img_labels, queries, scoring=s,
                                             split_prompts=split_prompts) for s in scoring}
        elif task == "probe":
            tds = EGMADataset(trecs, image_size=model.config.image_size, grid=model.grid, classes=classes,
                              image_mean=model.config.image_mean, image_std=model.config.image_std,
                              use_gaze=False)
            timgs = encode_dataset(model, tds, batch_size=batch_size, device=device, progress=progress,
                                   num_workers=num_workers)
            out["probe"] = linear_probe(timgs["pooled"], timgs["labels"], images["pooled"], images["labels"],
                                        fractions=fractions, seeds=seeds, multi_label=multi)
    return out


# ------------------------------------------------------------------------------------------- output


def _value(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def summary_rows(res: Dict) -> List[Tuple[str, str, str, str]]:
    """``(task, scoring, metric, value)`` for each headline number of an ``evaluate`` record."""
    rows = []
    for sc, z in res.get("zeroshot", {}).items():
        if "mean_auroc" in z:
            rows.append(("zeroshot", sc, f"mean AUROC ({len(z['classes'])} classes)", _value(z["mean_auroc"])))
            continue
        rows.append(("zeroshot", sc, f"accuracy ({z['n_images']} images)", _value(z["accuracy"])))
        rows.append(("zeroshot", sc, "macro-F1", _value(z["macro_f1"])))
    for sc, r in res.get("retrieval", {}).items():
        for direction in ("image_to_text", "text_to_image"):
            for key in (k for k in r if k.startswith(direction + "_p@")):
                rows.append(("retrieval", sc, f"{direction.replace('_to_', '->')} P@{key.split('@')[1]}",
                             _value(r[key])))
    for frac, p in res.get("probe", {}).items():
        rows.append(("probe", "pooled", f"AUROC, {100 * float(frac):g}% labels (n={p['n_train']})",
                     f"{_value(p['auroc_mean'])} ± {_value(p['auroc_std'])}"))
    return rows


def format_summary(res: Dict, json_path: Optional[str] = None) -> str:
    """The headline numbers as a plain table, with where the full record is."""
    rows = [("task", "scoring", "metric", "value")] + summary_rows(res)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"egma-eval: {res['checkpoint'] or 'model'} on {res['manifest']} ({res['n_images']} images)"]
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    if json_path:
        lines.append(f"full record (confusion matrices, per-class and per-seed values): {json_path}")
    return "\n".join(lines)


def default_out(checkpoint: str, manifest: str, split: Optional[str]) -> str:
    """``<checkpoint>/eval-<manifest name>[-<split>].json``: the results beside the model they belong to."""
    name = os.path.basename(manifest)
    for ext in (".gz", ".csv", ".jsonl", ".json"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return os.path.join(checkpoint, f"eval-{name}" + (f"-{split}" if split else "") + ".json")


def _check_writable(path: str) -> None:
    """``--out`` can be written (checked before the encoding, which can take long)."""
    if os.path.isdir(path):
        raise EvalInputError(f"--out {path}: is a folder; give a file name")
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):  # the nearest existing ancestor decides whether makedirs can succeed
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise EvalInputError(f"--out {path}: {probe} is a file, not a folder")
    if (os.path.exists(path) and not os.access(path, os.W_OK)) or not os.access(probe, os.W_OK | os.X_OK):
        raise EvalInputError(f"--out {path}: cannot write there (give --out a writable path)")


def _numbers(text: str, kind, option: str) -> tuple:
    try:
        values = tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise EvalInputError(f"{option}: expected comma-separated {kind.__name__} values, got {text!r}") from None
    return values


def _check_device(name: Optional[str]) -> None:
    if name is None:
        return
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise EvalInputError(f"--device: {_one_line(e)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalInputError(f"--device {name}: no CUDA device is visible")


# egma-eval's command line moved to egma_model.eval_cli (above this module and the paper table); the old
# names stay importable from here for one release, through importlib so that no import points back up.
_MOVED = {"main": "egma_model.eval_cli", "build_parser": "egma_model.eval_cli"}


def __getattr__(name):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(__getattr__("main")())
