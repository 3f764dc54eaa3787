// The per-report pieces of the loss that the CPU forward and backward both compute: the MLCE
// log-sum-exps, the mapping weights and logits, the CLIP loss of a square logit block and the diagonal
// cross-entropies (docs/loss.md, sections 2 to 4).
#pragma once

#include "kernels.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace egma_cpu {

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// log(1 + sum_{keep} exp(v)) over a strided set, stably (the extra zero logit bounds the shift below).
template <typename T, typename Keep>
inline T lse_with_zero(int64_t n, const T* v, int64_t stride, T sign, Keep keep) {
  T m = 0;
  for (int64_t e = 0; e < n; ++e)
    if (keep(e)) m = std::max(m, sign * v[e * stride]);
  T s = std::exp(-m);
  for (int64_t e = 0; e < n; ++e)
    if (keep(e)) s += std::exp(sign * v[e * stride] - m);
  return m + std::log(s);
}

// Row and column log-sum-exp of a square m x m block; returns the symmetric CLIP loss of the block.
template <typename T>
T clip_block(const T* L, int64_t m, T* row_lse, T* col_lse) {
  for (int64_t i = 0; i < m; ++i) {
    const T* row = L + i * m;
    T mx = neg_inf<T>();
    for (int64_t j = 0; j < m; ++j) mx = std::max(mx, row[j]);
    T s = 0;
    for (int64_t j = 0; j < m; ++j) s += std::exp(row[j] - mx);
    row_lse[i] = mx + std::log(s);
  }
  std::vector<T> cmax(m, neg_inf<T>()), csum(m, T(0));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) cmax[j] = std::max(cmax[j], L[i * m + j]);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) csum[j] += std::exp(L[i * m + j] - cmax[j]);
  T rows = 0, cols = 0;
  for (int64_t i = 0; i < m; ++i) {
    col_lse[i] = cmax[i] + std::log(csum[i]);
    rows += row_lse[i] - L[i * m + i];
    cols += col_lse[i] - L[i * m + i];
  }
  return T(0.5) * (rows / T(m) + cols / T(m));
}

// In place: L (m x m logits) becomes scale * d clip_block / d L, from the row and column log-sum-exps
// that clip_block(L, ...) wrote (the softmaxes of both directions minus the identity).
template <typename T>
void clip_block_grad(T* L, int64_t m, const T* row_lse, const T* col_lse, T scale) {
  const T c = scale * T(0.5) / T(m);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j) {
      const T x = L[i * m + j];
      L[i * m + j] = c * (std::exp(x - row_lse[i]) + std::exp(x - col_lse[j]) - (i == j ? T(2) : T(0)));
    }
}

// Cross-entropy with targets on the diagonal over rows (by_rows) or columns of a square B x B matrix,
// and optionally its gradient (scaled by coef) added into grad.
template <typename T>
T ce_diag(const T* M, int64_t B, bool by_rows, T coef, T* grad) {
  T total = 0;
  std::vector<T> p(B);
  for (int64_t a = 0; a < B; ++a) {
    auto at = [&](int64_t c) { return by_rows ? M[a * B + c] : M[c * B + a]; };
    T mx = neg_inf<T>();
    for (int64_t c = 0; c < B; ++c) mx = std::max(mx, at(c));
    T s = 0;
    for (int64_t c = 0; c < B; ++c) s += std::exp(at(c) - mx);
    T lse = mx + std::log(s);
    total += lse - at(a);
    if (grad != nullptr) {
      for (int64_t c = 0; c < B; ++c) {
        T g = coef * (std::exp(at(c) - lse) - (c == a ? T(1) : T(0))) / T(B);
        if (by_rows)
          grad[a * B + c] += g;
        else
          grad[c * B + a] += g;
      }
    }
  }
  return total / T(B);
}

