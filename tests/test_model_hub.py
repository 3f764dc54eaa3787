"""Encoders and tokenizers by hub name (from a temporary hub cache, offline) and by local directory.

The hub's offline switch and cache location are read by huggingface_hub when it is imported, so the loads
by name run in a fresh Python with ``HF_HOME``/``HF_HUB_CACHE`` pointing at a cache this test fills in the
hub's layout (``models--<org>--<name>/snapshots/<commit>/...`` and ``refs/main``) and ``HF_HUB_OFFLINE=1``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from egma_model import EGMAConfig, EGMAModel
from egma_model.model import TINY_SWIN
from model_fakes import put_in_hub_cache, save_tiny_bert, save_tiny_hf_swin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    bert, swin, timm_dir = str(root / "bert"), str(root / "swin"), str(root / "timm")
    save_tiny_bert(bert)
    save_tiny_hf_swin(swin)
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tm = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, **TINY_SWIN)
    os.makedirs(timm_dir)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, os.path.join(timm_dir, "model.safetensors"))
    cache = str(root / "hf" / "hub")
    put_in_hub_cache(cache, "egma-test/tiny-bert", bert)
    put_in_hub_cache(cache, "egma-test/tiny-swin", swin)
    put_in_hub_cache(cache, "timm/swin_tiny_patch4_window7_224.ms_in1k", timm_dir)
    return {"root": str(root), "bert": bert, "swin": swin, "cache": cache, "timm_state": tm.state_dict()}


def _run_offline(tiny_dirs, code: str) -> dict:
    env = dict(os.environ, HF_HOME=os.path.join(tiny_dirs["root"], "hf"), HF_HUB_CACHE=tiny_dirs["cache"],
               HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    env.pop("TRANSFORMERS_CACHE", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_encoders_by_hub_name_from_the_cache_offline(tiny_dirs):
    """EGMAModel with a hub id for the text model, the transformers Swin and timm pretrained weights; the
    weights loaded are the cached ones (checksums compared with the saved models), and a name that is not
    cached gives an error naming the model and HF_HUB_OFFLINE."""
    code = r"""
import json, torch
from egma_model import EGMAConfig, EGMAModel
from egma_model import hub
from egma_model.hub import EncoderLoadError, load_tokenizer_any
from egma_model.model import TINY_SWIN
m = EGMAModel(EGMAConfig.tiny(text_model="egma-test/tiny-bert", image_library="transformers",
                              image_model="egma-test/tiny-swin"))
# EGMAModel passes image_pretrained to this call (timm weights by name, here from the cache)
t = hub.create_timm("swin_tiny_patch4_window7_224", pretrained=True, num_classes=0, **TINY_SWIN)
tok = load_tokenizer_any("egma-test/tiny-bert")
errs = []
for f, name in ((hub.load_text_encoder, "emilyalsentzer/Bio_ClinicalBERT"),
                (hub.load_image_encoder_hf, "microsoft/swin-tiny-patch4-window7-224"),
                (lambda n: hub.create_timm(n, pretrained=True), "vit_base_patch16_224")):
    try:
        f(name)
        errs.append(None)
    except EncoderLoadError as e:
        errs.append(str(e))
s = lambda mod: float(sum(v.double().sum() for k, v in mod.state_dict().items()
                          if v.is_floating_point() and not k.startswith("pooler.")))
print(json.dumps({"bert": s(m.text_encoder), "swin": s(m.image_encoder), "timm": s(t),
                  "tok": tok("the heart")["input_ids"], "errs": errs}))
"""
    out = _run_offline(tiny_dirs, code)
    from transformers import AutoModel, AutoTokenizer

    ref = lambda mod: float(sum(v.double().sum() for k, v in mod.state_dict().items()
                                if v.is_floating_point() and not k.startswith("pooler.")))  # EGMA drops BERT's pooler
    assert out["bert"] == pytest.approx(ref(AutoModel.from_pretrained(tiny_dirs["bert"])), rel=1e-9)
    assert out["swin"] == pytest.approx(ref(AutoModel.from_pretrained(tiny_dirs["swin"])), rel=1e-9)
    ts = sum(v.double().sum() for v in tiny_dirs["timm_state"].values() if v.is_floating_point())
    assert out["timm"] == pytest.approx(float(ts), rel=1e-9)
    assert out["tok"] == AutoTokenizer.from_pretrained(tiny_dirs["bert"])("the heart")["input_ids"]
    names = ["emilyalsentzer/Bio_ClinicalBERT", "microsoft/swin-tiny-patch4-window7-224", "vit_base_patch16_224"]
    for err, name in zip(out["errs"], names):
        assert err is not None and name in err and "HF_HUB_OFFLINE" in err, err


def test_encoders_from_local_directories(tiny_dirs):
    m = EGMAModel(EGMAConfig.tiny(text_model=tiny_dirs["bert"], image_library="transformers",
                                  image_model=tiny_dirs["swin"], proj_bias=False))
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(tiny_dirs["swin"]).eval()
    x = torch.randn(1, 3, 224, 224)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m._image_features(x)[0].flatten(2).transpose(1, 2),
                                   ref(pixel_values=x).last_hidden_state)
    assert m.image_proj[0].bias is None and m.text_proj.bias is None
    # the checkpoint is self-contained: both encoders rebuilt from their saved configurations
    d = os.path.join(tiny_dirs["root"], "ckpt")
    m.save_pretrained(d)
    m2 = EGMAModel.from_pretrained(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(m2.encode_image(x), m.encode_image(x))


def test_missing_local_directory_is_named():
    from egma_model.hub import EncoderLoadError

    with pytest.raises(EncoderLoadError, match="does-not-exist"):
        EGMAModel(EGMAConfig.tiny(text_model="/nonexistent/does-not-exist"))
