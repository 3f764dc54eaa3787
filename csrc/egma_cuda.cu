// Fused CUDA kernels of the EGMA loss (docs/loss.md) and of the FILIP similarity.
//
// The same algorithm as egma_cpu.cpp, for float16 / bfloat16 / float32 (float32 accumulation) and float64
// inputs:
// - filip_tile_kernel: one thread block per (image a, report b). It walks 32-patch x 32-sentence tiles of
//   A = t <p[a, i], s[u]> (computed in shared memory over 32-wide chunks of D) and reduces each tile at once:
//   the running max over the report's sentences for every patch (I2T) and over the patches for every
//   sentence (T2I), with their argmax indices; matched blocks (a == b, the loss) are copied to `own` (N x P).
//   The (B*P) x N similarity matrix never exists.
// - per-report kernels for the MLCE term (log-sum-exps of the matched block), the mapping weights, the
//   mapped features, their CLIP logits and log-sum-exps;
// - backward: one kernel writes d patch_emb (one block per patch row), one d sent_emb (one block per
//   sentence); each adds its terms in a fixed order, routed through the saved argmax indices.
// Every output element is written by one thread and every sum runs in a fixed order (no atomics, warp
// reductions only through fixed shuffle trees): results are bitwise reproducible.
//
// cu_seqlens is copied to the host once per call and checked there (report offsets for the launch shapes).
// Only c10/cuda headers are used (ATen/cuda/CUDAContext.h needs cuSPARSE headers).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "egma_common.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace egma_cuda {
namespace {

constexpr int TILE = 32;      // patches x sentences per similarity tile
constexpr int TK = 32;        // chunk of D per shared-memory step
constexpr int NT = 256;       // threads of the tile kernels
constexpr int ROW_THREADS = 128;  // threads of the row kernels (one block per output row, threads over D)
constexpr int RED_THREADS = 256;  // threads of the per-report kernels

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T>
__device__ __forceinline__ T dev_neg_inf() {
  return -INFINITY;
}

template <typename acc_t>
__device__ __forceinline__ acc_t dexp(acc_t x) {
  return exp(x);
}
template <>
__device__ __forceinline__ float dexp<float>(float x) {
  return expf(x);
}
template <typename acc_t>
__device__ __forceinline__ acc_t dlog(acc_t x) {
  return log(x);
}
template <>
__device__ __forceinline__ float dlog<float>(float x) {
  return logf(x);
}

// out[i][j] = sum_d a[i, d] * b[j, d] for i < ma, j < nb (0 elsewhere), a TILE x TILE block in shared memory.
// Every entry is summed in the order d = 0, 1, ... (zero padding adds exact zeros). Needs NT threads.
template <typename TA, typename TB, typename acc_t>
__device__ void tile_dots(const TA* __restrict__ a, int64_t lda, int ma, const TB* __restrict__ b, int64_t ldb, int nb,
                          int64_t D, acc_t (*sa)[TK + 1], acc_t (*sb)[TK + 1], acc_t (*out)[TILE + 1]) {
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  acc_t c00 = 0, c01 = 0, c10 = 0, c11 = 0;
  for (int64_t d0 = 0; d0 < D; d0 += TK) {
    for (int e = tid; e < TILE * TK; e += NT) {
      const int r = e / TK, k = e % TK;
      const int64_t d = d0 + k;
      sa[r][k] = (r < ma && d < D) ? static_cast<acc_t>(a[r * lda + d]) : acc_t(0);
      sb[r][k] = (r < nb && d < D) ? static_cast<acc_t>(b[r * ldb + d]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < TK; ++k) {
      const acc_t a0 = sa[ty][k], a1 = sa[ty + 16][k], b0 = sb[tx][k], b1 = sb[tx + 16][k];
      c00 += a0 * b0;
      c01 += a0 * b1;
      c10 += a1 * b0;
      c11 += a1 * b1;
    }
    __syncthreads();
  }
  out[ty][tx] = c00;
  out[ty][tx + 16] = c01;
  out[ty + 16][tx] = c10;
  out[ty + 16][tx + 16] = c11;
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------------------
// FILIP tiles: grid (R, M), NT threads.
template <typename scalar_t, typename acc_t>
__global__ void filip_tile_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ s,
                                  const int32_t* __restrict__ cu, const acc_t* __restrict__ scale, int64_t P,
                                  int64_t D, int64_t N, int64_t R, int max_len, bool compat, acc_t* __restrict__ i2t,
                                  acc_t* __restrict__ t2i, int32_t* __restrict__ i2t_arg,
                                  int32_t* __restrict__ t2i_arg, acc_t* __restrict__ colbest,
                                  acc_t* __restrict__ own) {
  __shared__ acc_t sa[TILE][TK + 1];
  __shared__ acc_t sb[TILE][TK + 1];
  __shared__ acc_t S[TILE][TILE + 1];
  __shared__ acc_t rowbest[TILE];
  __shared__ int32_t rowarg[TILE];
  const int64_t b = blockIdx.x, a = blockIdx.y;
  const int tid = threadIdx.x;
  const acc_t t = *scale;
  const int64_t u0 = cu[b], u1 = cu[b + 1], n = u1 - u0;
  const bool clamp = compat && n < max_len;
  const bool matched = own != nullptr && a == b;
  acc_t rowsum = 0;  // thread 0
  for (int64_t i0 = 0; i0 < P; i0 += TILE) {
    const int pc = static_cast<int>(imin(TILE, P - i0));
    if (tid < TILE) {
      rowbest[tid] = dev_neg_inf<acc_t>();
      rowarg[tid] = 0;
    }
    for (int64_t c0 = u0; c0 < u1; c0 += TILE) {
      const int sc = static_cast<int>(imin(TILE, u1 - c0));
      tile_dots<scalar_t, scalar_t, acc_t>(p + (a * P + i0) * D, D, pc, s + c0 * D, D, sc, D, sa, sb, S);
      for (int e = tid; e < TILE * TILE; e += NT) S[e / TILE][e % TILE] *= t;
      __syncthreads();
      if (tid < pc) {  // row max over this chunk's sentences, in order
        acc_t best = rowbest[tid];
        int32_t arg = rowarg[tid];
        for (int j = 0; j < sc; ++j) {
          const acc_t v = S[tid][j];
          if (v > best || (c0 == u0 && j == 0)) {
            best = v;
            arg = static_cast<int32_t>(c0 + j);
          }
        }
        rowbest[tid] = best;
        rowarg[tid] = arg;
      } else if (tid >= 64 && tid < 64 + sc) {  // column max over this chunk's patches, in order
        const int j = tid - 64;
        const int64_t u = c0 + j;
        acc_t best = i0 == 0 ? dev_neg_inf<acc_t>() : colbest[a * N + u];
        int32_t arg = i0 == 0 ? 0 : t2i_arg[a * N + u];
        for (int i = 0; i < pc; ++i) {
          const acc_t v = S[i][j];
          if (v > best || (i0 == 0 && i == 0)) {
            best = v;
            arg = static_cast<int32_t>(i0 + i);
          }
        }
        colbest[a * N + u] = best;
        t2i_arg[a * N + u] = arg;
      }
      if (matched) {
        for (int e = tid; e < pc * sc; e += NT) {
          const int j = e / pc, i = e % pc;
          own[(c0 + j) * P + i0 + i] = S[i][j];
        }
      }
      __syncthreads();
    }
    if (tid < pc) {
      if (clamp && rowbest[tid] < acc_t(0)) {
        rowbest[tid] = 0;
        rowarg[tid] = -1;
      }
      if (i2t_arg != nullptr) i2t_arg[(a * R + b) * P + i0 + tid] = rowarg[tid];
    }
    __syncthreads();
    if (tid == 0)
      for (int i = 0; i < pc; ++i) rowsum += rowbest[i];
    __syncthreads();
  }
  if (tid == 0) {
    i2t[a * R + b] = rowsum / static_cast<acc_t>(P);
    acc_t sum = 0;
    for (int64_t u = u0; u < u1; ++u) sum += colbest[a * N + u];
    t2i[a * R + b] = sum / static_cast<acc_t>(n);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Per-report kernels of the loss (grid B, RED_THREADS threads).

__device__ __forceinline__ bool has_gaze(const bool* gmask, bool gaze_given, int64_t k) {
  return gaze_given && (gmask == nullptr || gmask[k]);
}

// log(1 + sum_{keep} exp(sign * v)) over a strided set.
template <typename acc_t, typename G>
__device__ acc_t lse_zero(const acc_t* v, int64_t n, int64_t stride, const G* g, int64_t gstride, acc_t sign,
                          bool positive) {
  acc_t m = 0;
  for (int64_t e = 0; e < n; ++e) {
    const bool pos = static_cast<acc_t>(g[e * gstride]) > acc_t(0);
    if (pos == positive) m = max(m, sign * v[e * stride]);
  }
  acc_t sum = dexp(-m);
  for (int64_t e = 0; e < n; ++e) {
    const bool pos = static_cast<acc_t>(g[e * gstride]) > acc_t(0);
    if (pos == positive) sum += dexp(sign * v[e * stride] - m);
  }
  return m + dlog(sum);
}

// Row (per sentence) and column (per patch) log-sum-exps of the MLCE term; mlce_k = the report's term.
template <typename scalar_t, typename acc_t>
__global__ void mlce_kernel(const acc_t* __restrict__ own, const scalar_t* __restrict__ gaze,
                            const bool* __restrict__ gmask, const int32_t* __restrict__ cu, int64_t P, acc_t alpha,
                            acc_t* rl, acc_t* rp, acc_t* cl, acc_t* cp, acc_t* mlce_k) {
  const int64_t k = blockIdx.x;
  const int64_t u0 = cu[k], n = cu[k + 1] - u0;
  if (!has_gaze(gmask, gaze != nullptr, k)) {
    if (threadIdx.x == 0) mlce_k[k] = 0;
    return;
  }
  const acc_t* X = own + u0 * P;
  const scalar_t* GS = gaze + u0 * P;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    rl[u0 + j] = lse_zero<acc_t, scalar_t>(X + j * P, P, 1, GS + j * P, 1, acc_t(1), false);
    rp[u0 + j] = lse_zero<acc_t, scalar_t>(X + j * P, P, 1, GS + j * P, 1, acc_t(-1), true);
  }
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
    cl[k * P + i] = lse_zero<acc_t, scalar_t>(X + i, n, P, GS + i, P, acc_t(1), false);
    cp[k * P + i] = lse_zero<acc_t, scalar_t>(X + i, n, P, GS + i, P, acc_t(-1), true);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t s2p = 0, p2s = 0;
    for (int64_t j = 0; j < n; ++j) s2p += rl[u0 + j] + rp[u0 + j];
    for (int64_t i = 0; i < P; ++i) p2s += cl[k * P + i] + cp[k * P + i];
    mlce_k[k] = alpha * (s2p / static_cast<acc_t>(n)) + (acc_t(1) - alpha) * (p2s / static_cast<acc_t>(P));
  }
}

// Mapping weights of report k (n >= 2): W1 at w1 + P * u0 (P x n), W2 at w2 + u0 * P (n x P).
template <typename scalar_t, typename acc_t>
__global__ void weights_kernel(const acc_t* __restrict__ own, const scalar_t* __restrict__ gaze,
                               const bool* __restrict__ gmask, const int32_t* __restrict__ cu, int64_t P,
                               acc_t theta, acc_t* w1, acc_t* w2) {
  const int64_t k = blockIdx.x;
  const int64_t u0 = cu[k], n = cu[k + 1] - u0;
  if (n < 2) return;
  const acc_t* X = own + u0 * P;
  const scalar_t* GS = has_gaze(gmask, gaze != nullptr, k) ? gaze + u0 * P : nullptr;
  auto omega = [&](acc_t v, acc_t mn, acc_t spread) -> acc_t {
    if (spread == acc_t(0)) return acc_t(1);
    return (v - mn) / spread >= theta ? acc_t(1) : acc_t(0);
  };
  acc_t* W1 = w1 + P * u0;
  acc_t* W2 = w2 + u0 * P;
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

// crossP[k, i] = sum_j W1[k][i, j] s[u0 + j] (grid B * P) and crossS[u] = sum_i W2[u, i] p[k, i] (grid N).
template <typename scalar_t, typename acc_t>
__global__ void cross_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ s,
                             const int32_t* __restrict__ cu, const int32_t* __restrict__ owner, const acc_t* w1,
                             const acc_t* w2, int64_t B, int64_t P, int64_t D, acc_t* crossP, acc_t* crossS) {
  const int64_t row = blockIdx.x;
  if (row < B * P) {
    const int64_t k = row / P, i = row % P;
    const int64_t u0 = cu[k], n = cu[k + 1] - u0;
    if (n < 2) return;
    const acc_t* W1 = w1 + P * u0 + i * n;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      acc_t acc = 0;
      for (int64_t j = 0; j < n; ++j) acc += W1[j] * static_cast<acc_t>(s[(u0 + j) * D + d]);
      crossP[row * D + d] = acc;
    }
  } else {
    const int64_t u = row - B * P;
    const int64_t k = owner[u];
    if (cu[k + 1] - cu[k] < 2) return;
    const acc_t* W2 = w2 + u * P;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      acc_t acc = 0;
      for (int64_t i = 0; i < P; ++i) acc += W2[i] * static_cast<acc_t>(p[(k * P + i) * D + d]);
      crossS[u * D + d] = acc;
    }
  }
}

