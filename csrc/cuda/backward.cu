// The backward kernels of both ops: d patch_emb (one block per patch row) and d sent_emb (one block per
// sentence), each adding its terms in a fixed order: the max terms routed through the saved argmax indices,
// then for the loss the MLCE term (through dX, the gradient of the matched similarities) and the mapping
// term (through the gradients of the mapping logits and mapped features). The loss's per-report quantities
// are recomputed first with the forward's kernels (loss_forward.cu).
#include "device_common.cuh"

namespace egma_cuda {
namespace {

// One block: d_i2t = dL/dI2T, d_t2i = dL/dT2I (M x R), and coef (Coef). The loss (grad_terms set) adds the
// contrastive term's gradient; FILIP passes the incoming gradients through.
template <typename scalar_t, typename acc_t>
__global__ void grad_setup_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int64_t M = params.M, R = params.R;
  const acc_t* gterms = params.grad_terms;
  const bool is_loss = gterms != nullptr;
  const LossOptions<acc_t>& opts = params.opts;
  const bool compat = opts.egma_compat;
  const acc_t* i2t = params.i2t;
  const acc_t* t2i = params.t2i;
  acc_t* ce_lse_i2t = params.ce_lse_i2t;
  acc_t* ce_lse_t2i = params.ce_lse_t2i;
  acc_t* d_i2t = params.d_i2t;
  acc_t* d_t2i = params.d_t2i;
  const acc_t c_con = is_loss ? gterms[kTotal] * opts.w_con + gterms[kContrastive] : acc_t(0);
  if (is_loss) {
    ce_lse(i2t, M, true, ce_lse_i2t);
    ce_lse(t2i, M, compat, ce_lse_t2i);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < M * R; e += blockDim.x) {
    const int64_t a = e / R, c = e % R;
    acc_t g1 = params.grad_i2t[e], g2 = params.grad_t2i[e];
    if (is_loss) {
      const acc_t delta = a == c ? acc_t(1) : acc_t(0);
      const acc_t cc = acc_t(0.5) * c_con / static_cast<acc_t>(M);
      g1 += cc * (dexp(i2t[e] - ce_lse_i2t[a]) - delta);
      g2 += cc * (dexp(t2i[e] - (compat ? ce_lse_t2i[a] : ce_lse_t2i[c])) - delta);
    }
    d_i2t[e] = g1;
    d_t2i[e] = g2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t g = 0;
    for (int64_t e = 0; e < M * R; ++e) g += d_i2t[e] * i2t[e] + d_t2i[e] * t2i[e];
    acc_t* coef = params.coef;
    coef[kCoefScale] = g / *params.scale;
    if (is_loss) {
      int64_t num_gaze = 0, num_mapped = 0;
      for (int64_t k = 0; k < M; ++k) {
        num_gaze += has_gaze(params.gaze_mask, params.gaze != nullptr, k) ? 1 : 0;
        num_mapped += params.cu[k + 1] - params.cu[k] >= 2 ? 1 : 0;
      }
      coef[kCoefMlce] = (gterms[kTotal] * opts.w_mlce + gterms[kGazeMlce]) /
                        static_cast<acc_t>(num_gaze > 0 ? num_gaze : 1);
      coef[kCoefMapping] = (gterms[kTotal] * opts.w_map + gterms[kMapping]) /
                           static_cast<acc_t>(num_mapped > 0 ? num_mapped : 1);
    }
  }
}

// dX (N x P, already times t) of the MLCE term, and dt_k[k] = sum dX * X / t. Grid B.
template <typename scalar_t, typename acc_t>
__global__ void mlce_grad_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int64_t P = params.P, k = blockIdx.x;
  const int64_t u0 = params.cu[k], n = params.cu[k + 1] - u0;
  const scalar_t* __restrict__ gaze = params.gaze;
  const bool g = has_gaze(params.gaze_mask, gaze != nullptr, k);
  const acc_t t = *params.scale, alpha = params.opts.alpha;
  const acc_t c_sent = params.coef[kCoefMlce] * alpha / static_cast<acc_t>(n);
  const acc_t c_patch = params.coef[kCoefMlce] * (acc_t(1) - alpha) / static_cast<acc_t>(P);
  const acc_t* __restrict__ matched = params.matched;
  const acc_t* sent_lse_neg = params.sent_lse_neg;
  const acc_t* sent_lse_pos = params.sent_lse_pos;
  const acc_t* patch_lse_neg = params.patch_lse_neg;
  const acc_t* patch_lse_pos = params.patch_lse_pos;
  acc_t* dX = params.dX;
  for (int64_t e = threadIdx.x; e < n * P; e += blockDim.x) {
    const int64_t j = e / P, i = e % P;
    acc_t d = 0;
    if (g) {
      const acc_t x = matched[(u0 + j) * P + i];
      if (static_cast<acc_t>(gaze[(u0 + j) * P + i]) > acc_t(0))
        d = -c_sent * dexp(-x - sent_lse_pos[u0 + j]) - c_patch * dexp(-x - patch_lse_pos[k * P + i]);
      else
        d = c_sent * dexp(x - sent_lse_neg[u0 + j]) + c_patch * dexp(x - patch_lse_neg[k * P + i]);
    }
    dX[(u0 + j) * P + i] = t * d;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t sum = 0;
    if (g)
      for (int64_t e = 0; e < n * P; ++e) sum += dX[u0 * P + e] * matched[u0 * P + e];
    params.dt_k[k] = sum / (t * t);
  }
}

