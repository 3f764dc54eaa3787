// Register-blocked inner-product kernels on 32-byte GCC vector types (declared in simd.h).
#include "simd.h"

namespace egma_cpu {
namespace {

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
template <typename T>
static EGMA_INLINE typename Vec<T>::type vsplat(T x) {
  return typename Vec<T>::type{} + x;
}
template <typename T>
static EGMA_INLINE void vstore(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
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

// y[0:D] += sum_k coef[k] * rows[k][0:D], the terms added in order k = 0, 1, ... to every element (a chunk
// of y stays in registers while the K rows stream through).
template <typename T>
static EGMA_INLINE void gather_axpy_impl(int64_t D, int64_t K, const T* coef, const T* const* rows, T* y) {
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
      const T* x = rows[k] + d;
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[u] += c * vload(x + u * W);
    }
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) vstore(y + d + u * W, acc[u]);
  }
  for (; d < D; ++d) {
    T acc = y[d];
    for (int64_t k = 0; k < K; ++k) acc += coef[k] * rows[k][d];
    y[d] = acc;
  }
}

// C (RI rows x 2W columns at C, row stride ldc) (+)= A (RI x K) @ Bm (K x 2W), A read through its strides.
template <typename T, int RI>
static EGMA_INLINE void nn_micro(int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* Bm, int64_t ldb, T* C,
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
      const VT a = vsplat(A[r * a_row + k * a_col]);
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
static EGMA_INLINE void gemm_nn_impl(int64_t m, int64_t K, int64_t D, const T* A, int64_t a_row, int64_t a_col,
                                     const T* Bm, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vec<T>::width;
  const int64_t Dv = D - D % (2 * W);
  for (int64_t d = 0; d < Dv; d += 2 * W) {
    int64_t r = 0;
    for (; r + 4 <= m; r += 4)
      nn_micro<T, 4>(K, A + r * a_row, a_row, a_col, Bm + d, ldb, C + r * ldc + d, ldc, accumulate);
    for (; r < m; ++r) nn_micro<T, 1>(K, A + r * a_row, a_row, a_col, Bm + d, ldb, C + r * ldc + d, ldc, accumulate);
  }
  for (int64_t r = 0; r < m; ++r)
    for (int64_t d = Dv; d < D; ++d) {
      T acc = accumulate ? C[r * ldc + d] : T(0);
      for (int64_t k = 0; k < K; ++k) acc += A[r * a_row + k * a_col] * Bm[k * ldb + d];
      C[r * ldc + d] = acc;
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
EGMA_CLONES void gather_axpy_f(int64_t D, int64_t K, const float* coef, const float* const* rows, float* y) {
  gather_axpy_impl(D, K, coef, rows, y);
}
EGMA_CLONES void gather_axpy_d(int64_t D, int64_t K, const double* coef, const double* const* rows, double* y) {
  gather_axpy_impl(D, K, coef, rows, y);
}
EGMA_CLONES void gemm_nn_f(int64_t m, int64_t K, int64_t D, const float* A, int64_t a_row, int64_t a_col,
                           const float* Bm, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_nn_impl(m, K, D, A, a_row, a_col, Bm, ldb, C, ldc, accumulate);
}
EGMA_CLONES void gemm_nn_d(int64_t m, int64_t K, int64_t D, const double* A, int64_t a_row, int64_t a_col,
                           const double* Bm, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_nn_impl(m, K, D, A, a_row, a_col, Bm, ldb, C, ldc, accumulate);
}

}  // namespace

void dots(const float* A, int64_t lda, int64_t m, const float* B, int64_t ldb, int64_t n, int64_t D, float* C,
          int64_t ldc) {
  dots_f(A, lda, m, B, ldb, n, D, C, ldc);
}
void dots(const double* A, int64_t lda, int64_t m, const double* B, int64_t ldb, int64_t n, int64_t D, double* C,
          int64_t ldc) {
  dots_d(A, lda, m, B, ldb, n, D, C, ldc);
}
void gather_axpy(int64_t D, int64_t K, const float* coef, const float* const* rows, float* y) {
  gather_axpy_f(D, K, coef, rows, y);
}
void gather_axpy(int64_t D, int64_t K, const double* coef, const double* const* rows, double* y) {
  gather_axpy_d(D, K, coef, rows, y);
}
void gemm_nn(int64_t m, int64_t K, int64_t D, const float* A, int64_t a_row, int64_t a_col, const float* Bm, float* C,
             bool accumulate) {
  gemm_nn_f(m, K, D, A, a_row, a_col, Bm, D, C, D, accumulate);
}
void gemm_nn(int64_t m, int64_t K, int64_t D, const double* A, int64_t a_row, int64_t a_col, const double* Bm,
             double* C, bool accumulate) {
  gemm_nn_d(m, K, D, A, a_row, a_col, Bm, D, C, D, accumulate);
}

}  // namespace egma_cpu
