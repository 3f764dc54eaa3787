// The FILIP similarity on the CPU, forward and backward; the loss runs the same code for its contrastive
// term.
//
// Forward: at::parallel_for over (image, block of whole reports) tiles. Each tile computes its similarities
// A = t * <patch, sentence> in blocks of PATCH_BLOCK patches x (<= SENT_BLOCK sentences) in a per-thread
// scratch buffer and reduces them at once: the I2T row max per (patch, report) and the T2I column max per
// (sentence, image), with their argmax indices. The (M*P) x N matrix never exists. The matched tiles
// (image k, report k; the loss) copy their similarities into `matched` (N x P).
//
// Backward: owner computes. The gradients of the max terms are routed through the saved argmax indices:
// the terms are grouped per destination row by a counting sort and added with one gather-accumulate pass
// per row, so every output row is written by one task and every sum runs in a fixed order.
#include "kernels.h"
#include "loss_math.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace egma_cpu {

Reports::Reports(const int32_t* cu_, int64_t R_, int64_t N) : ReportOwners(cu_, R_, N), cu(cu_), R(R_) {
  block_start.push_back(0);
  int64_t in_block = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = cu[r + 1] - cu[r];
    if (in_block > 0 && in_block + n > SENT_BLOCK) {
      block_start.push_back(r);
      in_block = 0;
    }
    in_block += n;
  }
  block_start.push_back(R);
}

template <typename T>
void similarity_forward(const Inputs<T>& in, bool egma_compat, const Similarities<T>& out) {
  const Reports& rep = *in.reports;
  const T* p = in.patch;
  const T* s = in.sent;
  const int64_t M = in.M, P = in.P, D = in.D, N = in.N, R = rep.R;
  const T t = in.scale;
  T* i2t = out.i2t;
  T* t2i = out.t2i;
  int32_t* i2t_arg = out.i2t_arg;
  int32_t* t2i_arg = out.t2i_arg;
  T* matched = out.matched;
  const int64_t nb = rep.num_blocks();
  int64_t widest = 0;
  for (int64_t k = 0; k < nb; ++k)
    widest = std::max<int64_t>(widest, rep.cu[rep.block_start[k + 1]] - rep.cu[rep.block_start[k]]);
  at::parallel_for(0, M * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(PATCH_BLOCK * widest), colbest(widest), rowsum(R);
    std::vector<int32_t> colarg(widest);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t a = tile / nb, kb = tile % nb;
      const int64_t r0 = rep.block_start[kb], r1 = rep.block_start[kb + 1];
      const int64_t u0 = rep.cu[r0], u1 = rep.cu[r1], nu = u1 - u0;
      std::fill(colbest.begin(), colbest.begin() + nu, neg_inf<T>());
      std::fill(colarg.begin(), colarg.begin() + nu, 0);
      std::fill(rowsum.begin() + r0, rowsum.begin() + r1, T(0));
      const bool is_matched_tile = matched != nullptr && a >= r0 && a < r1;
      for (int64_t i0 = 0; i0 < P; i0 += PATCH_BLOCK) {
        const int64_t pc = std::min(PATCH_BLOCK, P - i0);
        dots(p + (a * P + i0) * D, D, pc, s + u0 * D, D, nu, D, S.data(), nu);
        for (int64_t ii = 0; ii < pc; ++ii) {
          T* row = S.data() + ii * nu;
          for (int64_t e = 0; e < nu; ++e) row[e] = t * row[e];
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t e0 = rep.cu[r] - u0, e1 = rep.cu[r + 1] - u0;
            T best = row[e0];
            int64_t arg = e0;
            for (int64_t e = e0 + 1; e < e1; ++e)
              if (row[e] > best) {
                best = row[e];
                arg = e;
              }
            int32_t arg_u = static_cast<int32_t>(u0 + arg);
            if (egma_compat && e1 - e0 < rep.max_len && best < T(0)) {  // zero padding wins the max
              best = 0;
              arg_u = -1;
            }
            rowsum[r] += best;
            if (i2t_arg != nullptr) i2t_arg[(a * R + r) * P + i0 + ii] = arg_u;
          }
          for (int64_t e = 0; e < nu; ++e)
            if (row[e] > colbest[e]) {
              colbest[e] = row[e];
              colarg[e] = static_cast<int32_t>(i0 + ii);
            }
        }
        if (is_matched_tile) {
          for (int64_t u = rep.cu[a]; u < rep.cu[a + 1]; ++u)
            for (int64_t ii = 0; ii < pc; ++ii) matched[u * P + i0 + ii] = S[ii * nu + (u - u0)];
        }
      }
      for (int64_t r = r0; r < r1; ++r) {
        i2t[a * R + r] = rowsum[r] / T(P);
        T sum = 0;
        for (int64_t u = rep.cu[r]; u < rep.cu[r + 1]; ++u) sum += colbest[u - u0];
        t2i[a * R + r] = sum / T(rep.len(r));
      }
      if (t2i_arg != nullptr)
        for (int64_t u = u0; u < u1; ++u) t2i_arg[a * N + u] = colarg[u - u0];
    }
  });
}

