"""From published layouts to the paper's table, end to end on fake trees with tiny models:
egma-prepare -> egma-train --init-from <MedCLIP-layout checkpoint> -> egma-eval --paper-table."""

import json
import os

import torch

from egma_model.datasets.registry import write_fake_trees
from egma_model.eval_cli import main as egma_eval
from egma_model.prepare import main as prepare
from egma_model.train_cli import main as egma_train
from model_fakes import medclip_state_dict, save_tiny_bert, save_tiny_hf_swin


def test_prepare_train_from_medclip_then_the_whole_table(tmp_path, capsys):
    d = write_fake_trees(str(tmp_path / "data"))
    m = str(tmp_path / "manifests")
    for args in (["mimic-eye", "--root", d["mimic-eye"]],
                 ["egd-cxr", "--root", d["egd-cxr"], "--mimic-cxr-jpg", d["mimic-cxr-jpg"]],
                 ["chexpert-5x200", "--root", d["chexpert"], "--per-class", "3"],
                 ["chexpert", "--root", d["chexpert"], "--per-class", "3"],
                 ["rsna", "--root", d["rsna"]], ["siim", "--root", d["siim"]]):
        assert prepare(args + ["--out", os.path.join(m, args[0] + ".csv")]) == 0
    swin, bert = str(tmp_path / "swin"), str(tmp_path / "bert")
    save_tiny_hf_swin(swin, seed=5)
    save_tiny_bert(bert, seed=6)
    ckpt = str(tmp_path / "medclip" / "pytorch_model.bin")
    os.makedirs(os.path.dirname(ckpt))
    torch.save(medclip_state_dict(swin, bert), ckpt)
    run = str(tmp_path / "run")
    capsys.readouterr()
    rc = egma_train(["--manifest", os.path.join(m, "egd-cxr.csv"), "--out", run, "--preset", "tiny",
                     "--init-from", ckpt, "--image-model", swin, "--text-model", bert, "--max-steps", "2",
                     "--batch-size", "2", "--no-progress", "--lr", "1e-5"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "tensors loaded, 0 missing" in out.err
    with open(os.path.join(run, "init_report.json")) as f:
        rep = json.load(f)
    assert rep["missing"] == [] and "logit_scale" in rep["loaded"]
    with open(os.path.join(run, "final", "egma_config.json")) as f:
        cfg = json.load(f)
    assert cfg["image_library"] == "transformers" and cfg["proj_bias"] is False and cfg["embed_dim"] == 512
    res_path = str(tmp_path / "table.json")
    rc = egma_eval(["--paper-table", "--checkpoint", os.path.join(run, "final"),
                    "--chexpert-5x200", os.path.join(m, "chexpert-5x200.csv"), "--rsna", os.path.join(m, "rsna.csv"),
                    "--siim", os.path.join(m, "siim.csv"), "--chexpert", os.path.join(m, "chexpert.csv"), "--seeds", "0", "--no-progress", "--out", res_path])
    out = capsys.readouterr()
    assert rc == 0, out.err
    table = out.out
    print(table)
    assert "CheXpert 5x200 (n=15)" in table and "RSNA (n=3)" in table and "SIIM (n=3)" in table
    lines = table.splitlines()
    acc = next(l for l in lines if "CheXpert 5x200" in l and "Acc" in l).split()
    assert acc[-1] == "61.30" and 0 <= float(acc[-2]) <= 100 and 0 <= float(acc[-3]) <= 100
    assert next(l for l in lines if l.strip().startswith("RSNA (n=3)")).split()[-1] == "76.97"
    assert next(l for l in lines if "SIIM" in l and "Acc" in l).split()[-1] == "n/a"
    probe = {l.split()[0]: l.split()[1:] for l in lines if l.strip().split()[:1] in (["RSNA"], ["SIIM"], ["CheXpert"])
             and "(n=" not in l}
    assert all(v != "--" for v in probe["RSNA"][:3] + probe["SIIM"][:3] + probe["CheXpert"][:3])
    with open(res_path) as f:
        res = json.load(f)
    assert 0 <= res["retrieval/i2t_p@1/global"] <= 1 and "probe/rsna/0.01" in res
