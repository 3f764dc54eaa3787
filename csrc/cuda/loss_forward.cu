// The loss's per-report kernels after the similarities: the MLCE log-sum-exps of each matched block, the
// mapping weights, the mapped features M_P = W_I2T S_k and M_S = W_T2I P_k, their CLIP logits and
// log-sum-exps, and the totals (docs/loss.md, sections 3 to 5). The backward recomputes all but the totals.
#include "device_common.cuh"

namespace egma_cuda {
namespace {

// Row (per sentence) and column (per patch) log-sum-exps of the MLCE term; mlce_k = the report's term.
// Grid B, RED_THREADS threads.
template <typename scalar_t, typename acc_t>
__global__ void mlce_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int64_t P = params.P, k = blockIdx.x;
  const int64_t u0 = params.cu[k], n = params.cu[k + 1] - u0;
  if (!has_gaze(params.gaze_mask, params.gaze != nullptr, k)) {
    if (threadIdx.x == 0) params.mlce_k[k] = 0;
    return;
  }
  const acc_t* X = params.matched + u0 * P;
  const scalar_t* GS = params.gaze + u0 * P;
  acc_t* sent_lse_neg = params.sent_lse_neg;
  acc_t* sent_lse_pos = params.sent_lse_pos;
  acc_t* patch_lse_neg = params.patch_lse_neg;
  acc_t* patch_lse_pos = params.patch_lse_pos;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    sent_lse_neg[u0 + j] = lse_zero<acc_t, scalar_t>(X + j * P, P, 1, GS + j * P, 1, acc_t(1), false);
    sent_lse_pos[u0 + j] = lse_zero<acc_t, scalar_t>(X + j * P, P, 1, GS + j * P, 1, acc_t(-1), true);
  }
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    patch_lse_neg[k * P + i] = lse_zero<acc_t, scalar_t>(X + i, n, P, GS + i, P, acc_t(1), false);
    patch_lse_pos[k * P + i] = lse_zero<acc_t, scalar_t>(X + i, n, P, GS + i, P, acc_t(-1), true);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t s2p = 0, p2s = 0;
    for (int64_t j = 0; j < n; ++j) s2p += sent_lse_neg[u0 + j] + sent_lse_pos[u0 + j];
    for (int64_t i = 0; i < P; ++i) p2s += patch_lse_neg[k * P + i] + patch_lse_pos[k * P + i];
    const acc_t alpha = params.opts.alpha;
    params.mlce_k[k] = alpha * (s2p / static_cast<acc_t>(n)) + (acc_t(1) - alpha) * (p2s / static_cast<acc_t>(P));
  }
}

// Mapping weights of report k (n >= 2): W1 at w1 + P * u0 (P x n), W2 at w2 + u0 * P (n x P). Grid B.
template <typename scalar_t, typename acc_t>
__global__ void weights_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int64_t P = params.P, k = blockIdx.x;
  const int64_t u0 = params.cu[k], n = params.cu[k + 1] - u0;
  if (n < 2) return;
  const acc_t* X = params.matched + u0 * P;
  const scalar_t* GS = has_gaze(params.gaze_mask, params.gaze != nullptr, k) ? params.gaze + u0 * P : nullptr;
  const acc_t theta = params.opts.map_threshold;
  auto omega = [&](acc_t v, acc_t mn, acc_t spread) -> acc_t {
    if (spread == acc_t(0)) return acc_t(1);
    return (v - mn) / spread >= theta ? acc_t(1) : acc_t(0);
  };
  acc_t* W1 = params.w1 + P * u0;
  acc_t* W2 = params.w2 + u0 * P;
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    acc_t mn = X[i], mx = X[i];
    for (int64_t j = 1; j < n; ++j) {
      mn = min(mn, X[j * P + i]);
      mx = max(mx, X[j * P + i]);
    }
    acc_t sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t w = omega(X[j * P + i], mn, mx - mn) + (GS ? static_cast<acc_t>(GS[j * P + i]) : acc_t(0));
      W1[i * n + j] = w;
      sum += w;
    }
    for (int64_t j = 0; j < n; ++j) W1[i * n + j] /= sum;
  }
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const acc_t* x = X + j * P;
    acc_t mn = x[0], mx = x[0];
    for (int64_t i = 1; i < P; ++i) {
      mn = min(mn, x[i]);
      mx = max(mx, x[i]);
    }
    acc_t sum = 0;
    for (int64_t i = 0; i < P; ++i) {
      const acc_t w = omega(x[i], mn, mx - mn) + (GS ? static_cast<acc_t>(GS[j * P + i]) : acc_t(0));
      W2[j * P + i] = w;
      sum += w;
    }
    for (int64_t i = 0; i < P; ++i) W2[j * P + i] /= sum;
  }
}

