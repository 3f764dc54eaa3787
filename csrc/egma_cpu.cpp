// Fused CPU kernels of the EGMA loss (docs/loss.md) and of the FILIP similarity.
//
// Forward, phase 1: at::parallel_for over (image, block of whole reports) tiles. Each tile computes its
// similarities A = t * <patch, sentence> in blocks of PATCH_BLOCK patches x (<= SENT_BLOCK sentences) in a
// per-thread scratch buffer and reduces them at once: the I2T row max per (patch, report) and the T2I
// column max per (sentence, image), with their argmax indices. The (B*P) x N matrix never exists. The
// matched tiles (image k, report k) copy their similarities into `own` (N x P).
// Forward, phase 2: at::parallel_for over reports k: the MLCE term and the mapping weights, mapped
// features and the two CLIP losses of report k, from `own` and the embeddings.
// Forward, phase 3 (serial, B x B): the two cross-entropies and the totals.
//
// Backward: at::parallel_for over k, which owns d patch_emb[k] and d sent_emb[report k]; gradients of the
// max terms are routed through the saved argmax indices, the MLCE gradient is recomputed from `own`, and
// the mapping term is recomputed from `own` (its weights are constant). Every output element is written
// by exactly one task, every sum runs in a fixed order: results do not depend on the number of threads,
// and there are no atomics.
//
// Inner products: a register-blocked (4 x 2) kernel on 32-byte GCC vector types, compiled twice
// (x86-64-v3 with FMA, and the baseline) and chosen at load time with target_clones.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "egma_common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace egma_cpu {
namespace {

constexpr int64_t PATCH_BLOCK = 64;  // patches per similarity block
constexpr int64_t SENT_BLOCK = 128;  // sentences per tile (whole reports; a longer report is its own tile)

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define EGMA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EGMA_CLONES
#endif
#define EGMA_INLINE inline __attribute__((always_inline))

typedef float vec_f __attribute__((vector_size(32)));
typedef double vec_d __attribute__((vector_size(32)));
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = vec_f;
  static constexpr int width = 8;
};
template <>
struct Vec<double> {
  using type = vec_d;
  static constexpr int width = 4;
};

template <typename T>
static EGMA_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// C[r * ldc + c] = <A[r], B[c]> for an RI x RJ block; every entry is computed the same way (lane sums over
// D in order, then the lanes in order, then the scalar tail) whichever block shape it falls in.
template <typename T, int RI, int RJ>
static EGMA_INLINE void dots_micro(const T* A, int64_t lda, const T* B, int64_t ldb, int64_t D, T* C, int64_t ldc) {
  using VT = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  VT acc[RI][RJ];
#pragma GCC unroll 8
  for (int r = 0; r < RI; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < RJ; ++c) acc[r][c] = VT{};
  const int64_t Dv = D - D % W;
  for (int64_t d = 0; d < Dv; d += W) {
    VT a[RI], b[RJ];
#pragma GCC unroll 8
    for (int r = 0; r < RI; ++r) a[r] = vload(A + r * lda + d);
#pragma GCC unroll 8
    for (int c = 0; c < RJ; ++c) b[c] = vload(B + c * ldb + d);
#pragma GCC unroll 8
    for (int r = 0; r < RI; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < RJ; ++c) acc[r][c] += a[r] * b[c];
  }
  for (int r = 0; r < RI; ++r)
    for (int c = 0; c < RJ; ++c) {
      T s = 0;
      for (int l = 0; l < W; ++l) s += acc[r][c][l];
      T tail = 0;
      for (int64_t d = Dv; d < D; ++d) tail += A[r * lda + d] * B[c * ldb + d];
      C[r * ldc + c] = s + tail;
    }
}

template <typename T>
static EGMA_INLINE void dots_impl(const T* A, int64_t lda, int64_t m, const T* B, int64_t ldb, int64_t n, int64_t D,
                                  T* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) dots_micro<T, 4, 2>(A + i * lda, lda, B + j * ldb, ldb, D, C + i * ldc + j, ldc);
    for (; j < n; ++j) dots_micro<T, 4, 1>(A + i * lda, lda, B + j * ldb, ldb, D, C + i * ldc + j, ldc);
  }
  for (; i < m; ++i) {
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) dots_micro<T, 1, 2>(A + i * lda, lda, B + j * ldb, ldb, D, C + i * ldc + j, ldc);
    for (; j < n; ++j) dots_micro<T, 1, 1>(A + i * lda, lda, B + j * ldb, ldb, D, C + i * ldc + j, ldc);
  }
}

EGMA_CLONES void dots_f(const float* A, int64_t lda, int64_t m, const float* B, int64_t ldb, int64_t n, int64_t D,
                        float* C, int64_t ldc) {
  dots_impl<float>(A, lda, m, B, ldb, n, D, C, ldc);
}
EGMA_CLONES void dots_d(const double* A, int64_t lda, int64_t m, const double* B, int64_t ldb, int64_t n, int64_t D,
                        double* C, int64_t ldc) {
  dots_impl<double>(A, lda, m, B, ldb, n, D, C, ldc);
}
// C (m x n, row stride ldc) = A (m x D) B^T (B is n x D), rows contiguous along D.
inline void dots(const float* A, int64_t lda, int64_t m, const float* B, int64_t ldb, int64_t n, int64_t D, float* C,
                 int64_t ldc) {
  dots_f(A, lda, m, B, ldb, n, D, C, ldc);
}
inline void dots(const double* A, int64_t lda, int64_t m, const double* B, int64_t ldb, int64_t n, int64_t D,
                 double* C, int64_t ldc) {
  dots_d(A, lda, m, B, ldb, n, D, C, ldc);
}

