// Device helpers shared by the CUDA kernels: launch constants, exp/log in the accumulation type, the tiled
// inner products in shared memory, warp sums and the log-sum-exps. Every sum runs in a fixed order (warp
// sums through a fixed shuffle-down tree).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launch.h"

#include <cmath>
#include <cstdint>

namespace egma_cuda {

using egma_common::kContrastive;
using egma_common::kGazeMlce;
using egma_common::kMapping;
using egma_common::kTotal;

constexpr int TILE = 32;          // patches x sentences per similarity tile
constexpr int TK = 32;            // chunk of D per shared-memory step
constexpr int NT = 256;           // threads of the tile kernels
constexpr int ROW_THREADS = 128;  // threads of the row kernels (one block per output row, threads over D)
constexpr int RED_THREADS = 256;  // threads of the per-report kernels

inline unsigned grid1(int64_t n) { return static_cast<unsigned>(n > 0 ? n : 1); }

// Launches kernel(params) on stream and checks the launch.
template <typename Params>
void launch_kernel(void (*kernel)(Params), dim3 grid, int threads, cudaStream_t stream, const Params& params) {
  kernel<<<grid, threads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T>
__device__ __forceinline__ T dev_neg_inf() {
  return -INFINITY;
}

// exp and log in the accumulation type.
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

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

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return __shfl_sync(0xffffffffu, v, 0);
}

__device__ __forceinline__ bool has_gaze(const bool* gaze_mask, bool gaze_given, int64_t k) {
  return gaze_given && (gaze_mask == nullptr || gaze_mask[k]);
}

// log(1 + sum_{keep} exp(sign * v)) over a strided set, keeping the entries whose gaze g is positive
// (positive) or not.
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

// Diagonal cross-entropy's log-sum-exps over rows (by_rows) or columns of a B x B matrix; one thread per row.
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

}  // namespace egma_cuda