// In place: patch_logits <- t * its gradient, sent_logits likewise (the gradient of c_map * 0.5 * clip);
// dt_k[k] += sum dL * L / t. row_dt (B * P + N) holds the per-row sums, added in a fixed order by thread 0.
// Grid B.
template <typename scalar_t, typename acc_t>
__global__ void clip_grad_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int64_t B = params.M, P = params.P, k = blockIdx.x;
  const int64_t u0 = params.cu[k], n = params.cu[k + 1] - u0;
  if (n < 2) return;
  const acc_t t = *params.scale;
  acc_t* L = params.patch_logits + k * P * P;
  acc_t* M = params.sent_logits + params.sent_logits_offset[k];
  const acc_t* pl_row = params.patch_logits_row_lse;
  const acc_t* pl_col = params.patch_logits_col_lse;
  const acc_t* sl_row = params.sent_logits_row_lse;
  const acc_t* sl_col = params.sent_logits_col_lse;
  acc_t* row_dt = params.row_dt;
  const acc_t cP = params.coef[kCoefMapping] * acc_t(0.25) / static_cast<acc_t>(P);
  const acc_t cS = params.coef[kCoefMapping] * acc_t(0.25) / static_cast<acc_t>(n);
  for (int64_t i = threadIdx.x; i < P + n; i += blockDim.x) {
    acc_t sum = 0;
    if (i < P) {
      for (int64_t j = 0; j < P; ++j) {
        const acc_t x = L[i * P + j];
        const acc_t g =
            cP * (dexp(x - pl_row[k * P + i]) + dexp(x - pl_col[k * P + j]) - (i == j ? acc_t(2) : acc_t(0)));
        sum += g * x;
        L[i * P + j] = t * g;
      }
      row_dt[k * P + i] = sum;
    } else {
      const int64_t r = i - P;
      for (int64_t e = 0; e < n; ++e) {
        const acc_t x = M[r * n + e];
        const acc_t g =
            cS * (dexp(x - sl_row[u0 + r]) + dexp(x - sl_col[u0 + e]) - (r == e ? acc_t(2) : acc_t(0)));
        sum += g * x;
        M[r * n + e] = t * g;
      }
      row_dt[B * P + u0 + r] = sum;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t sum = 0;
    for (int64_t i = 0; i < P; ++i) sum += row_dt[k * P + i];
    for (int64_t r = 0; r < n; ++r) sum += row_dt[B * P + u0 + r];
    params.dt_k[k] += sum / t;
  }
}