// mapped_patch[k, i] = sum_j W1[k][i, j] s[u0 + j] (rows 0 .. B*P-1) and mapped_sent[u] = sum_i W2[u, i] p[k, i]
// (rows B*P + u). Grid B * P + N, ROW_THREADS threads over D.
template <typename scalar_t, typename acc_t>
__global__ void mapped_features_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int32_t* __restrict__ cu = params.cu;
  const int64_t B = params.M, P = params.P, D = params.D, row = blockIdx.x;
  if (row < B * P) {
    const scalar_t* __restrict__ s = params.sent;
    const int64_t k = row / P, i = row % P;
    const int64_t u0 = cu[k], n = cu[k + 1] - u0;
    if (n < 2) return;
    const acc_t* W1 = params.w1 + P * u0 + i * n;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      acc_t acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += W1[j] * static_cast<acc_t>(s[(u0 + j) * D + d]);
      params.mapped_patch[row * D + d] = acc;
    }
  } else {
    const scalar_t* __restrict__ p = params.patch;
    const int64_t u = row - B * P;
    const int64_t k = params.owner[u];
    if (cu[k + 1] - cu[k] < 2) return;
    const acc_t* W2 = params.w2 + u * P;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      acc_t acc = 0;
      for (int64_t i = 0; i < P; ++i) acc += W2[i] * static_cast<acc_t>(p[(k * P + i) * D + d]);
      params.mapped_sent[u * D + d] = acc;
    }
  }
}

// patch_logits[k] = t * mapped_patch[k] p[k]^T (P x P), tiled: grid (ceil(P/32), ceil(P/32), B), NT threads.
template <typename scalar_t, typename acc_t>
__global__ void patch_logits_kernel(const LaunchParams<scalar_t, acc_t> params) {
  __shared__ acc_t sa[TILE][TK + 1];
  __shared__ acc_t sb[TILE][TK + 1];
  __shared__ acc_t S[TILE][TILE + 1];
  const int64_t P = params.P, D = params.D, k = blockIdx.z;
  if (params.cu[k + 1] - params.cu[k] < 2) return;
  const int64_t i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE;
  const int mi = static_cast<int>(imin(TILE, P - i0)), nj = static_cast<int>(imin(TILE, P - j0));
  tile_dots<acc_t, scalar_t, acc_t>(params.mapped_patch + (k * P + i0) * D, D, mi, params.patch + (k * P + j0) * D, D,
                                    nj, D, sa, sb, S);
  const acc_t t = *params.scale;
  for (int e = threadIdx.x; e < mi * nj; e += NT) {
    const int i = e / nj, j = e % nj;
    params.patch_logits[(k * P + i0 + i) * P + j0 + j] = t * S[i][j];
  }
}

// sent_logits[u, e] = t * <mapped_sent[u], s[u0 + e]> at sent_logits_offset[k] + (u - u0) * n + e: grid N,
// ROW_THREADS threads, one warp per e.
template <typename scalar_t, typename acc_t>
__global__ void sent_logits_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int64_t D = params.D, u = blockIdx.x, k = params.owner[u];
  const int64_t u0 = params.cu[k], n = params.cu[k + 1] - u0;
  if (n < 2) return;
  const acc_t* __restrict__ mapped_sent = params.mapped_sent;
  const scalar_t* __restrict__ s = params.sent;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  const acc_t t = *params.scale;
  for (int64_t e = warp; e < n; e += nw) {
    acc_t acc = 0;
    for (int64_t d = lane; d < D; d += 32) acc += mapped_sent[u * D + d] * static_cast<acc_t>(s[(u0 + e) * D + d]);
    acc = warp_sum(acc);
    if (lane == 0) params.sent_logits[params.sent_logits_offset[k] + (u - u0) * n + e] = t * acc;
  }
}

// Row and column log-sum-exps of an m x m block (one thread per row and column).
template <typename acc_t>
__device__ void block_lse(const acc_t* L, int64_t m, acc_t* row_lse, acc_t* col_lse) {
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    acc_t mx = dev_neg_inf<acc_t>();
    for (int64_t j = 0; j < m; ++j) mx = max(mx, L[i * m + j]);
    acc_t sum = 0;
    for (int64_t j = 0; j < m; ++j) sum += dexp(L[i * m + j] - mx);
    row_lse[i] = mx + dlog(sum);
    mx = dev_neg_inf<acc_t>();
    for (int64_t j = 0; j < m; ++j) mx = max(mx, L[j * m + i]);
    sum = 0;
    for (int64_t j = 0; j < m; ++j) sum += dexp(L[j * m + i] - mx);
    col_lse[i] = mx + dlog(sum);
  }
}