template <typename T>
static EGMA_INLINE typename Vec<T>::type vsplat(T x) {
  return typename Vec<T>::type{} + x;
}
template <typename T>
static EGMA_INLINE void vstore(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// y[0:D] += sum_k coef[k] * xs[k][0:D], the terms added in order k = 0, 1, ... to every element (a chunk of
// y stays in registers while the K rows stream through).
template <typename T>
static EGMA_INLINE void gather_axpy_impl(int64_t D, int64_t K, const T* coef, const T* const* xs, T* y) {
  using VT = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  constexpr int U = 8;
  int64_t d = 0;
  for (; d + U * W <= D; d += U * W) {
    VT acc[U];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) acc[u] = vload(y + d + u * W);
    for (int64_t k = 0; k < K; ++k) {
      const VT c = vsplat(coef[k]);
      const T* x = xs[k] + d;
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[u] += c * vload(x + u * W);
    }
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) vstore(y + d + u * W, acc[u]);
  }
  for (; d < D; ++d) {
    T acc = y[d];
    for (int64_t k = 0; k < K; ++k) acc += coef[k] * xs[k][d];
    y[d] = acc;
  }
}
EGMA_CLONES void gather_axpy_f(int64_t D, int64_t K, const float* coef, const float* const* xs, float* y) {
  gather_axpy_impl(D, K, coef, xs, y);
}
EGMA_CLONES void gather_axpy_d(int64_t D, int64_t K, const double* coef, const double* const* xs, double* y) {
  gather_axpy_impl(D, K, coef, xs, y);
}
inline void gather_axpy(int64_t D, int64_t K, const float* coef, const float* const* xs, float* y) {
  gather_axpy_f(D, K, coef, xs, y);
}
inline void gather_axpy(int64_t D, int64_t K, const double* coef, const double* const* xs, double* y) {
  gather_axpy_d(D, K, coef, xs, y);
}

// C (m x D) (+)= A (m x K) @ Bm (K x D), A read as A[r * ar + k * ak] (so A^T is a stride swap); every
// element is C (or 0) + sum over k in order.
template <typename T, int RI>
static EGMA_INLINE void nn_micro(int64_t K, const T* A, int64_t ar, int64_t ak, const T* Bm, int64_t ldb, T* C,
                                 int64_t ldc, bool accumulate) {
  using VT = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  VT acc[RI][2];
#pragma GCC unroll 4
  for (int r = 0; r < RI; ++r) {
    acc[r][0] = accumulate ? vload(C + r * ldc) : VT{};
    acc[r][1] = accumulate ? vload(C + r * ldc + W) : VT{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const VT b0 = vload(Bm + k * ldb), b1 = vload(Bm + k * ldb + W);
#pragma GCC unroll 4
    for (int r = 0; r < RI; ++r) {
      const VT a = vsplat(A[r * ar + k * ak]);
      acc[r][0] += a * b0;
      acc[r][1] += a * b1;
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RI; ++r) {
    vstore(C + r * ldc, acc[r][0]);
    vstore(C + r * ldc + W, acc[r][1]);
  }
}

template <typename T>
static EGMA_INLINE void gemm_nn_impl(int64_t m, int64_t K, int64_t D, const T* A, int64_t ar, int64_t ak,
                                     const T* Bm, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vec<T>::width;
  const int64_t Dv = D - D % (2 * W);
  for (int64_t d = 0; d < Dv; d += 2 * W) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) nn_micro<T, 4>(K, A + r * ar, ar, ak, Bm + d, ldb, C + r * ldc + d, ldc, accumulate);
    for (; r < m; ++r) nn_micro<T, 1>(K, A + r * ar, ar, ak, Bm + d, ldb, C + r * ldc + d, ldc, accumulate);
  }
  for (int64_t r = 0; r < m; ++r)
    for (int64_t d = Dv; d < D; ++d) {
      T acc = accumulate ? C[r * ldc + d] : T(0);
      for (int64_t k = 0; k < K; ++k) acc += A[r * ar + k * ak] * Bm[k * ldb + d];
      C[r * ldc + d] = acc;
    }
}
EGMA_CLONES void gemm_nn_f(int64_t m, int64_t K, int64_t D, const float* A, int64_t ar, int64_t ak, const float* Bm,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_nn_impl(m, K, D, A, ar, ak, Bm, ldb, C, ldc, accumulate);
}
EGMA_CLONES void gemm_nn_d(int64_t m, int64_t K, int64_t D, const double* A, int64_t ar, int64_t ak,
                           const double* Bm, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_nn_impl(m, K, D, A, ar, ak, Bm, ldb, C, ldc, accumulate);
}
// C (m x D, rows contiguous, row stride D) (+)= A @ Bm with A[r, k] = A[r * ar + k * ak], Bm K x D contiguous.
inline void gemm_nn(int64_t m, int64_t K, int64_t D, const float* A, int64_t ar, int64_t ak, const float* Bm, float* C,
                    bool accumulate) {
  gemm_nn_f(m, K, D, A, ar, ak, Bm, D, C, D, accumulate);
}
inline void gemm_nn(int64_t m, int64_t K, int64_t D, const double* A, int64_t ar, int64_t ak, const double* Bm,
                    double* C, bool accumulate) {
  gemm_nn_d(m, K, D, A, ar, ak, Bm, D, C, D, accumulate);
}

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