// LP[k] = t * crossP[k] p[k]^T (P x P), tiled: grid (ceil(P/32), ceil(P/32), B).
template <typename scalar_t, typename acc_t>
__global__ void lp_kernel(const acc_t* __restrict__ crossP, const scalar_t* __restrict__ p,
                          const int32_t* __restrict__ cu, const acc_t* __restrict__ scale, int64_t P, int64_t D,
                          acc_t* LP) {
  __shared__ acc_t sa[TILE][TK + 1];
  __shared__ acc_t sb[TILE][TK + 1];
  __shared__ acc_t S[TILE][TILE + 1];
  const int64_t k = blockIdx.z;
  if (cu[k + 1] - cu[k] < 2) return;
  const int64_t i0 = blockIdx.y * TILE, j0 = blockIdx.x * TILE;
  const int mi = static_cast<int>(imin(TILE, P - i0)), nj = static_cast<int>(imin(TILE, P - j0));
  tile_dots<acc_t, scalar_t, acc_t>(crossP + (k * P + i0) * D, D, mi, p + (k * P + j0) * D, D, nj, D, sa, sb, S);
  const acc_t t = *scale;
  for (int e = threadIdx.x; e < mi * nj; e += NT) {
    const int i = e / nj, j = e % nj;
    LP[(k * P + i0 + i) * P + j0 + j] = t * S[i][j];
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return __shfl_sync(0xffffffffu, v, 0);
}

// LS[u, e] = t * <crossS[u], s[u0 + e]> at ls + ls_off[k] + (u - u0) * n + e: grid N, one warp per e.
template <typename scalar_t, typename acc_t>
__global__ void ls_kernel(const acc_t* __restrict__ crossS, const scalar_t* __restrict__ s,
                          const int32_t* __restrict__ cu, const int32_t* __restrict__ owner,
                          const int64_t* __restrict__ ls_off, const acc_t* __restrict__ scale, int64_t D, acc_t* LS) {
  const int64_t u = blockIdx.x, k = owner[u];
  const int64_t u0 = cu[k], n = cu[k + 1] - u0;
  if (n < 2) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  const acc_t t = *scale;
  for (int64_t e = warp; e < n; e += nw) {
    acc_t acc = 0;
    for (int64_t d = lane; d < D; d += 32) acc += crossS[u * D + d] * static_cast<acc_t>(s[(u0 + e) * D + d]);
    acc = warp_sum(acc);
    if (lane == 0) LS[ls_off[k] + (u - u0) * n + e] = t * acc;
  }
}

// Row / column log-sum-exps of LP[k] and LS[k] and the report's mapping term 0.5 (clipP + clipS).
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

template <typename acc_t>
__global__ void clip_kernel(const acc_t* LP, const acc_t* LS, const int32_t* __restrict__ cu,
                            const int64_t* __restrict__ ls_off, int64_t P, acc_t* lp_row, acc_t* lp_col,
                            acc_t* ls_row, acc_t* ls_col, acc_t* map_k) {
  const int64_t k = blockIdx.x;
  const int64_t u0 = cu[k], n = cu[k + 1] - u0;
  if (n < 2) {
    if (threadIdx.x == 0) map_k[k] = 0;
    return;
  }
  const acc_t* L = LP + k * P * P;
  const acc_t* M = LS + ls_off[k];
  block_lse(L, P, lp_row + k * P, lp_col + k * P);
  block_lse(M, n, ls_row + u0, ls_col + u0);
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t r = 0, c = 0;
    for (int64_t i = 0; i < P; ++i) {
      r += lp_row[k * P + i] - L[i * P + i];
      c += lp_col[k * P + i] - L[i * P + i];
    }
    const acc_t clip_p = acc_t(0.5) * (r / static_cast<acc_t>(P) + c / static_cast<acc_t>(P));
    r = 0;
    c = 0;
    for (int64_t e = 0; e < n; ++e) {
      r += ls_row[u0 + e] - M[e * n + e];
      c += ls_col[u0 + e] - M[e * n + e];
    }
    const acc_t clip_s = acc_t(0.5) * (r / static_cast<acc_t>(n) + c / static_cast<acc_t>(n));
    map_k[k] = acc_t(0.5) * (clip_p + clip_s);
  }
}