// Gradient of the max terms that reach image a (added into d_patch_a): for each patch i, the I2T terms (one
// per report, through its argmax sentence) then the T2I terms (the sentences whose best patch of image a is
// i).
template <typename T>
void route_to_image(int64_t a, const Inputs<T>& in, const MaxTermGrads<T>& g, T* d_patch_a,
                    RoutingScratch<T>& scratch) {
  const Reports& rep = *in.reports;
  const T* s = in.sent;
  const int64_t P = in.P, D = in.D, N = in.N, R = rep.R;
  const T t = in.scale;
  const auto& [d_i2t, d_t2i, i2t_arg, t2i_arg] = g;
  auto& [coef, rows, start] = scratch;
  // Counting sort of the terms by target patch: start[i] .. start[i+1].
  start.assign(P + 1, 0);
  for (int64_t b = 0; b < R; ++b) {
    if (d_i2t[a * R + b] == T(0)) continue;
    const int32_t* arg = i2t_arg + (a * R + b) * P;
    for (int64_t i = 0; i < P; ++i) start[i + 1] += arg[i] >= 0 ? 1 : 0;
  }
  for (int64_t u = 0; u < N; ++u) start[t2i_arg[a * N + u] + 1] += 1;
  for (int64_t i = 0; i < P; ++i) start[i + 1] += start[i];
  coef.resize(start[P]);
  rows.resize(start[P]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t b = 0; b < R; ++b) {
    const T c = t * d_i2t[a * R + b] / T(P);
    if (d_i2t[a * R + b] == T(0)) continue;
    const int32_t* arg = i2t_arg + (a * R + b) * P;
    for (int64_t i = 0; i < P; ++i)
      if (arg[i] >= 0) {
        coef[fill[i]] = c;
        rows[fill[i]++] = s + arg[i] * D;
      }
  }
  for (int64_t u = 0; u < N; ++u) {
    const int64_t b = rep.owner[u], i = t2i_arg[a * N + u];
    coef[fill[i]] = t * d_t2i[a * R + b] / T(rep.len(b));
    rows[fill[i]++] = s + u * D;
  }
  for (int64_t i = 0; i < P; ++i)
    gather_axpy(D, start[i + 1] - start[i], coef.data() + start[i], rows.data() + start[i], d_patch_a + i * D);
}

