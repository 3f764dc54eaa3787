"""Triton kernels of the EGMA loss (``docs/loss.md``). Launched by ``egma_kernels.triton_backend``.

Notation as in ``docs/loss.md``: ``A[a, i ; u] = t * <patch[a, i], sent[u]>``. No kernel writes the ``(B*P) x N``
matrix. The forward pass computes each tile once and keeps what the backward pass needs to route the
gradients of the maxima: each sentence's best patch of each image (B x N) and, for the loss, each patch's
best sentence of each report (the "routes", B x B x P small ints) unless those would outweigh the
gradients (B far above the embedding size, or float64 on a GPU), in which case the backward kernels
recompute the similarity tiles to find them. With saved routes the backward pass is two products (dL/dA
times the sentences, its transpose times the patches) where recomputing costs two more.

Kernels (one program per ...), in launch order:
  _pack_schedule_kernel   (once): the forward's packed tiles, consecutive whole reports filling COLS
                          columns (next fit), computed on the device from the offsets (the host knows B,
                          N and max_seqlen only, and never waits for the GPU); with egma_compat also the
                          longest report, for the zero-padding rule.
  _filip_fwd_kernel       (image a, packed tile; tiles fastest): I2T[a,b], T2I[a,b], the argmax patch of
                          each sentence, the routes, and on the matched tiles (a == b) the matched block
                          X[u, i] = A[o(u), i ; u]. The reports of a tile share every patch tile it loads,
                          and its columns are the reports' sentences with no padding between them.
  _report_fwd_kernel      report k: the contrastive cross-entropies' row k (log-sum-exps of row k of
                          I2T and of column k of T2I); on X_k (n_k x P) the gaze MLCE rows/columns, the
                          mapping weights (recomputed from X and the gaze, never stored) and both mapping
                          CLIP losses, using Z1 = W_I2T^T X_k (P x P) and Z2 = W_T2I X_k^T (n_k x n_k):
                          since X_k = t * S_k P_k^T, the mapped features never need to be formed.
  _loss_terms_kernel      (once): the three terms and the loss, summed over the reports in a fixed order.
  _report_bwd_kernel      report k: dL/dX_k from the MLCE and mapping terms.
  _pack_schedule_kernel   (once, two programs): the backward's packed tiles, of the forward's width for
                          the dpatch kernel and of a narrower one for the dsent kernel, with each tile's
                          column map (sentence and report per column).
  _filip_bwd_patch_kernel (image a, patch block, slice of the packed tiles): dL/dpatch and dL/dt partials.
  _filip_bwd_sent_kernel  (packed tile, slice of the images): dL/dsent partials; the tile's reports share
                          every patch tile it loads.
                          Both hold a [rows, D] float32 accumulator; for D > 512 (256 in float64) the
                          output columns are split into chunks across programs, so that the accumulator
                          stays in registers (without saved routes each chunk recomputes the similarity
                          tiles over the whole D). When recomputing without chunks (SIM_ONE_DOT) the
                          similarity is one dot over D from the very tiles the gradient product loads,
                          and a program's fixed operand is loaded once; not with 3xTF32 float32
                          operands, whose split copies of a whole-D tile spill (ptxas).
The whole loss is these kernels and no torch op between them (the backward pass ends with fixed-order
sums of its partial buffers), so that a call costs a few launches of host time (at small batches the
host, not the GPU, sets the pace). The backward kernels
turn the upstream gradients of the loss and of its terms into the cross-entropies' softmax gradients
themselves, from the log-sum-exps saved by the forward pass.
Every reduction happens inside one program in a fixed order, and the partials of the slices are summed
in a fixed order afterwards: results are deterministic (no atomics). The slices only add parallelism
where there are few programs (small batches).

A report is always held whole in one tile, so a segment max or log-sum-exp over a report's sentences never
crosses tiles: in the filip kernels (forward and backward) a packed tile of COLS >= BLOCK_S columns (the
schedule never splits a report), in the report kernels a slot of BLOCK_S >= its length columns (BLOCK_S
comes from the longest report). Inside a packed tile, per-report maxima are segmented scans along the
columns (forward: running max and argmax; backward without saved routes: the same, its result at each
report's last column carried back to the report's columns by a reverse scan).
"""

import triton
import triton.language as tl


@triton.jit
def _patch_rows(patch_ptr, img, p_offs, p_mask, dd, D, stride_pb, stride_pp):
    """patch[img, p_offs, dd] as a [rows, len(dd)] tile in the input dtype (zeros outside P and D)."""
    ptrs = patch_ptr + tl.cast(img, tl.int64) * stride_pb + p_offs.to(tl.int64)[:, None] * stride_pp + dd[None, :]
    return tl.load(ptrs, mask=p_mask[:, None] & (dd[None, :] < D), other=0.0)


@triton.jit
def _sentence_rows(sent_ptr, u_offs, u_mask, dd, D, stride_sn):
    """sent[u_offs, dd] as a [rows, len(dd)] tile in the input dtype (zeros outside the reports and D)."""
    ptrs = sent_ptr + u_offs.to(tl.int64)[:, None] * stride_sn + dd[None, :]
    return tl.load(ptrs, mask=u_mask[:, None] & (dd[None, :] < D), other=0.0)


