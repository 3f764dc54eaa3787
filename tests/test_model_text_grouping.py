"""Grouped text encoding: sentences encoded in groups of similar length, each padded to its own longest,
give the embeddings (and gradients) of one padded batch; the all-positions pooling is never grouped."""

import pytest
import torch

from egma_model import EGMAConfig, EGMAModel
from egma_model.model import padding_saved, text_groups

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _sentences(n=11, L=20, seed=0):
    """Right-padded sentences of lengths 2..L in a shuffled order (a row's length is distinct enough that a
    wrong scatter back shows)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 60, (n, L), generator=g) * mask
    return ids, mask


def _model(groups, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    kw.setdefault("text_config", NO_DROPOUT)
    m = EGMAModel(EGMAConfig.tiny("vit_base_patch16_224", image_size=112, vocab_size=60, text_groups=groups, **kw))
    return m.to(dtype)


def test_the_plan_partitions_rows_by_length_and_trims_trailing_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    plan = text_groups(mask, 2)
    assert [idx.tolist() for idx, _ in plan] == [[1, 3], [0, 2]]
    assert [w for _, w in plan] == [2, 5]
    assert padding_saved(mask, 2) == (24, 2 * 2 + 2 * 5)
    assert padding_saved(mask, 1) == (24, 4 * 5)  # one group still drops the all-padding last column
    assert sorted(torch.cat([idx for idx, _ in text_groups(mask, 9)]).tolist()) == [0, 1, 2, 3]
    # a hole in a mask is kept: only trailing columns go
    assert text_groups(torch.tensor([[1, 0, 1, 0]]), 1)[0][1] == 3
    with pytest.raises(ValueError, match="text_groups"):
        EGMAConfig.tiny(text_groups=0)


@pytest.mark.parametrize("groups", [2, 3, 4, 11, 20])
def test_grouped_embeddings_and_gradients_equal_one_padded_batch(groups):
    ids, mask = _sentences()
    ref_m, m = _model(1), _model(groups)
    m.load_state_dict(ref_m.state_dict())
    ref = ref_m.encode_sentences(ids, mask, normalize=False)
    got = m.encode_sentences(ids, mask, normalize=False)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1))
    (ref * w).sum().backward()
    (got * w).sum().backward()
    for (n, a), b in zip(ref_m.text_encoder.named_parameters(), m.text_encoder.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_grouped_float32_and_a_wrong_order_is_caught():
    ids, mask = _sentences(n=16, L=24, seed=3)
    ref_m, m = _model(1, torch.float32), _model(4, torch.float32)
    m.load_state_dict(ref_m.state_dict())
    with torch.no_grad():
        ref = ref_m.encode_sentences(ids, mask)
        got = m.encode_sentences(ids, mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the comparison is row by row: embeddings left in the sorted order would not pass
    order = torch.cat([idx for idx, _ in text_groups(mask, 4)])
    assert not torch.equal(order, torch.arange(16))
    assert not torch.allclose(got[order], ref, atol=1e-3)


def test_the_all_positions_pooling_is_never_grouped():
    """``last4_all`` averages over every position, padding included: dropping padding columns would change
    its embeddings, so ``text_groups`` leaves it alone."""
    ids, mask = _sentences()
    ref_m, m = _model(1, text_pooling="last4_all"), _model(4, text_pooling="last4_all")
    m.load_state_dict(ref_m.state_dict())
    with torch.no_grad():
        ref = ref_m.encode_sentences(ids, mask)
        torch.testing.assert_close(m.encode_sentences(ids, mask), ref, rtol=0, atol=0)
        # what grouping would do to it: each sentence padded to its group's longest only
        from egma_model.model import _grouped

        def last4_all(i, a):
            hs = m.text_encoder(input_ids=i, attention_mask=a, output_hidden_states=True).hidden_states
            return torch.stack(hs[-4:]).mean(0).mean(1)

        trimmed = torch.nn.functional.normalize(m.text_proj(_grouped(last4_all, ids, mask, 4)), dim=-1)
    assert (trimmed - ref).abs().max() > 1e-3


def test_forward_with_grouped_text_equals_ungrouped():
    from test_model_model import _batch

    ref_m, m = _model(1), _model(4)
    m.load_state_dict(ref_m.state_dict())
    b = _batch([2, 3, 1, 4], P=49, image_size=112, seed=5)
    b = {k: v.double() if v.is_floating_point() else v for k, v in b.items()}
    ref_m.train(), m.train()
    torch.testing.assert_close(m(b)["loss"], ref_m(b)["loss"], rtol=1e-12, atol=1e-12)