struct Reports {
  const int32_t* cu;
  int64_t R;
  int64_t max_len = 0;
  std::vector<int64_t> block_start;  // report index where each tile's block of reports starts (+ end)
  std::vector<int32_t> owner;        // report of each sentence

  Reports(const int32_t* cu_, int64_t R_, int64_t N) : cu(cu_), R(R_), owner(N) {
    block_start.push_back(0);
    int64_t in_block = 0;
    for (int64_t r = 0; r < R; ++r) {
      int64_t n = cu[r + 1] - cu[r];
      max_len = std::max(max_len, n);
      if (in_block > 0 && in_block + n > SENT_BLOCK) {
        block_start.push_back(r);
        in_block = 0;
      }
      in_block += n;
      for (int64_t u = cu[r]; u < cu[r + 1]; ++u) owner[u] = static_cast<int32_t>(r);
    }
    block_start.push_back(R);
  }
  int64_t num_blocks() const { return static_cast<int64_t>(block_start.size()) - 1; }
  int64_t len(int64_t r) const { return cu[r + 1] - cu[r]; }
};

// Phase 1: I2T, T2I (M x R), argmax indices (optional) and the matched similarities (optional, M == R).
template <typename T>
void filip_tiles(const T* p, int64_t M, int64_t P, int64_t D, const T* s, int64_t N, const Reports& rep, T t,
                 bool compat, T* i2t, T* t2i, int32_t* i2t_arg, int32_t* t2i_arg, T* own) {
  const int64_t R = rep.R;
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
      const bool matched = own != nullptr && a >= r0 && a < r1;
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
            if (compat && e1 - e0 < rep.max_len && best < T(0)) {  // zero padding wins the max
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
        if (matched) {
          for (int64_t u = rep.cu[a]; u < rep.cu[a + 1]; ++u)
            for (int64_t ii = 0; ii < pc; ++ii) own[u * P + i0 + ii] = S[ii * nu + (u - u0)];
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

template <typename T>
struct LossParams {
  T alpha, theta, w_con, w_mlce, w_map;
  bool compat;
};

// The mapping weights of report k: W1 (P x n, each patch over sentences) and W2 (n x P, each sentence over
// patches) from the matched block X (n x P) and the gaze rows GS (n x P, or null when g_k = 0).
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

// Per-thread scratch of the matched (per-report) phase.
template <typename T>
struct Scratch {
  std::vector<T> W1, W2, LP, LS, lse_a, lse_b, dX, rl, rp, cl, cp;
  void reserve(int64_t P, int64_t n) {
    W1.resize(P * n);
    W2.resize(n * P);
    LP.resize(P * P);
    LS.resize(n * n);
    lse_a.resize(std::max(P, n));
    lse_b.resize(std::max(P, n));
  }
};

// Mapping logits of report k without the mapped features: with X = A_k (n x P, t already in),
//   LP = t crossP p_k^T = t W1 s_k p_k^T = W1 X        (P x P)
//   LS = t crossS s_k^T = t W2 p_k s_k^T = W2 X^T      (n x n)
// so neither the P x D mapped features nor any product over D is needed. Builds W1, W2, LP, LS in sc.
template <typename T>
void mapping_forward(const T* X, const T* GS, int64_t n, int64_t P, T theta, Scratch<T>& sc) {
  sc.reserve(P, n);
  mapping_weights(X, GS, n, P, theta, sc.W1.data(), sc.W2.data());
  gemm_nn(P, n, P, sc.W1.data(), n, 1, X, sc.LP.data(), false);  // LP = W1 @ X
  dots(sc.W2.data(), P, n, X, P, n, P, sc.LS.data(), n);         // LS = W2 @ X^T
}

template <typename T>
void mlce_lses(const T* X, const T* GS, int64_t n, int64_t P, T* row_neg, T* row_pos, T* col_neg, T* col_pos) {
  for (int64_t j = 0; j < n; ++j) {
    const T* x = X + j * P;
    const T* g = GS + j * P;
    row_neg[j] = lse_with_zero<T>(P, x, 1, T(1), [&](int64_t i) { return !(g[i] > 0); });
    row_pos[j] = lse_with_zero<T>(P, x, 1, T(-1), [&](int64_t i) { return g[i] > 0; });
  }
  for (int64_t i = 0; i < P; ++i) {
    col_neg[i] = lse_with_zero<T>(n, X + i, P, T(1), [&](int64_t j) { return !(GS[j * P + i] > 0); });
    col_pos[i] = lse_with_zero<T>(n, X + i, P, T(-1), [&](int64_t j) { return GS[j * P + i] > 0; });
  }
}

template <typename T>
void loss_forward(const T* p, int64_t B, int64_t P, int64_t D, const T* s, int64_t N, const Reports& rep, T t,
                  const T* gaze, const bool* gmask, const LossParams<T>& lp, T* terms, T* i2t, T* t2i,
                  int32_t* i2t_arg, int32_t* t2i_arg, T* own) {
  filip_tiles(p, B, P, D, s, N, rep, t, lp.compat, i2t, t2i, i2t_arg, t2i_arg, own);
  std::vector<T> mlce_k(B, T(0)), map_k(B, T(0));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t u0 = rep.cu[k], n = rep.len(k);
      const T* X = own + u0 * P;
      const bool g = gaze != nullptr && (gmask == nullptr || gmask[k]);
      const T* GS = g ? gaze + u0 * P : nullptr;
      if (g) {
        sc.rl.resize(n);
        sc.rp.resize(n);
        sc.cl.resize(P);
        sc.cp.resize(P);
        mlce_lses(X, GS, n, P, sc.rl.data(), sc.rp.data(), sc.cl.data(), sc.cp.data());
        T s2p = 0, p2s = 0;
        for (int64_t j = 0; j < n; ++j) s2p += sc.rl[j] + sc.rp[j];
        for (int64_t i = 0; i < P; ++i) p2s += sc.cl[i] + sc.cp[i];
        mlce_k[k] = lp.alpha * (s2p / T(n)) + (T(1) - lp.alpha) * (p2s / T(P));
      }
      if (n >= 2) {
        mapping_forward(X, GS, n, P, lp.theta, sc);
        T clip_p = clip_block(sc.LP.data(), P, sc.lse_a.data(), sc.lse_b.data());
        T clip_s = clip_block(sc.LS.data(), n, sc.lse_a.data(), sc.lse_b.data());
        map_k[k] = T(0.5) * (clip_p + clip_s);
      }
    }
  });
  int64_t num_g = 0, num_map = 0;
  T mlce = 0, mapping = 0;
  for (int64_t k = 0; k < B; ++k) {
    if (gaze != nullptr && (gmask == nullptr || gmask[k])) {
      ++num_g;
      mlce += mlce_k[k];
    }
    if (rep.len(k) >= 2) {
      ++num_map;
      mapping += map_k[k];
    }
  }
  mlce /= T(std::max<int64_t>(1, num_g));
  mapping /= T(std::max<int64_t>(1, num_map));
  const T con = T(0.5) * (ce_diag<T>(i2t, B, true, T(0), nullptr) + ce_diag<T>(t2i, B, lp.compat, T(0), nullptr));
  terms[0] = lp.w_con * con + lp.w_mlce * mlce + lp.w_map * mapping;
  terms[1] = con;
  terms[2] = mlce;
  terms[3] = mapping;
}