// Diagonal cross-entropy over rows (by_rows) or columns of a B x B matrix; one thread per row.
template <typename acc_t>
__device__ void ce_lse(const acc_t* Mx, int64_t B, bool by_rows, acc_t* lse) {
  for (int64_t a = threadIdx.x; a < B; a += blockDim.x) {
    acc_t mx = dev_neg_inf<acc_t>();
    for (int64_t c = 0; c < B; ++c) mx = max(mx, by_rows ? Mx[a * B + c] : Mx[c * B + a]);
    acc_t sum = 0;
    for (int64_t c = 0; c < B; ++c) sum += dexp((by_rows ? Mx[a * B + c] : Mx[c * B + a]) - mx);
    lse[a] = mx + dlog(sum);
  }
}

// One block: the totals. lse1 / lse2 are B-sized scratch.
template <typename acc_t>
__global__ void final_kernel(const acc_t* i2t, const acc_t* t2i, const acc_t* mlce_k, const acc_t* map_k,
                             const int32_t* __restrict__ cu, const bool* gmask, bool gaze_given, int64_t B,
                             bool compat, acc_t w_con, acc_t w_mlce, acc_t w_map, acc_t* lse1, acc_t* lse2,
                             acc_t* terms) {
  ce_lse(i2t, B, true, lse1);
  ce_lse(t2i, B, compat, lse2);
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t ce1 = 0, ce2 = 0, mlce = 0, mapping = 0;
    int64_t ng = 0, nm = 0;
    for (int64_t a = 0; a < B; ++a) {
      ce1 += lse1[a] - i2t[a * B + a];
      ce2 += lse2[a] - t2i[a * B + a];
      if (has_gaze(gmask, gaze_given, a)) {
        ++ng;
        mlce += mlce_k[a];
      }
      if (cu[a + 1] - cu[a] >= 2) {
        ++nm;
        mapping += map_k[a];
      }
    }
    const acc_t con = acc_t(0.5) * (ce1 / static_cast<acc_t>(B) + ce2 / static_cast<acc_t>(B));
    mlce /= static_cast<acc_t>(ng > 0 ? ng : 1);
    mapping /= static_cast<acc_t>(nm > 0 ? nm : 1);
    terms[0] = w_con * con + w_mlce * mlce + w_map * mapping;
    terms[1] = con;
    terms[2] = mlce;
    terms[3] = mapping;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward.

// One block: G1 = dL/dI2T, G2 = dL/dT2I (M x R), coef = [c_mlce / #gaze, c_map / #mapped, dt_con].
template <typename acc_t>
__global__ void grad_setup_kernel(const acc_t* gterms, const acc_t* g_i2t, const acc_t* g_t2i, const acc_t* i2t,
                                  const acc_t* t2i, const acc_t* __restrict__ scale, const int32_t* __restrict__ cu,
                                  const bool* gmask, bool gaze_given, int64_t M, int64_t R, bool is_loss, bool compat,
                                  acc_t w_con, acc_t w_mlce, acc_t w_map, acc_t* lse1, acc_t* lse2, acc_t* G1,
                                  acc_t* G2, acc_t* coef) {
  const acc_t c_con = is_loss ? gterms[0] * w_con + gterms[1] : acc_t(0);
  if (is_loss) {
    ce_lse(i2t, M, true, lse1);
    ce_lse(t2i, M, compat, lse2);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < M * R; e += blockDim.x) {
    const int64_t a = e / R, c = e % R;
    acc_t g1 = g_i2t[e], g2 = g_t2i[e];
    if (is_loss) {
      const acc_t delta = a == c ? acc_t(1) : acc_t(0);
      const acc_t cc = acc_t(0.5) * c_con / static_cast<acc_t>(M);
      g1 += cc * (dexp(i2t[e] - lse1[a]) - delta);
      g2 += cc * (dexp(t2i[e] - (compat ? lse2[a] : lse2[c])) - delta);
    }
    G1[e] = g1;
    G2[e] = g2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t g = 0;
    for (int64_t e = 0; e < M * R; ++e) g += G1[e] * i2t[e] + G2[e] * t2i[e];
    coef[2] = g / *scale;
    if (is_loss) {
      int64_t ng = 0, nm = 0;
      for (int64_t k = 0; k < M; ++k) {
        ng += has_gaze(gmask, gaze_given, k) ? 1 : 0;
        nm += cu[k + 1] - cu[k] >= 2 ? 1 : 0;
      }
      coef[0] = (gterms[0] * w_mlce + gterms[2]) / static_cast<acc_t>(ng > 0 ? ng : 1);
      coef[1] = (gterms[0] * w_map + gterms[3]) / static_cast<acc_t>(nm > 0 ? nm : 1);
    }
  }
}

// dX (N x P, already times t) of the MLCE term, and dt_k[k] = sum dX * X / t (grid B).
template <typename scalar_t, typename acc_t>
__global__ void mlce_grad_kernel(const acc_t* __restrict__ own, const scalar_t* __restrict__ gaze,
                                 const bool* __restrict__ gmask, const int32_t* __restrict__ cu,
                                 const acc_t* __restrict__ scale, int64_t P, acc_t alpha, const acc_t* rl,
                                 const acc_t* rp, const acc_t* cl, const acc_t* cp, const acc_t* coef, acc_t* dX,
                                 acc_t* dt_k) {
  const int64_t k = blockIdx.x;
  const int64_t u0 = cu[k], n = cu[k + 1] - u0;
  const bool g = has_gaze(gmask, gaze != nullptr, k);
  const acc_t t = *scale;
  const acc_t cr = coef[0] * alpha / static_cast<acc_t>(n), cc = coef[0] * (acc_t(1) - alpha) / static_cast<acc_t>(P);
  for (int64_t e = threadIdx.x; e < n * P; e += blockDim.x) {
    const int64_t j = e / P, i = e % P;
    acc_t d = 0;
    if (g) {
      const acc_t x = own[(u0 + j) * P + i];
      if (static_cast<acc_t>(gaze[(u0 + j) * P + i]) > acc_t(0))
        d = -cr * dexp(-x - rp[u0 + j]) - cc * dexp(-x - cp[k * P + i]);
      else
        d = cr * dexp(x - rl[u0 + j]) + cc * dexp(x - cl[k * P + i]);
    }
    dX[(u0 + j) * P + i] = t * d;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t sum = 0;
    if (g)
      for (int64_t e = 0; e < n * P; ++e) sum += dX[u0 * P + e] * own[u0 * P + e];
    dt_k[k] = sum / (t * t);
  }
}

// In place: LP <- t * dLP, LS <- t * dLS (dLP = c_map * 0.5 * d clip / d LP); dt_k[k] += sum dL * L / t.
// rowdt (B * P + N) holds the per-row sums, added in a fixed order by thread 0.
template <typename acc_t>
__global__ void clip_grad_kernel(acc_t* LP, acc_t* LS, const int32_t* __restrict__ cu,
                                 const int64_t* __restrict__ ls_off, const acc_t* __restrict__ scale, int64_t B,
                                 int64_t P, const acc_t* lp_row, const acc_t* lp_col, const acc_t* ls_row,
                                 const acc_t* ls_col, const acc_t* coef, acc_t* rowdt, acc_t* dt_k) {
  const int64_t k = blockIdx.x;
  const int64_t u0 = cu[k], n = cu[k + 1] - u0;
  if (n < 2) return;
  const acc_t t = *scale;
  acc_t* L = LP + k * P * P;
  acc_t* M = LS + ls_off[k];
  const acc_t cP = coef[1] * acc_t(0.25) / static_cast<acc_t>(P);
  const acc_t cS = coef[1] * acc_t(0.25) / static_cast<acc_t>(n);
  for (int64_t i = threadIdx.x; i < P + n; i += blockDim.x) {
    acc_t sum = 0;
    if (i < P) {
      for (int64_t j = 0; j < P; ++j) {
        const acc_t x = L[i * P + j];
        const acc_t g =
            cP * (dexp(x - lp_row[k * P + i]) + dexp(x - lp_col[k * P + j]) - (i == j ? acc_t(2) : acc_t(0)));
        sum += g * x;
        L[i * P + j] = t * g;
      }
      rowdt[k * P + i] = sum;
    } else {
      const int64_t r = i - P;
      for (int64_t e = 0; e < n; ++e) {
        const acc_t x = M[r * n + e];
        const acc_t g =
            cS * (dexp(x - ls_row[u0 + r]) + dexp(x - ls_col[u0 + e]) - (r == e ? acc_t(2) : acc_t(0)));
        sum += g * x;
        M[r * n + e] = t * g;
      }
      rowdt[B * P + u0 + r] = sum;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t sum = 0;
    for (int64_t i = 0; i < P; ++i) sum += rowdt[k * P + i];
    for (int64_t r = 0; r < n; ++r) sum += rowdt[B * P + u0 + r];
    dt_k[k] += sum / t;
  }
}

// dcrossP[k, i] = sum_j dQ[k][i, j] p[k, j] (grid B * P) and dcrossS[u] = sum_e dQS[u, e] s[u0 + e] (grid N).
template <typename scalar_t, typename acc_t>
__global__ void dcross_kernel(const scalar_t* __restrict__ p, const scalar_t* __restrict__ s,
                              const int32_t* __restrict__ cu, const int32_t* __restrict__ owner,
                              const int64_t* __restrict__ ls_off, const acc_t* dLP, const acc_t* dLS, int64_t B,
                              int64_t P, int64_t D, acc_t* dcrossP, acc_t* dcrossS) {
  const int64_t row = blockIdx.x;
  if (row < B * P) {
    const int64_t k = row / P, i = row % P;
    if (cu[k + 1] - cu[k] < 2) return;
    const acc_t* g = dLP + (k * P + i) * P;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      acc_t acc = 0;
      for (int64_t j = 0; j < P; ++j) acc += g[j] * static_cast<acc_t>(p[(k * P + j) * D + d]);
      dcrossP[row * D + d] = acc;
    }
  } else {
    const int64_t u = row - B * P, k = owner[u];
    const int64_t u0 = cu[k], n = cu[k + 1] - u0;
    if (n < 2) return;
    const acc_t* g = dLS + ls_off[k] + (u - u0) * n;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      acc_t acc = 0;
      for (int64_t e = 0; e < n; ++e) acc += g[e] * static_cast<acc_t>(s[(u0 + e) * D + d]);
      dcrossS[u * D + d] = acc;
    }
  }
}

