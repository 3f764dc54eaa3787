"""EGMAModel: grids, shapes, the loss, an optimisation step, checkpoints."""

import pytest
import torch

import egma_kernels
from egma_model import EGMAConfig, EGMAModel


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(0)
    return EGMAModel(EGMAConfig.tiny(vocab_size=60, scales=(-1, 2, 1)))


def _batch(lengths, P=49, seed=0, image_size=224):
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    gaze = torch.rand(N, P, generator=g) * (torch.rand(N, P, generator=g) < 0.3)
    return {"pixel_values": torch.randn(len(lengths), 3, image_size, image_size, generator=g),
            "input_ids": torch.randint(5, 60, (N, 9), generator=g),
            "attention_mask": (torch.arange(9)[None] < torch.randint(3, 10, (N, 1), generator=g)).long(),
            "cu_seqlens": cu, "gaze": gaze, "gaze_mask": torch.tensor([True] * (len(lengths) - 1) + [False])}


def test_swin_grids_and_shapes(swin):
    assert swin.grids == [(7, 7), (14, 14), (28, 28)]  # config order; the first is the main scale
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        p = swin.encode_image(x)
        ps = swin.encode_image(x, all_scales=True)
        g = swin.encode_image_global(x)
        s = swin.encode_sentences(torch.randint(5, 60, (5, 7)), torch.ones(5, 7, dtype=torch.long))
    assert p.shape == (2, 49, 64) and [t.shape[1] for t in ps] == [49, 196, 784]
    assert g.shape == (2, 64) and s.shape == (5, 64)
    for t in (p, g, s):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]))


def test_vit_grid():
    m = EGMAModel(EGMAConfig.tiny("vit_base_patch16_224", vocab_size=60))
    assert m.grid == (14, 14)
    with torch.no_grad():
        assert m.encode_image(torch.randn(1, 3, 224, 224)).shape == (1, 196, 64)


def test_temperature_init_and_clamp(swin):
    assert float(swin.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    m = EGMAModel(EGMAConfig.tiny(vocab_size=60))
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
        assert float(m.scale().detach()) == pytest.approx(100.0, rel=1e-5)
        m.logit_scale.fill_(-3.0)
        assert float(m.scale().detach()) == pytest.approx(1.0)


def test_forward_matches_the_kernel_loss_on_the_main_scale():
    torch.manual_seed(1)
    m = EGMAModel(EGMAConfig.tiny(vocab_size=60)).eval()
    b = _batch([2, 3, 1])
    with torch.no_grad():
        out = m(b)
        pe = m.encode_image(b["pixel_values"])
        se = m.encode_sentences(b["input_ids"], b["attention_mask"])
        ref = egma_kernels.fine_grained_loss(pe, se, b["cu_seqlens"], m.scale(), b["gaze"], b["gaze_mask"],
                                             return_details=True)
    torch.testing.assert_close(out["loss"], ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["gaze_mlce"], ref.gaze_mlce, rtol=1e-5, atol=1e-5)
    assert out["global"] == 0
    # without gaze the MLCE term vanishes
    m.config.use_gaze = False
    with torch.no_grad():
        assert float(m(b)["gaze_mlce"]) == 0.0


def test_multiscale_pools_gaze_and_rejects_mismatched_grids(swin):
    b = _batch([2, 2], P=28 * 28)  # gaze on the finest grid, pooled to 14x14 and 7x7
    with torch.no_grad():
        out = swin(b)
    assert {"contrastive@7x7", "contrastive@14x14", "contrastive@28x28"} <= set(out)
    total = sum(out[f"{k}@{g}"] for k in ("contrastive", "gaze_mlce", "mapping") for g in ("7x7", "14x14", "28x28"))
    torch.testing.assert_close(out["loss"], total, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"gaze has 100 columns, which is not the image encoder's 7x7 grid"):
        swin(_batch([2, 2], P=100))


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    m = EGMAModel(EGMAConfig.tiny(vocab_size=60, global_weight=0.5))
    b = _batch([3, 2, 2, 1], seed=3)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    with torch.no_grad():
        m.eval()
        before = float(m(b)["loss"])
    m.train()
    out = m(b)
    assert out["global"] > 0
    out["loss"].backward()
    assert m.logit_scale.grad is not None and m.image_proj[0].weight.grad.abs().sum() > 0
    assert next(m.text_encoder.parameters()).grad is not None
    opt.step()
    m.eval()
    with torch.no_grad():
        after = float(m(b)["loss"])
    assert after < before - 1e-3, (before, after)


def test_checkpoint_round_trip(tmp_path):
    from egma_model.tokenizer import build_word_tokenizer, load_tokenizer

    tok = build_word_tokenizer(["the heart is enlarged.", "small left effusion."])
    torch.manual_seed(0)
    m = EGMAModel(EGMAConfig.tiny(vocab_size=len(tok), scales=(-1, 2), global_weight=0.3)).eval()
    with torch.no_grad():
        m.logit_scale.fill_(3.0)
    m.save_pretrained(str(tmp_path / "ck"), tokenizer=tok)
    m2 = EGMAModel.from_pretrained(str(tmp_path / "ck")).eval()
    tok2 = load_tokenizer(str(tmp_path / "ck" / "tokenizer"))
    import json

    def norm(c):
        d = json.loads(json.dumps(c.to_dict()))
        d.pop("text_config")
        return d

    assert norm(m2.config) == norm(m.config) and m2.config.vocab_size == len(tok)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    b = _batch([2, 1], P=196, seed=5)  # gaze on the finest grid
    enc = tok2(["the heart is enlarged.", "small left effusion.", "the heart"], padding=True, return_tensors="pt")
    assert enc["input_ids"].tolist() == tok(["the heart is enlarged.", "small left effusion.", "the heart"],
                                            padding=True, return_tensors="pt")["input_ids"].tolist()
    b["input_ids"], b["attention_mask"] = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        torch.testing.assert_close(m(b)["loss"], m2(b)["loss"])
    with pytest.raises(FileNotFoundError, match="not an EGMA checkpoint"):
        EGMAModel.from_pretrained(str(tmp_path))


def test_local_text_model_path(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(str(tmp_path / "bert"))
    m = EGMAModel(EGMAConfig.tiny(text_model=str(tmp_path / "bert")))
    assert m.text_encoder.config.hidden_size == 32
    with pytest.raises(FileNotFoundError, match="text encoder directory not found"):
        EGMAModel(EGMAConfig.tiny(text_model=str(tmp_path / "nope")))


def test_local_image_weights(tmp_path):
    import timm

    from egma_model.model import TINY_VIT

    src = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=112, **TINY_VIT)
    torch.save(src.state_dict(), str(tmp_path / "vit.pth"))
    m = EGMAModel(EGMAConfig.tiny("vit_base_patch16_224", image_size=112, image_weights=str(tmp_path / "vit.pth"),
                                  vocab_size=50))
    sd = m.image_encoder.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items() if not k.startswith("head"))
    with pytest.raises(FileNotFoundError, match="image encoder weights not found"):
        EGMAModel(EGMAConfig.tiny(image_weights=str(tmp_path / "nope.pth")))
