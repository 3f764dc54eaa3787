"""The authors' pipeline as options (docs/recipes.md): image tokens before the final LayerNorm, the pooled
token through the shared projection, the text pooling and sentence rule, the gaze label rule, the in-place
temperature clamp. Tiny models only."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from egma_model import gaze as gz
from egma_model.data import normalize_image, split_sentences, split_sentences_egma, split_sentences_medclip
from egma_model.model import EGMAConfig, EGMAModel


def _tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("image_size", 224 if kw.get("image_library") == "transformers" else 64)
    return EGMAModel(EGMAConfig.tiny(**kw)).eval()


# ------------------------------------------------------------------ image side


def test_timm_pre_layernorm_tokens():
    pre, post = _tiny(patch_norm="pre"), _tiny()
    post.load_state_dict(pre.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fp, fq = pre._image_features(x)[0], post._image_features(x)[0]
        enc = pre.image_encoder
        h = enc.layers(enc.patch_embed(x))  # NHWC, the last stage's output before the final norm
        hand_pre = h.permute(0, 3, 1, 2)
        hand_post = enc.norm(h).permute(0, 3, 1, 2)
    torch.testing.assert_close(fp, hand_pre, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fq, hand_post, rtol=1e-5, atol=1e-5)
    assert (fp - fq).abs().max() > 0.1


def test_transformers_pre_layernorm_tokens():
    pre = _tiny(patch_norm="pre", image_library="transformers")
    post = _tiny(image_library="transformers")
    post.load_state_dict(pre.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = pre.image_encoder(pixel_values=x, output_hidden_states=True)
        fp, fq = pre._image_features(x)[0], post._image_features(x)[0]
    B, C, gh, gw = fp.shape
    torch.testing.assert_close(fp.flatten(2).transpose(1, 2), out.hidden_states[-1])
    torch.testing.assert_close(fq.flatten(2).transpose(1, 2), out.last_hidden_state)
    assert (fp - fq).abs().max() > 0.1


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_pooled_token_through_the_shared_projection(library):
    m = _tiny(image_library=library, patch_norm="pre", image_global="pooler", proj_bias=False)
    x = torch.randn(2, 3, m.config.image_size, m.config.image_size)
    with torch.no_grad():
        g = m.encode_image_global(x)
        if library == "transformers":
            pooled = m.image_encoder(pixel_values=x).pooler_output
        else:
            pooled = m._final_norm(m._image_features(x)[0]).flatten(2).mean(2)
        hand = F.normalize(pooled @ m.image_proj[0].weight.t(), dim=-1)
    assert m.image_proj[0].bias is None and m.text_proj.bias is None
    torch.testing.assert_close(g, hand, rtol=1e-5, atol=1e-6)
    # the default global embedding (mean of projected patches) is a different vector
    m2 = _tiny(image_library=library, patch_norm="pre", proj_bias=False)
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert (m2.encode_image_global(x) - g).abs().max() > 1e-3


def test_normalisation_configurable():
    x = torch.full((1, 4, 4), 0.7)
    torch.testing.assert_close(normalize_image(x, 0.5863, 0.2795), torch.full((3, 4, 4), (0.7 - 0.5863) / 0.2795))
    torch.testing.assert_close(normalize_image(x), torch.full((3, 4, 4), (0.7 - 0.449) / 0.226))
    with pytest.raises(ValueError, match="image_std"):
        EGMAConfig(image_std=0.0)
    with pytest.raises(ValueError, match="patch_norm"):
        EGMAConfig(patch_norm="middle")


# ------------------------------------------------------------------ text side


def test_text_pooling_last4_over_all_positions():
    m = _tiny(text_pooling="last4_all", text_config=dict(num_hidden_layers=5), proj_bias=False)
    ids = torch.tensor([[2, 7, 8, 9, 3, 0, 0], [2, 10, 11, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        e = m.encode_sentences(ids, mask, normalize=False)
        hs = m.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        assert len(hs) == 6
        hand = ((hs[2] + hs[3] + hs[4] + hs[5]) / 4).sum(1) / ids.shape[1]  # padding positions counted
        torch.testing.assert_close(e, hand @ m.text_proj.weight.t(), rtol=1e-5, atol=1e-6)
        m.config.text_pooling = "masked_mean"
        last = hs[-1]
        mm = (last * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(m.encode_sentences(ids, mask, normalize=False), mm @ m.text_proj.weight.t(),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="4 encoder layers"):
        _tiny(text_pooling="last4_all", text_config=dict(num_hidden_layers=2)).encode_sentences(ids, mask)


REPORT = ("FINDINGS: 1. The lungs are clear. 2. No pleural effusion or pneumothorax.\n"
          "Heart size is normal; mediastinal contours unchanged since 2.5 cm prior. IMPRESSION: No acute process!")


def test_split_rule_egma_on_a_fixed_report():
    assert split_sentences_egma(REPORT) == [
        "findings :", "the lungs are clear", "no pleural effusion or pneumothorax",
        "heart size is normal ; mediastinal contours unchanged since 2 . 5 cm prior",
        "impression : no acute process !",
    ]
    assert split_sentences_medclip(REPORT) == [
        "no pleural effusion or pneumothorax",
        "heart size is normal ; mediastinal contours unchanged since 2 . 5 cm prior",
        "impression : no acute process !",
    ]
    # 4 tokens or fewer are dropped; non-ASCII characters removed; "3.Left" is a numbered marker
    assert split_sentences_medclip("Lungs are clear. 3.Left basilar opacity, likely atelectasis") == [
        "eft basilar opacity , likely atelectasis"]
    assert split_sentences_medclip("Small left effusion \u2013 unchanged from before") == [
        "small left effusion unchanged from before"]


def test_split_rule_ours_on_the_same_report():
    assert split_sentences(REPORT) == [
        "1.", "The lungs are clear.", "2.", "No pleural effusion or pneumothorax.", "Heart size is normal",
        "mediastinal contours unchanged since 2.5 cm prior.", "No acute process!"]


# ------------------------------------------------------------------ gaze labels


def _aa_bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased bilinear downsampling as a matrix ``(n_out, n_in)``, written out: each output pixel
    ``i`` averages the inputs ``j`` with a triangle weight ``1 - |(j + 0.5 - c) / s|`` (``c = s (i + 0.5)``,
    ``s = n_in / n_out``) over ``[c - s, c + s)``, normalised to sum 1."""
    s = n_in / n_out
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = s * (i + 0.5)
        lo, hi = max(int(c - s + 0.5), 0), min(int(c + s + 0.5), n_in)
        for j in range(lo, hi):
            W[i, j] = max(0.0, 1.0 - abs((j + 0.5 - c) / s))
        W[i] /= W[i].sum()
    return W