// d patch_emb[a, i] (grid M * P, threads over D): I2T terms (per report, through the argmax sentence), T2I
// terms (sentences whose best patch of image a is i), then, for the loss, the MLCE and mapping terms.
template <typename scalar_t, typename acc_t>
__global__ void dpatch_kernel(const scalar_t* __restrict__ s, const int32_t* __restrict__ cu,
                              const int32_t* __restrict__ owner, const acc_t* __restrict__ scale, int64_t P,
                              int64_t D, int64_t N, int64_t R, const acc_t* G1, const acc_t* G2,
                              const int32_t* __restrict__ i2t_arg, const int32_t* __restrict__ t2i_arg,
                              const acc_t* dX, const acc_t* dLP, const acc_t* crossP, const acc_t* w2,
                              const acc_t* dcrossS, scalar_t* dp) {
  const int64_t row = blockIdx.x, a = row / P, i = row % P;
  const acc_t t = *scale;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t acc = 0;
    for (int64_t b = 0; b < R; ++b) {
      const int32_t u = i2t_arg[(a * R + b) * P + i];  // -1: egma_compat's clamp; bounded against made-up indices
      if (u >= 0 && u < N) acc += (t * G1[a * R + b] / static_cast<acc_t>(P)) * static_cast<acc_t>(s[u * D + d]);
    }
    for (int64_t u = 0; u < N; ++u)
      if (t2i_arg[a * N + u] == i) {
        const int64_t b = owner[u];
        acc += (t * G2[a * R + b] / static_cast<acc_t>(cu[b + 1] - cu[b])) * static_cast<acc_t>(s[u * D + d]);
      }
    if (dX != nullptr) {  // the loss: image a is matched with report a
      const int64_t u0 = cu[a], n = cu[a + 1] - u0;
      for (int64_t j = 0; j < n; ++j) acc += dX[(u0 + j) * P + i] * static_cast<acc_t>(s[(u0 + j) * D + d]);
      if (n >= 2) {
        const acc_t* g = dLP + a * P * P;
        for (int64_t r = 0; r < P; ++r) acc += g[r * P + i] * crossP[(a * P + r) * D + d];
        for (int64_t j = 0; j < n; ++j) acc += w2[(u0 + j) * P + i] * dcrossS[(u0 + j) * D + d];
      }
    }
    dp[row * D + d] = static_cast<scalar_t>(acc);
  }
}

