"""``loss_dtype``: the dtype of the embeddings the model hands to the loss kernels."""

import pytest
import torch

import egma_kernels
from egma_model import EGMAConfig, EGMAModel

from test_model_model import _batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EGMAModel(EGMAConfig.tiny("vit_base_patch16_224", image_size=112, vocab_size=60, global_weight=0.5)).eval()


def _loss_input_dtypes(monkeypatch, m, b, loss_dtype, *, autocast=None):
    seen = []
    real = egma_kernels.fine_grained_loss

    def spy(pe, se, cu, t, g, mask, **kw):
        seen.append((pe.dtype, se.dtype, None if g is None else g.dtype))
        return real(pe, se, cu, t, g, mask, **kw)

    monkeypatch.setattr(egma_kernels, "fine_grained_loss", spy)
    m.config.loss_dtype = loss_dtype
    try:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = m(b)
    finally:
        m.config.loss_dtype = "float32"
        monkeypatch.setattr(egma_kernels, "fine_grained_loss", real)
    return seen, out


def test_the_loss_inputs_take_the_chosen_dtype(model, monkeypatch):
    b = _batch([2, 3, 1], P=49, image_size=112)
    seen, ref = _loss_input_dtypes(monkeypatch, model, b, "float32")
    assert seen == [(torch.float32, torch.float32, torch.float32)]
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        seen, out = _loss_input_dtypes(monkeypatch, model, b, name)
        assert seen == [(dt, dt, torch.float32)], name  # the gaze stays float32
        assert out["loss"].dtype == torch.float32
        torch.testing.assert_close(out["loss"], ref["loss"], rtol=2e-3, atol=2e-3)
        assert float((out["loss"] - ref["loss"]).detach().abs()) > 0  # the inputs were rounded
    seen, _ = _loss_input_dtypes(monkeypatch, model, b, "auto")
    assert seen == [(torch.float32,) * 3]  # no autocast: float32
    seen, _ = _loss_input_dtypes(monkeypatch, model, b, "auto", autocast=torch.bfloat16)
    assert seen[0][:2] == (torch.bfloat16, torch.bfloat16)
    seen, _ = _loss_input_dtypes(monkeypatch, model, b, "float32", autocast=torch.bfloat16)
    assert seen[0][:2] == (torch.float32, torch.float32)  # float32 even under autocast (the default)


def test_gradients_flow_through_half_precision_loss_inputs(model):
    b = _batch([2, 3, 1], P=49, image_size=112)
    model.config.loss_dtype = "bfloat16"
    try:
        model.zero_grad(set_to_none=True)
        model(b)["loss"].backward()
    finally:
        model.config.loss_dtype = "float32"
    assert model.image_proj[0].weight.grad.dtype == torch.float32
    assert torch.isfinite(model.image_proj[0].weight.grad).all() and model.image_proj[0].weight.grad.abs().sum() > 0
    assert model.text_proj.weight.grad.abs().sum() > 0 and model.logit_scale.grad.abs() > 0


def test_float64_stays_float64_and_bad_names_are_refused(monkeypatch):
    torch.manual_seed(0)
    m = EGMAModel(EGMAConfig.tiny("vit_base_patch16_224", image_size=112, vocab_size=60)).double().eval()
    b = {k: v.double() if v.is_floating_point() else v for k, v in _batch([2, 1], P=49, image_size=112).items()}
    seen, out = _loss_input_dtypes(monkeypatch, m, b, "bfloat16")
    assert seen == [(torch.float64,) * 3] and out["loss"].dtype == torch.float64
    with pytest.raises(ValueError, match="loss_dtype"):
        EGMAConfig.tiny(loss_dtype="int8")


def test_the_cli_option_reaches_the_model():
    from egma_model.train import build_model_and_tokenizer
    from egma_model.train_cli import args_from_namespace, build_parser

    ns = build_parser().parse_args(["--manifest", "m.csv", "--out", "o", "--image-model", "vit_base_patch16_224",
                                    "--image-size", "112", "--loss-dtype", "bfloat16", "--text-groups", "2"])
    a = args_from_namespace(ns)
    m, _ = build_model_and_tokenizer(a, ["no effusion", "clear lungs"])
    assert m.config.loss_dtype == "bfloat16" and m.config.text_groups == 2