// Gradient of the max terms that reach report b's sentences (added into their d_sent rows): for each
// sentence, the I2T terms (patches whose best sentence of b it is, by image then patch) then the T2I terms
// (its best patch in each image).
template <typename T>
void route_to_report(int64_t b, const Inputs<T>& in, const MaxTermGrads<T>& g, T* d_sent,
                     RoutingScratch<T>& scratch) {
  const Reports& rep = *in.reports;
  const T* p = in.patch;
  const int64_t M = in.M, P = in.P, D = in.D, N = in.N, R = rep.R;
  const T t = in.scale;
  const auto& [d_i2t, d_t2i, i2t_arg, t2i_arg] = g;
  auto& [coef, rows, start] = scratch;
  const int64_t u0 = rep.cu[b], n = rep.len(b);
  start.assign(n + 1, 0);
  for (int64_t a = 0; a < M; ++a) {
    if (d_i2t[a * R + b] == T(0)) continue;
    const int32_t* arg = i2t_arg + (a * R + b) * P;
    for (int64_t i = 0; i < P; ++i)
      if (arg[i] >= 0) start[arg[i] - u0 + 1] += 1;
  }
  for (int64_t e = 0; e < n; ++e) start[e + 1] += M;
  for (int64_t e = 0; e < n; ++e) start[e + 1] += start[e];
  coef.resize(start[n]);
  rows.resize(start[n]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t a = 0; a < M; ++a) {
    if (d_i2t[a * R + b] == T(0)) continue;
    const T c = t * d_i2t[a * R + b] / T(P);
    const int32_t* arg = i2t_arg + (a * R + b) * P;
    for (int64_t i = 0; i < P; ++i)
      if (arg[i] >= 0) {
        const int64_t e = arg[i] - u0;
        coef[fill[e]] = c;
        rows[fill[e]++] = p + (a * P + i) * D;
      }
  }
  for (int64_t e = 0; e < n; ++e)
    for (int64_t a = 0; a < M; ++a) {
      coef[fill[e]] = t * d_t2i[a * R + b] / T(n);
      rows[fill[e]++] = p + (a * P + t2i_arg[a * N + u0 + e]) * D;
    }
  for (int64_t e = 0; e < n; ++e)
    gather_axpy(D, start[e + 1] - start[e], coef.data() + start[e], rows.data() + start[e], d_sent + (u0 + e) * D);
}

template <typename T>
void similarity_backward(const Inputs<T>& in, const T* d_i2t, const T* d_t2i, const SavedSimilarities<T>& saved,
                         const Gradients<T>& grads) {
  const Reports& rep = *in.reports;
  const int64_t M = in.M, P = in.P, D = in.D, R = rep.R;
  const MaxTermGrads<T> g{d_i2t, d_t2i, saved.i2t_arg, saved.t2i_arg};
  T* dp = grads.d_patch;
  T* ds = grads.d_sent;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    RoutingScratch<T> scratch;
    for (int64_t a = begin; a < end; ++a) {
      std::fill(dp + a * P * D, dp + (a + 1) * P * D, T(0));
      route_to_image(a, in, g, dp + a * P * D, scratch);
    }
  });
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    RoutingScratch<T> scratch;
    for (int64_t b = begin; b < end; ++b) {
      std::fill(ds + rep.cu[b] * D, ds + rep.cu[b + 1] * D, T(0));
      route_to_report(b, in, g, ds, scratch);
    }
  });
  T sum = 0;
  for (int64_t e = 0; e < M * R; ++e) sum += d_i2t[e] * saved.i2t[e] + d_t2i[e] * saved.t2i[e];
  *grads.d_scale = sum / in.scale;
}

#define EGMA_INSTANTIATE_SIMILARITY(T)                                                                              \
  template void similarity_forward<T>(const Inputs<T>&, bool, const Similarities<T>&);                             \
  template void route_to_image<T>(int64_t, const Inputs<T>&, const MaxTermGrads<T>&, T*, RoutingScratch<T>&);      \
  template void route_to_report<T>(int64_t, const Inputs<T>&, const MaxTermGrads<T>&, T*, RoutingScratch<T>&);     \
  template void similarity_backward<T>(const Inputs<T>&, const T*, const T*, const SavedSimilarities<T>&,          \
                                       const Gradients<T>&);
EGMA_INSTANTIATE_SIMILARITY(float)
EGMA_INSTANTIATE_SIMILARITY(double)

}  // namespace egma_cpu