// The mapping weights of report k: W1 (P x n, each patch over sentences: W_I2T) and W2 (n x P, each
// sentence over patches: W_T2I) from the matched block X (n x P) and the gaze rows GS (n x P, or null when
// g_k = 0).
template <typename T, typename G>
void mapping_weights(const T* X, const G* GS, int64_t n, int64_t P, T theta, T* W1, T* W2) {
  auto omega = [&](T v, T mn, T spread) -> T {
    if (spread == T(0)) return T(1);
    return (v - mn) / spread >= theta ? T(1) : T(0);
  };
  for (int64_t i = 0; i < P; ++i) {
    T mn = X[i], mx = X[i];
    for (int64_t j = 1; j < n; ++j) {
      mn = std::min(mn, X[j * P + i]);
      mx = std::max(mx, X[j * P + i]);
    }
    T sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      T w = omega(X[j * P + i], mn, mx - mn) + (GS ? static_cast<T>(GS[j * P + i]) : T(0));
      W1[i * n + j] = w;
      sum += w;
    }
    for (int64_t j = 0; j < n; ++j) W1[i * n + j] /= sum;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* x = X + j * P;
    T mn = x[0], mx = x[0];
    for (int64_t i = 1; i < P; ++i) {
      mn = std::min(mn, x[i]);
      mx = std::max(mx, x[i]);
    }
    T sum = 0;
    for (int64_t i = 0; i < P; ++i) {
      T w = omega(x[i], mn, mx - mn) + (GS ? static_cast<T>(GS[j * P + i]) : T(0));
      W2[j * P + i] = w;
      sum += w;
    }
    for (int64_t i = 0; i < P; ++i) W2[j * P + i] /= sum;
  }
}

// Per-thread scratch of the per-report phase: the mapping weights W1 (P x n) and W2 (n x P), the mapping
// logits patch_logits (P x P) and sent_logits (n x n) with row and column log-sum-exps, the MLCE
// log-sum-exps (per sentence and per patch, of the negative and of the positive labels) and dX, the
// gradient of the matched block (n x P).
template <typename T>
struct Scratch {
  std::vector<T> W1, W2, patch_logits, sent_logits, row_lse, col_lse, dX;
  std::vector<T> sent_lse_neg, sent_lse_pos, patch_lse_neg, patch_lse_pos;
  void reserve_mapping(int64_t P, int64_t n) {
    W1.resize(P * n);
    W2.resize(n * P);
    patch_logits.resize(P * P);
    sent_logits.resize(n * n);
    row_lse.resize(std::max(P, n));
    col_lse.resize(std::max(P, n));
  }
};

// Mapping logits of report k without the mapped features: with X = A_k (n x P, t already in),
//   patch_logits = t crossP p_k^T = t W1 s_k p_k^T = W1 X        (P x P)
//   sent_logits  = t crossS s_k^T = t W2 p_k s_k^T = W2 X^T      (n x n)
// so neither the P x D mapped features nor any product over D is needed. Builds W1, W2 and both logit
// blocks in sc.
template <typename T>
void mapping_forward(const T* X, const T* GS, int64_t n, int64_t P, T theta, Scratch<T>& sc) {
  sc.reserve_mapping(P, n);
  mapping_weights(X, GS, n, P, theta, sc.W1.data(), sc.W2.data());
  gemm_nn(P, n, P, sc.W1.data(), n, 1, X, sc.patch_logits.data(), false);  // W1 @ X
  dots(sc.W2.data(), P, n, X, P, n, P, sc.sent_logits.data(), n);          // W2 @ X^T
}

// The MLCE log-sum-exps of report k's matched block X (n x P) with gaze rows GS, into sc.
template <typename T>
void mlce_lses(const T* X, const T* GS, int64_t n, int64_t P, Scratch<T>& sc) {
  sc.sent_lse_neg.resize(n);
  sc.sent_lse_pos.resize(n);
  sc.patch_lse_neg.resize(P);
  sc.patch_lse_pos.resize(P);
  for (int64_t j = 0; j < n; ++j) {
    const T* x = X + j * P;
    const T* g = GS + j * P;
    sc.sent_lse_neg[j] = lse_with_zero<T>(P, x, 1, T(1), [&](int64_t i) { return !(g[i] > 0); });
    sc.sent_lse_pos[j] = lse_with_zero<T>(P, x, 1, T(-1), [&](int64_t i) { return g[i] > 0; });
  }
  for (int64_t i = 0; i < P; ++i) {
    sc.patch_lse_neg[i] = lse_with_zero<T>(n, X + i, P, T(1), [&](int64_t j) { return !(GS[j * P + i] > 0); });
    sc.patch_lse_pos[i] = lse_with_zero<T>(n, X + i, P, T(-1), [&](int64_t j) { return GS[j * P + i] > 0; });
  }
}

}  // namespace egma_cpu