// Gradient of the max terms that reach image a (added into dp_a): for each patch i, the I2T terms (one per
// report, through its argmax sentence) then the T2I terms (the sentences whose best patch of image a is i).
template <typename T>
void image_side_grad(int64_t a, const T* s, int64_t P, int64_t D, int64_t N, const Reports& rep, T t, const T* G1,
                     const T* G2, const int32_t* i2t_arg, const int32_t* t2i_arg, T* dp_a, std::vector<T>& coef,
                     std::vector<const T*>& xs, std::vector<int64_t>& start) {
  const int64_t R = rep.R;
  // Counting sort of the terms by target patch: start[i] .. start[i+1].
  start.assign(P + 1, 0);
  for (int64_t b = 0; b < R; ++b) {
    if (G1[a * R + b] == T(0)) continue;
    const int32_t* arg = i2t_arg + (a * R + b) * P;
    for (int64_t i = 0; i < P; ++i) start[i + 1] += arg[i] >= 0 ? 1 : 0;
  }
  for (int64_t u = 0; u < N; ++u) start[t2i_arg[a * N + u] + 1] += 1;
  for (int64_t i = 0; i < P; ++i) start[i + 1] += start[i];
  coef.resize(start[P]);
  xs.resize(start[P]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t b = 0; b < R; ++b) {
    const T c = t * G1[a * R + b] / T(P);
    if (G1[a * R + b] == T(0)) continue;
    const int32_t* arg = i2t_arg + (a * R + b) * P;
    for (int64_t i = 0; i < P; ++i)
      if (arg[i] >= 0) {
        coef[fill[i]] = c;
        xs[fill[i]++] = s + arg[i] * D;
      }
  }
  for (int64_t u = 0; u < N; ++u) {
    const int64_t b = rep.owner[u], i = t2i_arg[a * N + u];
    coef[fill[i]] = t * G2[a * R + b] / T(rep.len(b));
    xs[fill[i]++] = s + u * D;
  }
  for (int64_t i = 0; i < P; ++i)
    gather_axpy(D, start[i + 1] - start[i], coef.data() + start[i], xs.data() + start[i], dp_a + i * D);
}