// d_mapped_patch[k, i] = sum_j dPL[k][i, j] p[k, j] (rows 0 .. B*P-1) and d_mapped_sent[u] = sum_e dSL[u, e]
// s[u0 + e] (rows B*P + u), with dPL, dSL the logits' gradients clip_grad_kernel left in place. Grid
// B * P + N, ROW_THREADS threads over D.
template <typename scalar_t, typename acc_t>
__global__ void d_mapped_features_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int64_t B = params.M, P = params.P, D = params.D, row = blockIdx.x;
  const int32_t* __restrict__ cu = params.cu;
  if (row < B * P) {
    const int64_t k = row / P, i = row % P;
    if (cu[k + 1] - cu[k] < 2) return;
    const scalar_t* __restrict__ p = params.patch;
    const acc_t* g = params.patch_logits + (k * P + i) * P;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      acc_t acc = 0;
      for (int64_t j = 0; j < P; ++j) acc += g[j] * static_cast<acc_t>(p[(k * P + j) * D + d]);
      params.d_mapped_patch[row * D + d] = acc;
    }
  } else {
    const int64_t u = row - B * P, k = params.owner[u];
    const int64_t u0 = cu[k], n = cu[k + 1] - u0;
    if (n < 2) return;
    const scalar_t* __restrict__ s = params.sent;
    const acc_t* g = params.sent_logits + params.sent_logits_offset[k] + (u - u0) * n;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      acc_t acc = 0;
      for (int64_t e = 0; e < n; ++e) acc += g[e] * static_cast<acc_t>(s[(u0 + e) * D + d]);
      params.d_mapped_sent[u * D + d] = acc;
    }
  }
}

// d patch_emb[a, i] (grid M * P, threads over D): I2T terms (per report, through the argmax sentence), T2I
// terms (sentences whose best patch of image a is i), then, for the loss, the MLCE and mapping terms.
template <typename scalar_t, typename acc_t>
__global__ void d_patch_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int64_t P = params.P, D = params.D, N = params.N, R = params.R;
  const int64_t row = blockIdx.x, a = row / P, i = row % P;
  const acc_t t = *params.scale;
  const scalar_t* __restrict__ s = params.sent;
  const int32_t* __restrict__ cu = params.cu;
  const int32_t *__restrict__ i2t_arg = params.i2t_arg, *__restrict__ t2i_arg = params.t2i_arg;
  const acc_t *d_i2t = params.d_i2t, *d_t2i = params.d_t2i, *dX = params.dX;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t acc = 0;
    for (int64_t b = 0; b < R; ++b) {
      const int32_t u = i2t_arg[(a * R + b) * P + i];  // -1: egma_compat's clamp; bounded against made-up indices
      if (u >= 0 && u < N) acc += (t * d_i2t[a * R + b] / static_cast<acc_t>(P)) * static_cast<acc_t>(s[u * D + d]);
    }
    for (int64_t u = 0; u < N; ++u)
      if (t2i_arg[a * N + u] == i) {
        const int64_t b = params.owner[u];
        acc += (t * d_t2i[a * R + b] / static_cast<acc_t>(cu[b + 1] - cu[b])) * static_cast<acc_t>(s[u * D + d]);
      }
    if (dX != nullptr) {  // the loss: image a is matched with report a
      const int64_t u0 = cu[a], n = cu[a + 1] - u0;
      for (int64_t j = 0; j < n; ++j) acc += dX[(u0 + j) * P + i] * static_cast<acc_t>(s[(u0 + j) * D + d]);
      if (n >= 2) {
        const acc_t* g = params.patch_logits + a * P * P;  // t * d patch_logits
        for (int64_t r = 0; r < P; ++r) acc += g[r * P + i] * params.mapped_patch[(a * P + r) * D + d];
        for (int64_t j = 0; j < n; ++j) acc += params.w2[(u0 + j) * P + i] * params.d_mapped_sent[(u0 + j) * D + d];
      }
    }
    params.d_patch[row * D + d] = static_cast<scalar_t>(acc);
  }
}

