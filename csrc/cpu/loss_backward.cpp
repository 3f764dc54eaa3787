// The loss backward on the CPU: at::parallel_for over k, which owns d patch_emb[k] and d sent_emb[report k].
// The max terms' gradients are routed through the saved argmax indices (similarity.cpp); the MLCE and
// mapping gradients are recomputed from the matched similarities A_k (the mapping weights are constant)
// and collected in d A_k (n_k x P: W1^T dLP + dLS^T W2 for the mapping term), then one pair of small GEMMs
// over D adds them to d patch_emb[k] and d sent_emb[report k]; d t = sum dA * A / t. Every output element
// is written by exactly one task and every sum runs in a fixed order: no atomics, and the results do not
// depend on the number of threads.
#include "loss_math.h"

#include <ATen/Parallel.h>

namespace egma_cpu {

// Adds the MLCE term's gradient of report k (scaled by coef) to dX (n x P), from the log-sum-exps in sc.
template <typename T>
void mlce_backward(const T* X, const T* GS, int64_t n, int64_t P, T alpha, T coef, const Scratch<T>& sc, T* dX) {
  const T c_sent = coef * alpha / T(n), c_patch = coef * (T(1) - alpha) / T(P);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < P; ++i) {
      const T x = X[j * P + i];
      if (GS[j * P + i] > 0)
        dX[j * P + i] = -c_sent * std::exp(-x - sc.sent_lse_pos[j]) - c_patch * std::exp(-x - sc.patch_lse_pos[i]);
      else
        dX[j * P + i] = c_sent * std::exp(x - sc.sent_lse_neg[j]) + c_patch * std::exp(x - sc.patch_lse_neg[i]);
    }
}

template <typename T>
void loss_backward(const Inputs<T>& in, const LossOptions<T>& opts, const T* grad_terms, const T* grad_i2t,
                   const T* grad_t2i, const SavedSimilarities<T>& saved, const Gradients<T>& grads) {
  const Reports& rep = *in.reports;
  const int64_t B = in.M, P = in.P, D = in.D;
  const T t = in.scale;
  int64_t num_gaze = 0, num_mapped = 0;
  for (int64_t k = 0; k < B; ++k) {
    num_gaze += in.report_has_gaze(k) ? 1 : 0;
    num_mapped += rep.len(k) >= 2 ? 1 : 0;
  }
  // The gradient reaching each term: the total's weight times its gradient plus the term's own.
  const T c_con = grad_terms[kTotal] * opts.w_con + grad_terms[kContrastive];
  const T c_mlce = (grad_terms[kTotal] * opts.w_mlce + grad_terms[kGazeMlce]) / T(std::max<int64_t>(1, num_gaze));
  const T c_map = (grad_terms[kTotal] * opts.w_map + grad_terms[kMapping]) / T(std::max<int64_t>(1, num_mapped));
  // dL/dI2T and dL/dT2I: the incoming gradients plus the contrastive term's.
  std::vector<T> d_i2t(grad_i2t, grad_i2t + B * B), d_t2i(grad_t2i, grad_t2i + B * B);
  ce_diag<T>(saved.i2t, B, true, T(0.5) * c_con, d_i2t.data());
  ce_diag<T>(saved.t2i, B, opts.egma_compat, T(0.5) * c_con, d_t2i.data());
  const MaxTermGrads<T> max_grads{d_i2t.data(), d_t2i.data(), saved.i2t_arg, saved.t2i_arg};
  std::vector<T> dt_k(B, T(0));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc;
    RoutingScratch<T> routing;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t u0 = rep.cu[k], n = rep.len(k);
      T* dpk = grads.d_patch + k * P * D;
      T* dsk = grads.d_sent + u0 * D;
      const T* pk = in.patch + k * P * D;
      const T* sk = in.sent + u0 * D;
      std::fill(dpk, dpk + P * D, T(0));
      std::fill(dsk, dsk + n * D, T(0));
      route_to_image(k, in, max_grads, dpk, routing);
      route_to_report(k, in, max_grads, grads.d_sent, routing);
      const T* X = saved.matched + u0 * P;
      const T* GS = in.report_has_gaze(k) ? in.gaze + u0 * P : nullptr;
      // d A_k (n x P) of the MLCE and mapping terms, then one pair of products over D.
      const bool do_mlce = GS != nullptr && c_mlce != T(0);
      const bool do_map = n >= 2 && c_map != T(0);
      T dtk = 0;
      if (do_mlce || do_map) {
        sc.dX.assign(n * P, T(0));
        if (do_mlce) {
          mlce_lses(X, GS, n, P, sc);
          mlce_backward(X, GS, n, P, opts.alpha, c_mlce, sc, sc.dX.data());
        }
        if (do_map) {
          mapping_forward(X, GS, n, P, opts.map_threshold, sc);
          // The mapping term is c_map * 0.5 * (clipP + clipS). d patch_logits in place; patch_logits = W1 X
          // gives dX += W1^T @ d patch_logits.
          clip_block(sc.patch_logits.data(), P, sc.row_lse.data(), sc.col_lse.data());
          clip_block_grad(sc.patch_logits.data(), P, sc.row_lse.data(), sc.col_lse.data(), c_map * T(0.5));
          gemm_nn(n, P, P, sc.W1.data(), 1, n, sc.patch_logits.data(), sc.dX.data(), true);
          // d sent_logits likewise; sent_logits = W2 X^T gives dX += d sent_logits^T @ W2.
          clip_block(sc.sent_logits.data(), n, sc.row_lse.data(), sc.col_lse.data());
          clip_block_grad(sc.sent_logits.data(), n, sc.row_lse.data(), sc.col_lse.data(), c_map * T(0.5));
          gemm_nn(n, n, P, sc.sent_logits.data(), 1, n, sc.W2.data(), sc.dX.data(), true);
        }
        // A = t S: dt += sum dA * S = sum dA * A / t, and d S = t d A.
        for (int64_t e = 0; e < n * P; ++e) {
          dtk += sc.dX[e] * X[e];
          sc.dX[e] *= t;
        }
        gemm_nn(P, n, D, sc.dX.data(), 1, P, sk, dpk, true);  // dp_k += dS^T @ s_k
        gemm_nn(n, P, D, sc.dX.data(), P, 1, pk, dsk, true);  // ds_k += dS @ p_k
      }
      dt_k[k] = dtk / t;
    }
  });
  T g = 0;
  for (int64_t e = 0; e < B * B; ++e) g += d_i2t[e] * saved.i2t[e] + d_t2i[e] * saved.t2i[e];
  g /= t;
  for (int64_t k = 0; k < B; ++k) g += dt_k[k];
  *grads.d_scale = g;
}

template void loss_backward<float>(const Inputs<float>&, const LossOptions<float>&, const float*, const float*,
                                   const float*, const SavedSimilarities<float>&, const Gradients<float>&);
template void loss_backward<double>(const Inputs<double>&, const LossOptions<double>&, const double*, const double*,
                                    const double*, const SavedSimilarities<double>&, const Gradients<double>&);

}  // namespace egma_cpu