def test_label_rule_on_one_gaussian_fixation():
    # one fixation at (300, 420) px of a 1000x800 image: the square frame is 1000 px, the heatmap 56x56
    fix = np.array([[0.0, 0.4, 300.0, 420.0]])
    maps, fell = gz.sentence_heatmaps(fix, [(0.0, 1.0)], (1000, 800), sigma=80.0, resolution=56)
    assert not fell[0]
    W = _aa_bilinear_weights(56, 7)
    hand = W @ maps[0].astype(np.float64) @ W.T
    ref = F.interpolate(torch.from_numpy(maps)[:, None], size=(7, 7), mode="bilinear", antialias=True,
                        align_corners=False)[0, 0].double().numpy()
    np.testing.assert_allclose(ref, hand, rtol=1e-5, atol=1e-7)  # the hand computation is torch's resize
    got = gz.to_patch_grid(maps, (7, 7), min_heat=0.0, resize="bilinear_antialias")[0].double().numpy()
    np.testing.assert_allclose(got, (hand / hand.max()).reshape(-1), rtol=1e-5, atol=1e-7)
    pos_theirs = set(np.flatnonzero(hand.reshape(-1) > 0))
    assert set(np.flatnonzero(got > 0)) == pos_theirs
    ours = gz.to_patch_grid(maps, (7, 7))[0].numpy()
    # the triangle filter reaches one input pixel further than area averaging, and nothing is cut at 0.1
    assert set(np.flatnonzero(ours > 0)) < pos_theirs
    with pytest.raises(ValueError, match="resize"):
        gz.to_patch_grid(maps, (7, 7), resize="nearest")


# ------------------------------------------------------------------ temperature


def test_temperature_clamped_in_place_keeps_its_gradient():
    for mode, grad_nonzero in (("in_place", True), ("at_use", False)):
        m = _tiny(temperature_clamp=mode).train()
        with torch.no_grad():
            m.logit_scale.fill_(5.0)  # above ln 100
        t = m.scale()
        assert abs(float(t.detach()) - 100.0) < 1e-3
        t.backward()
        assert (float(m.logit_scale.grad) != 0.0) == grad_nonzero
        if mode == "in_place":
            assert abs(float(m.logit_scale.detach()) - math.log(100.0)) < 1e-6
        else:
            assert float(m.logit_scale.detach()) == 5.0
