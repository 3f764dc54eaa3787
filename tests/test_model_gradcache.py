"""Gradient caching (``egma_model.gradcache``): every parameter's gradient equals that of one big batch
(float64, tiny models), for several chunk sizes, with and without gaze; dropout replays per chunk."""

import os

import pytest
import torch

from egma_model import EGMAConfig, EGMAModel
from egma_model import gradcache
from egma_model.gradcache import chunk_bounds, grad_cache_step, slice_batch

from test_model_model import _batch

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("text_config", NO_DROPOUT)
    m = EGMAModel(EGMAConfig.tiny(vocab_size=60, **kw)).double()
    m.train()
    return m


def _double(b):
    return {k: v.double() if v.is_floating_point() else v for k, v in b.items()}


def _grads(m):
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in m.named_parameters()}


def _assert_same_grads(got, want, atol=1e-10):
    assert got.keys() == want.keys()
    with_grad = 0
    for n in want:
        assert (got[n] is None) == (want[n] is None), n
        if want[n] is not None:
            with_grad += 1
            torch.testing.assert_close(got[n], want[n], rtol=1e-8, atol=atol, msg=n)
    return with_grad


def _big_batch_grads(m, b):
    m.zero_grad(set_to_none=True)
    out = m(b)
    out["loss"].backward()
    return out, _grads(m)


def _cached_grads(m, b, k):
    m.zero_grad(set_to_none=True)
    out = grad_cache_step(m, b, k)
    return out, _grads(m)


def test_chunks_carry_their_reports_sentences():
    b = _batch([2, 3, 1, 4, 2])
    cu = b["cu_seqlens"].tolist()
    assert chunk_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]
    parts = [slice_batch(b, i0, i1, cu) for i0, i1 in chunk_bounds(5, 2)]
    assert [p["pixel_values"].shape[0] for p in parts] == [2, 2, 1]
    assert [p["input_ids"].shape[0] for p in parts] == [5, 5, 2]
    assert [p["cu_seqlens"].tolist() for p in parts] == [[0, 2, 5], [0, 1, 5], [0, 2]]
    torch.testing.assert_close(torch.cat([p["input_ids"] for p in parts]), b["input_ids"])
    torch.testing.assert_close(torch.cat([p["gaze"] for p in parts]), b["gaze"])
    torch.testing.assert_close(torch.cat([p["gaze_mask"] for p in parts]), b["gaze_mask"])
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_bounds(5, 0)


@pytest.mark.parametrize("gaze", [True, False])
def test_gradients_equal_the_big_batch_for_every_chunk_size(gaze):
    m = _model(image_model="vit_base_patch16_224", image_size=112, global_weight=0.5)
    b = _double(_batch([2, 3, 1, 4, 2], P=49, image_size=112, seed=1))
    if not gaze:
        b.pop("gaze"), b.pop("gaze_mask")
    out_ref, ref = _big_batch_grads(m, b)
    assert (float(out_ref["gaze_mlce"].detach()) != 0.0) == gaze
    for k in (1, 2, 3, 5, 8):  # 2 and 3: an uneven last chunk; 5 and 8: one chunk
        out, got = _cached_grads(m, b, k)
        torch.testing.assert_close(out["loss"], out_ref["loss"].detach(), rtol=0, atol=1e-12)
        n = _assert_same_grads(got, ref)
        assert n > 30 and got["logit_scale"].abs() > 0, (k, n)


def test_multiscale_pooler_and_in_place_temperature():
    """Several scales and the projected pooled token as embeddings; the temperature clamped in place."""
    # timm's Swin drops paths at random by default (stochastic depth): off, so one batch and chunks can match
    m = _model(scales=(-1, 2), image_global="pooler", global_weight=0.7, temperature_clamp="in_place",
               image_kwargs={"drop_path_rate": 0.0})
    b = _double(_batch([1, 3, 2], P=196, seed=2))
    out_ref, ref = _big_batch_grads(m, b)
    for k in (1, 2):
        _, got = _cached_grads(m, b, k)
        _assert_same_grads(got, ref)
    assert ref["image_proj.1.weight"].abs().sum() > 0  # the second scale's projection is trained


def test_a_lost_chunk_is_caught_by_the_gradients_not_the_loss(monkeypatch):
    """The comparison is sensitive: a step that skips the last chunk's backward pass returns the right
    loss, and only the per-parameter gradients show it."""
    m = _model(image_model="vit_base_patch16_224", image_size=112)
    b = _double(_batch([2, 3, 1, 4], P=49, image_size=112, seed=3))
    out_ref, ref = _big_batch_grads(m, b)
    real, calls = torch.autograd.backward, []

    def skip_last_chunk(tensors, grad_tensors=None, *args, **kw):
        calls.append(1)
        if len(calls) < 3:  # the loss's backward, then the first of the two chunks
            real(tensors, grad_tensors, *args, **kw)

    monkeypatch.setattr(torch.autograd, "backward", skip_last_chunk)
    out, got = _cached_grads(m, b, 2)
    assert len(calls) == 3
    torch.testing.assert_close(out["loss"], out_ref["loss"].detach(), rtol=0, atol=1e-12)
    with pytest.raises(AssertionError):
        _assert_same_grads(got, ref)


def _chunked_graph_grads(m, b, k, seed):
    """The reference with dropout: one autograd graph over the chunks computed in order, then the loss."""
    from egma_model.gradcache import _flatten, _unflatten

    cu = b["cu_seqlens"].tolist()
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    pieces = [_flatten(m.embed(slice_batch(b, i0, i1, cu))) for i0, i1 in chunk_bounds(b["pixel_values"].shape[0], k)]
    emb = _unflatten([None if p[0] is None else torch.cat(p) for p in zip(*pieces)])
    m.loss_from_embeddings(emb, b)["loss"].backward()
    return _grads(m)