// Gradient of the max terms that reach report b's sentences (added into their ds rows): for each sentence,
// the I2T terms (patches whose best sentence of b it is, by image then patch) then the T2I terms (its best
// patch in each image).
template <typename T>
void report_side_grad(int64_t b, const T* p, int64_t M, int64_t P, int64_t D, int64_t N, const Reports& rep, T t,
                      const T* G1, const T* G2, const int32_t* i2t_arg, const int32_t* t2i_arg, T* ds,
                      std::vector<T>& coef, std::vector<const T*>& xs, std::vector<int64_t>& start) {
  const int64_t R = rep.R;
  const int64_t u0 = rep.cu[b], n = rep.len(b);
  start.assign(n + 1, 0);
  for (int64_t a = 0; a < M; ++a) {
    if (G1[a * R + b] == T(0)) continue;
    const int32_t* arg = i2t_arg + (a * R + b) * P;
    for (int64_t i = 0; i < P; ++i)
      if (arg[i] >= 0) start[arg[i] - u0 + 1] += 1;
  }
  for (int64_t e = 0; e < n; ++e) start[e + 1] += M;
  for (int64_t e = 0; e < n; ++e) start[e + 1] += start[e];
  coef.resize(start[n]);
  xs.resize(start[n]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t a = 0; a < M; ++a) {
    if (G1[a * R + b] == T(0)) continue;
    const T c = t * G1[a * R + b] / T(P);
    const int32_t* arg = i2t_arg + (a * R + b) * P;
    for (int64_t i = 0; i < P; ++i)
      if (arg[i] >= 0) {
        const int64_t e = arg[i] - u0;
        coef[fill[e]] = c;
        xs[fill[e]++] = p + (a * P + i) * D;
      }
  }
  for (int64_t e = 0; e < n; ++e)
    for (int64_t a = 0; a < M; ++a) {
      coef[fill[e]] = t * G2[a * R + b] / T(n);
      xs[fill[e]++] = p + (a * P + t2i_arg[a * N + u0 + e]) * D;
    }
  for (int64_t e = 0; e < n; ++e)
    gather_axpy(D, start[e + 1] - start[e], coef.data() + start[e], xs.data() + start[e], ds + (u0 + e) * D);
}

template <typename T>
void filip_backward(const T* p, int64_t M, int64_t P, int64_t D, const T* s, int64_t N, const Reports& rep, T t,
                    const T* G1, const T* G2, const T* i2t, const T* t2i, const int32_t* i2t_arg,
                    const int32_t* t2i_arg, T* dp, T* ds, T* dt) {
  const int64_t R = rep.R;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> coef;
    std::vector<const T*> xs;
    std::vector<int64_t> start;
    for (int64_t a = begin; a < end; ++a) {
      std::fill(dp + a * P * D, dp + (a + 1) * P * D, T(0));
      image_side_grad(a, s, P, D, N, rep, t, G1, G2, i2t_arg, t2i_arg, dp + a * P * D, coef, xs, start);
    }
  });
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> coef;
    std::vector<const T*> xs;
    std::vector<int64_t> start;
    for (int64_t b = begin; b < end; ++b) {
      std::fill(ds + rep.cu[b] * D, ds + rep.cu[b + 1] * D, T(0));
      report_side_grad(b, p, M, P, D, N, rep, t, G1, G2, i2t_arg, t2i_arg, ds, coef, xs, start);
    }
  });
  T g = 0;
  for (int64_t e = 0; e < M * R; ++e) g += G1[e] * i2t[e] + G2[e] * t2i[e];
  *dt = g / t;
}

