// The FILIP similarity's forward kernel (both ops): one thread block per (image a, report b). It walks
// 32-patch x 32-sentence tiles of A = t <p[a, i], s[u]> (computed in shared memory over 32-wide chunks of
// D) and reduces each tile at once: the running max over the report's sentences for every patch (I2T) and
// over the patches for every sentence (T2I), with their argmax indices; matched blocks (a == b, the loss)
// are copied to `matched` (N x P). The (M*P) x N similarity matrix never exists.
#include "device_common.cuh"

namespace egma_cuda {
namespace {

// Grid (R, M), NT threads. t2i_arg and col_best are written even when the routes are not saved (scratch).
template <typename scalar_t, typename acc_t>
__global__ void filip_tile_kernel(const LaunchParams<scalar_t, acc_t> params) {
  __shared__ acc_t sa[TILE][TK + 1];
  __shared__ acc_t sb[TILE][TK + 1];
  __shared__ acc_t S[TILE][TILE + 1];
  __shared__ acc_t row_best[TILE];
  __shared__ int32_t row_arg[TILE];
  const int64_t P = params.P, D = params.D, N = params.N, R = params.R;
  const int32_t* __restrict__ cu = params.cu;
  int32_t* __restrict__ i2t_arg = params.i2t_arg;
  int32_t* __restrict__ t2i_arg = params.t2i_arg;
  const int64_t b = blockIdx.x, a = blockIdx.y;
  const int tid = threadIdx.x;
  acc_t* __restrict__ col_best = params.col_best;
  acc_t* __restrict__ matched = params.matched;
  const acc_t t = *params.scale;
  const int64_t u0 = cu[b], u1 = cu[b + 1], n = u1 - u0;
  const bool clamp = params.opts.egma_compat && n < params.max_len;
  const bool is_matched_block = matched != nullptr && a == b;
  acc_t row_sum = 0;  // thread 0
  for (int64_t i0 = 0; i0 < P; i0 += TILE) {
    const int pc = static_cast<int>(imin(TILE, P - i0));
    if (tid < TILE) {
      row_best[tid] = dev_neg_inf<acc_t>();
      row_arg[tid] = 0;
    }
    for (int64_t c0 = u0; c0 < u1; c0 += TILE) {
      const int sc = static_cast<int>(imin(TILE, u1 - c0));
      tile_dots<scalar_t, scalar_t, acc_t>(params.patch + (a * P + i0) * D, D, pc, params.sent + c0 * D, D, sc, D,
                                           sa, sb, S);
      for (int e = tid; e < TILE * TILE; e += NT) S[e / TILE][e % TILE] *= t;
      __syncthreads();
      if (tid < pc) {  // row max over this chunk's sentences, in order
        acc_t best = row_best[tid];
        int32_t arg = row_arg[tid];
        for (int j = 0; j < sc; ++j) {
          const acc_t v = S[tid][j];
          if (v > best || (c0 == u0 && j == 0)) {
            best = v;
            arg = static_cast<int32_t>(c0 + j);
          }
        }
        row_best[tid] = best;
        row_arg[tid] = arg;
      } else if (tid >= 64 && tid < 64 + sc) {  // column max over this chunk's patches, in order
        const int j = tid - 64;
        const int64_t u = c0 + j;
        acc_t best = i0 == 0 ? dev_neg_inf<acc_t>() : col_best[a * N + u];
        int32_t arg = i0 == 0 ? 0 : t2i_arg[a * N + u];
        for (int i = 0; i < pc; ++i) {
          const acc_t v = S[i][j];
          if (v > best || (i0 == 0 && i == 0)) {
            best = v;
            arg = static_cast<int32_t>(i0 + i);
          }
        }
        col_best[a * N + u] = best;
        t2i_arg[a * N + u] = arg;
      }
      if (is_matched_block) {
        for (int e = tid; e < pc * sc; e += NT) {
          const int j = e / pc, i = e % pc;
          matched[(c0 + j) * P + i0 + i] = S[i][j];
        }
      }
      __syncthreads();
    }
    if (tid < pc) {
      if (clamp && row_best[tid] < acc_t(0)) {
        row_best[tid] = 0;
        row_arg[tid] = -1;
      }
      if (i2t_arg != nullptr) i2t_arg[(a * R + b) * P + i0 + tid] = row_arg[tid];
    }
    __syncthreads();
    if (tid == 0)
      for (int i = 0; i < pc; ++i) row_sum += row_best[i];
    __syncthreads();
  }
  if (tid == 0) {
    params.i2t[a * R + b] = row_sum / static_cast<acc_t>(P);
    acc_t sum = 0;
    for (int64_t u = u0; u < u1; ++u) sum += col_best[a * N + u];
    params.t2i[a * R + b] = sum / static_cast<acc_t>(n);
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
void Launch<scalar_t, acc_t>::similarity_forward(const Params& params, cudaStream_t stream) {
  launch_kernel(filip_tile_kernel<scalar_t, acc_t>, dim3(grid1(params.R), grid1(params.M)), NT, stream, params);
}

EGMA_INSTANTIATE_LAUNCHER(similarity_forward)

}  // namespace egma_cuda