def test_dropout_replays_per_chunk(monkeypatch):
    m = _model(image_model="vit_base_patch16_224", image_size=112, image_kwargs={"drop_path_rate": 0.2},
               text_config={"hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.2})
    b = _double(_batch([2, 3, 1, 4, 2], P=49, image_size=112, seed=4))
    ref = _chunked_graph_grads(m, b, 2, seed=7)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    grad_cache_step(m, b, 2)
    _assert_same_grads(_grads(m), ref)
    after = torch.rand(3)
    torch.manual_seed(7)
    for i0, i1 in chunk_bounds(5, 2):  # the RNG ends where one pass over the chunks leaves it
        with torch.no_grad():
            m.embed(slice_batch(b, i0, i1, b["cu_seqlens"].tolist()))
    torch.testing.assert_close(after, torch.rand(3))
    # without the replay the re-run draws other dropout masks, and the gradients differ
    monkeypatch.setattr(gradcache, "_set_rng_state", lambda state, device: None)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    grad_cache_step(m, b, 2)
    with pytest.raises(AssertionError):
        _assert_same_grads(_grads(m), ref)


def test_egma_train_grad_chunk_size_matches_the_plain_step(tmp_path, monkeypatch):
    """Three steps of ``egma-train --grad-chunk-size 1`` against plain steps: the same losses and weights
    (float32; dropout off so that the two runs draw nothing different)."""
    import json

    from egma_model import model as model_module
    from egma_model.train_cli import main

    from test_model_eval import _tiny_manifest

    monkeypatch.setattr(model_module, "TINY_BERT", dict(model_module.TINY_BERT, **NO_DROPOUT))
    calls = []
    real = gradcache.grad_cache_step

    def counted(*args, **kw):
        calls.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(gradcache, "grad_cache_step", counted)
    d = str(tmp_path)
    m, _ = _tiny_manifest(d)
    common = ["--manifest", m, "--split", "train", "--image-model", "vit_base_patch16_224", "--image-size", "112",
              "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "1", "--lr", "1e-3", "--no-progress",
              "--threads", "1", "--save-every", "0"]
    runs = {}
    for name, extra in (("plain", []), ("cached", ["--grad-chunk-size", "1"])):
        out = os.path.join(d, name)
        assert main(common + ["--out", out] + extra) == 0
        with open(os.path.join(out, "log.jsonl")) as f:
            runs[name] = ([json.loads(line) for line in f], EGMAModel.from_pretrained(os.path.join(out, "final")))
    assert calls == [1, 1, 1]  # the cached run took the gradient-caching step, the plain one did not
    (log_p, m_p), (log_c, m_c) = runs["plain"], runs["cached"]
    assert [r["step"] for r in log_c] == [1, 2, 3]
    for rp, rc in zip(log_p, log_c):
        for k in ("loss", "contrastive", "gaze_mlce", "mapping", "grad_norm"):
            assert rc[k] == pytest.approx(rp[k], rel=1e-4, abs=1e-5), (k, rp, rc)
    sd_p, sd_c = m_p.state_dict(), m_c.state_dict()
    worst = max(float((sd_p[k].float() - sd_c[k].float()).abs().max()) for k in sd_p)
    assert worst < 1e-4, worst


def test_grad_chunk_size_composes_with_the_distributed_loss(tmp_path, monkeypatch):
    """Two gloo processes with ``--grad-chunk-size 1`` (global negatives, gradients averaged without DDP)
    against one process with the same global batch and plain steps: the same losses and weights."""
    import json

    from egma_model import model as model_module
    from egma_model.train_cli import main

    from test_distributed_train import _no_dropout, _spawn
    from test_model_eval import _tiny_manifest

    d = str(tmp_path)
    manifest, _ = _tiny_manifest(d)
    common = ["--manifest", manifest, "--split", "train", "--preset", "tiny", "--image-model",
              "vit_base_patch16_224", "--image-size", "112", "--warmup-steps", "1", "--no-progress",
              "--threads", "1", "--lr", "1e-3", "--max-steps", "3", "--save-every", "0"]
    two, one = os.path.join(d, "two"), os.path.join(d, "one")
    _spawn(2, [common + ["--out", two, "--batch-size", "2", "--grad-chunk-size", "1"]])
    monkeypatch.setattr(model_module, "TINY_BERT", dict(model_module.TINY_BERT))
    _no_dropout()
    assert main(common + ["--out", one, "--batch-size", "4"]) == 0
    logs = {}
    for name, out in (("two", two), ("one", one)):
        with open(os.path.join(out, "log.jsonl")) as f:
            logs[name] = [json.loads(line) for line in f]
    assert [r["step"] for r in logs["two"]] == [1, 2, 3]
    for a, b in zip(logs["two"], logs["one"]):
        for k in ("loss", "contrastive", "gaze_mlce", "mapping"):
            assert abs(a[k] - b[k]) <= 2e-5 * max(1.0, abs(b[k])), (a["step"], k, a[k], b[k])
        # the norm before clipping: a sum over the ranks instead of the mean would double it
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"], b["grad_norm"])
    p_two = EGMAModel.from_pretrained(os.path.join(two, "final")).state_dict()
    p_one = EGMAModel.from_pretrained(os.path.join(one, "final")).state_dict()
    worst = max(float((p_two[k].float() - p_one[k].float()).abs().max()) for k in p_one)
    assert worst <= 5e-5, worst
    assert logs["one"][0]["loss"] != logs["one"][-1]["loss"]