template <typename T>
void loss_backward(const T* gterms, const T* g_i2t, const T* g_t2i, const T* p, int64_t B, int64_t P, int64_t D,
                   const T* s, int64_t N, const Reports& rep, T t, const T* gaze, const bool* gmask,
                   const T* i2t, const T* t2i, const int32_t* i2t_arg, const int32_t* t2i_arg, const T* own,
                   const LossParams<T>& lp, T* dp, T* ds, T* dt) {
  int64_t num_g = 0, num_map = 0;
  for (int64_t k = 0; k < B; ++k) {
    num_g += (gaze != nullptr && (gmask == nullptr || gmask[k])) ? 1 : 0;
    num_map += rep.len(k) >= 2 ? 1 : 0;
  }
  const T c_con = gterms[0] * lp.w_con + gterms[1];
  const T c_mlce = (gterms[0] * lp.w_mlce + gterms[2]) / T(std::max<int64_t>(1, num_g));
  const T c_map = (gterms[0] * lp.w_map + gterms[3]) / T(std::max<int64_t>(1, num_map));
  std::vector<T> G1(g_i2t, g_i2t + B * B), G2(g_t2i, g_t2i + B * B);
  ce_diag<T>(i2t, B, true, T(0.5) * c_con, G1.data());
  ce_diag<T>(t2i, B, lp.compat, T(0.5) * c_con, G2.data());
  std::vector<T> dt_k(B, T(0));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> sc;
    std::vector<T> coef;
    std::vector<const T*> xs;
    std::vector<int64_t> start;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t u0 = rep.cu[k], n = rep.len(k);
      T* dpk = dp + k * P * D;
      T* dsk = ds + u0 * D;
      const T* pk = p + k * P * D;
      const T* sk = s + u0 * D;
      std::fill(dpk, dpk + P * D, T(0));
      std::fill(dsk, dsk + n * D, T(0));
      image_side_grad(k, s, P, D, N, rep, t, G1.data(), G2.data(), i2t_arg, t2i_arg, dpk, coef, xs, start);
      report_side_grad(k, p, B, P, D, N, rep, t, G1.data(), G2.data(), i2t_arg, t2i_arg, ds, coef, xs, start);
      const T* X = own + u0 * P;
      const bool g = gaze != nullptr && (gmask == nullptr || gmask[k]);
      const T* GS = g ? gaze + u0 * P : nullptr;
      // d A_k (n x P) of the MLCE and mapping terms, then one pair of products over D.
      const bool do_mlce = g && c_mlce != T(0);
      const bool do_map = n >= 2 && c_map != T(0);
      T dtk = 0;
      if (do_mlce || do_map) {
        sc.dX.assign(n * P, T(0));
        if (do_mlce) {
          sc.rl.resize(n);
          sc.rp.resize(n);
          sc.cl.resize(P);
          sc.cp.resize(P);
          mlce_lses(X, GS, n, P, sc.rl.data(), sc.rp.data(), sc.cl.data(), sc.cp.data());
          const T cr = c_mlce * lp.alpha / T(n), cc = c_mlce * (T(1) - lp.alpha) / T(P);
          for (int64_t j = 0; j < n; ++j)
            for (int64_t i = 0; i < P; ++i) {
              const T x = X[j * P + i];
              if (GS[j * P + i] > 0)
                sc.dX[j * P + i] = -cr * std::exp(-x - sc.rp[j]) - cc * std::exp(-x - sc.cp[i]);
              else
                sc.dX[j * P + i] = cr * std::exp(x - sc.rl[j]) + cc * std::exp(x - sc.cl[i]);
            }
        }
        if (do_map) {
          mapping_forward(X, GS, n, P, lp.theta, sc);
          // The mapping term is c_map * 0.5 * (clipP + clipS). dLP in place; LP = W1 X gives dX += W1^T @ dLP.
          clip_block(sc.LP.data(), P, sc.lse_a.data(), sc.lse_b.data());
          clip_block_grad(sc.LP.data(), P, sc.lse_a.data(), sc.lse_b.data(), c_map * T(0.5));
          gemm_nn(n, P, P, sc.W1.data(), 1, n, sc.LP.data(), sc.dX.data(), true);
          // dLS likewise; LS = W2 X^T gives dX += dLS^T @ W2.
          clip_block(sc.LS.data(), n, sc.lse_a.data(), sc.lse_b.data());
          clip_block_grad(sc.LS.data(), n, sc.lse_a.data(), sc.lse_b.data(), c_map * T(0.5));
          gemm_nn(n, n, P, sc.LS.data(), 1, n, sc.W2.data(), sc.dX.data(), true);
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
  for (int64_t e = 0; e < B * B; ++e) g += G1[e] * i2t[e] + G2[e] * t2i[e];
  g /= t;
  for (int64_t k = 0; k < B; ++k) g += dt_k[k];
  *dt = g;
}

// ------------------------------------------------------------------------------------------------------
// Op wrappers.

using egma_common::check_gaze_inputs;
using egma_common::check_loss_grad_inputs;
using egma_common::check_report_offsets;
using egma_common::check_similarity_grad_inputs;
using egma_common::new_out;

// The saved argmax indices the backward routes through: i2t_arg[a, r, i] is -1 (egma_compat's clamp to 0)
// or a sentence of report r, t2i_arg[a, u] a patch. Checked before any kernel uses them as offsets.
void check_argmax_indices(const int32_t* i2t_arg, const int32_t* t2i_arg, const int32_t* cu, int64_t M, int64_t R,
                          int64_t P, int64_t N, const char* op) {
  std::atomic<bool> bad{false};
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t a = begin; a < end && !bad.load(std::memory_order_relaxed); ++a) {
      for (int64_t r = 0; r < R; ++r) {
        const int32_t lo = cu[r], hi = cu[r + 1];
        const int32_t* arg = i2t_arg + (a * R + r) * P;
        for (int64_t i = 0; i < P; ++i)
          if (arg[i] != -1 && (arg[i] < lo || arg[i] >= hi)) bad = true;
      }
      const int32_t* arg = t2i_arg + a * N;
      for (int64_t u = 0; u < N; ++u)
        if (arg[u] < 0 || arg[u] >= P) bad = true;
    }
  });
  TORCH_CHECK(!bad.load(), "egma_kernels ", op, ": the saved argmax indices are out of range (pass the tensors ",
              "the forward op returned)");
}

