"""Metrics against hand-computed values, the tasks, and the egma-train / egma-eval CLIs end to end."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from egma_model import evaluate as ev
from egma_model.model import WEIGHTS_NAME
from egma_model.train import cosine_with_warmup


def test_accuracy_confusion_and_macro_f1_by_hand():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 0, 2]
    assert ev.accuracy(y, p) == pytest.approx(4 / 6)
    assert ev.confusion_matrix(y, p, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # class 0: TP1 FP1 FN1 -> 0.5; class 1: TP2 FP1 FN0 -> 0.8; class 2: TP1 FP0 FN1 -> 2/3
    assert ev.macro_f1(y, p, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class never seen nor predicted does not count; one predicted but absent counts with F1 = 0
    assert ev.macro_f1([0, 0], [0, 0], 4) == pytest.approx(1.0)
    assert ev.macro_f1([0, 0], [0, 3], 4) == pytest.approx((2 / 3 + 0) / 2)


def test_precision_at_k_by_hand():
    sim = np.array([[0.9, 0.8, 0.1, 0.5],
                    [0.2, 0.3, 0.9, 0.1]])
    q = ["a", "b"]
    g = ["a", "b", "b", "a"]
    # query 0 ranks 0(a), 1(b), 3(a), 2(b); query 1 ranks 2(b), 1(b), 0(a), 3(a)
    assert ev.precision_at_k(sim, q, g, 1) == pytest.approx(1.0)
    assert ev.precision_at_k(sim, q, g, 2) == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert ev.precision_at_k(sim, q, g, 3) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert ev.precision_at_k(sim, q, g, 10) == pytest.approx(0.5)  # k capped at the gallery size


def test_auroc_by_hand():
    # positives 0.8, 0.4; negatives 0.5, 0.1, 0.4: pairs won 0.8>all (3), 0.4>0.1 (1), tie 0.4=0.4 (0.5) -> 4.5/6
    assert ev.auroc([0.8, 0.5, 0.4, 0.1, 0.4], [1, 0, 1, 0, 0]) == pytest.approx(4.5 / 6)
    assert ev.auroc([1, 2, 3], [1, 1, 1]) != ev.auroc([1, 2, 3], [1, 1, 1])  # NaN with one class
    m, per = ev.mean_auroc(np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.5]]), np.array([[1, 0], [0, 1], [1, 0]]))
    assert per == [1.0, 1.0] and m == 1.0


def test_cosine_schedule():
    assert cosine_with_warmup(0, 100, 10) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 100, 10) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 100, 10) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 100, 10) == pytest.approx(0.0)


def test_linear_probe_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 8, generator=g) * 0.3
    x[torch.arange(300), y] += 2.0
    onehot = torch.nn.functional.one_hot(y, 3).float()
    res = ev.linear_probe(x[:200], onehot[:200], x[200:], onehot[200:], fractions=(0.1, 1.0), seeds=(0, 1))
    assert res["1"]["auroc_mean"] > 0.98 and res["0.1"]["n_train"] == 20
    assert res["0.1"]["auroc_mean"] > 0.9


def test_zero_shot_and_retrieval_with_given_embeddings():
    """zero_shot/retrieval reduce prompt scores as documented (texts encoded by a stub model)."""

    class Stub:
        config = type("C", (), {"max_length": 8})()

    # 2 classes; global scoring only needs "global" embeddings, so patch texts through a fake encode_texts
    images = {"global": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]),
              "labels": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])}
    text_emb = {"a1": [1.0, 0.0], "a2": [0.8, 0.6], "b1": [0.0, 1.0]}
    orig = ev.encode_texts
    ev.encode_texts = lambda model, tok, texts, **kw: {"global": torch.tensor([text_emb[t] for t in texts])}
    try:
        res = ev.zero_shot(Stub(), None, images, {"A": ["a1", "a2"], "B": ["b1"]}, ["A", "B"], scoring="global")
        # image 2: A max(0.6, 0.96) = 0.96 > B 0.8 -> predicted A (wrong)
        assert res["accuracy"] == pytest.approx(2 / 3) and res["confusion_matrix"] == [[1, 0], [1, 1]]
        res = ev.zero_shot(Stub(), None, images, {"A": ["a1", "a2"], "B": ["b1"]}, ["A", "B"], scoring="global",
                           reduce="mean")
        # mean: A (0.6 + 0.96) / 2 = 0.78 < 0.8 -> B (right)
        assert res["accuracy"] == pytest.approx(1.0) and res["macro_f1"] == pytest.approx(1.0)
        r = ev.retrieval(Stub(), None, images, ["A", "B", "B"], [{"text": "a1", "label": "A"},
                                                                {"text": "b1", "label": "B"}], scoring="global")
        assert r["image_to_text_p@1"] == pytest.approx(1.0)  # image 2: b1 0.8 > a1 0.6
        assert r["text_to_image_p@1"] == pytest.approx(1.0) and r["text_to_image_p@5"] == pytest.approx(0.5)
    finally:
        ev.encode_texts = orig


def _tiny_manifest(d, n=12):
    rng = np.random.default_rng(0)
    rows = ["image,report,labels,split"]
    texts = {"Cardiomegaly": "The heart is enlarged. No effusion.", "Effusion": "Small left effusion. Heart normal."}
    for i in range(n):
        c = "Cardiomegaly" if i % 2 else "Effusion"
        a = (rng.random((40, 48)) * 255).astype(np.uint8)
        Image.fromarray(a).save(os.path.join(d, f"img{i}.png"))
        rows.append(f"img{i}.png,{texts[c]},{c},{'test' if i >= 8 else 'train'}")
    with open(os.path.join(d, "m.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    with open(os.path.join(d, "prompts.json"), "w") as f:
        json.dump({"classes": {"Cardiomegaly": ["enlarged heart", "cardiomegaly"], "Effusion": ["pleural effusion"]}}, f)
    return os.path.join(d, "m.csv"), os.path.join(d, "prompts.json")


def test_train_resume_and_eval_clis(tmp_path, capsys):
    from egma_model.eval_cli import main as eval_main
    from egma_model.train_cli import main as train_main

    d = str(tmp_path)
    m, pr = _tiny_manifest(d)
    out = os.path.join(d, "run")
    common = ["--manifest", m, "--split", "train", "--out", out, "--image-model", "vit_base_patch16_224",
              "--image-size", "112", "--batch-size", "4", "--warmup-steps", "1", "--no-progress", "--save-every", "2"]
    assert train_main(common + ["--max-steps", "2"]) == 0
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert {"contrastive", "gaze_mlce", "mapping", "lr", "logit_scale"} <= set(log[0])
    assert train_main(common + ["--max-steps", "3", "--resume"]) == 0
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3]
    capsys.readouterr()
    res_path = os.path.join(d, "eval.json")
    assert eval_main(["--checkpoint", os.path.join(out, "final"), "--manifest", m, "--split", "test", "--prompts", pr,
                      "--tasks", "zeroshot,retrieval,probe", "--train-manifest", m, "--train-split", "train",
                      "--fractions", "0.5,1", "--seeds", "0", "--no-progress", "--out", res_path]) == 0
    res = json.load(open(res_path))
    zs = res["zeroshot"]["fine"]
    assert zs["n_images"] == 4 and 0 <= zs["accuracy"] <= 1 and np.array(zs["confusion_matrix"]).sum() == 4
    assert 0 <= res["retrieval"]["global"]["text_to_image_p@1"] <= 1
    assert set(res["probe"]) == {"0.5", "1"}
    # a bad manifest gives a clear error and exit status 2
    with open(os.path.join(d, "bad.csv"), "w") as f:
        f.write("image,report\nnope.png,Heart normal.\n")
    assert train_main(["--manifest", os.path.join(d, "bad.csv"), "--out", os.path.join(d, "bad-run")]) == 2
    assert "bad.csv: row 2: image file not found" in capsys.readouterr().err


# ------------------------------------------------------------------ egma-eval's output and its refusals


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small random checkpoint (64 px Swin, tiny BERT) and a 12-image manifest with prompts."""
    from egma_model.model import EGMAConfig, EGMAModel
    from egma_model.tokenizer import build_word_tokenizer

    d = str(tmp_path_factory.mktemp("eval"))
    m, pr = _tiny_manifest(d)
    tok = build_word_tokenizer(["the heart is enlarged", "small left pleural effusion", "cardiomegaly"])
    torch.manual_seed(0)
    model = EGMAModel(EGMAConfig.tiny(image_size=64, vocab_size=len(tok)))
    ckpt = os.path.join(d, "ckpt")
    model.save_pretrained(ckpt, tokenizer=tok)
    return ckpt, m, pr