// d sent_emb[u] (grid N, threads over D): I2T terms (patches whose best sentence of report b is u, by image
// then patch), T2I terms (its best patch in each image), then, for the loss, the MLCE and mapping terms.
template <typename scalar_t, typename acc_t>
__global__ void d_sent_kernel(const LaunchParams<scalar_t, acc_t> params) {
  const int64_t M = params.M, P = params.P, D = params.D, N = params.N, R = params.R;
  const int64_t u = blockIdx.x, b = params.owner[u];
  const int64_t u0 = params.cu[b], n = params.cu[b + 1] - u0, e = u - u0;
  const scalar_t* __restrict__ p = params.patch;
  const acc_t t = *params.scale;
  const int32_t *__restrict__ i2t_arg = params.i2t_arg, *__restrict__ t2i_arg = params.t2i_arg;
  const acc_t *d_i2t = params.d_i2t, *d_t2i = params.d_t2i, *dX = params.dX;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t acc = 0;
    for (int64_t a = 0; a < M; ++a) {
      const acc_t c = t * d_i2t[a * R + b] / static_cast<acc_t>(P);
      const int32_t* arg = i2t_arg + (a * R + b) * P;
      for (int64_t i = 0; i < P; ++i)
        if (arg[i] == u) acc += c * static_cast<acc_t>(p[(a * P + i) * D + d]);
    }
    for (int64_t a = 0; a < M; ++a) {
      const int64_t i = imin(imax(t2i_arg[a * N + u], 0), P - 1);  // a patch index, bounded against made-up ones
      acc += (t * d_t2i[a * R + b] / static_cast<acc_t>(n)) * static_cast<acc_t>(p[(a * P + i) * D + d]);
    }
    if (dX != nullptr) {
      for (int64_t i = 0; i < P; ++i) acc += dX[u * P + i] * static_cast<acc_t>(p[(b * P + i) * D + d]);
      if (n >= 2) {
        const acc_t* W1 = params.w1 + P * u0;
        for (int64_t i = 0; i < P; ++i) acc += W1[i * n + e] * params.d_mapped_patch[(b * P + i) * D + d];
        const acc_t* g = params.sent_logits + params.sent_logits_offset[b];  // t * d sent_logits
        for (int64_t r = 0; r < n; ++r) acc += g[r * n + e] * params.mapped_sent[(u0 + r) * D + d];
      }
    }
    params.d_sent[u * D + d] = static_cast<scalar_t>(acc);
  }
}

// One thread: d t = the contrastive and max terms' part plus, for the loss, every report's part.
template <typename scalar_t, typename acc_t>
__global__ void d_scale_kernel(const LaunchParams<scalar_t, acc_t> params) {
  acc_t g = params.coef[kCoefScale];
  const int64_t K = params.dt_k != nullptr ? params.M : 0;
  for (int64_t k = 0; k < K; ++k) g += params.dt_k[k];
  *params.d_scale = g;
}

}  // namespace

template <typename scalar_t, typename acc_t>
void Launch<scalar_t, acc_t>::loss_backward(const Params& params, cudaStream_t stream) {
  const int64_t B = params.M, P = params.P, N = params.N;
  launch_kernel(grad_setup_kernel<scalar_t, acc_t>, 1, RED_THREADS, stream, params);
  report_terms(params, stream);
  // mlce_grad_kernel reads the MLCE log-sum-exps and coef, and writes dX and dt_k, which no kernel of
  // report_terms touches; clip_grad_kernel then adds to dt_k.
  launch_kernel(mlce_grad_kernel<scalar_t, acc_t>, grid1(B), RED_THREADS, stream, params);
  launch_kernel(clip_grad_kernel<scalar_t, acc_t>, grid1(B), RED_THREADS, stream, params);
  launch_kernel(d_mapped_features_kernel<scalar_t, acc_t>, grid1(B * P + N), ROW_THREADS, stream, params);
  launch_kernel(d_patch_kernel<scalar_t, acc_t>, grid1(B * P), ROW_THREADS, stream, params);
  launch_kernel(d_sent_kernel<scalar_t, acc_t>, grid1(N), ROW_THREADS, stream, params);
  launch_kernel(d_scale_kernel<scalar_t, acc_t>, 1, 1, stream, params);
}

template <typename scalar_t, typename acc_t>
void Launch<scalar_t, acc_t>::similarity_backward(const Params& params, cudaStream_t stream) {
  launch_kernel(grad_setup_kernel<scalar_t, acc_t>, 1, RED_THREADS, stream, params);
  if (params.M * params.P > 0)
    launch_kernel(d_patch_kernel<scalar_t, acc_t>, grid1(params.M * params.P), ROW_THREADS, stream, params);
  if (params.N > 0) launch_kernel(d_sent_kernel<scalar_t, acc_t>, grid1(params.N), ROW_THREADS, stream, params);
  launch_kernel(d_scale_kernel<scalar_t, acc_t>, 1, 1, stream, params);
}

EGMA_INSTANTIATE_LAUNCHER(loss_backward)
EGMA_INSTANTIATE_LAUNCHER(similarity_backward)

}  // namespace egma_cuda
