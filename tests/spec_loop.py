"""``docs/loss.md`` written out literally: a per-image, per-report Python loop in float64.

Slow and obviously correct; the tests hold the vectorised reference (and through it every backend) to it.
Nothing here is shared with ``egma_kernels``.
"""

import torch


def ce_rows(m):
    """-(1/R) sum_a log softmax(m[a, :])[a]"""
    return -sum(torch.log_softmax(m[a], dim=0)[a] for a in range(m.shape[0])) / m.shape[0]


def mlce(x, y):
    neg = x[y == 0]
    pos = x[y == 1]
    return torch.log(1 + torch.exp(neg).sum()) + torch.log(1 + torch.exp(-pos).sum())


def min_max(v):
    if v.max() == v.min():
        return torch.ones_like(v)
    return (v - v.min()) / (v.max() - v.min())


def rownorm(m):
    return m / m.sum(dim=1, keepdim=True)


def clip(u, v, t):
    return 0.5 * (ce_rows(t * u @ v.T) + ce_rows(t * v @ u.T))


def split_reports(sent, cu):
    cu = [int(c) for c in cu]
    return [sent[cu[k] : cu[k + 1]] for k in range(len(cu) - 1)]


def filip_loop(patch, sent, cu, t, egma_compat=False):
    reports = split_reports(sent, cu)
    s_max = max(r.shape[0] for r in reports)
    i2t, t2i = [], []
    for a in range(patch.shape[0]):
        i2t_row, t2i_row = [], []
        for r in reports:
            x = t * patch[a] @ r.T  # P x n_b
            best_sentence = x.max(dim=1).values
            if egma_compat and r.shape[0] < s_max:
                best_sentence = torch.maximum(best_sentence, torch.zeros_like(best_sentence))
            i2t_row.append(best_sentence.mean())
            t2i_row.append(x.max(dim=0).values.mean())
        i2t.append(torch.stack(i2t_row))
        t2i.append(torch.stack(t2i_row))
    return torch.stack(i2t), torch.stack(t2i)


def loss_loop(patch_emb, sent_emb, cu_seqlens, logit_scale, gaze=None, gaze_mask=None, alpha=None, theta=2 / 7, weights=(1, 1, 1), egma_compat=False):
    patch, sent, cu, t = patch_emb, sent_emb, cu_seqlens, logit_scale
    B, P, _ = patch.shape
    if alpha is None:
        alpha = 0.8 if egma_compat else 0.5
    if gaze_mask is None:
        gaze_mask = [gaze is not None] * B
    reports = split_reports(sent, cu)
    gazes = split_reports(gaze, cu) if gaze is not None else [None] * B

    i2t, t2i = filip_loop(patch, sent, cu, t, egma_compat)
    if egma_compat:
        con = 0.5 * (ce_rows(i2t) + ce_rows(t2i))
    else:
        con = 0.5 * (ce_rows(i2t) + ce_rows(t2i.T))

    mlce_sum, n_gaze = 0.0, 0
    map_sum, n_map = 0.0, 0
    for k in range(B):
        x = t * reports[k] @ patch[k].T  # X_k: n_k x P, rows sentences
        n_k = x.shape[0]
        g = bool(gaze_mask[k])
        if g:
            y = (gazes[k] > 0).to(x.dtype)
            s2p = sum(mlce(x[j], y[j]) for j in range(n_k)) / n_k
            p2s = sum(mlce(x[:, i], y[:, i]) for i in range(P)) / P
            mlce_sum = mlce_sum + alpha * s2p + (1 - alpha) * p2s
            n_gaze += 1
        if n_k >= 2:
            r = x.detach().T  # R_k: P x n_k
            om_i2t = torch.stack([(min_max(r[i]) >= theta).to(x.dtype) for i in range(P)])
            om_t2i = torch.stack([(min_max(r[:, j]) >= theta).to(x.dtype) for j in range(n_k)])
            if g:
                om_i2t = om_i2t + gazes[k].T
                om_t2i = om_t2i + gazes[k]
            cross_p = rownorm(om_i2t) @ reports[k]
            cross_s = rownorm(om_t2i) @ patch[k]
            map_sum = map_sum + 0.5 * (clip(cross_p, patch[k], t) + clip(cross_s, reports[k], t))
            n_map += 1
    l_mlce = mlce_sum / max(1, n_gaze)
    l_map = map_sum / n_map if n_map else torch.zeros((), dtype=patch.dtype)
    loss = weights[0] * con + weights[1] * l_mlce + weights[2] * l_map
    zero = torch.zeros((), dtype=patch.dtype)
    as_tensor = lambda v: v if isinstance(v, torch.Tensor) else zero + v
    return dict(loss=loss, contrastive=con, gaze_mlce=as_tensor(l_mlce), mapping=as_tensor(l_map), i2t=i2t, t2i=t2i)