// d sent_emb[u] (grid N, threads over D): I2T terms (patches whose best sentence of report b is u, by image
// then patch), T2I terms (its best patch in each image), then, for the loss, the MLCE and mapping terms.
template <typename scalar_t, typename acc_t>
__global__ void dsent_kernel(const scalar_t* __restrict__ p, const int32_t* __restrict__ cu,
                             const int32_t* __restrict__ owner, const int64_t* __restrict__ ls_off,
                             const acc_t* __restrict__ scale, int64_t M, int64_t P, int64_t D, int64_t N, int64_t R,
                             const acc_t* G1, const acc_t* G2, const int32_t* __restrict__ i2t_arg,
                             const int32_t* __restrict__ t2i_arg, const acc_t* dX, const acc_t* w1,
                             const acc_t* dcrossP, const acc_t* dLS, const acc_t* crossS, scalar_t* ds) {
  const int64_t u = blockIdx.x, b = owner[u];
  const int64_t u0 = cu[b], n = cu[b + 1] - u0, e = u - u0;
  const acc_t t = *scale;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t acc = 0;
    for (int64_t a = 0; a < M; ++a) {
      const acc_t c = t * G1[a * R + b] / static_cast<acc_t>(P);
      const int32_t* arg = i2t_arg + (a * R + b) * P;
      for (int64_t i = 0; i < P; ++i)
        if (arg[i] == u) acc += c * static_cast<acc_t>(p[(a * P + i) * D + d]);
    }
    for (int64_t a = 0; a < M; ++a) {
      const int64_t i = imin(imax(t2i_arg[a * N + u], 0), P - 1);  // a patch index, bounded against made-up ones
      acc += (t * G2[a * R + b] / static_cast<acc_t>(n)) * static_cast<acc_t>(p[(a * P + i) * D + d]);
    }
    if (dX != nullptr) {
      for (int64_t i = 0; i < P; ++i) acc += dX[u * P + i] * static_cast<acc_t>(p[(b * P + i) * D + d]);
      if (n >= 2) {
        const acc_t* W1 = w1 + P * u0;
        for (int64_t i = 0; i < P; ++i) acc += W1[i * n + e] * dcrossP[(b * P + i) * D + d];
        const acc_t* g = dLS + ls_off[b];
        for (int64_t r = 0; r < n; ++r) acc += g[r * n + e] * crossS[(u0 + r) * D + d];
      }
    }
    ds[u * D + d] = static_cast<scalar_t>(acc);
  }
}

template <typename acc_t>
__global__ void dscale_kernel(const acc_t* coef, const acc_t* dt_k, int64_t K, acc_t* dscale) {
  acc_t g = coef[2];
  for (int64_t k = 0; k < K; ++k) g += dt_k[k];
  *dscale = g;
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

using egma_common::check_gaze_inputs;
using egma_common::check_loss_grad_inputs;
using egma_common::check_report_offsets;
using egma_common::check_similarity_grad_inputs;
using egma_common::new_out;

void check_common(const at::Tensor& patch, const at::Tensor& sent, const at::Tensor& cu, const at::Tensor& scale) {
  TORCH_CHECK(patch.is_cuda() && sent.is_cuda() && cu.is_cuda() && scale.is_cuda(),
              "egma_kernels CUDA op: all tensors must be CUDA tensors");
  TORCH_CHECK(patch.device() == sent.device() && patch.device() == cu.device() && patch.device() == scale.device(),
              "egma_kernels CUDA op: tensors on different devices");
  TORCH_CHECK(patch.dim() == 3 && sent.dim() == 2 && cu.dim() == 1, "egma_kernels: bad ranks");
  TORCH_CHECK(patch.size(2) == sent.size(1), "egma_kernels: embedding sizes differ");
  TORCH_CHECK(patch.scalar_type() == sent.scalar_type(), "egma_kernels: patch_emb and sent_emb dtypes differ");
  TORCH_CHECK(cu.scalar_type() == at::kInt, "egma_kernels: cu_seqlens must be int32");
  TORCH_CHECK(scale.numel() == 1, "egma_kernels: logit_scale must have one element");
  TORCH_CHECK(cu.size(0) >= 1, "egma_kernels: cu_seqlens must have at least one element");
  TORCH_CHECK(patch.size(1) >= 1 && patch.size(2) >= 1, "egma_kernels: patch_emb must have P >= 1 and D >= 1");
}

// Host copy of the offsets, checked (every kernel indexes sentences through them): max length, the owner of each sentence and the offsets of the n_k x n_k blocks.
struct HostReports {
  std::vector<int32_t> cu;
  int max_len = 0;
  at::Tensor owner, ls_off;
  int64_t ls_total = 0;
  HostReports(const at::Tensor& cu_dev, int64_t N, const char* op) {
    auto cu_cpu = cu_dev.to(at::kCPU).contiguous();
    const int64_t R = cu_cpu.numel() - 1;
    cu.assign(cu_cpu.data_ptr<int32_t>(), cu_cpu.data_ptr<int32_t>() + R + 1);
    check_report_offsets(cu.data(), R, N, op);
    std::vector<int32_t> own(N);
    std::vector<int64_t> off(R);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = cu[r + 1] - cu[r];
      max_len = std::max<int>(max_len, static_cast<int>(n));
      for (int64_t u = cu[r]; u < cu[r + 1]; ++u) own[u] = static_cast<int32_t>(r);
      off[r] = ls_total;
      ls_total += n >= 2 ? n * n : 0;
    }
    auto dev = cu_dev.device();
    owner = at::from_blob(own.data(), {N}, at::kInt).to(dev);
    ls_off = at::from_blob(off.data(), {R}, at::kLong).to(dev);
  }
};

template <typename T>
T* ptr_or_null(const at::Tensor& x) {
  return x.defined() ? x.data_ptr<T>() : nullptr;
}