@triton.jit
def _similarity_tile(
    patch_ptr, sent_ptr, img, p_offs, p_mask, u_offs, u_mask, D,
    stride_pb, stride_pp, stride_sn,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """<patch[img, p], sent[u]> for a [BLOCK_P, BLOCK_S] tile (unscaled), accumulated in ACC."""
    acc = tl.zeros([BLOCK_P, BLOCK_S], dtype=ACC)
    p_base = patch_ptr + tl.cast(img, tl.int64) * stride_pb + p_offs.to(tl.int64)[:, None] * stride_pp
    s_base = sent_ptr + u_offs.to(tl.int64)[None, :] * stride_sn
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        pt = tl.load(p_base + d[None, :], mask=p_mask[:, None] & d_mask[None, :], other=0.0)
        st = tl.load(s_base + d[:, None], mask=d_mask[:, None] & u_mask[None, :], other=0.0)
        acc = tl.dot(pt, st, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _segment(cu_ptr, k, mask, N):
    """Report k's (start, length) from the offsets, clamped to 0 <= start <= end <= N: whatever the offsets
    hold (unchecked with validate=False), no sentence index leaves [0, N). 0 sentences where ~mask."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + k, mask=mask, other=0), 0), N)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + k + 1, mask=mask, other=0), start), N)
    return start, end - start


@triton.jit
def _segmented_max(v1, k1, v2, k2):
    """Combine of a segmented running (max, argmax) scan along a tile's columns. k = column index + 2**20 if
    the column starts a new report (one operand for both: fewer registers than three). Ties keep the
    leftmost column (as tl.argmax(tie_break_left=True))."""
    take2 = (k2 >= 1048576) | (v2 > v1)
    return tl.where(take2, v2, v1), tl.where(take2, k2 & 1048575, k1 & 1048575) | ((k1 | k2) & 1048576)


@triton.jit
def _tile_layout(cu_ptr, r0, r1, N, COLS: tl.constexpr):
    """Reports r0 .. r1-1, each whole and in order, side by side in COLS columns. Per report lane (COLS
    lanes: a tile never holds more reports than columns): (report index, mask, start, length, first column);
    per column: (sentence index, mask, report index, the column's index in its report, starts a report,
    ends a report). A report that does not fit the columns left (only a wrong max_seqlen makes one) keeps
    those it gets."""
    lane = tl.arange(0, COLS)
    reps = r0 + lane
    rep_mask = reps < r1
    start, n_rep = _segment(cu_ptr, reps, rep_mask, N)  # 0 sentences in an unused lane
    pos = tl.cumsum(n_rep, 0) - n_rep
    n_vis = tl.minimum(n_rep, tl.maximum(COLS - pos, 0))
    j = tl.arange(0, COLS)
    inside = (j[None, :] >= pos[:, None]) & (j[None, :] < (pos + n_vis)[:, None])  # [lanes, columns]
    u_mask = tl.max(inside.to(tl.int32), axis=0) > 0
    col_pos = tl.sum(tl.where(inside, pos[:, None], 0), axis=0)
    col_end = tl.sum(tl.where(inside, (pos + n_vis)[:, None], 0), axis=0)
    u_offs = tl.sum(tl.where(inside, (start - pos)[:, None], 0), axis=0) + j
    u_rep = r0 + tl.sum(tl.where(inside, lane[:, None], 0), axis=0)
    return reps, rep_mask, n_rep, inside, u_offs, u_mask, u_rep, j - col_pos, j == col_pos, u_mask & (j == col_end - 1)


@triton.jit
def _packed_tile(cu_ptr, sched_ptr, tile, N, COLS: tl.constexpr):
    """Tile ``tile`` of the packed schedule (_pack_schedule_kernel): reports sched[tile] .. sched[tile+1]-1,
    laid out by _tile_layout."""
    return _tile_layout(cu_ptr, tl.load(sched_ptr + tile), tl.load(sched_ptr + tile + 1), N, COLS)


@triton.jit
def _tile_columns(colmap_ptr, cu_ptr, tile, used, N, COLS: tl.constexpr):
    """Per column of packed tile ``tile`` (the backward's, from the column map the schedule kernel wrote:
    [sentence index or -1, report index] per column): (sentence index, mask, report index, index in its
    report, starts a report, ends a report, its report's length). Loading the map costs the backward
    kernels two [COLS] loads a tile instead of _tile_layout's [COLS, COLS] work (and its registers)."""
    j = tl.arange(0, COLS)
    base = colmap_ptr + tl.cast(tile, tl.int64) * 2 * COLS
    u = tl.load(base + j, mask=used, other=-1)
    u_mask = u >= 0
    u_rep = tl.load(base + COLS + j, mask=used & u_mask, other=0)
    start, u_n = _segment(cu_ptr, u_rep, u_mask, N)
    u_offs = tl.where(u_mask, u, 0)
    u_index = u_offs - start
    return u_offs, u_mask, u_rep, u_index, u_mask & (u_index == 0), u_mask & (u_index == u_n - 1), u_n


@triton.jit
def _next_fit(cu_ptr, sched_ptr, colmap_ptr, R, N, T_MAX, COLS: tl.constexpr, BLOCK_B: tl.constexpr,
              COLMAP: tl.constexpr):
    """Writes sched[0 .. T_MAX + 1]: tile t holds reports sched[t] .. sched[t+1]-1, as many whole consecutive
    reports as fit COLS columns (at least one, at most COLS), R after the last tile, and sched[T_MAX + 1]
    = the number of tiles. A dependent step per tile, each a load of the next COLS offsets (cached) and a
    prefix sum. Stops at T_MAX tiles (only offsets the host's bound does not cover, i.e. malformed ones,
    reach it: their last reports are then in no tile). COLMAP: also each tile's column map (T_MAX, 2, COLS)
    for _tile_columns: per column its sentence index (-1 where unused), then its report index."""
    lane = tl.arange(0, COLS)
    tl.store(sched_ptr, 0)
    s = 0
    t = 0
    while (s < R) & (t < T_MAX):
        reps = s + lane
        _, n = _segment(cu_ptr, reps, reps < R, N)
        fits = (tl.cumsum(n, 0) <= COLS) & (reps < R)
        s_next = s + tl.maximum(tl.sum(fits.to(tl.int32), axis=0), 1)
        if COLMAP:
            _, _, _, _, u_offs, u_mask, u_rep, _, _, _ = _tile_layout(cu_ptr, s, s_next, N, COLS)
            row = colmap_ptr + tl.cast(t, tl.int64) * 2 * COLS + lane
            tl.store(row, tl.where(u_mask, u_offs, -1))
            tl.store(row + COLS, u_rep)
        s = s_next
        t += 1
        tl.store(sched_ptr + t, s)
    for t0 in range(0, T_MAX + 1, BLOCK_B):  # entries after the last tile: R (no report)
        idx = t0 + tl.arange(0, BLOCK_B)
        tl.store(sched_ptr + idx, tl.zeros([BLOCK_B], dtype=tl.int32) + R, mask=(idx > t) & (idx <= T_MAX))
    tl.store(sched_ptr + T_MAX + 1, t)


@triton.jit
def _pack_schedule_kernel(cu_ptr, sched_ptr, sched2_ptr, colmap_ptr, colmap2_ptr, counts_ptr, R, N, T_MAX, T_MAX2,
                          LONGEST: tl.constexpr, COLS: tl.constexpr, COLS2: tl.constexpr, BLOCK_B: tl.constexpr,
                          COLMAP: tl.constexpr):
    """Packed tiles (next fit, in report order, _next_fit) of COLS columns into sched (T_MAX + 2 entries;
    T_MAX bounds the tiles of any offsets with reports of 1 to COLS sentences, see
    triton_backend._pack_tiles) and, by a second program where the grid has two, of COLS2 columns into
    sched2 (T_MAX2 + 2 entries): the backward pass's two kernels take tiles of different widths. COLMAP
    (the backward's): also their column maps (colmap, colmap2). LONGEST (first program): also counts[0] =
    the longest report."""
    if tl.program_id(0) == 0:
        if LONGEST:
            longest = tl.zeros([BLOCK_B], dtype=tl.int32)
            for k0 in range(0, R, BLOCK_B):
                k = k0 + tl.arange(0, BLOCK_B)
                _, n = _segment(cu_ptr, k, k < R, N)
                longest = tl.maximum(longest, n)
            tl.store(counts_ptr, tl.max(longest, axis=0))
        _next_fit(cu_ptr, sched_ptr, colmap_ptr, R, N, T_MAX, COLS, BLOCK_B, COLMAP)
    else:
        _next_fit(cu_ptr, sched2_ptr, colmap2_ptr, R, N, T_MAX2, COLS2, BLOCK_B, COLMAP)


@triton.jit
def _filip_fwd_kernel(
    patch_ptr, sent_ptr, cu_ptr, scale_ptr, smax_ptr, sched_ptr,
    i2t_ptr, t2i_ptr, best_patch_ptr, matched_ptr, route_ptr,
    P, D, N, R, T_MAX,
    stride_pb, stride_pp, stride_sn,
    EGMA_COMPAT: tl.constexpr, WRITE_MATCHED: tl.constexpr, SAVE_ROUTE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, COLS: tl.constexpr,
    SIM_ONE_DOT: tl.constexpr, D_PAD: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One image against one packed tile of whole reports (_packed_tile): the similarity tile is
    [BLOCK_P, COLS], its columns the tile's sentences report after report with no padding between them,
    and each patch tile loaded serves all of them. A report's max over its sentences (I2T) is a segmented
    scan along the columns, read at the report's last column: it never crosses reports, and a report never
    crosses tiles. With SIM_ONE_DOT the tile's sentences are loaded once ([COLS, D_PAD]) and each patch
    block is one dot over D. A program of an unused tile (past the schedule's last) does no work.

    A 1-D grid, tiles fastest: the programs in flight together share one image, whose patches then come
    from memory once and from L2 for the other tiles (image-fastest order would fetch every image once per
    tile as soon as the batch's patches outgrow L2, e.g. B=256, P=196, D=512 float32). The sentences, a
    small fraction of the input, stay in L2 throughout.

    SAVE_ROUTE: also write each patch's best sentence of each report (the I2T max's argmax, an index into
    the report; BLOCK_S where egma_compat's zero padding won), so that the backward pass routes its
    gradients without recomputing the similarities."""
    img = tl.program_id(0) // T_MAX
    tile = tl.program_id(0) % T_MAX
    reps, rep_mask, n_rep, inside, u_offs, u_mask, u_rep, u_index, u_first, u_last = _packed_tile(
        cu_ptr, sched_ptr, tile, N, COLS)
    t = tl.load(scale_ptr).to(ACC)
    u_n = tl.sum(tl.where(inside, n_rep[:, None], 0), axis=0)  # each column's report length
    if EGMA_COMPAT:
        padded = u_n < tl.load(smax_ptr)  # zero-padding takes part in this column's report's max
    if SIM_ONE_DOT:
        dd = tl.arange(0, D_PAD)
        sents = _sentence_rows(sent_ptr, u_offs, u_mask, dd, D, stride_sn)

    col_max = tl.full([COLS], float("-inf"), dtype=ACC)
    col_arg = tl.zeros([COLS], dtype=tl.int32)
    row_total = tl.zeros([COLS], dtype=ACC)  # per report, at its last column: sum over patches of the max
    p_end = tl.where(tl.max(u_mask.to(tl.int32), axis=0) > 0, P, 0)  # an unused tile skips the loop
    # The scan's second operand: column index, + 2**20 where a report starts.
    col_key = tl.broadcast_to((tl.arange(0, COLS) + tl.where(u_first, 1048576, 0))[None, :], [BLOCK_P, COLS])
    for p0 in range(0, p_end, BLOCK_P):
        p_offs = p0 + tl.arange(0, BLOCK_P)
        p_mask = p_offs < P
        if SIM_ONE_DOT:
            patches = _patch_rows(patch_ptr, img, p_offs, p_mask, dd, D, stride_pb, stride_pp)
            sim = t * tl.dot(patches, tl.trans(sents), input_precision=DOT_PRECISION, out_dtype=ACC)
        else:
            sim = t * _similarity_tile(
                patch_ptr, sent_ptr, img, p_offs, p_mask, u_offs, u_mask, D, stride_pb, stride_pp, stride_sn,
                BLOCK_P, COLS, BLOCK_D, ACC, DOT_PRECISION,
            )
        # I2T: each patch's best sentence of each report, at the report's last column.
        row_max, row_key = tl.associative_scan(
            (tl.where(u_mask[None, :], sim, float("-inf")), col_key), 1, _segmented_max)
        if SAVE_ROUTE:
            route = (row_key & 1048575) - (tl.arange(0, COLS) - u_index)[None, :]  # an index into the report
            if EGMA_COMPAT:
                route = tl.where(padded[None, :] & (row_max < 0.0), BLOCK_S, route)
            route_offs = (tl.cast(img, tl.int64) * R + u_rep)[None, :] * P + p_offs[:, None]
            tl.store(route_ptr + route_offs, route.to(route_ptr.dtype.element_ty),
                     mask=p_mask[:, None] & u_last[None, :])
        if EGMA_COMPAT:
            row_max = tl.where(padded[None, :], tl.maximum(row_max, 0.0), row_max)
        row_total += tl.sum(tl.where(p_mask[:, None] & u_last[None, :], row_max, 0.0), axis=0)
        # T2I: each sentence's best patch of this image, carried across patch blocks (first index on ties).
        masked = tl.where(p_mask[:, None], sim, float("-inf"))
        blk_max = tl.max(masked, axis=0)
        blk_arg = tl.argmax(masked, axis=0, tie_break_left=True).to(tl.int32) + p0
        better = blk_max > col_max
        col_arg = tl.where(better, blk_arg, col_arg)
        col_max = tl.where(better, blk_max, col_max)
        if WRITE_MATCHED:
            matched_offs = u_offs.to(tl.int64)[None, :] * P + p_offs[:, None]
            tl.store(matched_ptr + matched_offs, sim, mask=p_mask[:, None] & (u_mask & (u_rep == img))[None, :])

    # Per report lane: I2T from its last column, T2I the mean of its columns' maxima.
    rep_i2t = tl.sum(tl.where(inside & u_last[None, :], row_total[None, :], 0.0), axis=1)
    rep_t2i = tl.sum(tl.where(inside, tl.where(u_mask, col_max, 0.0)[None, :], 0.0), axis=1)
    at = tl.cast(img, tl.int64) * R + reps
    tl.store(i2t_ptr + at, rep_i2t / P, mask=rep_mask)
    tl.store(t2i_ptr + at, rep_t2i / tl.maximum(n_rep, 1), mask=rep_mask)
    best_ptrs = best_patch_ptr + tl.cast(img, tl.int64) * N + u_offs
    tl.store(best_ptrs, col_arg.to(best_patch_ptr.dtype.element_ty), mask=u_mask)  # int16 when P < 2**15


# Which upstream gradients the backward kernels receive (a bit mask, constexpr): any subset of the
# loss and its three terms (the usual case: the loss alone), and of the two matrices. Test a bit as
# `(BIT & GRADS)`, the bit first: the interpreter passes GRADS as a plain int, which has no `& constexpr`.
G_LOSS = tl.constexpr(1)
G_CON = tl.constexpr(2)
G_MLCE = tl.constexpr(4)
G_MAP = tl.constexpr(8)
G_I2T = tl.constexpr(16)
G_T2I = tl.constexpr(32)

# Rows of the per-report buffer (8, B) that the report kernel fills and the later kernels read.
PR_S2P = tl.constexpr(0)
PR_P2S = tl.constexpr(1)
PR_CLIP_P = tl.constexpr(2)
PR_CLIP_S = tl.constexpr(3)
PR_LSE_I2T = tl.constexpr(4)  # log-sum-exp of row k of I2T (over the reports)
PR_LSE_T2I = tl.constexpr(5)  # log-sum-exp of column k of T2I (over the images); of row k with egma_compat
PR_CE_I2T = tl.constexpr(6)
PR_CE_T2I = tl.constexpr(7)
PER_REPORT_ROWS = tl.constexpr(8)

# Columns of the per-sentence buffer (N, SENT_STATS) that the report kernel fills for the backward pass.
SS_NEG_LSE = tl.constexpr(0)  # MLCE row log-sum-exp over the sentence's non-gazed patches
SS_POS_LSE = tl.constexpr(1)  # MLCE row log-sum-exp over its gazed patches
SS_W_LO = tl.constexpr(2)     # W_T2I row statistics (the mapping weights' normalisation)
SS_W_HI = tl.constexpr(3)
SS_W_TOTAL = tl.constexpr(4)
SS_Z2_ROW = tl.constexpr(5)   # Z2 log-sum-exps: the sentence's row and column
SS_Z2_COL = tl.constexpr(6)
SENT_STATS = tl.constexpr(7)


@triton.jit
def _term_coefficient(g_loss_ptr, g_term_ptr, weight, GRADS: tl.constexpr, TERM_BIT: tl.constexpr):
    """dL_out/d(term) = weight * g_loss + g_term, for the gradients present (at least one must be)."""
    if (G_LOSS & GRADS) != 0:
        c = weight * tl.load(g_loss_ptr)
        if (TERM_BIT & GRADS) != 0:
            c += tl.load(g_term_ptr)
    else:
        c = tl.load(g_term_ptr)
    return c


@triton.jit
def _matrix_grads(
    img, reps, rep_mask, R, c_con, i2t_ptr, t2i_ptr, per_report_ptr, g_i2t_ptr, g_t2i_ptr,
    EGMA_COMPAT: tl.constexpr, GRADS: tl.constexpr,
):
    """dL/dI2T[img, reps] and dL/dT2I[img, reps] for a group of reports: the contrastive cross-entropies'
    softmax minus target (``c_con`` = dL/dL_con * 1/2 * 1/B), plus any gradient given to the matrices."""
    at = tl.cast(img, tl.int64) * R + reps
    g_row = tl.where(rep_mask, 0.0, 0.0)
    g_col = tl.where(rep_mask, 0.0, 0.0)
    if ((G_LOSS | G_CON) & GRADS) != 0:
        target = tl.where(reps == img, 1.0, 0.0)
        lse_row = tl.load(per_report_ptr + PR_LSE_I2T * R + img)
        g_row = c_con * (tl.exp(tl.load(i2t_ptr + at, mask=rep_mask, other=0.0) - lse_row) - target)
        if EGMA_COMPAT:
            lse_col = tl.load(per_report_ptr + PR_LSE_T2I * R + img)
        else:
            lse_col = tl.load(per_report_ptr + PR_LSE_T2I * R + reps, mask=rep_mask, other=0.0)
        g_col = c_con * (tl.exp(tl.load(t2i_ptr + at, mask=rep_mask, other=0.0) - lse_col) - target)
    if (G_I2T & GRADS) != 0:
        g_row += tl.load(g_i2t_ptr + at, mask=rep_mask, other=0.0)
    if (G_T2I & GRADS) != 0:
        g_col += tl.load(g_t2i_ptr + at, mask=rep_mask, other=0.0)
    return tl.where(rep_mask, g_row, 0.0), tl.where(rep_mask, g_col, 0.0)


@triton.jit
def _contrastive_coefficient(g_loss_ptr, g_con_ptr, w_con, num_reports, GRADS: tl.constexpr):
    """dL_out/dL_con * 1/2 * 1/B: the factor of both cross-entropies' gradients (0 without one)."""
    c = 0.0
    if ((G_LOSS | G_CON) & GRADS) != 0:
        c = _term_coefficient(g_loss_ptr, g_con_ptr, w_con, GRADS, G_CON) * 0.5 / num_reports
    return c


@triton.jit
def _saved_hits(route_ptr, img, u_rep, u_index, u_mask, p_offs, p_mask, R, P):
    """[rows, columns] of a packed tile: True where the column is the row's best sentence of its report, by
    the forward's saved routes (route[img, report, row] is an index into the report; an index no column has,
    BLOCK_S, where egma_compat's zero padding won the max). Each column reads its own report's route."""
    mask = p_mask[:, None] & u_mask[None, :]
    r0 = tl.min(tl.where(u_mask, u_rep, R), axis=0)  # the tile's first report: int32 offsets from it
    base = route_ptr + (tl.cast(img, tl.int64) * R + r0) * P
    route = tl.load(base + ((u_rep - r0)[None, :] * P + p_offs[:, None]), mask=mask, other=0).to(tl.int32)
    return mask & (route == u_index[None, :])


@triton.jit
def _segment_first(k1, k2):
    """Combine of a segmented scan that carries each segment's first element (the flag bit 2**20 marks
    where a segment starts): along the reverse direction, each report's last column."""
    return tl.where(k2 >= 1048576, k2, k1 | (k2 & 1048576))


@triton.jit
def _recomputed_hits(sim, p_mask, u_mask, u_first, u_last, padded, EGMA_COMPAT: tl.constexpr, COLS: tl.constexpr):
    """As _saved_hits, from the recomputed similarity tile [rows, COLS]: each row's best sentence of each
    report, found as the forward finds it (a segmented running max and argmax along the columns, whose
    value at the report's last column is the report's leftmost maximum), then carried back to every column
    of the report by a reverse segmented scan of that one int. With egma_compat, no column where the
    report's zero padding won (a report shorter than the longest, whose maximum is negative)."""
    v = tl.where(u_mask[None, :], sim, float("-inf"))
    col = tl.arange(0, COLS)
    first_key = tl.broadcast_to((col + tl.where(u_first, 1048576, 0))[None, :], sim.shape)
    _, best = tl.associative_scan((v, first_key), 1, _segmented_max)
    best = (best & 1048575) | tl.where(u_last, 1048576, 0)[None, :]
    best = tl.associative_scan(best, 1, _segment_first, reverse=True)
    hit = ((best & 1048575) == col[None, :]) & u_mask[None, :] & p_mask[:, None]
    if EGMA_COMPAT:
        hit = hit & ~(padded[None, :] & (v < 0.0))
    return hit


@triton.jit
def _packed_grad_tile(
    hit, img, p_offs, p_mask, u_offs, u_mask, u_rep, u_n, P, N, g_row, g_col, best_patch_ptr, d_matched_ptr,
    HAS_MATCHED_GRAD: tl.constexpr,
):
    """dL/dA on one image's rows against a packed tile [rows, columns]: dL/dI2T[img, report] / P at each
    row's best sentence of each report (``hit``), dL/dT2I[img, report] / n at each sentence's best row (the
    forward's best_patch), plus the matched block's gradient where the report is the image's own.
    ``g_row``, ``g_col``: per column, its report's dL/dI2T and dL/dT2I."""
    d_sim = tl.where(hit, (g_row / P)[None, :], 0.0)
    best = tl.load(best_patch_ptr + tl.cast(img, tl.int64) * N + u_offs, mask=u_mask, other=-1).to(tl.int32)
    d_sim += tl.where((p_offs[:, None] == best[None, :]) & u_mask[None, :],
                      (g_col / tl.maximum(u_n, 1))[None, :], 0.0)
    if HAS_MATCHED_GRAD:
        matched_offs = u_offs.to(tl.int64)[None, :] * P + p_offs[:, None]
        d_sim += tl.load(d_matched_ptr + matched_offs, mask=p_mask[:, None] & (u_mask & (u_rep == img))[None, :],
                         other=0.0)
    return d_sim


@triton.jit
def _filip_bwd_patch_kernel(
    patch_ptr, sent_ptr, cu_ptr, scale_ptr, smax_ptr, sched_ptr, colmap_ptr,
    i2t_ptr, t2i_ptr, per_report_ptr, g_loss_ptr, g_con_ptr, g_i2t_ptr, g_t2i_ptr, w_con,
    best_patch_ptr, d_matched_ptr, matched_ptr, route_ptr,
    d_patch_ptr, d_scale_part_ptr,
    P, D, N, R, T_MAX,
    stride_pb, stride_pp, stride_sn,
    EGMA_COMPAT: tl.constexpr, HAS_MATCHED_GRAD: tl.constexpr, GRADS: tl.constexpr, SAVED_ROUTE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, COLS: tl.constexpr,
    D_OUT: tl.constexpr, D_CHUNKS: tl.constexpr, SIM_ONE_DOT: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
):
    """dL/dpatch rows of one image (and a partial of dL/dt): for every packed tile of whole reports
    (sched, COLS columns, as the forward's), the gradient tile dL/dA [rows, COLS] times the tile's
    sentences. Slice ``part`` of the S slices (grid axis 2) takes tiles part, part + S, ... of the schedule's
    (balanced whatever the bound on the tiles). With SAVED_ROUTE the tile comes from the forward's routes
    alone (no similarity, so a D chunk loads only its own columns) and dL/dt from I2T, T2I and the matched
    block (sum dA * A / t = sum g_I2T I2T + g_T2I T2I + dX X, all over t); otherwise the similarity tile is
    recomputed to find the routes."""
    img = tl.program_id(0)
    pblk = tl.program_id(1) // D_CHUNKS  # axis 1: (block of patch rows, chunk of D_OUT output columns)
    chunk = tl.program_id(1) % D_CHUNKS
    part = tl.program_id(2)
    num_images = tl.num_programs(0)
    t = tl.load(scale_ptr).to(ACC)
    p_offs = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p_offs < P
    dd = chunk * D_OUT + tl.arange(0, D_OUT)
    acc = tl.zeros([BLOCK_P, D_OUT], dtype=ACC)
    scale_acc = tl.zeros([BLOCK_P], dtype=ACC)
    matrix_scale = tl.zeros([COLS], dtype=ACC)  # SAVED_ROUTE: sum g_I2T I2T + g_T2I T2I of this image
    c_con = _contrastive_coefficient(g_loss_ptr, g_con_ptr, w_con, R, GRADS)
    longest = 0
    if EGMA_COMPAT:
        longest = tl.load(smax_ptr)
    if SIM_ONE_DOT and not SAVED_ROUTE:  # the whole D fits one program: load the patch rows once
        rows = _patch_rows(patch_ptr, img, p_offs, p_mask, dd, D, stride_pb, stride_pp)
    for tile in range(part, tl.load(sched_ptr + T_MAX + 1), tl.num_programs(2)):
        u_offs, u_mask, u_rep, u_index, u_first, u_last, u_n = _tile_columns(colmap_ptr, cu_ptr, tile, True, N, COLS)
        sents = _sentence_rows(sent_ptr, u_offs, u_mask, dd, D, stride_sn)
        g_row, g_col = _matrix_grads(
            img, u_rep, u_mask, R, c_con, i2t_ptr, t2i_ptr, per_report_ptr, g_i2t_ptr, g_t2i_ptr, EGMA_COMPAT, GRADS
        )
        if SAVED_ROUTE:
            hit = _saved_hits(route_ptr, img, u_rep, u_index, u_mask, p_offs, p_mask, R, P)
            at = tl.cast(img, tl.int64) * R + u_rep  # each report once: at its first column
            matrix_scale += g_row * tl.load(i2t_ptr + at, mask=u_first, other=0.0) \
                + g_col * tl.load(t2i_ptr + at, mask=u_first, other=0.0)
        else:
            if SIM_ONE_DOT:  # one dot over the whole D, from the tiles the gradient product uses too
                sim = t * tl.dot(rows, tl.trans(sents), input_precision=DOT_PRECISION, out_dtype=ACC)
            else:
                sim = t * _similarity_tile(
                    patch_ptr, sent_ptr, img, p_offs, p_mask, u_offs, u_mask, D, stride_pb, stride_pp, stride_sn,
                    BLOCK_P, COLS, BLOCK_D, ACC, DOT_PRECISION,
                )
            hit = _recomputed_hits(sim, p_mask, u_mask, u_first, u_last, u_n < longest, EGMA_COMPAT, COLS)
        d_sim = _packed_grad_tile(
            hit, img, p_offs, p_mask, u_offs, u_mask, u_rep, u_n, P, N, g_row, g_col, best_patch_ptr, d_matched_ptr,
            HAS_MATCHED_GRAD,
        ).to(ACC)
        if not SAVED_ROUTE:
            scale_acc += tl.sum(d_sim * sim, axis=1)
        acc = tl.dot(d_sim, sents.to(ACC), acc, input_precision=GRAD_PRECISION, out_dtype=ACC)
    row0 = (tl.cast(part, tl.int64) * num_images + img) * P  # partial buffer (slices, B, P, D)
    out = d_patch_ptr + (row0 + p_offs.to(tl.int64)[:, None]) * D + dd[None, :]
    tl.store(out, t * acc, mask=p_mask[:, None] & (dd[None, :] < D))
    # dL/dt = sum dA * A / t, one partial per program, summed afterwards in a fixed order. Only the first
    # chunk's counts (the others write 0); with SAVED_ROUTE the matrices' part only in the first row block
    # and the matched block's part only in the first slice.
    scale_part = tl.sum(scale_acc, axis=0)
    if SAVED_ROUTE:
        scale_part = tl.where(pblk == 0, tl.sum(matrix_scale, axis=0), 0.0)
        if HAS_MATCHED_GRAD:
            own_start, own_len = _segment(cu_ptr, img, img >= 0, N)
            j = tl.arange(0, BLOCK_S)
            u_own = own_start + j
            matched_mask = (j < own_len)[:, None] & p_mask[None, :] & (part == 0)
            matched_offs = u_own.to(tl.int64)[:, None] * P + p_offs[None, :]
            x = tl.load(matched_ptr + matched_offs, mask=matched_mask, other=0.0).to(ACC)
            scale_part += tl.sum(tl.sum(x * tl.load(d_matched_ptr + matched_offs, mask=matched_mask, other=0.0), axis=1), axis=0)
    slot = (part * num_images + img) * tl.num_programs(1) + tl.program_id(1)
    tl.store(d_scale_part_ptr + slot, tl.where(chunk == 0, scale_part / t, 0.0))


@triton.jit
def _filip_bwd_sent_kernel(
    patch_ptr, sent_ptr, cu_ptr, scale_ptr, smax_ptr, sched_ptr, colmap_ptr,
    i2t_ptr, t2i_ptr, per_report_ptr, g_loss_ptr, g_con_ptr, g_i2t_ptr, g_t2i_ptr, w_con,
    best_patch_ptr, d_matched_ptr, route_ptr,
    d_sent_ptr,
    num_images, P, D, N, R, T_MAX, images_per_slice,
    stride_pb, stride_pp, stride_sn,
    EGMA_COMPAT: tl.constexpr, HAS_MATCHED_GRAD: tl.constexpr, GRADS: tl.constexpr, SAVED_ROUTE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, COLS: tl.constexpr,
    D_OUT: tl.constexpr, D_CHUNKS: tl.constexpr, SIM_ONE_DOT: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr,
):
    """dL/dsent rows of one packed tile of whole reports (sched, COLS columns; the [COLS, D_OUT]
    accumulator bounds COLS): for every image, the transposed gradient tile times the image's patch rows
    (the routes saved by the forward pass, or recomputed from the similarity tile). Every patch tile loaded
    serves all the tile's sentences. A program of an unused tile (past the schedule's last) does no work."""
    part = tl.program_id(1) // D_CHUNKS  # axis 1: (slice of the images, chunk of D_OUT output columns)
    chunk = tl.program_id(1) % D_CHUNKS
    t = tl.load(scale_ptr).to(ACC)
    tile = tl.program_id(0)
    used = tile < tl.load(sched_ptr + T_MAX + 1)
    u_offs, u_mask, u_rep, u_index, u_first, u_last, u_n = _tile_columns(colmap_ptr, cu_ptr, tile, used, N, COLS)
    dd = chunk * D_OUT + tl.arange(0, D_OUT)
    acc = tl.zeros([COLS, D_OUT], dtype=ACC)
    c_con = _contrastive_coefficient(g_loss_ptr, g_con_ptr, w_con, R, GRADS)
    longest = 0
    if EGMA_COMPAT:
        longest = tl.load(smax_ptr)
    if SIM_ONE_DOT and not SAVED_ROUTE:  # the whole D fits one program: load the sentences once
        sents = _sentence_rows(sent_ptr, u_offs, u_mask, dd, D, stride_sn)
    img_lo = part * images_per_slice
    img_hi = tl.where(used, tl.minimum(img_lo + images_per_slice, num_images), img_lo)  # an unused tile: no loop
    for img in range(img_lo, img_hi):
        g_row, g_col = _matrix_grads(
            img, u_rep, u_mask, R, c_con, i2t_ptr, t2i_ptr, per_report_ptr, g_i2t_ptr, g_t2i_ptr, EGMA_COMPAT, GRADS
        )
        for p0 in range(0, P, BLOCK_P):
            p_offs = p0 + tl.arange(0, BLOCK_P)
            p_mask = p_offs < P
            patches = _patch_rows(patch_ptr, img, p_offs, p_mask, dd, D, stride_pb, stride_pp)
            if SAVED_ROUTE:
                hit = _saved_hits(route_ptr, img, u_rep, u_index, u_mask, p_offs, p_mask, R, P)
            else:
                if SIM_ONE_DOT:  # one dot over the whole D, from the tiles the gradient product uses too
                    sim = t * tl.dot(patches, tl.trans(sents), input_precision=DOT_PRECISION, out_dtype=ACC)
                else:
                    sim = t * _similarity_tile(
                        patch_ptr, sent_ptr, img, p_offs, p_mask, u_offs, u_mask, D, stride_pb, stride_pp,
                        stride_sn, BLOCK_P, COLS, BLOCK_D, ACC, DOT_PRECISION,
                    )
                hit = _recomputed_hits(sim, p_mask, u_mask, u_first, u_last, u_n < longest, EGMA_COMPAT, COLS)
            d_sim = _packed_grad_tile(
                hit, img, p_offs, p_mask, u_offs, u_mask, u_rep, u_n, P, N, g_row, g_col, best_patch_ptr,
                d_matched_ptr, HAS_MATCHED_GRAD,
            ).to(ACC)
            acc = tl.dot(tl.trans(d_sim), patches.to(ACC), acc, input_precision=GRAD_PRECISION, out_dtype=ACC)
    out = d_sent_ptr + (tl.cast(part, tl.int64) * N + u_offs.to(tl.int64))[:, None] * D + dd[None, :]
    tl.store(out, t * acc, mask=u_mask[:, None] & (dd[None, :] < D))


# ----------------------------------------------------------------------------------------------------
# Matched blocks: gaze MLCE and gaze-guided mapping, on X_k = matched[c_k : c_k + n_k, :] (n_k x P).
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _smallest_normal(ACC: tl.constexpr):
    """The smallest positive normal number of ACC (float32 or float64), as a scalar of that dtype."""
    if ACC == tl.float64:
        return tl.full([], 2.2250738585072014e-308, tl.float64)
    else:
        return tl.full([], 1.1754943508222875e-38, tl.float32)


@triton.jit
def _load_block(matched_ptr, gaze_ptr, u_offs, u_mask, p_offs, p_mask, P, HAS_GAZE: tl.constexpr, ACC: tl.constexpr):
    offs = u_offs.to(tl.int64)[:, None] * P + p_offs[None, :]
    mask = u_mask[:, None] & p_mask[None, :]
    x = tl.load(matched_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_GAZE:
        # The labels come from the gaze as given (gaze > 0): a positive value too small for ACC (a float64
        # 1e-50 with float32 inputs) becomes ACC's smallest normal number, not 0.
        given = tl.load(gaze_ptr + offs, mask=mask, other=0.0)
        heat = given.to(ACC)
        heat = tl.where(given > 0, tl.maximum(heat, _smallest_normal(ACC)), heat)
    else:
        heat = tl.zeros_like(x)
    return x, heat, mask


@triton.jit
def _binarise(x, lo, hi, threshold):
    """1[ min-max(x) >= threshold ] given the row/column min and max (all ones on a constant row)."""
    spread = hi - lo
    constant = spread == 0.0
    scaled = (x - lo) / tl.where(constant, 1.0, spread)
    scaled = tl.where(constant, 1.0, scaled)
    return tl.where(scaled >= threshold, 1.0, 0.0)


@triton.jit
def _w_i2t_block(x, heat, mask, add_gaze, threshold):
    """W_I2T on a [sentences, patch block] tile: each patch's weights over the report's sentences."""
    lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
    hi = tl.max(tl.where(mask, x, float("-inf")), axis=0)
    w = _binarise(x, lo[None, :], hi[None, :], threshold) + tl.where(add_gaze, heat, 0.0)
    w = tl.where(mask, w, 0.0)
    total = tl.sum(w, axis=0)
    return w / tl.where(total > 0.0, total, 1.0)[None, :]


@triton.jit
def _w_t2i_block(x, heat, mask, add_gaze, threshold, row_lo, row_hi, row_total):
    """W_T2I on a tile, from each sentence's min and max and weight total over all patches."""
    w = _binarise(x, row_lo[:, None], row_hi[:, None], threshold) + tl.where(add_gaze, heat, 0.0)
    w = tl.where(mask, w, 0.0)
    return w / tl.where(row_total > 0.0, row_total, 1.0)[:, None]


@triton.jit
def _z2(matched_ptr, gaze_ptr, u_offs, u_mask, P, add_gaze, threshold, row_lo, row_hi, row_total,
        HAS_GAZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """Z2 = W_T2I X_k^T (n_k x n_k), accumulated over patch blocks (the weights recomputed on the way)."""
    z2 = tl.zeros([BLOCK_S, BLOCK_S], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        p_offs = p0 + tl.arange(0, BLOCK_P)
        p_mask = p_offs < P
        x, heat, mask = _load_block(matched_ptr, gaze_ptr, u_offs, u_mask, p_offs, p_mask, P, HAS_GAZE, ACC)
        w2 = _w_t2i_block(x, heat, mask, add_gaze, threshold, row_lo, row_hi, row_total)
        z2 = tl.dot(w2, tl.trans(x), z2, input_precision=DOT_PRECISION, out_dtype=ACC)
    return z2


@triton.jit
def _online_lse(m, s, values, axis: tl.constexpr):
    """Merge a block's values (-inf = absent) into a running (max, sum of exp) along ``axis``."""
    new_m = tl.maximum(m, tl.max(values, axis=axis))
    s = s * tl.exp(m - new_m) + tl.sum(tl.exp(values - tl.expand_dims(new_m, axis)), axis=axis)
    return new_m, s


@triton.jit
def _report_rows(cu_ptr, gaze_mask_ptr, k, N, HAS_GAZE: tl.constexpr, BLOCK_S: tl.constexpr):
    """Report k's sentences as tile rows: (length, row index, sentence index, row mask, add its gaze?);
    offsets clamped to [0, N] (_segment), at most BLOCK_S rows."""
    start, n_rep = _segment(cu_ptr, k, k >= 0, N)
    j = tl.arange(0, BLOCK_S)
    if HAS_GAZE:
        add_gaze = tl.load(gaze_mask_ptr + k) != 0
    else:
        add_gaze = k < 0  # never: without gaze the heat tiles are zeros anyway
    return n_rep, j, start + j, j < n_rep, add_gaze


@triton.jit
def _row_lse(m_ptr, k, stride_row, stride_col, length, BLOCK: tl.constexpr):
    """(log-sum-exp, diagonal element) of line k of a square matrix, online over blocks of BLOCK."""
    line = m_ptr + tl.cast(k, tl.int64) * stride_row
    diag = tl.load(line + tl.cast(k, tl.int64) * stride_col)
    run_max = diag  # a finite start: the running sum's first rescale never sees -inf - -inf
    run_sum = diag * 0.0
    for c0 in range(0, length, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        v = tl.load(line + c.to(tl.int64) * stride_col, mask=c < length, other=float("-inf"))
        new_max = tl.maximum(run_max, tl.max(v, axis=0))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(v - new_max), axis=0)
        run_max = new_max
    return run_max + tl.log(run_sum), diag


@triton.jit
def _loss_terms_kernel(
    cu_ptr, gaze_mask_ptr, per_report_ptr, loss_ptr, con_ptr, mlce_ptr, map_ptr, counts_ptr,
    B, N, alpha, w_con, w_mlce, w_map,
    HAS_GAZE: tl.constexpr, BLOCK_B: tl.constexpr, ACC: tl.constexpr,
):
    """The three terms and the loss from the per-report values, in one program (a fixed order).

    Also saves for the backward pass counts[1] = max(1, reports with gaze) and counts[2] = max(1,
    reports with two sentences or more), the two denominators."""
    con = tl.zeros([BLOCK_B], dtype=ACC)
    mlce = tl.zeros([BLOCK_B], dtype=ACC)
    mapping = tl.zeros([BLOCK_B], dtype=ACC)
    n_gaze = tl.zeros([BLOCK_B], dtype=tl.int32)
    n_mapped = tl.zeros([BLOCK_B], dtype=tl.int32)
    for k0 in range(0, B, BLOCK_B):
        k = k0 + tl.arange(0, BLOCK_B)
        mask = k < B
        con += tl.load(per_report_ptr + PR_CE_I2T * B + k, mask=mask, other=0.0)
        con += tl.load(per_report_ptr + PR_CE_T2I * B + k, mask=mask, other=0.0)
        if HAS_GAZE:
            gazed = mask & (tl.load(gaze_mask_ptr + k, mask=mask, other=0) != 0)
            s2p = tl.load(per_report_ptr + PR_S2P * B + k, mask=gazed, other=0.0)
            p2s = tl.load(per_report_ptr + PR_P2S * B + k, mask=gazed, other=0.0)
            mlce += tl.where(gazed, alpha * s2p + (1.0 - alpha) * p2s, 0.0)
            n_gaze += gazed.to(tl.int32)
        _, n = _segment(cu_ptr, k, mask, N)
        mapped = mask & (n >= 2)
        clip_p = tl.load(per_report_ptr + PR_CLIP_P * B + k, mask=mapped, other=0.0)
        clip_s = tl.load(per_report_ptr + PR_CLIP_S * B + k, mask=mapped, other=0.0)
        mapping += tl.where(mapped, 0.5 * (clip_p + clip_s), 0.0)
        n_mapped += mapped.to(tl.int32)
    gaze_count = tl.maximum(tl.sum(n_gaze, axis=0), 1)
    mapped_count = tl.maximum(tl.sum(n_mapped, axis=0), 1)
    con_value = 0.5 * tl.sum(con, axis=0) / B
    mlce_value = tl.sum(mlce, axis=0) / gaze_count
    map_value = tl.sum(mapping, axis=0) / mapped_count
    tl.store(con_ptr, con_value)
    tl.store(mlce_ptr, mlce_value)
    tl.store(map_ptr, map_value)
    tl.store(loss_ptr, w_con * con_value + w_mlce * mlce_value + w_map * map_value)
    tl.store(counts_ptr + 1, gaze_count)
    tl.store(counts_ptr + 2, mapped_count)


@triton.jit
def _report_fwd_kernel(
    matched_ptr, gaze_ptr, gaze_mask_ptr, cu_ptr, i2t_ptr, t2i_ptr,
    per_report_ptr, sent_stats_ptr, z1_lse_ptr,
    B, N, P, threshold,
    HAS_GAZE: tl.constexpr, EGMA_COMPAT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    k = tl.program_id(0)
    n_rep, j, u_offs, u_mask, add_gaze = _report_rows(cu_ptr, gaze_mask_ptr, k, N, HAS_GAZE, BLOCK_S)
    NEG_INF: tl.constexpr = float("-inf")
    out = per_report_ptr + k
    z1_row_lse_ptr = z1_lse_ptr  # (2, B, P): Z1's row log-sum-exps, then its column log-sum-exps
    z1_col_lse_ptr = z1_lse_ptr + tl.cast(B, tl.int64) * P

    # Contrastive cross-entropies: row k of I2T, and column k of T2I (row k with egma_compat).
    if EGMA_COMPAT:
        lse_t2i, diag_t2i = _row_lse(t2i_ptr, k, B, 1, B, BLOCK_B)
    else:
        lse_t2i, diag_t2i = _row_lse(t2i_ptr, k, 1, B, B, BLOCK_B)
    lse_i2t, diag_i2t = _row_lse(i2t_ptr, k, B, 1, B, BLOCK_B)
    tl.store(out + PR_LSE_I2T * B, lse_i2t)
    tl.store(out + PR_LSE_T2I * B, lse_t2i)
    tl.store(out + PR_CE_I2T * B, lse_i2t - diag_i2t)
    tl.store(out + PR_CE_T2I * B, lse_t2i - diag_t2i)

    # Pass 1 over patch blocks: MLCE rows (online), MLCE columns (complete per block), W_T2I row stats,
    # and the diagonal of Z1 (sum_j W_I2T[j, i] X[j, i]).
    neg_m = tl.zeros([BLOCK_S], dtype=ACC)  # the extra zero logit: running max starts at 0, sum at 1
    neg_s = tl.full([BLOCK_S], 1.0, dtype=ACC)
    pos_m = tl.zeros([BLOCK_S], dtype=ACC)
    pos_s = tl.full([BLOCK_S], 1.0, dtype=ACC)
    row_lo = tl.full([BLOCK_S], float("inf"), dtype=ACC)
    row_hi = tl.full([BLOCK_S], NEG_INF, dtype=ACC)
    p2s_total = tl.zeros([BLOCK_P], dtype=ACC)
    z1_diag = tl.zeros([BLOCK_P], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        p_offs = p0 + tl.arange(0, BLOCK_P)
        p_mask = p_offs < P
        x, heat, mask = _load_block(matched_ptr, gaze_ptr, u_offs, u_mask, p_offs, p_mask, P, HAS_GAZE, ACC)
        positive = heat > 0.0
        neg = tl.where(mask & ~positive, x, NEG_INF)
        pos = tl.where(mask & positive, -x, NEG_INF)
        neg_m, neg_s = _online_lse(neg_m, neg_s, neg, 1)
        pos_m, pos_s = _online_lse(pos_m, pos_s, pos, 1)
        zero = tl.zeros([BLOCK_P], dtype=ACC)
        one = tl.full([BLOCK_P], 1.0, dtype=ACC)
        cn_m, cn_s = _online_lse(zero, one, neg, 0)
        cp_m, cp_s = _online_lse(zero, one, pos, 0)
        p2s_total += tl.where(p_mask, cn_m + tl.log(cn_s) + cp_m + tl.log(cp_s), 0.0)
        row_lo = tl.minimum(row_lo, tl.min(tl.where(mask, x, float("inf")), axis=1))
        row_hi = tl.maximum(row_hi, tl.max(tl.where(mask, x, NEG_INF), axis=1))
        w1 = _w_i2t_block(x, heat, mask, add_gaze, threshold)
        z1_diag += tl.sum(w1 * x, axis=0)
    row_mlce = neg_m + tl.log(neg_s) + pos_m + tl.log(pos_s)
    tl.store(out + PR_S2P * B, tl.sum(tl.where(u_mask, row_mlce, 0.0), axis=0) / n_rep)
    tl.store(out + PR_P2S * B, tl.sum(p2s_total, axis=0) / P)

    # Pass 2: W_T2I totals, then Z2 = W_T2I X^T (n_k x n_k) accumulated over patch blocks.
    row_total = tl.zeros([BLOCK_S], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        p_offs = p0 + tl.arange(0, BLOCK_P)
        p_mask = p_offs < P
        x, heat, mask = _load_block(matched_ptr, gaze_ptr, u_offs, u_mask, p_offs, p_mask, P, HAS_GAZE, ACC)
        one = tl.full([BLOCK_S], 1.0, dtype=ACC)
        w_raw = _w_t2i_block(x, heat, mask, add_gaze, threshold, row_lo, row_hi, one)
        row_total += tl.sum(w_raw, axis=1)
    z2 = _z2(matched_ptr, gaze_ptr, u_offs, u_mask, P, add_gaze, threshold, row_lo, row_hi, row_total,
             HAS_GAZE, BLOCK_P, BLOCK_S, ACC, DOT_PRECISION)
    pair_mask = u_mask[:, None] & u_mask[None, :]
    z2m = tl.where(pair_mask, z2, NEG_INF)
    z2_row = tl.max(z2m, axis=1)
    z2_row = z2_row + tl.log(tl.sum(tl.exp(z2m - z2_row[:, None]), axis=1))
    z2_col = tl.max(z2m, axis=0)
    z2_col = z2_col + tl.log(tl.sum(tl.exp(z2m - z2_col[None, :]), axis=0))
    z2_diag = tl.sum(tl.where(j[:, None] == j[None, :], z2, 0.0), axis=1)
    clip_s = 0.5 * tl.sum(tl.where(u_mask, z2_row + z2_col - 2.0 * z2_diag, 0.0), axis=0) / n_rep
    tl.store(out + PR_CLIP_S * B, clip_s)
    # Saved for the backward pass: the MLCE row log-sum-exps, W_T2I row stats, Z2 log-sum-exps.
    stats = sent_stats_ptr + u_offs.to(tl.int64) * SENT_STATS
    tl.store(stats + SS_NEG_LSE, neg_m + tl.log(neg_s), mask=u_mask)
    tl.store(stats + SS_POS_LSE, pos_m + tl.log(pos_s), mask=u_mask)
    tl.store(stats + SS_W_LO, row_lo, mask=u_mask)
    tl.store(stats + SS_W_HI, row_hi, mask=u_mask)
    tl.store(stats + SS_W_TOTAL, row_total, mask=u_mask)
    tl.store(stats + SS_Z2_ROW, z2_row, mask=u_mask)
    tl.store(stats + SS_Z2_COL, z2_col, mask=u_mask)

    # Pass 3: log-sum-exp of the rows and of the columns of Z1 = W_I2T^T X (P x P), block by block.
    z1_total = tl.zeros([BLOCK_P], dtype=ACC)
    for outer in range(0, P, BLOCK_P):
        o_offs = outer + tl.arange(0, BLOCK_P)
        o_mask = o_offs < P
        xo, ho, mo = _load_block(matched_ptr, gaze_ptr, u_offs, u_mask, o_offs, o_mask, P, HAS_GAZE, ACC)
        w1o = _w_i2t_block(xo, ho, mo, add_gaze, threshold)
        r_m = tl.full([BLOCK_P], NEG_INF, dtype=ACC)
        r_s = tl.zeros([BLOCK_P], dtype=ACC)
        c_m = tl.full([BLOCK_P], NEG_INF, dtype=ACC)
        c_s = tl.zeros([BLOCK_P], dtype=ACC)
        for inner in range(0, P, BLOCK_P):
            i_offs = inner + tl.arange(0, BLOCK_P)
            i_mask = i_offs < P
            xi, hi, mi = _load_block(matched_ptr, gaze_ptr, u_offs, u_mask, i_offs, i_mask, P, HAS_GAZE, ACC)
            w1i = _w_i2t_block(xi, hi, mi, add_gaze, threshold)
            # rows of Z1 in the outer block: Z1[o, i] = sum_j W1[j, o] X[j, i]
            z_rows = tl.dot(tl.trans(w1o), xi, input_precision=DOT_PRECISION, out_dtype=ACC)
            r_m, r_s = _online_lse(r_m, r_s, tl.where(i_mask[None, :], z_rows, NEG_INF), 1)
            # columns of Z1 in the outer block: Z1[i, o] = sum_j W1[j, i] X[j, o]
            z_cols = tl.dot(tl.trans(w1i), xo, input_precision=DOT_PRECISION, out_dtype=ACC)
            c_m, c_s = _online_lse(c_m, c_s, tl.where(i_mask[:, None], z_cols, NEG_INF), 0)
        r_lse = r_m + tl.log(r_s)
        c_lse = c_m + tl.log(c_s)
        tl.store(z1_row_lse_ptr + k.to(tl.int64) * P + o_offs, r_lse, mask=o_mask)
        tl.store(z1_col_lse_ptr + k.to(tl.int64) * P + o_offs, c_lse, mask=o_mask)
        z1_total += tl.where(o_mask, r_lse + c_lse, 0.0)
    clip_p = 0.5 * (tl.sum(z1_total, axis=0) - 2.0 * tl.sum(z1_diag, axis=0)) / P
    tl.store(out + PR_CLIP_P * B, clip_p)


@triton.jit
def _report_bwd_kernel(
    matched_ptr, gaze_ptr, gaze_mask_ptr, cu_ptr, counts_ptr,
    g_loss_ptr, g_mlce_ptr, g_map_ptr, w_mlce, w_map, alpha,
    sent_stats_ptr, z1_lse_ptr,
    d_matched_ptr,
    N, P, threshold,
    HAS_GAZE: tl.constexpr, GRADS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dL/dX_k from the MLCE and mapping terms (launched only when one of them has a gradient)."""
    k = tl.program_id(0)
    n_rep, j, u_offs, u_mask, add_gaze = _report_rows(cu_ptr, gaze_mask_ptr, k, N, HAS_GAZE, BLOCK_S)
    z1_row_lse_ptr = z1_lse_ptr
    z1_col_lse_ptr = z1_lse_ptr + tl.cast(tl.num_programs(0), tl.int64) * P
    NEG_INF: tl.constexpr = float("-inf")
    MLCE_GRAD: tl.constexpr = HAS_GAZE and ((G_LOSS | G_MLCE) & GRADS) != 0
    MAP_GRAD: tl.constexpr = ((G_LOSS | G_MAP) & GRADS) != 0
    # dL/d s2p[k], dL/d p2s[k], dL/d clip_p[k], dL/d clip_s[k], each with its row-mean factor.
    if MLCE_GRAD:
        c_mlce = _term_coefficient(g_loss_ptr, g_mlce_ptr, w_mlce, GRADS, G_MLCE) / tl.load(counts_ptr + 1)
        c_mlce = tl.where(add_gaze, c_mlce, 0.0)
        g_s2p = c_mlce * alpha / n_rep
        g_p2s = c_mlce * (1.0 - alpha) / P
    if MAP_GRAD:
        c_map = _term_coefficient(g_loss_ptr, g_map_ptr, w_map, GRADS, G_MAP) / tl.load(counts_ptr + 2)
        c_map = tl.where(n_rep >= 2, c_map, 0.0)
        g_clip_p = 0.25 * c_map / P
        g_clip_s = 0.25 * c_map / n_rep

    stats = sent_stats_ptr + u_offs.to(tl.int64) * SENT_STATS
    neg_lse = tl.load(stats + SS_NEG_LSE, mask=u_mask, other=0.0)
    pos_lse = tl.load(stats + SS_POS_LSE, mask=u_mask, other=0.0)
    row_lo = tl.load(stats + SS_W_LO, mask=u_mask, other=0.0)
    row_hi = tl.load(stats + SS_W_HI, mask=u_mask, other=0.0)
    row_total = tl.load(stats + SS_W_TOTAL, mask=u_mask, other=1.0)
    z2_row = tl.load(stats + SS_Z2_ROW, mask=u_mask, other=0.0)
    z2_col = tl.load(stats + SS_Z2_COL, mask=u_mask, other=0.0)

    if MAP_GRAD:
        # dZ2 from the saved log-sum-exps (Z2 recomputed: it is n_k x n_k).
        z2 = _z2(matched_ptr, gaze_ptr, u_offs, u_mask, P, add_gaze, threshold, row_lo, row_hi, row_total,
                 HAS_GAZE, BLOCK_P, BLOCK_S, ACC, DOT_PRECISION)
        pair_mask = u_mask[:, None] & u_mask[None, :]
        eye = j[:, None] == j[None, :]
        d_z2 = tl.exp(z2 - z2_row[:, None]) + tl.exp(z2 - z2_col[None, :]) - tl.where(eye, 2.0, 0.0)
        d_z2 = tl.where(pair_mask, g_clip_s * d_z2, 0.0)

    for c0 in range(0, P, BLOCK_P):
        c_offs = c0 + tl.arange(0, BLOCK_P)
        c_mask = c_offs < P
        x, heat, mask = _load_block(matched_ptr, gaze_ptr, u_offs, u_mask, c_offs, c_mask, P, HAS_GAZE, ACC)
        d_x = tl.zeros([BLOCK_S, BLOCK_P], dtype=ACC)
        if MLCE_GRAD:
            # MLCE: rows (sentence over patches) from saved log-sum-exps, columns computed here.
            positive = heat > 0.0
            neg = tl.where(mask & ~positive, x, NEG_INF)
            pos = tl.where(mask & positive, -x, NEG_INF)
            zero = tl.zeros([BLOCK_P], dtype=ACC)
            one = tl.full([BLOCK_P], 1.0, dtype=ACC)
            cn_m, cn_s = _online_lse(zero, one, neg, 0)
            cp_m, cp_s = _online_lse(zero, one, pos, 0)
            col_neg_lse = cn_m + tl.log(cn_s)
            col_pos_lse = cp_m + tl.log(cp_s)
            d_x += g_s2p * (tl.exp(neg - neg_lse[:, None]) - tl.exp(pos - pos_lse[:, None]))
            d_x += g_p2s * (tl.exp(neg - col_neg_lse[None, :]) - tl.exp(pos - col_pos_lse[None, :]))
        if MAP_GRAD:
            # Mapping, sentence side: Z2 = W2 X^T  ->  dX += dZ2^T W2.
            w2 = _w_t2i_block(x, heat, mask, add_gaze, threshold, row_lo, row_hi, row_total)
            d_x += tl.dot(tl.trans(d_z2), w2, input_precision=DOT_PRECISION, out_dtype=ACC)
            # Mapping, patch side: Z1 = W1^T X  ->  dX[:, c] += sum_o W1[:, o] dZ1[o, c].
            c_lse = tl.load(z1_col_lse_ptr + k.to(tl.int64) * P + c_offs, mask=c_mask, other=0.0)
            for o0 in range(0, P, BLOCK_P):
                o_offs = o0 + tl.arange(0, BLOCK_P)
                o_mask = o_offs < P
                xo, ho, mo = _load_block(matched_ptr, gaze_ptr, u_offs, u_mask, o_offs, o_mask, P, HAS_GAZE, ACC)
                w1o = _w_i2t_block(xo, ho, mo, add_gaze, threshold)
                r_lse = tl.load(z1_row_lse_ptr + k.to(tl.int64) * P + o_offs, mask=o_mask, other=0.0)
                z1 = tl.dot(tl.trans(w1o), x, input_precision=DOT_PRECISION, out_dtype=ACC)
                eye1 = o_offs[:, None] == c_offs[None, :]
                d_z1 = tl.exp(z1 - r_lse[:, None]) + tl.exp(z1 - c_lse[None, :]) - tl.where(eye1, 2.0, 0.0)
                d_z1 = tl.where(o_mask[:, None] & c_mask[None, :], g_clip_p * d_z1, 0.0)
                d_x += tl.dot(w1o, d_z1, input_precision=DOT_PRECISION, out_dtype=ACC)
        offs = u_offs.to(tl.int64)[:, None] * P + c_offs[None, :]
        tl.store(d_matched_ptr + offs, d_x, mask=mask)
