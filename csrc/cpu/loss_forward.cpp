// The loss forward on the CPU (docs/loss.md).
//
// Phase 1: the similarity tiles (similarity.cpp), which also copy the matched similarities A_k into
// `matched` (N x P). Phase 2: at::parallel_for over reports k: the MLCE term, the mapping weights and the
// two CLIP losses of report k, from A_k alone (loss_math.h: the mapping logits need no product over D).
// Phase 3 (serial, B x B): the two cross-entropies and the totals.
#include "loss_math.h"

#include <ATen/Parallel.h>

namespace egma_cpu {

template <typename T>
void loss_forward(const Inputs<T>& in, const LossOptions<T>& opts, const Similarities<T>& out, T* terms) {
  const Reports& rep = *in.reports;
  const int64_t B = in.M, P = in.P;
  similarity_forward(in, opts.egma_compat, out);
  std::vector<T> mlce_k(B, T(0)), map_k(B, T(0));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t u0 = rep.cu[k], n = rep.len(k);
      const T* X = out.matched + u0 * P;
      const T* GS = in.report_has_gaze(k) ? in.gaze + u0 * P : nullptr;
      if (GS != nullptr) {
        mlce_lses(X, GS, n, P, sc);
        T s2p = 0, p2s = 0;
        for (int64_t j = 0; j < n; ++j) s2p += sc.sent_lse_neg[j] + sc.sent_lse_pos[j];
        for (int64_t i = 0; i < P; ++i) p2s += sc.patch_lse_neg[i] + sc.patch_lse_pos[i];
        mlce_k[k] = opts.alpha * (s2p / T(n)) + (T(1) - opts.alpha) * (p2s / T(P));
      }
      if (n >= 2) {
        mapping_forward(X, GS, n, P, opts.map_threshold, sc);
        const T clip_p = clip_block(sc.patch_logits.data(), P, sc.row_lse.data(), sc.col_lse.data());
        const T clip_s = clip_block(sc.sent_logits.data(), n, sc.row_lse.data(), sc.col_lse.data());
        map_k[k] = T(0.5) * (clip_p + clip_s);
      }
    }
  });
  int64_t num_gaze = 0, num_mapped = 0;
  T mlce = 0, mapping = 0;
  for (int64_t k = 0; k < B; ++k) {
    if (in.report_has_gaze(k)) {
      ++num_gaze;
      mlce += mlce_k[k];
    }
    if (rep.len(k) >= 2) {
      ++num_mapped;
      mapping += map_k[k];
    }
  }
  mlce /= T(std::max<int64_t>(1, num_gaze));
  mapping /= T(std::max<int64_t>(1, num_mapped));
  const T con = T(0.5) * (ce_diag<T>(out.i2t, B, true, T(0), nullptr) +
                          ce_diag<T>(out.t2i, B, opts.egma_compat, T(0), nullptr));
  terms[kTotal] = opts.w_con * con + opts.w_mlce * mlce + opts.w_map * mapping;
  terms[kContrastive] = con;
  terms[kGazeMlce] = mlce;
  terms[kMapping] = mapping;
}

template void loss_forward<float>(const Inputs<float>&, const LossOptions<float>&, const Similarities<float>&, float*);
template void loss_forward<double>(const Inputs<double>&, const LossOptions<double>&, const Similarities<double>&,
                                   double*);

}  // namespace egma_cpu