def test_eval_prints_a_table_and_writes_the_record(tiny_checkpoint, capsys):
    ckpt, m, pr = tiny_checkpoint
    assert ev.main(["--checkpoint", ckpt, "--manifest", m, "--split", "test", "--prompts", pr, "--no-progress",
                    "--tasks", "zeroshot,retrieval,probe", "--train-manifest", m, "--train-split", "train",
                    "--fractions", "1", "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    path = os.path.join(ckpt, "eval-m-test.json")  # the default --out: beside the model, named by the manifest
    res = json.load(open(path))
    assert res["zeroshot"]["fine"]["confusion_matrix"] and res["n_images"] == 4
    lines = out.splitlines()
    assert len(lines) < 25 and "{" not in out  # a table, not the JSON record
    assert lines[1].split() == ["task", "scoring", "metric", "value"]
    acc = res["zeroshot"]["global"]["accuracy"]
    assert any(l.split()[:3] == ["zeroshot", "global", "accuracy"] and l.endswith(f"{acc:.4f}") for l in lines)
    p1 = res["retrieval"]["fine"]["text_to_image_p@1"]
    assert any(l.split()[:3] == ["retrieval", "fine", "text->image"] and "P@1 " in l and l.endswith(f"{p1:.4f}")
               for l in lines)
    assert any(l.startswith("probe") and "100% labels" in l for l in lines)
    assert lines[-1].endswith(path)


def _no_encoding(*args, **kwargs):
    raise AssertionError("encoding started before the inputs were checked")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


BAD_INPUTS = {
    # name: (change to the good command line, given the fixture's folder; fragment of the one-line error)
    "missing checkpoint": (lambda d, c: {"--checkpoint": os.path.join(d, "nope")}, "checkpoint folder not found"),
    "truncated weights": (lambda d, c: {"--checkpoint": c}, "cannot load the checkpoint"),
    "prompts a list": (lambda d, c: {"--prompts": _write(os.path.join(d, "p1.json"), "[1, 2]")}, "needs 'classes'"),
    "prompts classes a list": (lambda d, c: {"--prompts": _write(os.path.join(d, "p2.json"), '{"classes": ["a"]}')},
                               "needs 'classes'"),
    "prompts queries not a list": (lambda d, c: {"--prompts": _write(os.path.join(d, "p3.json"),
                                                                    '{"classes": {"Effusion": ["x"]}, "queries": 3}')},
                                   "'queries' must be a list"),
    "prompt classes not in the manifest": (
        lambda d, c: {"--prompts": _write(os.path.join(d, "p4.json"), '{"classes": {"Edema": ["edema"]}}')},
        "no image is labelled with a prompt class"),
    "no rows after --split": (lambda d, c: {"--split": "validation"}, "no row has split 'validation'"),
    "unknown task": (lambda d, c: {"--tasks": "zeroshot,retreival"}, "unknown task(s) ['retreival']"),
    "probe without a training manifest": (lambda d, c: {"--tasks": "probe"}, "needs --train-manifest"),
    "missing manifest": (lambda d, c: {"--manifest": os.path.join(d, "nope.csv")}, "manifest not found"),
    "bad fractions": (lambda d, c: {"--fractions": "0.1,all"}, "--fractions: expected comma-separated float"),
    "unknown scoring": (lambda d, c: {"--scoring": "fine,cosine"}, "unknown scoring(s) ['cosine']"),
    "a set option without --paper-table": (lambda d, c: {"--rsna": "x.csv"}, "--rsna is a --paper-table option"),
    "--out under a file": (lambda d, c: {"--out": os.path.join(_write(os.path.join(d, "f"), ""), "r.json")},
                           "is a file, not a folder"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_eval_refuses_bad_input_in_one_line_before_encoding(name, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import shutil

    ckpt, m, pr = tiny_checkpoint
    broken = str(tmp_path / "broken")
    shutil.copytree(ckpt, broken)
    weights = os.path.join(broken, WEIGHTS_NAME)  # the weights file a checkpoint holds
    with open(weights, "r+b") as f:  # a copy cut short, as by a full disk or an interrupted download
        f.truncate(os.path.getsize(weights) // 2)
    change, fragment = BAD_INPUTS[name]
    args = {"--checkpoint": ckpt, "--manifest": m, "--split": "test", "--prompts": pr, "--out": str(tmp_path / "r.json")}
    args.update(change(str(tmp_path), broken))
    monkeypatch.setattr(ev, "encode_dataset", _no_encoding)
    argv = [x for kv in args.items() for x in kv] + ["--no-progress"]
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("egma-eval: error: ") and "Traceback" not in err, err
    assert fragment in err, err
    assert not os.path.exists(tmp_path / "r.json")


def test_paper_table_refuses_a_missing_manifest_or_a_broken_checkpoint_in_one_line(tiny_checkpoint, tmp_path, capsys,
                                                                                    monkeypatch):
    import shutil

    ckpt, m, _ = tiny_checkpoint
    monkeypatch.setattr(ev, "encode_dataset", _no_encoding)
    # a good set first: every manifest is checked before the first set is encoded
    assert ev.main(["--paper-table", "--checkpoint", ckpt, "--chexpert-5x200", m, "--rsna", str(tmp_path / "rsna.csv"),
                    "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rsna.csv: manifest not found (--rsna)" in err, err
    broken = str(tmp_path / "broken")
    shutil.copytree(ckpt, broken)
    with open(os.path.join(broken, WEIGHTS_NAME), "r+b") as f:
        f.truncate(100)
    assert ev.main(["--paper-table", "--checkpoint", broken, "--siim", m, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{broken}: cannot load the checkpoint" in err, err