unsigned grid1(int64_t n) { return static_cast<unsigned>(n > 0 ? n : 1); }


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_fwd_cuda(
    const at::Tensor& patch_, const at::Tensor& sent_, const at::Tensor& cu_, const at::Tensor& scale_,
    const std::optional<at::Tensor>& gaze_, const std::optional<at::Tensor>& gmask_, double alpha, double theta,
    double w_con, double w_mlce, double w_map, bool compat, bool save_idx) {
  check_common(patch_, sent_, cu_, scale_);
  c10::cuda::CUDAGuard guard(patch_.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto patch = patch_.contiguous();
  const auto sent = sent_.contiguous();
  const auto cu = cu_.contiguous();
  const int64_t B = patch.size(0), P = patch.size(1), D = patch.size(2), N = sent.size(0);
  TORCH_CHECK(cu.size(0) == B + 1, "egma_kernels: the loss needs one report per image");
  const auto acc_type = patch.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopts = patch.options().dtype(acc_type);
  const auto iopts = patch.options().dtype(at::kInt);
  const auto scale = scale_.to(acc_type).contiguous();
  check_gaze_inputs(B, P, N, gaze_, gmask_, "loss_fwd");
  at::Tensor gaze, gmask;
  if (gaze_.has_value()) {
    gaze = gaze_->to(patch.scalar_type()).contiguous();
    if (gmask_.has_value()) gmask = gmask_->to(at::kBool).contiguous();
  }
  HostReports hr(cu, N, "loss_fwd");
  auto terms = new_out({4}, aopts);
  auto i2t = new_out({B, B}, aopts);
  auto t2i = new_out({B, B}, aopts);
  // The argmax routes only when a backward may follow (the tile kernel uses t2i_arg as scratch either way).
  auto i2t_arg = save_idx ? new_out({B, B, P}, iopts) : at::empty({0}, iopts);
  auto t2i_arg = save_idx ? new_out({B, N}, iopts) : at::empty({B, N}, iopts);
  auto own = new_out({N, P}, aopts);
  auto colbest = at::empty({B, N}, aopts);
  auto rl = at::empty({N}, aopts), rp = at::empty({N}, aopts);
  auto cl = at::empty({B, P}, aopts), cp = at::empty({B, P}, aopts);
  auto mlce_k = at::empty({B}, aopts), map_k = at::empty({B}, aopts);
  auto w1 = at::empty({N * P}, aopts), w2 = at::empty({N * P}, aopts);
  auto crossP = at::empty({B * P, D}, aopts), crossS = at::empty({N, D}, aopts);
  auto LP = at::empty({B * P * P}, aopts), LS = at::empty({std::max<int64_t>(hr.ls_total, 1)}, aopts);
  auto lp_row = at::empty({B * P}, aopts), lp_col = at::empty({B * P}, aopts);
  auto ls_row = at::empty({N}, aopts), ls_col = at::empty({N}, aopts);
  auto lse = at::empty({2 * B}, aopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patch.scalar_type(), "egma_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = patch.data_ptr<scalar_t>();
    const scalar_t* s = sent.data_ptr<scalar_t>();
    const int32_t* c = cu.data_ptr<int32_t>();
    const acc_t* t = scale.data_ptr<acc_t>();
    const scalar_t* g = ptr_or_null<scalar_t>(gaze);
    const bool* gm = ptr_or_null<bool>(gmask);
    filip_tile_kernel<scalar_t, acc_t><<<dim3(grid1(B), grid1(B)), NT, 0, stream>>>(
        p, s, c, t, P, D, N, B, hr.max_len, compat, i2t.data_ptr<acc_t>(), t2i.data_ptr<acc_t>(),
        save_idx ? i2t_arg.data_ptr<int32_t>() : nullptr, t2i_arg.data_ptr<int32_t>(), colbest.data_ptr<acc_t>(),
        own.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mlce_kernel<scalar_t, acc_t><<<grid1(B), RED_THREADS, 0, stream>>>(
        own.data_ptr<acc_t>(), g, gm, c, P, static_cast<acc_t>(alpha), rl.data_ptr<acc_t>(), rp.data_ptr<acc_t>(),
        cl.data_ptr<acc_t>(), cp.data_ptr<acc_t>(), mlce_k.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    weights_kernel<scalar_t, acc_t><<<grid1(B), RED_THREADS, 0, stream>>>(
        own.data_ptr<acc_t>(), g, gm, c, P, static_cast<acc_t>(theta), w1.data_ptr<acc_t>(), w2.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cross_kernel<scalar_t, acc_t><<<grid1(B * P + N), ROW_THREADS, 0, stream>>>(
        p, s, c, hr.owner.data_ptr<int32_t>(), w1.data_ptr<acc_t>(), w2.data_ptr<acc_t>(), B, P, D,
        crossP.data_ptr<acc_t>(), crossS.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned tiles = static_cast<unsigned>((P + TILE - 1) / TILE);
    lp_kernel<scalar_t, acc_t><<<dim3(tiles, tiles, grid1(B)), NT, 0, stream>>>(crossP.data_ptr<acc_t>(), p, c, t,
                                                                                 P, D, LP.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ls_kernel<scalar_t, acc_t><<<grid1(N), ROW_THREADS, 0, stream>>>(
        crossS.data_ptr<acc_t>(), s, c, hr.owner.data_ptr<int32_t>(), hr.ls_off.data_ptr<int64_t>(), t, D,
        LS.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    clip_kernel<acc_t><<<grid1(B), RED_THREADS, 0, stream>>>(
        LP.data_ptr<acc_t>(), LS.data_ptr<acc_t>(), c, hr.ls_off.data_ptr<int64_t>(), P, lp_row.data_ptr<acc_t>(),
        lp_col.data_ptr<acc_t>(), ls_row.data_ptr<acc_t>(), ls_col.data_ptr<acc_t>(), map_k.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    final_kernel<acc_t><<<1, RED_THREADS, 0, stream>>>(
        i2t.data_ptr<acc_t>(), t2i.data_ptr<acc_t>(), mlce_k.data_ptr<acc_t>(), map_k.data_ptr<acc_t>(), c, gm,
        g != nullptr, B, compat, static_cast<acc_t>(w_con), static_cast<acc_t>(w_mlce), static_cast<acc_t>(w_map),
        lse.data_ptr<acc_t>(), lse.data_ptr<acc_t>() + B, terms.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!save_idx) t2i_arg = at::empty({0}, iopts);
  return {terms, i2t, t2i, i2t_arg, t2i_arg, own};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_bwd_cuda(
    const at::Tensor& gterms_, const at::Tensor& g_i2t_, const at::Tensor& g_t2i_, const at::Tensor& patch_,
    const at::Tensor& sent_, const at::Tensor& cu_, const at::Tensor& scale_, const std::optional<at::Tensor>& gaze_,
    const std::optional<at::Tensor>& gmask_, const at::Tensor& i2t_, const at::Tensor& t2i_,
    const at::Tensor& i2t_arg_, const at::Tensor& t2i_arg_, const at::Tensor& own_, double alpha, double theta,
    double w_con, double w_mlce, double w_map, bool compat) {
  check_common(patch_, sent_, cu_, scale_);
  c10::cuda::CUDAGuard guard(patch_.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto patch = patch_.contiguous();
  const auto sent = sent_.contiguous();
  const auto cu = cu_.contiguous();
  const int64_t B = patch.size(0), P = patch.size(1), D = patch.size(2), N = sent.size(0);
  const char* op = "loss_bwd";
  check_loss_grad_inputs(B, P, N, cu.size(0), gterms_, g_i2t_, g_t2i_, i2t_, t2i_, i2t_arg_, t2i_arg_, own_, gaze_,
                         gmask_);
  const auto acc_type = patch.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopts = patch.options().dtype(acc_type);
  const auto scale = scale_.to(acc_type).contiguous();
  const auto gterms = gterms_.to(acc_type).contiguous();
  const auto g_i2t = g_i2t_.to(acc_type).contiguous();
  const auto g_t2i = g_t2i_.to(acc_type).contiguous();
  const auto i2t = i2t_.contiguous(), t2i = t2i_.contiguous(), own = own_.contiguous();
  const auto i2t_arg = i2t_arg_.contiguous(), t2i_arg = t2i_arg_.contiguous();
  at::Tensor gaze, gmask;
  if (gaze_.has_value()) {
    gaze = gaze_->to(patch.scalar_type()).contiguous();
    if (gmask_.has_value()) gmask = gmask_->to(at::kBool).contiguous();
  }
  HostReports hr(cu, N, op);
  auto dp = new_out({B, P, D}, patch.options());
  auto ds = new_out({N, D}, patch.options());
  auto dscale = new_out({}, scale_.options());
  auto G1 = at::empty({B, B}, aopts), G2 = at::empty({B, B}, aopts), coef = at::zeros({4}, aopts);
  auto lse = at::empty({2 * B}, aopts);
  auto rl = at::empty({N}, aopts), rp = at::empty({N}, aopts);
  auto cl = at::empty({B, P}, aopts), cp = at::empty({B, P}, aopts);
  auto mlce_k = at::empty({B}, aopts), map_k = at::empty({B}, aopts), dt_k = at::empty({B}, aopts);
  auto dX = at::empty({N, P}, aopts);
  auto w1 = at::empty({N * P}, aopts), w2 = at::empty({N * P}, aopts);
  auto crossP = at::empty({B * P, D}, aopts), crossS = at::empty({N, D}, aopts);
  auto dcrossP = at::empty({B * P, D}, aopts), dcrossS = at::empty({N, D}, aopts);
  auto LP = at::empty({B * P * P}, aopts), LS = at::empty({std::max<int64_t>(hr.ls_total, 1)}, aopts);
  auto lp_row = at::empty({B * P}, aopts), lp_col = at::empty({B * P}, aopts);
  auto ls_row = at::empty({N}, aopts), ls_col = at::empty({N}, aopts);
  auto rowdt = at::empty({B * P + N}, aopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patch.scalar_type(), "egma_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = patch.data_ptr<scalar_t>();
    const scalar_t* s = sent.data_ptr<scalar_t>();
    const int32_t* c = cu.data_ptr<int32_t>();
    const acc_t* t = scale.data_ptr<acc_t>();
    const scalar_t* g = ptr_or_null<scalar_t>(gaze);
    const bool* gm = ptr_or_null<bool>(gmask);
    const int32_t* owner = hr.owner.data_ptr<int32_t>();
    const int64_t* ls_off = hr.ls_off.data_ptr<int64_t>();
    grad_setup_kernel<acc_t><<<1, RED_THREADS, 0, stream>>>(
        gterms.data_ptr<acc_t>(), g_i2t.data_ptr<acc_t>(), g_t2i.data_ptr<acc_t>(), i2t.data_ptr<acc_t>(),
        t2i.data_ptr<acc_t>(), t, c, gm, g != nullptr, B, B, true, compat, static_cast<acc_t>(w_con),
        static_cast<acc_t>(w_mlce), static_cast<acc_t>(w_map), lse.data_ptr<acc_t>(), lse.data_ptr<acc_t>() + B,
        G1.data_ptr<acc_t>(), G2.data_ptr<acc_t>(), coef.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mlce_kernel<scalar_t, acc_t><<<grid1(B), RED_THREADS, 0, stream>>>(
        own.data_ptr<acc_t>(), g, gm, c, P, static_cast<acc_t>(alpha), rl.data_ptr<acc_t>(), rp.data_ptr<acc_t>(),
        cl.data_ptr<acc_t>(), cp.data_ptr<acc_t>(), mlce_k.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mlce_grad_kernel<scalar_t, acc_t><<<grid1(B), RED_THREADS, 0, stream>>>(
        own.data_ptr<acc_t>(), g, gm, c, t, P, static_cast<acc_t>(alpha), rl.data_ptr<acc_t>(), rp.data_ptr<acc_t>(),
        cl.data_ptr<acc_t>(), cp.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), dX.data_ptr<acc_t>(),
        dt_k.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    weights_kernel<scalar_t, acc_t><<<grid1(B), RED_THREADS, 0, stream>>>(
        own.data_ptr<acc_t>(), g, gm, c, P, static_cast<acc_t>(theta), w1.data_ptr<acc_t>(), w2.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cross_kernel<scalar_t, acc_t><<<grid1(B * P + N), ROW_THREADS, 0, stream>>>(
        p, s, c, owner, w1.data_ptr<acc_t>(), w2.data_ptr<acc_t>(), B, P, D, crossP.data_ptr<acc_t>(),
        crossS.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned tiles = static_cast<unsigned>((P + TILE - 1) / TILE);
    lp_kernel<scalar_t, acc_t><<<dim3(tiles, tiles, grid1(B)), NT, 0, stream>>>(crossP.data_ptr<acc_t>(), p, c, t,
                                                                                 P, D, LP.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ls_kernel<scalar_t, acc_t><<<grid1(N), ROW_THREADS, 0, stream>>>(crossS.data_ptr<acc_t>(), s, c, owner, ls_off,
                                                                      t, D, LS.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    clip_kernel<acc_t><<<grid1(B), RED_THREADS, 0, stream>>>(
        LP.data_ptr<acc_t>(), LS.data_ptr<acc_t>(), c, ls_off, P, lp_row.data_ptr<acc_t>(), lp_col.data_ptr<acc_t>(),
        ls_row.data_ptr<acc_t>(), ls_col.data_ptr<acc_t>(), map_k.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    clip_grad_kernel<acc_t><<<grid1(B), RED_THREADS, 0, stream>>>(
        LP.data_ptr<acc_t>(), LS.data_ptr<acc_t>(), c, ls_off, t, B, P, lp_row.data_ptr<acc_t>(),
        lp_col.data_ptr<acc_t>(), ls_row.data_ptr<acc_t>(), ls_col.data_ptr<acc_t>(), coef.data_ptr<acc_t>(),
        rowdt.data_ptr<acc_t>(), dt_k.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dcross_kernel<scalar_t, acc_t><<<grid1(B * P + N), ROW_THREADS, 0, stream>>>(
        p, s, c, owner, ls_off, LP.data_ptr<acc_t>(), LS.data_ptr<acc_t>(), B, P, D, dcrossP.data_ptr<acc_t>(),
        dcrossS.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dpatch_kernel<scalar_t, acc_t><<<grid1(B * P), ROW_THREADS, 0, stream>>>(
        s, c, owner, t, P, D, N, B, G1.data_ptr<acc_t>(), G2.data_ptr<acc_t>(), i2t_arg.data_ptr<int32_t>(),
        t2i_arg.data_ptr<int32_t>(), dX.data_ptr<acc_t>(), LP.data_ptr<acc_t>(), crossP.data_ptr<acc_t>(),
        w2.data_ptr<acc_t>(), dcrossS.data_ptr<acc_t>(), dp.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dsent_kernel<scalar_t, acc_t><<<grid1(N), ROW_THREADS, 0, stream>>>(
        p, c, owner, ls_off, t, B, P, D, N, B, G1.data_ptr<acc_t>(), G2.data_ptr<acc_t>(),
        i2t_arg.data_ptr<int32_t>(), t2i_arg.data_ptr<int32_t>(), dX.data_ptr<acc_t>(), w1.data_ptr<acc_t>(),
        dcrossP.data_ptr<acc_t>(), LS.data_ptr<acc_t>(), crossS.data_ptr<acc_t>(), ds.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto dscale_acc = dscale.scalar_type() == acc_type ? dscale : at::empty({}, aopts);
    dscale_kernel<acc_t><<<1, 1, 0, stream>>>(coef.data_ptr<acc_t>(), dt_k.data_ptr<acc_t>(), B,
                                              dscale_acc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!dscale_acc.is_same(dscale)) dscale.copy_(dscale_acc);
  });
  return {dp, ds, dscale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filip_fwd_cuda(const at::Tensor& patch_,
                                                                          const at::Tensor& sent_,
                                                                          const at::Tensor& cu_,
                                                                          const at::Tensor& scale_, bool compat,
                                                                          bool save_idx) {
  check_common(patch_, sent_, cu_, scale_);
  c10::cuda::CUDAGuard guard(patch_.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto patch = patch_.contiguous();
  const auto sent = sent_.contiguous();
  const auto cu = cu_.contiguous();
  const int64_t M = patch.size(0), P = patch.size(1), D = patch.size(2), N = sent.size(0), R = cu.size(0) - 1;
  const auto acc_type = patch.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopts = patch.options().dtype(acc_type);
  const auto iopts = patch.options().dtype(at::kInt);
  const auto scale = scale_.to(acc_type).contiguous();
  // The offsets are checked on the host (one copy of R+1 integers) before any kernel indexes through them.
  const int max_len = HostReports(cu, N, "filip_fwd").max_len;
  auto i2t = new_out({M, R}, aopts);
  auto t2i = new_out({M, R}, aopts);
  auto i2t_arg = save_idx ? new_out({M, R, P}, iopts) : at::empty({0}, iopts);
  auto t2i_arg = save_idx ? new_out({M, N}, iopts) : at::empty({M, N}, iopts);
  auto colbest = at::empty({M, N}, aopts);
  if (M > 0 && R > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patch.scalar_type(), "egma_filip_fwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      filip_tile_kernel<scalar_t, acc_t><<<dim3(grid1(R), grid1(M)), NT, 0, stream>>>(
          patch.data_ptr<scalar_t>(), sent.data_ptr<scalar_t>(), cu.data_ptr<int32_t>(), scale.data_ptr<acc_t>(), P,
          D, N, R, compat ? max_len : 0, compat, i2t.data_ptr<acc_t>(), t2i.data_ptr<acc_t>(),
          save_idx ? i2t_arg.data_ptr<int32_t>() : nullptr, t2i_arg.data_ptr<int32_t>(), colbest.data_ptr<acc_t>(),
          nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!save_idx) t2i_arg = at::empty({0}, iopts);
  return {i2t, t2i, i2t_arg, t2i_arg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> filip_bwd_cuda(const at::Tensor& g_i2t_, const at::Tensor& g_t2i_,
                                                              const at::Tensor& patch_, const at::Tensor& sent_,
                                                              const at::Tensor& cu_, const at::Tensor& scale_,
                                                              const at::Tensor& i2t_, const at::Tensor& t2i_,
                                                              const at::Tensor& i2t_arg_, const at::Tensor& t2i_arg_) {
  check_common(patch_, sent_, cu_, scale_);
  c10::cuda::CUDAGuard guard(patch_.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto patch = patch_.contiguous();
  const auto sent = sent_.contiguous();
  const auto cu = cu_.contiguous();
  const int64_t M = patch.size(0), P = patch.size(1), D = patch.size(2), N = sent.size(0), R = cu.size(0) - 1;
  const char* op = "filip_bwd";
  check_similarity_grad_inputs(M, R, P, N, g_i2t_, g_t2i_, i2t_, t2i_, i2t_arg_, t2i_arg_, op);
  const auto acc_type = patch.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopts = patch.options().dtype(acc_type);
  const auto scale = scale_.to(acc_type).contiguous();
  const auto g_i2t = g_i2t_.to(acc_type).contiguous(), g_t2i = g_t2i_.to(acc_type).contiguous();
  const auto i2t = i2t_.contiguous(), t2i = t2i_.contiguous();
  const auto i2t_arg = i2t_arg_.contiguous(), t2i_arg = t2i_arg_.contiguous();
  HostReports hr(cu, N, op);
  auto dp = new_out({M, P, D}, patch.options());
  auto ds = new_out({N, D}, patch.options());
  auto dscale = new_out({}, scale_.options());
  auto G1 = at::empty({M, R}, aopts), G2 = at::empty({M, R}, aopts), coef = at::zeros({4}, aopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patch.scalar_type(), "egma_filip_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* t = scale.data_ptr<acc_t>();
    grad_setup_kernel<acc_t><<<1, RED_THREADS, 0, stream>>>(
        nullptr, g_i2t.data_ptr<acc_t>(), g_t2i.data_ptr<acc_t>(), i2t.data_ptr<acc_t>(), t2i.data_ptr<acc_t>(), t,
        cu.data_ptr<int32_t>(), nullptr, false, M, R, false, false, acc_t(0), acc_t(0), acc_t(0), nullptr, nullptr,
        G1.data_ptr<acc_t>(), G2.data_ptr<acc_t>(), coef.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (M * P > 0)
      dpatch_kernel<scalar_t, acc_t><<<grid1(M * P), ROW_THREADS, 0, stream>>>(
          sent.data_ptr<scalar_t>(), cu.data_ptr<int32_t>(), hr.owner.data_ptr<int32_t>(), t, P, D, N, R,
          G1.data_ptr<acc_t>(), G2.data_ptr<acc_t>(), i2t_arg.data_ptr<int32_t>(), t2i_arg.data_ptr<int32_t>(),
          nullptr, nullptr, nullptr, nullptr, nullptr, dp.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (N > 0)
      dsent_kernel<scalar_t, acc_t><<<grid1(N), ROW_THREADS, 0, stream>>>(
          patch.data_ptr<scalar_t>(), cu.data_ptr<int32_t>(), hr.owner.data_ptr<int32_t>(),
          hr.ls_off.data_ptr<int64_t>(), t, M, P, D, N, R, G1.data_ptr<acc_t>(), G2.data_ptr<acc_t>(),
          i2t_arg.data_ptr<int32_t>(), t2i_arg.data_ptr<int32_t>(), nullptr, nullptr, nullptr, nullptr, nullptr,
          ds.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto dscale_acc = dscale.scalar_type() == acc_type ? dscale : at::empty({}, aopts);
    dscale_kernel<acc_t><<<1, 1, 0, stream>>>(coef.data_ptr<acc_t>(), nullptr, 0, dscale_acc.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!dscale_acc.is_same(dscale)) dscale.copy_(dscale_acc);
  });
  return {dp, ds, dscale};
}

}  // namespace
}  // namespace egma_cuda

TORCH_LIBRARY_IMPL(egma_kernels, CUDA, m) {
  m.impl("loss_fwd", &egma_cuda::loss_fwd_cuda);
  m.impl("loss_bwd", &egma_cuda::loss_bwd_cuda);
  m.impl("filip_fwd", &egma_cuda::filip_fwd_cuda);
  m.impl("filip_bwd", &egma_cuda::filip_bwd_cuda);
}
