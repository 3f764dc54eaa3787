"""Parity run: a few training steps of the authors' released training loop (MoMarky/EGMA) and of
``egma-train --recipe authors-code``, from the same randomly initialised weights and the same batches.

    "$AUTHORS_VENV/bin/python" tools/authors_parity.py --authors-repo "$AUTHORS_REPO" \\
        --out benchmarks/results/authors-parity/parity-224-gaze.json [--image-size 224] [--gaze-ratio 1]
        [--n-images 8] [--batch-size 4] [--epochs 2] [--lr 1e-5] [--seed 0] [--threads 2]

``$AUTHORS_VENV``: a venv with their extra dependencies (see benchmarks/results/authors-parity/README.md).
``--authors-repo``: a checkout of the authors' repository (the folder holding ``egma/`` and
``finetune_egma.py``); its modules are imported from there, nothing of it is copied. Run it with a Python
that has their extra dependencies (nltk, pandas, scikit-learn, opencv, omegaconf, ftfy, regex,
pytorch-msssim, fairscale, requests) besides this package's, and ``PYTHONPATH`` set to this repository.

What runs on their side: their dataset class (``my_PartGaze_MIMICEYE_ImageTextContrastiveDataset_AllSentenceHeatmap``:
sentence split, image and heatmap loading), their collator, ``SPARC_FILIP_PartGaze_Model`` with
``Hyrachy_VisionModelViT`` and ``MedCLIPTextModel`` under their ``finetune_egma.py`` settings,
``FILIP_PartGaze_ImageTextContrastiveLoss`` and ``Trainer_multi_evaluator.train`` (AdamW, weight decay on every
parameter, warm-up ratio, cosine, clipping). What is stood in for, because it needs files that are not public
or not reachable offline:

* MedCLIP / Bio_ClinicalBERT / Swin weights: a Swin with MedCLIP's widths (embed 96, so 192/384/768 as their
  projection heads expect) and a 768-wide BERT, both with fewer layers and random weights (seeded), saved
  as local folders; their ``constants.VIT_TYPE``/``BERT_TYPE`` point there. Dropout and drop-path are 0 on
  both sides (their masks and ours cannot be drawn alike).
* The tokenizer: a word-level WordPiece vocabulary built from the reports (``egma_model.tokenizer``), the
  same folder for both sides.
* MIMIC-EYE files: synthetic grey images and per-sentence Gaussian heatmaps in their file layout
  (``.../src.jpg``, ``sentence_hm/<i>_sent_hm_array.jpg``, PNG content so nothing is lost), and the same
  heatmaps as ``.npy`` for our manifest (``gaze_format npy``).
* Their CheXpert 5x200 evaluator: a stand-in whose ``evaluate()`` returns nothing (their loop calls it once
  after the last step; ``--evaluation_steps 0`` keeps it out of the steps).
* CUDA: their code calls ``.cuda()`` on tensors and modules; those calls return the object itself on the CPU.
* Library drift: transformers 5 lost ``CLIPFeatureExtractor`` and moved three helpers out of
  ``modeling_utils``; numpy 2 lost ``numpy.lib.function_base``. The names are put back for their imports;
  both sides run on the same torch/transformers.

Augmentation is off on both sides (theirs: ColorJitter, sharpness, autocontrast; ours: gamma, contrast,
brightness, noise; random and different by design). Both sides see the batches in our sampler's order.

Our side runs ``egma_model.train`` as ``egma-train --recipe authors-code`` does (parser, recipe resolution,
``train``), starting from their initial weights through ``--init-from`` (their model's state dict is in
MedCLIP's layout). ``recipe`` is ``--recipe authors-code`` as it is, with no other option and no function
replaced. The differences the recipe used to have are now options it sets; ``only-<d>`` puts difference
``<d>`` back by its option, to show its size:

* ``padding`` (``--text-padding max_length``): every sentence padded to 77 tokens for the last-4 pooling;
  their collator pads to the batch's longest sentence (``padding=True``, the recipe's ``longest``), and the
  mean over positions includes the padding.
* ``schedule`` (``--warmup-rule ours``): a warm-up of ``round(0.1 * steps)`` steps starting at ``1/warmup``;
  theirs (transformers' cosine, the recipe's ``transformers``) ``ceil(0.1 * steps)`` steps starting at 0.
* ``norm`` (``--image-mean 0.5863 --image-std 0.2795``): MedCLIP's constants rounded; theirs and the
  recipe's are 0.5862785803043838 / 0.27950088968644304.
* ``mapping`` (``--loss-weights 1,1,1``): the mapping term (EGM) trained with weight 1 too; the recipe has
  ``1,1,0`` as their released ``loss_mix`` (FILIP + MLCE).

Writes ``--out`` (JSON: settings, versions, per-step values per variant, batch checks) and a Markdown
summary beside it (``.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from typing import Dict, List

import numpy as np
import torch

# finetune_egma.py's train_config (the keys their model and trainer read)
AUTHORS_TRAIN_CONFIG = {
    "batch_size": 40, "num_epochs": 10, "warmup": 0.1, "lr": 1e-5, "weight_decay": 1e-4, "eval_steps": 40,
    "eval_best_save_flag": "acc", "loss1024": 0, "loss256": 0, "loss49": 1, "gaze_ratio": 0.0,
    "vision_freeze_layers": None, "text_freeze_layers": None, "loss_mix": ["filip_clip_loss", "mlce"],
    "only_gaze_loss": False, "use_eda": False, "finetuned": True, "no_decay": [],
}
CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices"]
SENTENCES = [
    "The cardiac silhouette is mildly enlarged", "There is a small left pleural effusion",
    "No focal consolidation is seen in either lung", "The lungs are hyperinflated but otherwise clear",
    "Mild pulmonary vascular congestion is present", "There is patchy opacity at the right lung base",
    "The mediastinal contours are within normal limits", "An endotracheal tube terminates above the carina",
    "Linear atelectasis is noted at the left base", "There is no pneumothorax on this frontal view",
    "Degenerative changes are seen in the thoracic spine", "A right internal jugular line ends in the cavoatrial junction",
    # short ones (4 tokens or fewer), which the authors' training dataset keeps
    "Heart size normal", "No effusion", "Lungs clear",
]
# reports whose sentences are short show the sentence rules apart (not used for training)
SPLIT_EXAMPLES = [
    "1. Heart size normal. 2. No effusion. 3. There is a small left pleural effusion.",
    "FINDINGS: Lungs clear. The cardiac silhouette is mildly enlarged. No pneumothorax.",
]
# what --recipe authors-code once did differently, each put back by an option in an only-<d> variant
DIFFERENCES = {"padding": ["--text-padding", "max_length"], "schedule": ["--warmup-rule", "ours"],
               "norm": ["--image-mean", "0.5863", "--image-std", "0.2795"], "mapping": ["--loss-weights", "1,1,1"]}


# ------------------------------------------------------------------------------------------ their modules


def import_authors(repo: str, swin_dir: str, bert_dir: str) -> types.SimpleNamespace:
    """Their modules, imported from ``repo`` without running ``egma/__init__.py`` (it imports a module that is
    not in the release), with their hub names pointed at the local random-weight folders."""
    import transformers

    transformers.CLIPImageProcessor  # resolving a lazy name replaces the module object in sys.modules
    tm = sys.modules["transformers"]
    if not hasattr(tm, "CLIPFeatureExtractor"):
        tm.CLIPFeatureExtractor = tm.CLIPImageProcessor
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for n in ("apply_chunking_to_forward", "prune_linear_layer", "find_pruneable_heads_and_indices"):
        if not hasattr(mu, n):
            setattr(mu, n, getattr(pu, n, None) or _unavailable(n))
    try:
        importlib.import_module("numpy.lib.function_base")
    except ImportError:
        fb = types.ModuleType("numpy.lib.function_base")
        fb.extract = np.extract
        sys.modules["numpy.lib.function_base"] = fb
    pkg_dir = os.path.join(os.path.abspath(repo), "egma")
    if not os.path.isfile(os.path.join(pkg_dir, "modeling_egma.py")):
        raise SystemExit(f"--authors-repo {repo}: no egma/modeling_egma.py there")
    pkg = types.ModuleType("egma")
    pkg.__path__ = [pkg_dir]
    sys.modules["egma"] = pkg
    constants = importlib.import_module("egma.constants")
    # before modeling_egma is imported: its classes bind these names as default arguments
    constants.VIT_TYPE, constants.BERT_TYPE = swin_dir, bert_dir
    ns = types.SimpleNamespace(constants=constants)
    for m in ("modeling_egma", "losses", "trainer", "dataset"):
        setattr(ns, m, importlib.import_module(f"egma.{m}"))
    return ns


def _unavailable(name):
    def f(*a, **k):
        raise NotImplementedError(f"{name} is not in the installed transformers")

    return f


@contextlib.contextmanager
def cpu_cuda_calls():
    """``.cuda()`` on tensors and modules returns the object itself (their code calls it unconditionally)."""
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


# ------------------------------------------------------------------------------------------ shared inputs


def make_encoders(work: str, tok, image_size: int, seed: int, swin_depths, bert_layers: int):
    """Random-weight Swin (MedCLIP's widths) and BERT (768 wide) saved as local folders."""
    from transformers import BertConfig, BertModel, SwinConfig, SwinModel

    torch.manual_seed(seed)
    swin = SwinModel(SwinConfig(image_size=image_size, patch_size=4, num_channels=3, embed_dim=96,
                                depths=list(swin_depths), num_heads=[3, 6, 12, 24], window_size=7,
                                drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    swin_dir = os.path.join(work, "swin")
    swin.save_pretrained(swin_dir)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=768, num_hidden_layers=bert_layers,
                                num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    bert_dir = os.path.join(work, "bert")
    bert.save_pretrained(bert_dir)
    tok.save_pretrained(bert_dir)
    return swin_dir, bert_dir


def make_data(work: str, n: int, size: int, seed: int) -> Dict:
    """Synthetic images, reports and per-sentence heatmaps in their MIMIC-EYE layout and our manifest."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows, ours = [], []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for i in range(n):
        d = os.path.join(work, "data", f"p{i}")
        os.makedirs(os.path.join(d, "sentence_hm"), exist_ok=True)
        base = rng.random((8, 8))
        img = np.asarray(Image.fromarray((base * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                         dtype=np.float64)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        img_path = os.path.join(d, "src.jpg")  # their file name; PNG content (PIL reads by content), lossless
        Image.fromarray(img, mode="L").save(img_path, format="PNG")
        k = int(rng.integers(2, 5))
        sents = [SENTENCES[j] for j in rng.choice(len(SENTENCES), size=k, replace=False)]
        if i % 2:
            report = " ".join(f"{j + 1}. {s}." for j, s in enumerate(sents))
        else:
            report = ". ".join(sents) + "."
        maps = []
        for j in range(k):
            cy, cx = rng.uniform(0.2, 0.8, 2) * size
            sig = rng.uniform(0.04, 0.1) * size
            r2 = (yy - cy) ** 2 + (xx - cx) ** 2
            h = np.where(r2 <= (2 * sig) ** 2, np.exp(-r2 / (2 * sig * sig)), 0.0)
            q = np.round(h / h.max() * 255).astype(np.uint8)
            Image.fromarray(q, mode="L").save(os.path.join(d, "sentence_hm", f"{j}_sent_hm_array.jpg"), format="PNG")
            maps.append(q.astype(np.float32) / 255.0)
        whole = np.clip(np.sum(maps, 0), 0, 1)
        Image.fromarray(np.round(whole * 255).astype(np.uint8), mode="L").save(os.path.join(d, "hm_array.jpg"),
                                                                                format="PNG")
        npy = os.path.join(d, "gaze.npy")
        np.save(npy, np.stack(maps))  # exactly the PNGs' values / 255
        rows.append({"imgpath": img_path, "report": report, **{c: 0 for c in CHEXPERT_LABELS}})
        ours.append({"image": img_path, "report": report, "gaze_format": "npy", "gaze": npy, "n_maps": k})
    theirs_csv = os.path.join(work, "theirs.csv")
    with open(theirs_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    manifest = os.path.join(work, "manifest.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "report", "gaze_format", "gaze"])
        w.writeheader()
        w.writerows([{k: r[k] for k in ("image", "report", "gaze_format", "gaze")} for r in ours])
    return {"theirs_csv": theirs_csv, "manifest": manifest, "reports": [r["report"] for r in rows],
            "n_maps": [r["n_maps"] for r in ours]}


# ------------------------------------------------------------------------------------------ their run


class _NoEvaluator:
    """Stands in for their CheXpert 5x200 / RSNA evaluators (their loop calls evaluate() after the last step)."""

    def evaluate(self):
        return {}


class _OurOrder(torch.utils.data.Sampler):
    """Our sampler's order (``GlobalBatchSampler``, one process), one epoch per pass."""

    def __init__(self, n: int, batch: int, seed: int):
        from egma_model.train import GlobalBatchSampler

        self.s = GlobalBatchSampler(n, batch, 0, 1, seed)
        self.epoch = 0

    def __len__(self):
        return len(self.s)

    def __iter__(self):
        self.s.set_epoch(self.epoch)
        self.epoch += 1
        return iter(list(self.s))


def run_theirs(A, data: Dict, init_dir: str, a, work: str) -> Dict:
    from torchvision import transforms

    ds_mod, md, lo, tr = A.dataset, A.modeling_egma, A.losses, A.trainer
    cfg = dict(AUTHORS_TRAIN_CONFIG, batch_size=a.batch_size, num_epochs=a.epochs, lr=a.lr, gaze_ratio=a.gaze_ratio)
    c = A.constants
    # finetune_egma.py's transforms without the random ones (ColorJitter, sharpness, autocontrast)
    transform = transforms.Compose([transforms.Resize((a.image_size, a.image_size)), transforms.ToTensor(),
                                    transforms.Normalize(mean=[c.IMG_MEAN], std=[c.IMG_STD])])
    hm_transform = transforms.Compose([transforms.Grayscale(num_output_channels=1),
                                       transforms.Resize((a.image_size, a.image_size)), transforms.ToTensor()])
    out_dir = os.path.join(work, "theirs_out")
    os.makedirs(out_dir, exist_ok=True)
    # their dataset reads '..../EGMA/local_data/sentence-label.csv' relative to the working directory
    cwd = os.getcwd()
    run_dir = os.path.join(work, "theirs_cwd")
    os.makedirs(os.path.join(run_dir, "....", "EGMA"), exist_ok=True)
    link = os.path.join(run_dir, "....", "EGMA", "local_data")
    if not os.path.exists(link):
        os.symlink(os.path.join(os.path.abspath(a.authors_repo), "local_data"), link)
    os.chdir(run_dir)
    try:
        ds = ds_mod.my_PartGaze_MIMICEYE_ImageTextContrastiveDataset_AllSentenceHeatmap(
            datapath=data["theirs_csv"], imgtransform=transform, hm_transform=hm_transform,
            gaze_ratio=a.gaze_ratio, save_path=out_dir)
    finally:
        os.chdir(cwd)
    collate = ds_mod.my_PartGaze_FILIP_ImageTextContrastiveCollator(use_eda=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, sampler=_OurOrder(len(ds), a.batch_size, a.seed),
                                         collate_fn=collate, num_workers=0)
    rec: Dict[str, List] = {"loss": [], "contrastive": [], "gaze_mlce": [], "grad_norm": [], "lr": [],
                            "logit_scale": []}
    first_batch = {}
    with cpu_cuda_calls():
        model = md.SPARC_FILIP_PartGaze_Model(vision_cls=md.Hyrachy_VisionModelViT, checkpoint=init_dir, config=cfg)
        inner = model.get_two_sides_soft_sim_logits_PartGaze

        def terms(*args, **kw):
            out = inner(*args, **kw)
            rec["contrastive"].append(float(out[0]))
            rec["gaze_mlce"].append(float(out[2]))
            return out

        model.get_two_sides_soft_sim_logits_PartGaze = terms
        loss_model = lo.FILIP_PartGaze_ImageTextContrastiveLoss(model, org_clip=True)
        fwd = loss_model.forward

        def loss_forward(**data_kw):
            if not first_batch:
                first_batch.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in data_kw.items()})
            out = fwd(**data_kw)
            rec["loss"].append(float(out["loss_value"]))
            return out

        loss_model.forward = loss_forward

        class RecordingAdamW(torch.optim.AdamW):
            def step(self, closure=None):
                rec["lr"].append(self.param_groups[0]["lr"])
                # the scale this step's forward used (their forward clamps the parameter in place)
                rec["logit_scale"].append(float(model.logit_scale.detach().exp()))
                return super().step(closure)

        clip = torch.nn.utils.clip_grad_norm_

        def clip_rec(params, max_norm, *args, **kw):
            n = clip(params, max_norm, *args, **kw)
            rec["grad_norm"].append(float(n))
            return n

        torch.nn.utils.clip_grad_norm_ = clip_rec
        t0 = time.time()
        try:
            tr.Trainer_multi_evaluator().train(
                model, train_objectives=[(loader, loss_model, 1)], warmup_ratio=cfg["warmup"], epochs=a.epochs,
                optimizer_class=RecordingAdamW, optimizer_params={"lr": a.lr}, output_path=out_dir,
                evaluation_steps=0, weight_decay=cfg["weight_decay"], save_steps=10 ** 9, evaluator=_NoEvaluator(),
                eval_dataloader=None, use_amp=False, args=cfg, show_progress_bar=False)
        finally:
            torch.nn.utils.clip_grad_norm_ = clip
        rec["time_s"] = round(time.time() - t0, 1)
    rec["sentences"] = [list(r) for r in ds.df["report"]]
    rec["first_batch"] = first_batch
    return rec


# ------------------------------------------------------------------------------------------ our run


def run_ours(a, data: Dict, dirs: Dict, work: str, keep: set, name: str) -> Dict:
    """``egma-train --recipe authors-code`` with the differences in ``keep`` put back by their options."""
    import egma_model.data as D
    import egma_model.train as T
    from egma_model.recipes import explicit_options

    out = os.path.join(work, f"ours_{name}")
    argv = ["--recipe", "authors-code", "--manifest", data["manifest"], "--out", out,
            "--image-model", dirs["swin"], "--text-model", dirs["bert"], "--tokenizer", dirs["tok"],
            "--init-from", os.path.join(dirs["init"], "pytorch_model.bin"), "--image-size", str(a.image_size),
            "--batch-size", str(a.batch_size), "--epochs", str(a.epochs), "--lr", str(a.lr), "--seed", str(a.seed),
            "--no-progress", "--save-every", "0", "--device", "cpu"]
    if a.gaze_ratio == 0:
        argv.append("--no-gaze")
    for d in sorted(keep):
        argv += DIFFERENCES[d]
    parser = T.build_parser()
    ns = parser.parse_args(argv)
    args, source = T.apply_recipe(T.args_from_namespace(ns), explicit_options(parser, argv))
    saved = D.photometric_augment, T.Collator, torch.optim.AdamW
    first_batch = {}
    lr_used: List[float] = []

    class RecordingAdamW(saved[2]):
        def step(self, closure=None):
            lr_used.append(self.param_groups[0]["lr"])
            return super().step(closure)

    class Collator(saved[1]):  # records the first batch; the padding is the recipe's (or --text-padding)
        def __call__(self, items):
            b = super().__call__(items)
            if not first_batch:
                first_batch.update({k: v.clone() for k, v in b.items()})
            return b

    D.photometric_augment = lambda x, generator=None: x  # augmentation off (theirs is off too)
    T.Collator = Collator
    torch.optim.AdamW = RecordingAdamW
    t0 = time.time()
    try:
        res = T.train(args)
    finally:
        D.photometric_augment, T.Collator, torch.optim.AdamW = saved
    h = res["history"]
    # "logit_scale" in our log is the scale the step's forward used
    rec = {k: [r[k] for r in h] for k in ("loss", "contrastive", "gaze_mlce", "mapping", "grad_norm", "logit_scale")}
    rec["lr"] = lr_used
    rec["time_s"] = round(time.time() - t0, 1)
    rec["argv"] = argv
    rec["settings"] = T.recipe_text(args, source)
    with open(os.path.join(out, "init_report.json")) as f:
        ir = json.load(f)
    rec["init"] = {"loaded": len(ir["loaded"]), "missing": ir["missing"], "unused": sorted(ir["unused"])}
    rec["first_batch"] = first_batch
    shutil.rmtree(out, ignore_errors=True)
    return rec


# ------------------------------------------------------------------------------------------ checks


def batch_checks(theirs_b: Dict, ours_b: Dict, image_size: int) -> Dict:
    """The first batch as each side builds it: pixels, tokens (up to each side's padding), gaze labels."""
    import torch.nn.functional as F

    out = {"pixel_max_abs_diff": float((theirs_b["pixel_values"] - ours_b["pixel_values"]).abs().max()),
           "sentences_per_image": {"theirs": list(theirs_b["img_sent_num"]),
                                   "ours": (ours_b["cu_seqlens"][1:] - ours_b["cu_seqlens"][:-1]).tolist()}}
    ti, oi = theirs_b["input_ids"], ours_b["input_ids"]
    L = ti.shape[1]
    out["token_length"] = {"theirs": int(L), "ours": int(oi.shape[1])}
    out["tokens_equal_up_to_padding"] = bool(
        ti.shape[0] == oi.shape[0] and torch.equal(ti, oi[:, :L]) and bool((oi[:, L:] == 0).all()))
    if "gaze" in ours_b and sum(theirs_b["img_with_gaze"]):
        g = int(round(math.sqrt(ours_b["gaze"].shape[1])))
        # their label rule: torchvision Resize((7, 7), antialias=True) on the tensor, positive where > 0
        hm = F.interpolate(theirs_b["gaze_hm"].float(), size=(7, 7), mode="bilinear", antialias=True,
                           align_corners=False).flatten(1) > 0
        if g == 7:
            ol = ours_b["gaze"] > 0
            out["gaze_labels_equal"] = bool(torch.equal(hm, ol))
            out["gaze_positives"] = {"theirs": int(hm.sum()), "ours": int(ol.sum())}
        else:
            out["gaze_labels_equal"] = f"grids differ: theirs 7x7, ours {g}x{g}"
    return out


def their_gaze_at_256(A, dirs: Dict, cfg: Dict) -> str:
    """Their model with gaze at 256 px: the labels are resized to a fixed 7x7, the tokens are 8x8."""
    md = A.modeling_egma
    with cpu_cuda_calls():
        torch.manual_seed(0)
        m = md.SPARC_FILIP_PartGaze_Model(vision_cls=md.Hyrachy_VisionModelViT, checkpoint=dirs["init"], config=cfg)
        ids = torch.tensor([[2, 10, 11, 3], [2, 12, 13, 3]])
        try:
            with torch.no_grad():
                m(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.zeros(2, 3, 256, 256),
                  return_loss=True, gaze_hm=torch.rand(2, 1, 256, 256), img_sent_num=[1, 1], img_with_gaze=[1, 1])
            return "ran"
        except RuntimeError as e:
            return f"RuntimeError: {str(e).splitlines()[0]}"


def split_examples(A) -> List[Dict]:
    from egma_model.data import split_sentences_egma

    cls = A.dataset.my_PartGaze_MIMICEYE_ImageTextContrastiveDataset_AllSentenceHeatmap
    return [{"report": r, "theirs": cls._split_report_into_segment(None, r), "ours_egma": split_sentences_egma(r)}
            for r in SPLIT_EXAMPLES]


# ------------------------------------------------------------------------------------------ main


def versions(repo: str) -> Dict:
    import timm
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "timm": timm.__version__, "numpy": np.__version__, "threads": torch.get_num_threads()}
    for m in ("nltk", "pandas", "torchvision"):
        try:
            v[m] = importlib.import_module(m).__version__
        except ImportError:
            v[m] = None
    v["authors_repo"] = os.path.abspath(repo)
    return v