void check_common(const at::Tensor& patch, const at::Tensor& sent, const at::Tensor& cu, const at::Tensor& scale) {
  TORCH_CHECK(patch.device().is_cpu() && sent.device().is_cpu() && cu.device().is_cpu() && scale.device().is_cpu(),
              "egma_kernels CPU op: all tensors must be on the CPU");
  TORCH_CHECK(patch.dim() == 3 && sent.dim() == 2 && cu.dim() == 1, "egma_kernels: bad ranks");
  TORCH_CHECK(patch.size(2) == sent.size(1), "egma_kernels: embedding sizes differ");
  TORCH_CHECK(patch.scalar_type() == sent.scalar_type(), "egma_kernels: patch_emb and sent_emb dtypes differ");
  TORCH_CHECK(patch.scalar_type() == at::kFloat || patch.scalar_type() == at::kDouble,
              "egma_kernels CPU op: float32 or float64 inputs (upcast float16/bfloat16 first)");
  TORCH_CHECK(cu.scalar_type() == at::kInt, "egma_kernels: cu_seqlens must be int32");
  TORCH_CHECK(scale.numel() == 1, "egma_kernels: logit_scale must have one element");
  TORCH_CHECK(cu.size(0) >= 1, "egma_kernels: cu_seqlens must have at least one element");
  TORCH_CHECK(patch.size(1) >= 1 && patch.size(2) >= 1, "egma_kernels: patch_emb must have P >= 1 and D >= 1");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_fwd_cpu(
    const at::Tensor& patch_, const at::Tensor& sent_, const at::Tensor& cu_, const at::Tensor& scale_,
    const std::optional<at::Tensor>& gaze_, const std::optional<at::Tensor>& gmask_, double alpha, double theta,
    double w_con, double w_mlce, double w_map, bool compat, bool save_idx) {
  check_common(patch_, sent_, cu_, scale_);
  const auto patch = patch_.contiguous();
  const auto sent = sent_.contiguous();
  const auto cu = cu_.contiguous();
  const int64_t B = patch.size(0), P = patch.size(1), D = patch.size(2), N = sent.size(0);
  TORCH_CHECK(cu.size(0) == B + 1, "egma_kernels: the loss needs one report per image");
  check_report_offsets(cu.data_ptr<int32_t>(), B, N, "loss_fwd");
  check_gaze_inputs(B, P, N, gaze_, gmask_, "loss_fwd");
  at::Tensor gaze, gmask;
  if (gaze_.has_value()) {
    gaze = gaze_->to(patch.scalar_type()).contiguous();
    if (gmask_.has_value()) gmask = gmask_->to(at::kBool).contiguous();
  }
  const auto opts = patch.options();
  auto terms = new_out({4}, opts);
  auto i2t = new_out({B, B}, opts);
  auto t2i = new_out({B, B}, opts);
  // The argmax routes (B x B x P) only when a backward may follow.
  auto i2t_arg = save_idx ? new_out({B, B, P}, opts.dtype(at::kInt)) : at::empty({0}, opts.dtype(at::kInt));
  auto t2i_arg = save_idx ? new_out({B, N}, opts.dtype(at::kInt)) : at::empty({0}, opts.dtype(at::kInt));
  auto own = new_out({N, P}, opts);
  AT_DISPATCH_FLOATING_TYPES(patch.scalar_type(), "egma_loss_fwd_cpu", [&] {
    using T = scalar_t;
    const T t = scale_.to(patch.scalar_type()).item<T>();
    Reports rep(cu.data_ptr<int32_t>(), B, N);
    LossParams<T> lp{T(alpha), T(theta), T(w_con), T(w_mlce), T(w_map), compat};
    loss_forward<T>(patch.data_ptr<T>(), B, P, D, sent.data_ptr<T>(), N, rep, t,
                    gaze.defined() ? gaze.data_ptr<T>() : nullptr, gmask.defined() ? gmask.data_ptr<bool>() : nullptr,
                    lp, terms.data_ptr<T>(), i2t.data_ptr<T>(), t2i.data_ptr<T>(),
                    save_idx ? i2t_arg.data_ptr<int32_t>() : nullptr, save_idx ? t2i_arg.data_ptr<int32_t>() : nullptr,
                    own.data_ptr<T>());
  });
  return {terms, i2t, t2i, i2t_arg, t2i_arg, own};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_bwd_cpu(
    const at::Tensor& gterms_, const at::Tensor& g_i2t_, const at::Tensor& g_t2i_, const at::Tensor& patch_,
    const at::Tensor& sent_, const at::Tensor& cu_, const at::Tensor& scale_, const std::optional<at::Tensor>& gaze_,
    const std::optional<at::Tensor>& gmask_, const at::Tensor& i2t_, const at::Tensor& t2i_,
    const at::Tensor& i2t_arg_, const at::Tensor& t2i_arg_, const at::Tensor& own_, double alpha, double theta,
    double w_con, double w_mlce, double w_map, bool compat) {
  check_common(patch_, sent_, cu_, scale_);
  const auto patch = patch_.contiguous();
  const auto sent = sent_.contiguous();
  const auto cu = cu_.contiguous();
  const int64_t B = patch.size(0), P = patch.size(1), D = patch.size(2), N = sent.size(0);
  const char* op = "loss_bwd";
  check_loss_grad_inputs(B, P, N, cu.size(0), gterms_, g_i2t_, g_t2i_, i2t_, t2i_, i2t_arg_, t2i_arg_, own_, gaze_,
                         gmask_);
  check_report_offsets(cu.data_ptr<int32_t>(), B, N, op);
  const auto dt_ = patch.scalar_type();
  const auto gterms = gterms_.to(dt_).contiguous();
  const auto g_i2t = g_i2t_.to(dt_).contiguous();
  const auto g_t2i = g_t2i_.to(dt_).contiguous();
  const auto i2t = i2t_.contiguous();
  const auto t2i = t2i_.contiguous();
  const auto i2t_arg = i2t_arg_.contiguous();
  const auto t2i_arg = t2i_arg_.contiguous();
  const auto own = own_.contiguous();
  check_argmax_indices(i2t_arg.data_ptr<int32_t>(), t2i_arg.data_ptr<int32_t>(), cu.data_ptr<int32_t>(), B, B, P, N, op);
  at::Tensor gaze, gmask;
  if (gaze_.has_value()) {
    gaze = gaze_->to(dt_).contiguous();
    if (gmask_.has_value()) gmask = gmask_->to(at::kBool).contiguous();
  }
  auto dp = new_out({B, P, D}, patch.options());
  auto ds = new_out({N, D}, patch.options());
  auto dscale = new_out({}, scale_.options());
  AT_DISPATCH_FLOATING_TYPES(dt_, "egma_loss_bwd_cpu", [&] {
    using T = scalar_t;
    const T t = scale_.to(dt_).item<T>();
    Reports rep(cu.data_ptr<int32_t>(), B, N);
    LossParams<T> lp{T(alpha), T(theta), T(w_con), T(w_mlce), T(w_map), compat};
    T gt = 0;
    loss_backward<T>(gterms.data_ptr<T>(), g_i2t.data_ptr<T>(), g_t2i.data_ptr<T>(), patch.data_ptr<T>(), B, P, D,
                     sent.data_ptr<T>(), N, rep, t, gaze.defined() ? gaze.data_ptr<T>() : nullptr,
                     gmask.defined() ? gmask.data_ptr<bool>() : nullptr, i2t.data_ptr<T>(), t2i.data_ptr<T>(),
                     i2t_arg.data_ptr<int32_t>(), t2i_arg.data_ptr<int32_t>(), own.data_ptr<T>(), lp,
                     dp.data_ptr<T>(), ds.data_ptr<T>(), &gt);
    dscale.fill_(gt);
  });
  return {dp, ds, dscale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filip_fwd_cpu(const at::Tensor& patch_,
                                                                         const at::Tensor& sent_,
                                                                         const at::Tensor& cu_,
                                                                         const at::Tensor& scale_, bool compat,
                                                                         bool save_idx) {
  check_common(patch_, sent_, cu_, scale_);
  const auto patch = patch_.contiguous();
  const auto sent = sent_.contiguous();
  const auto cu = cu_.contiguous();
  const int64_t M = patch.size(0), P = patch.size(1), D = patch.size(2), N = sent.size(0), R = cu.size(0) - 1;
  check_report_offsets(cu.data_ptr<int32_t>(), R, N, "filip_fwd");
  const auto opts = patch.options();
  auto i2t = new_out({M, R}, opts);
  auto t2i = new_out({M, R}, opts);
  auto i2t_arg = save_idx ? new_out({M, R, P}, opts.dtype(at::kInt)) : at::empty({0}, opts.dtype(at::kInt));
  auto t2i_arg = save_idx ? new_out({M, N}, opts.dtype(at::kInt)) : at::empty({0}, opts.dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(patch.scalar_type(), "egma_filip_fwd_cpu", [&] {
    using T = scalar_t;
    const T t = scale_.to(patch.scalar_type()).item<T>();
    Reports rep(cu.data_ptr<int32_t>(), R, N);
    filip_tiles<T>(patch.data_ptr<T>(), M, P, D, sent.data_ptr<T>(), N, rep, t, compat, i2t.data_ptr<T>(),
                   t2i.data_ptr<T>(), save_idx ? i2t_arg.data_ptr<int32_t>() : nullptr,
                   save_idx ? t2i_arg.data_ptr<int32_t>() : nullptr, nullptr);
  });
  return {i2t, t2i, i2t_arg, t2i_arg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> filip_bwd_cpu(const at::Tensor& g_i2t_, const at::Tensor& g_t2i_,
                                                             const at::Tensor& patch_, const at::Tensor& sent_,
                                                             const at::Tensor& cu_, const at::Tensor& scale_,
                                                             const at::Tensor& i2t_, const at::Tensor& t2i_,
                                                             const at::Tensor& i2t_arg_, const at::Tensor& t2i_arg_) {
  check_common(patch_, sent_, cu_, scale_);
  const auto patch = patch_.contiguous();
  const auto sent = sent_.contiguous();
  const auto cu = cu_.contiguous();
  const int64_t M = patch.size(0), P = patch.size(1), D = patch.size(2), N = sent.size(0), R = cu.size(0) - 1;
  const char* op = "filip_bwd";
  check_report_offsets(cu.data_ptr<int32_t>(), R, N, op);
  const auto dt_ = patch.scalar_type();
  check_similarity_grad_inputs(M, R, P, N, g_i2t_, g_t2i_, i2t_, t2i_, i2t_arg_, t2i_arg_, op);
  const auto g1 = g_i2t_.to(dt_).contiguous();
  const auto g2 = g_t2i_.to(dt_).contiguous();
  const auto i2t = i2t_.contiguous();
  const auto t2i = t2i_.contiguous();
  const auto i2t_arg = i2t_arg_.contiguous();
  const auto t2i_arg = t2i_arg_.contiguous();
  check_argmax_indices(i2t_arg.data_ptr<int32_t>(), t2i_arg.data_ptr<int32_t>(), cu.data_ptr<int32_t>(), M, R, P, N, op);
  auto dp = new_out({M, P, D}, patch.options());
  auto ds = new_out({N, D}, patch.options());
  auto dscale = new_out({}, scale_.options());
  AT_DISPATCH_FLOATING_TYPES(dt_, "egma_filip_bwd_cpu", [&] {
    using T = scalar_t;
    const T t = scale_.to(dt_).item<T>();
    Reports rep(cu.data_ptr<int32_t>(), R, N);
    T gt = 0;
    filip_backward<T>(patch.data_ptr<T>(), M, P, D, sent.data_ptr<T>(), N, rep, t, g1.data_ptr<T>(),
                      g2.data_ptr<T>(), i2t.data_ptr<T>(), t2i.data_ptr<T>(), i2t_arg.data_ptr<int32_t>(),
                      t2i_arg.data_ptr<int32_t>(), dp.data_ptr<T>(), ds.data_ptr<T>(), &gt);
    dscale.fill_(gt);
  });
  return {dp, ds, dscale};
}

}  // namespace
}  // namespace egma_cpu

TORCH_LIBRARY_IMPL(egma_kernels, CPU, m) {
  m.impl("loss_fwd", &egma_cpu::loss_fwd_cpu);
  m.impl("loss_bwd", &egma_cpu::loss_bwd_cpu);
  m.impl("filip_fwd", &egma_cpu::filip_fwd_cpu);
  m.impl("filip_bwd", &egma_cpu::filip_bwd_cpu);
}
