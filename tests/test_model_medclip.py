"""MedCLIP-ViT checkpoint -> EGMAModel: every tensor lands where MedCLIP uses it, nothing is dropped silently.

The checkpoint is built in MedCLIP's layout (``model_fakes.medclip_state_dict``) from tiny randomly
initialised Swin and BERT models; the checks compare the EGMA model's outputs with what MedCLIP's classes
compute from the same tensors (``MedCLIPVisionModelViT.forward``: projection of Swin's ``pooler_output``).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from egma_model import EGMAConfig, EGMAModel
from egma_model.medclip import MedCLIPInitError, init_from_medclip
from model_fakes import medclip_state_dict, save_tiny_bert, save_tiny_hf_swin


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("medclip")
    swin, bert = str(root / "swin"), str(root / "bert")
    save_tiny_hf_swin(swin, seed=3)
    save_tiny_bert(bert, seed=4)
    sd = medclip_state_dict(swin, bert)
    os.makedirs(root / "medclip-vit")
    path = str(root / "medclip-vit" / "pytorch_model.bin")
    torch.save(sd, path)
    # the model starts from differently seeded encoders, so a tensor that is not loaded shows
    save_tiny_hf_swin(str(root / "swin0"), seed=11)
    save_tiny_bert(str(root / "bert0"), seed=12)
    return {"root": root, "swin": swin, "bert": bert, "sd": sd, "path": path,
            "swin0": str(root / "swin0"), "bert0": str(root / "bert0")}


def _model(fake, **kw):
    kw.setdefault("embed_dim", 512)
    kw.setdefault("proj_bias", False)
    return EGMAModel(EGMAConfig.tiny(image_library="transformers", image_model=fake["swin0"],
                                     text_model=fake["bert0"], **kw))


def test_medclip_keys_map_onto_the_model(fake):
    from transformers import AutoModel

    m = _model(fake)
    rep = init_from_medclip(m, os.path.dirname(fake["path"]))  # the folder works like the file
    assert rep["missing"] == [] and rep["zeroed"] == []
    # every checkpoint key is mapped or listed as unused with a reason; unused = pooler and old buffers only
    assert set(rep["mapped"]) | set(rep["unused"]) == set(fake["sd"])
    assert not set(rep["mapped"]) & set(rep["unused"])
    unused = set(rep["unused"])
    assert {k for k in unused if "pooler" in k} == {"text_model.model.pooler.dense.weight",
                                                    "text_model.model.pooler.dense.bias"}
    assert "text_model.model.embeddings.position_ids" in unused
    assert all(k.endswith("relative_position_index") or "pooler" in k or k.endswith("position_ids") for k in unused)
    assert sum(k.endswith("relative_position_index") for k in unused) == 4

    m.eval()
    swin = AutoModel.from_pretrained(fake["swin"]).eval()
    bert = AutoModel.from_pretrained(fake["bert"]).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(5, 20, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    sd = fake["sd"]
    with torch.no_grad():
        out = swin(pixel_values=x)
        # MedCLIPVisionModelViT.forward: projection_head(pooler_output); EGMA's global = mean of projected patches
        medclip_img = F.normalize(out.pooler_output @ sd["vision_model.projection_head.weight"].t(), dim=-1)
        torch.testing.assert_close(m.encode_image_global(x), medclip_img, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m._image_features(x)[0].flatten(2).transpose(1, 2), out.last_hidden_state)
        h = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = F.normalize(h.mean(1) @ sd["text_model.projection_head.weight"].t(), dim=-1)
        torch.testing.assert_close(m.encode_sentences(ids, mask), ref, rtol=1e-5, atol=1e-5)
    assert float(m.logit_scale.detach()) == pytest.approx(3.2)


def test_bias_and_extra_scales_are_reported(fake):
    m = _model(fake, proj_bias=True, scales=(-1, 2))
    with torch.no_grad():
        m.image_proj[0].bias.fill_(1.0)
    rep = init_from_medclip(m, fake["path"])
    assert rep["zeroed"] == ["image_proj.0.bias", "text_proj.bias"]
    assert float(m.image_proj[0].bias.detach().abs().max()) == 0.0
    assert rep["missing"] == ["image_proj.1.weight", "image_proj.1.bias"]
    with pytest.raises(MedCLIPInitError, match="missing"):
        init_from_medclip(m, fake["path"], strict=True)


def test_bad_checkpoints_are_named(fake, tmp_path):
    with pytest.raises(MedCLIPInitError, match="embed_dim must be 512"):
        init_from_medclip(_model(fake, embed_dim=64), fake["path"])
    with pytest.raises(MedCLIPInitError, match="image_library='transformers'"):
        init_from_medclip(EGMAModel(EGMAConfig.tiny(text_model=fake["bert0"], embed_dim=512)), fake["path"])
    bad = dict(fake["sd"])
    bad["vision_model.model.embeddings.patch_embeddings.projection.weight"] = torch.zeros(5, 3, 4, 4)
    torch.save(bad, str(tmp_path / "bad.bin"))
    with pytest.raises(MedCLIPInitError, match="patch_embeddings"):
        init_from_medclip(_model(fake), str(tmp_path / "bad.bin"))
    torch.save({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.bin"))
    with pytest.raises(MedCLIPInitError, match="not a MedCLIP checkpoint"):
        init_from_medclip(_model(fake), str(tmp_path / "other.bin"))
    with pytest.raises(FileNotFoundError, match="MedCLIP checkpoint not found"):
        init_from_medclip(_model(fake), str(tmp_path / "none.bin"))