def markdown(res: Dict) -> str:
    a = res["args"]
    lines = [f"## {a['image_size']} px, gaze ratio {a['gaze_ratio']}: {res['steps']} steps "
             f"({a['n_images']} images, batch {a['batch_size']}, {a['epochs']} epochs, lr {a['lr']})", ""]
    th = res["theirs"]
    names = list(res["ours"])
    head = "| step | theirs: loss | " + " | ".join(f"ours {n}: loss" for n in names) + " |"
    lines += [head, "|" + "---|" * (2 + len(names))]
    for s in range(res["steps"]):
        row = [str(s + 1), f"{th['loss'][s]:.9f}"]
        for n in names:
            v = res["ours"][n]["loss"][s]
            row.append(f"{v:.9f} ({v - th['loss'][s]:+.1e})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Per term and gradient norm, theirs vs ours `{names[0]}`:", "",
              "| step | lr theirs / ours | contrastive theirs / ours | gaze MLCE theirs / ours | mapping ours | "
              "grad norm theirs / ours | scale theirs / ours |", "|---|---|---|---|---|---|---|"]
    o = res["ours"][names[0]]
    for s in range(res["steps"]):
        lines.append(f"| {s + 1} | {th['lr'][s]:.3g} / {o['lr'][s]:.3g} | {th['contrastive'][s]:.9f} / "
                     f"{o['contrastive'][s]:.9f} | {th['gaze_mlce'][s]:.9f} / {o['gaze_mlce'][s]:.9f} | "
                     f"{o['mapping'][s]:.6f} | {th['grad_norm'][s]:.6f} / {o['grad_norm'][s]:.6f} | "
                     f"{th['logit_scale'][s]:.6f} / {o['logit_scale'][s]:.6f} |")
    lines += ["", "Largest |ours - theirs| over the steps, per variant:", "",
              "| variant | loss | contrastive | gaze MLCE | grad norm | run time (s) |", "|---|---|---|---|---|---|"]
    for n in names:
        d = res["max_abs_diff"][n]
        lines.append(f"| {n} | {d['loss']:.2e} | {d['contrastive']:.2e} | {d['gaze_mlce']:.2e} | {d['grad_norm']:.2e} "
                     f"| {res['ours'][n]['time_s']} |")
    lines.append(f"| (theirs) | | | | | {th['time_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors-repo", required=True, help="checkout of MoMarky/EGMA (the folder with egma/) (default: none, required)")
    p.add_argument("--out", required=True, help="result JSON; a Markdown summary is written beside it (default: none, required)")
    p.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224; their gaze labels need 224)")
    p.add_argument("--gaze-ratio", type=float, default=1.0, choices=[0.0, 1.0],
                   help="their gaze_ratio: 1 = every image with gaze, 0 = none, as released (ours: --no-gaze) (default: 1)")
    p.add_argument("--n-images", type=int, default=8, help="synthetic images (default: 8)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default: 4)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the images (default: 2)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default: 1e-5, theirs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data and order (default: 0)")
    p.add_argument("--swin-depths", default="2,2,2,2", help="Swin blocks per stage (default: 2,2,2,2; MedCLIP's 2,2,6,2)")
    p.add_argument("--bert-layers", type=int, default=4, help="BERT layers (default: 4, the fewest the last-4 pooling reads)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--variants", default="all", help="our variants: all, or a comma list of recipe, "
                   "only-<difference> (default: all)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    a = p.parse_args(argv)
    if a.n_images % a.batch_size:
        p.error("--n-images must be a multiple of --batch-size (full batches on both sides)")
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = a.work or tempfile.mkdtemp(prefix="egma_parity_")
    os.makedirs(work, exist_ok=True)
    from egma_model.tokenizer import build_word_tokenizer

    data = make_data(work, a.n_images, a.image_size, a.seed)
    tok_dir = os.path.join(work, "tok")
    tok = build_word_tokenizer([s.lower() for s in SENTENCES] + [r.lower() for r in data["reports"]], save_dir=tok_dir)
    swin_dir, bert_dir = make_encoders(work, tok, a.image_size, a.seed, [int(x) for x in a.swin_depths.split(",")],
                                       a.bert_layers)
    A = import_authors(a.authors_repo, swin_dir, bert_dir)
    cfg = dict(AUTHORS_TRAIN_CONFIG, gaze_ratio=a.gaze_ratio)
    # the shared start: their model, seeded, saved in MedCLIP's layout (what their init_weight_path holds)
    init_dir = os.path.join(work, "init")
    os.makedirs(init_dir, exist_ok=True)
    with cpu_cuda_calls():
        torch.manual_seed(a.seed)
        m0 = A.modeling_egma.SPARC_FILIP_PartGaze_Model(vision_cls=A.modeling_egma.Hyrachy_VisionModelViT,
                                                       checkpoint=None, config=cfg)
    torch.save(m0.state_dict(), os.path.join(init_dir, "pytorch_model.bin"))
    del m0
    dirs = {"swin": swin_dir, "bert": bert_dir, "tok": tok_dir, "init": init_dir}

    res: Dict = {"args": vars(a), "versions": versions(a.authors_repo), "steps": (a.n_images // a.batch_size) * a.epochs,
                 "authors_train_config": dict(cfg, batch_size=a.batch_size, num_epochs=a.epochs, lr=a.lr),
                 "split_examples": split_examples(A), "n_maps": data["n_maps"]}
    print(f"[parity] their run ({res['steps']} steps)", file=sys.stderr, flush=True)
    theirs = run_theirs(A, data, init_dir, a, work)
    if a.image_size != 224 or a.gaze_ratio == 0:
        res["their_gaze_at_256"] = their_gaze_at_256(A, dirs, dict(cfg, gaze_ratio=1.0))
    names = ["recipe"] + [f"only-{d}" for d in DIFFERENCES]
    if a.variants != "all":
        names = a.variants.split(",")
    ours = {}
    for n in names:
        if n != "recipe" and not (n.startswith("only-") and n[5:] in DIFFERENCES):
            p.error(f"unknown variant {n!r}: recipe or only-<{'|'.join(DIFFERENCES)}>")
        keep = {n[5:]} if n.startswith("only-") else set()
        print(f"[parity] our run: {n}", file=sys.stderr, flush=True)
        ours[n] = run_ours(a, data, dirs, work, keep, n)
    res["batch_checks"] = batch_checks(theirs["first_batch"], ours[names[0]]["first_batch"], a.image_size)
    res["theirs_sentences"] = theirs.pop("sentences")
    theirs.pop("first_batch")
    for o in ours.values():
        o.pop("first_batch")
    res["theirs"] = theirs
    res["ours"] = ours
    res["max_abs_diff"] = {n: {k: max(abs(x - y) for x, y in zip(o[k], theirs[k]))
                               for k in ("loss", "contrastive", "gaze_mlce", "grad_norm")} for n, o in ours.items()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    md = markdown(res)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
