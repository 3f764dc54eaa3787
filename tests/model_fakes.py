"""Tiny models, a hub cache and a MedCLIP-layout checkpoint for the egma_model tests (offline, random weights).

The fake dataset trees in the published layouts are written by the dataset modules themselves
(``egma_model.datasets.<family>.write_fake_tree``; all of them: ``egma_model.datasets.registry.write_fake_trees``);
the ``make_*`` names and constants below are aliases of those for the tests that use them.
"""

import os
import shutil

import torch

from egma_model.datasets._fakes import REPORT, write_csv  # noqa: F401
from egma_model.datasets.chexpert import write_fake_tree as make_chexpert  # noqa: F401
from egma_model.datasets.egd_cxr import FAKE_FIXATION_HEADER as EGD_FIX_HEADER  # noqa: F401
from egma_model.datasets.egd_cxr import write_fake_tree as make_egd_cxr  # noqa: F401
from egma_model.datasets.mimic_cxr import FAKE_ITEMS as MIMIC_ITEMS  # noqa: F401
from egma_model.datasets.mimic_cxr import write_fake_tree as make_mimic_cxr_jpg  # noqa: F401
from egma_model.datasets.mimic_eye import write_fake_tree as make_mimic_eye  # noqa: F401
from egma_model.datasets.reflacx import FAKE_OFF_IMAGE as REFLACX_OFF_IMAGE  # noqa: F401
from egma_model.datasets.reflacx import write_fake_tree as make_reflacx  # noqa: F401
from egma_model.datasets.registry import write_fake_trees as make_all  # noqa: F401
from egma_model.datasets.rsna import write_fake_tree as make_rsna  # noqa: F401
from egma_model.datasets.siim import write_fake_tree as make_siim  # noqa: F401
from egma_model.model import TINY_BERT, TINY_HF_SWIN

COMMIT = "0123456789abcdef0123456789abcdef01234567"
WORDS = ["the heart is enlarged", "no pleural effusion", "clear lungs", "there is pneumonia", "pneumothorax",
         "atelectasis", "cardiomegaly", "edema", "consolidation", "normal chest"]


def put_in_hub_cache(cache: str, repo_id: str, src_dir: str) -> None:
    """Copy a saved model folder into a hub cache as revision ``main`` of ``repo_id``."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", COMMIT)
    shutil.copytree(src_dir, snap)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(COMMIT)


def save_tiny_bert(path: str, seed: int = 0) -> None:
    from transformers import BertConfig, BertModel

    from egma_model import build_word_tokenizer

    tok = build_word_tokenizer(WORDS, save_dir=path)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(tok), **TINY_BERT)).save_pretrained(path)


def save_tiny_hf_swin(path: str, seed: int = 0) -> None:
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(seed)
    d = dict(TINY_HF_SWIN)
    d.pop("model_type")
    SwinModel(SwinConfig(**d)).save_pretrained(path)


def medclip_state_dict(swin_dir: str, bert_dir: str, *, embed_dim: int = 512, legacy_buffers: bool = True,
                       seed: int = 1):
    """A state dict in the layout of ``medclip.MedCLIPModel(vision_cls=MedCLIPVisionModelViT)``
    (medclip 0.0.3, ``modeling_medclip.py``) around the saved tiny Swin and BERT.

    The encoders' tensors are taken from their saved files (``save_pretrained`` writes the classic key
    names older transformers used); ``legacy_buffers`` adds the buffers transformers 4.x also saved
    (Swin's ``relative_position_index``, BERT's ``position_ids``), as in MedCLIP's released checkpoint.
    The projection heads are bias-free ``Linear(hidden, embed_dim)``; ``logit_scale`` is a scalar.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    sd = {}
    for prefix, d in (("vision_model.model.", swin_dir), ("text_model.model.", bert_dir)):
        for k, v in load_file(os.path.join(d, "model.safetensors")).items():
            sd[prefix + k] = v
    g = torch.Generator().manual_seed(seed)
    sc, bc = AutoConfig.from_pretrained(swin_dir), AutoConfig.from_pretrained(bert_dir)
    if legacy_buffers:
        ws = sc.window_size
        for i, depth in enumerate(sc.depths):
            for j in range(depth):
                sd[f"vision_model.model.encoder.layers.{i}.blocks.{j}.attention.self.relative_position_index"] = \
                    torch.zeros(ws * ws, ws * ws, dtype=torch.long)
        sd["text_model.model.embeddings.position_ids"] = torch.arange(bc.max_position_embeddings)[None]
    swin_width = int(sc.embed_dim * 2 ** (len(sc.depths) - 1))
    sd["vision_model.projection_head.weight"] = torch.randn(embed_dim, swin_width, generator=g) * 0.05
    sd["text_model.projection_head.weight"] = torch.randn(embed_dim, bc.hidden_size, generator=g) * 0.05
    sd["logit_scale"] = torch.tensor(3.2)
    return sd