// The log-sum-exps of both logit blocks of report k and its mapping term 0.5 (clipP + clipS). Grid B.
template <typename scalar_t, typename acc_t>
__global__ void clip_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int64_t P = params.P, k = blockIdx.x;
  const int64_t u0 = params.cu[k], n = params.cu[k + 1] - u0;
  if (n < 2) {
    if (threadIdx.x == 0) params.map_k[k] = 0;
    return;
  }
  const acc_t* L = params.patch_logits + k * P * P;
  const acc_t* M = params.sent_logits + params.sent_logits_offset[k];
  acc_t* pl_row = params.patch_logits_row_lse;
  acc_t* pl_col = params.patch_logits_col_lse;
  acc_t* sl_row = params.sent_logits_row_lse;
  acc_t* sl_col = params.sent_logits_col_lse;
  block_lse(L, P, pl_row + k * P, pl_col + k * P);
  block_lse(M, n, sl_row + u0, sl_col + u0);
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t r = 0, c = 0;
    for (int64_t i = 0; i < P; ++i) {
      r += pl_row[k * P + i] - L[i * P + i];
      c += pl_col[k * P + i] - L[i * P + i];
    }
    const acc_t clip_p = acc_t(0.5) * (r / static_cast<acc_t>(P) + c / static_cast<acc_t>(P));
    r = 0;
    c = 0;
    for (int64_t e = 0; e < n; ++e) {
      r += sl_row[u0 + e] - M[e * n + e];
      c += sl_col[u0 + e] - M[e * n + e];
    }
    const acc_t clip_s = acc_t(0.5) * (r / static_cast<acc_t>(n) + c / static_cast<acc_t>(n));
    params.map_k[k] = acc_t(0.5) * (clip_p + clip_s);
  }
}

// One block: the contrastive term and the totals.
template <typename scalar_t, typename acc_t>
__global__ void totals_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const acc_t* i2t = params.i2t;
  const acc_t* t2i = params.t2i;
  const int64_t B = params.M;
  const LossOptions<acc_t>& opts = params.opts;
  ce_lse(i2t, B, true, params.ce_lse_i2t);
  ce_lse(t2i, B, opts.egma_compat, params.ce_lse_t2i);
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t ce1 = 0, ce2 = 0, mlce = 0, mapping = 0;
    int64_t num_gaze = 0, num_mapped = 0;
    for (int64_t a = 0; a < B; ++a) {
      ce1 += params.ce_lse_i2t[a] - i2t[a * B + a];
      ce2 += params.ce_lse_t2i[a] - t2i[a * B + a];
      if (has_gaze(params.gaze_mask, params.gaze != nullptr, a)) {
        ++num_gaze;
        mlce += params.mlce_k[a];
      }
      if (params.cu[a + 1] - params.cu[a] >= 2) {
        ++num_mapped;
        mapping += params.map_k[a];
      }
    }
    const acc_t con = acc_t(0.5) * (ce1 / static_cast<acc_t>(B) + ce2 / static_cast<acc_t>(B));
    mlce /= static_cast<acc_t>(num_gaze > 0 ? num_gaze : 1);
    mapping /= static_cast<acc_t>(num_mapped > 0 ? num_mapped : 1);
    acc_t* terms = params.terms;
    terms[kTotal] = opts.w_con * con + opts.w_mlce * mlce + opts.w_map * mapping;
    terms[kContrastive] = con;
    terms[kGazeMlce] = mlce;
    terms[kMapping] = mapping;
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
void Launch<scalar_t, acc_t>::report_terms(const Params& params, cudaStream_t stream) {
  const int64_t B = params.M, P = params.P, N = params.N;
  launch_kernel(mlce_kernel<scalar_t, acc_t>, grid1(B), RED_THREADS, stream, params);
  launch_kernel(weights_kernel<scalar_t, acc_t>, grid1(B), RED_THREADS, stream, params);
  launch_kernel(mapped_features_kernel<scalar_t, acc_t>, grid1(B * P + N), ROW_THREADS, stream, params);
  const unsigned tiles = static_cast<unsigned>((P + TILE - 1) / TILE);
  launch_kernel(patch_logits_kernel<scalar_t, acc_t>, dim3(tiles, tiles, grid1(B)), NT, stream, params);
  launch_kernel(sent_logits_kernel<scalar_t, acc_t>, grid1(N), ROW_THREADS, stream, params);
  launch_kernel(clip_kernel<scalar_t, acc_t>, grid1(B), RED_THREADS, stream, params);
}

template <typename scalar_t, typename acc_t>
void Launch<scalar_t, acc_t>::loss_forward(const Params& params, cudaStream_t stream) {
  report_terms(params, stream);
  launch_kernel(totals_kernel<scalar_t, acc_t>, 1, RED_THREADS, stream, params);
}

EGMA_INSTANTIATE_LAUNCHER(report_terms)
EGMA_INSTANTIATE_LAUNCHER(loss_forward)

}  // namespace egma_cuda
