// Register-blocked inner-product kernels of the CPU backend (simd.cpp), for float and double. Each is
// compiled twice (x86-64-v3 with FMA, and the baseline) and chosen at load time with target_clones. Every
// output element is summed in a fixed order, whatever block of the output it falls in.
#pragma once

#include <cstdint>

namespace egma_cpu {

// C (m x n, row stride ldc) = A (m x D, row stride lda) B^T (B: n x D, row stride ldb).
void dots(const float* A, int64_t lda, int64_t m, const float* B, int64_t ldb, int64_t n, int64_t D, float* C,
          int64_t ldc);
void dots(const double* A, int64_t lda, int64_t m, const double* B, int64_t ldb, int64_t n, int64_t D, double* C,
          int64_t ldc);

// y[0:D] += sum_k coef[k] * rows[k][0:D], the terms added in order k = 0, 1, ... to every element.
void gather_axpy(int64_t D, int64_t K, const float* coef, const float* const* rows, float* y);
void gather_axpy(int64_t D, int64_t K, const double* coef, const double* const* rows, double* y);

// C (m x D, row stride D) (+)= A @ Bm with A[r, k] = A[r * a_row + k * a_col] (so A^T is a stride swap) and
// Bm K x D contiguous; every element is C (or 0) + the sum over k in order.
void gemm_nn(int64_t m, int64_t K, int64_t D, const float* A, int64_t a_row, int64_t a_col, const float* Bm,
             float* C, bool accumulate);
void gemm_nn(int64_t m, int64_t K, int64_t D, const double* A, int64_t a_row, int64_t a_col, const double* Bm,
             double* C, bool accumulate);

}  // namespace egma_cpu
