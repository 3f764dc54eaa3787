"""The options that make ``--recipe authors-code`` train as the authors' code: sentence padding, the warm-up
rule, the sentence split rule and the normalisation constants, on fixed examples and hand computations."""

import math

import pytest
import torch

from egma_model import data as dm
from egma_model.recipes import TRAIN
from egma_model.tokenizer import build_word_tokenizer
from egma_model.train import TrainArgs, cosine_with_warmup, pads_to_max_length, resolve_warmup

# ------------------------------------------------------------------ sentence padding

SENTS = [["heart size normal", "no effusion"], ["there is a small left pleural effusion ."]]


def _items(sents):
    return [{"sentences": s, "gaze": None, "labels": None, "index": i,
             "pixel_values": torch.zeros(3, 4, 4)} for i, s in enumerate(sents)]


def test_text_padding_longest_pads_to_the_batchs_longest_sentence():
    tok = build_word_tokenizer([s for r in SENTS for s in r])
    # [CLS] + 8 words + [SEP] = 10 tokens for the longest sentence
    longest = dm.Collator(tok, max_length=77, pad_to_max_length=pads_to_max_length("last4_all", "longest"))
    b = longest(_items(SENTS))
    assert b["input_ids"].shape == (3, 10)
    assert b["attention_mask"].sum(1).tolist() == [5, 4, 10]
    assert b["input_ids"][1, 4:].tolist() == [tok.pad_token_id] * 6
    # a batch of the two short sentences only is padded to 5, not 10
    assert longest(_items(SENTS[:1]))["input_ids"].shape == (2, 5)
    full = dm.Collator(tok, max_length=77, pad_to_max_length=pads_to_max_length("last4_all", "max_length"))
    assert full(_items(SENTS))["input_ids"].shape == (3, 77)
    assert full(_items(SENTS[:1]))["input_ids"].shape == (2, 77)
    # same ids where both have tokens
    torch.testing.assert_close(full(_items(SENTS))["input_ids"][:, :10], b["input_ids"], rtol=0, atol=0)


def test_text_padding_only_matters_for_last4_all():
    assert pads_to_max_length("last4_all", "max_length") is True
    assert pads_to_max_length("last4_all", "longest") is False
    assert pads_to_max_length("masked_mean", "max_length") is False
    assert pads_to_max_length(None, "max_length") is False
    with pytest.raises(ValueError, match="text padding"):
        pads_to_max_length("last4_all", "shortest")


def test_recipes_text_padding():
    assert TrainArgs(manifest="", out="").text_padding == "max_length"
    assert TRAIN["ours"]["text_padding"] == "max_length"
    assert TRAIN["authors-code"]["text_padding"] == "longest"


# ------------------------------------------------------------------ warm-up rule


def _lrs(rule, total, warmup, lr=1e-5):
    m = torch.nn.Linear(1, 1)
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, warmup, rule=rule))
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_transformers_warmup_rule_by_hand():
    # 4 steps, ratio 0.1: ceil(0.4) = 1 warm-up step at lr 0, then cos over 3 steps:
    # 0.5 (1 + cos(pi k / 3)) for k = 0, 1, 2 -> 1, 0.75, 0.25 (the parity run's 0, 1e-5, 7.5e-6, 2.5e-6)
    a = TrainArgs(manifest="", out="", warmup_ratio=0.1, warmup_rule="transformers")
    assert resolve_warmup(a, 4, 2) == 1
    assert _lrs("transformers", 4, 1) == pytest.approx([0.0, 1e-5, 7.5e-6, 2.5e-6], rel=1e-12, abs=1e-20)
    # 20 steps, ratio 0.1 -> 2 warm-up steps: 0, 1/2, then 0.5 (1 + cos(pi k / 18))
    assert resolve_warmup(dict_args(warmup_ratio=0.1, warmup_rule="transformers"), 20, 5) == 2
    want = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * k / 18)) for k in range(18)]
    assert [cosine_with_warmup(s, 20, 2, rule="transformers") for s in range(20)] == pytest.approx(want, abs=1e-15)
    # ratio 0.15 of 10 steps: ceil(1.5) = 2 (transformers), round(1.5) = 2; of 30 steps: ceil(4.5) = 5, round = 4
    assert resolve_warmup(dict_args(warmup_ratio=0.15, warmup_rule="transformers"), 30, 3) == 5
    assert resolve_warmup(dict_args(warmup_ratio=0.15), 30, 3) == 4
    assert resolve_warmup(dict_args(warmup_epochs=0.5, warmup_rule="transformers"), 30, 3) == 2
    # ours: round(0.4) = 0 warm-up steps, the cosine starts at 1
    assert resolve_warmup(dict_args(warmup_ratio=0.1), 4, 2) == 0
    assert _lrs("ours", 4, 0) == pytest.approx([1e-5, 0.5 * (1 + math.cos(math.pi / 4)) * 1e-5, 5e-6,
                                               0.5 * (1 + math.cos(3 * math.pi / 4)) * 1e-5], rel=1e-12)
    # ours with a warm-up starts at lr / warmup
    assert cosine_with_warmup(0, 20, 2) == 0.5 and cosine_with_warmup(1, 20, 2) == 1.0
    with pytest.raises(ValueError, match="warm-up rule"):
        cosine_with_warmup(0, 20, 2, rule="linear")


def dict_args(**kw):
    return TrainArgs(manifest="", out="", **kw)


def test_transformers_warmup_rule_equals_get_cosine_schedule_with_warmup():
    transformers = pytest.importorskip("transformers")
    for total, ratio in ((4, 0.1), (20, 0.1), (93, 0.1), (7, 0.5), (10, 0.0)):
        warmup = resolve_warmup(dict_args(warmup_ratio=ratio, warmup_rule="transformers"), total, 1)
        assert warmup == math.ceil(total * ratio)
        m = torch.nn.Linear(1, 1)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
        ref = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
        want = []
        for _ in range(total):
            want.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
        assert _lrs("transformers", total, warmup) == pytest.approx(want, rel=1e-12, abs=1e-20), (total, ratio)


def test_recipes_warmup_rule():
    assert TrainArgs(manifest="", out="").warmup_rule == "ours"
    assert TRAIN["ours"]["warmup_rule"] == "ours"
    assert TRAIN["authors-code"]["warmup_rule"] == "transformers"


# ------------------------------------------------------------------ sentence split


def test_egma_split_keeps_every_piece_with_a_token():
    r = "Heart size normal. No effusion. No pneumothorax ."
    assert dm.split_sentences_egma(r) == ["heart size normal", "no effusion", "no pneumothorax ."]
    assert dm.split_sentences_medclip(r) == []
    r2 = "1. Heart size normal. 2. No effusion. 3. There is a small left pleural effusion."
    assert dm.split_sentences_egma(r2) == ["heart size normal", "no effusion", "there is a small left pleural effusion ."]
    assert dm.split_sentences_medclip(r2) == ["there is a small left pleural effusion ."]
    r3 = "FINDINGS: Lungs clear. The cardiac silhouette is mildly enlarged. No pneumothorax."
    assert dm.split_sentences_egma(r3) == ["findings : lungs clear", "the cardiac silhouette is mildly enlarged",
                                           "no pneumothorax ."]
    # pieces with no token (an empty piece, a lone non-ASCII character) are dropped; one token is kept
    # (the same output as their _split_report_into_segment on these strings)
    assert dm.split_sentences_egma("Stable. . \u2013. Clear. .") == ["stable", "clear", "."]
    assert dm.split_sentences_egma("Stable. . \u2013. Clear. .", min_tokens=2) == []
    assert dm.split_sentences_egma("") == [] and dm.split_sentences_egma(None) == []
    assert dm.SPLIT_RULES["egma"] is dm.split_sentences_egma


def test_egma_split_through_the_manifest(tmp_path):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    m = tmp_path / "m.csv"
    m.write_text('image,report\na.png,"Heart size normal. No effusion. There is a small left pleural effusion."\n')
    assert dm.load_manifest(str(m), split_rule="egma")[0].sentences == [
        "heart size normal", "no effusion", "there is a small left pleural effusion ."]
    assert dm.load_manifest(str(m), split_rule="medclip")[0].sentences == ["there is a small left pleural effusion ."]
    assert TRAIN["authors-code"]["split_rule"] == "egma"


# ------------------------------------------------------------------ normalisation


def test_authors_code_normalisation_is_their_constants_unrounded():
    a = TRAIN["authors-code"]
    assert (a["image_mean"], a["image_std"]) == (0.5862785803043838, 0.27950088968644304)
    x = torch.full((1, 2, 2), 0.7)
    torch.testing.assert_close(dm.normalize_image(x, a["image_mean"], a["image_std"]),
                               torch.full((3, 2, 2), (0.7 - 0.5862785803043838) / 0.27950088968644304))
