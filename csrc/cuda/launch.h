// The CUDA kernels' interface: one launch parameter struct, passed by value to every kernel, and the
// launchers the op wrappers (ops_cuda.cpp) call. The launchers are defined in similarity.cu,
// loss_forward.cu and backward.cu for (scalar_t, acc_t) = (double, double), (float, float),
// (c10::Half, float) and (c10::BFloat16, float).
#pragma once

#include <cuda_runtime_api.h>

#include "../egma_common.h"

#include <cstdint>

namespace egma_cuda {

using egma_common::LossOptions;

// Elements of the backward's coefficient buffer (coef): the gradient reaching each report's MLCE term
// (already divided by the number of reports with gaze) and mapping term (divided by the number of reports
// with two sentences or more), and the contrastive and max terms' part of d t.
enum Coef : int { kCoefMlce = 0, kCoefMapping = 1, kCoefScale = 2, kNumCoefs = 4 };

// Everything a kernel reads or writes: M images of P patches, N sentences in R reports, embeddings of size D
// (the loss: M == R == B). Pointers a call does not use are null. Buffers of acc_t are contiguous.
template <typename scalar_t, typename acc_t>
struct LaunchParams {
  // Inputs.
  const scalar_t* patch = nullptr;  // M x P x D
  const scalar_t* sent = nullptr;   // N x D
  const int32_t* cu = nullptr;      // R + 1 report offsets (checked on the host)
  const int32_t* owner = nullptr;   // N: the report of each sentence
  const int64_t* sent_logits_offset = nullptr;  // R: where report r's n_r x n_r sentence mapping logits start
  const acc_t* scale = nullptr;      // the logit scale t (one element)
  const scalar_t* gaze = nullptr;    // N x P; null: no report carries gaze
  const bool* gaze_mask = nullptr;   // M; null: every report carries gaze when gaze is given
  int64_t M = 0, R = 0, P = 0, D = 0, N = 0;
  int max_len = 0;  // the longest report's number of sentences
  LossOptions<acc_t> opts{};

  // Similarities (written by the forward, read by the backward).
  acc_t* i2t = nullptr;         // M x R
  acc_t* t2i = nullptr;         // M x R
  int32_t* i2t_arg = nullptr;   // M x R x P: best sentence of each patch per report (-1: egma_compat's clamp)
  int32_t* t2i_arg = nullptr;   // M x N: best patch of each sentence per image
  acc_t* col_best = nullptr;    // M x N: the forward's running column max (scratch)
  acc_t* matched = nullptr;     // N x P: matched[u, i] = A[o(u), i ; u] (the loss only)
  acc_t* terms = nullptr;       // kNumTerms: the loss's total and terms

  // Per-report buffers of the loss (forward, and recomputed in the backward).
  acc_t* sent_lse_neg = nullptr;   // N: MLCE log-sum-exp of each sentence over its negative patches
  acc_t* sent_lse_pos = nullptr;   // N: ... over its positive patches
  acc_t* patch_lse_neg = nullptr;  // B x P: MLCE log-sum-exp of each patch over the negative sentences
  acc_t* patch_lse_pos = nullptr;  // B x P: ... over the positive sentences
  acc_t* mlce_k = nullptr;         // B: each report's MLCE term
  acc_t* map_k = nullptr;          // B: each report's mapping term
  acc_t* w1 = nullptr;             // report k's W_I2T (P x n_k) at w1 + P * c_k
  acc_t* w2 = nullptr;             // W_T2I (n_k x P) at w2 + c_k * P
  acc_t* mapped_patch = nullptr;   // B * P x D: M_P(k) = W_I2T(k) S_k
  acc_t* mapped_sent = nullptr;    // N x D: M_S(k) = W_T2I(k) P_k
  acc_t* patch_logits = nullptr;   // B x P x P: t M_P(k) P_k^T (the backward overwrites it with t * its gradient)
  acc_t* sent_logits = nullptr;    // sum of n_k^2: t M_S(k) S_k^T at sent_logits_offset[k] (likewise)
  acc_t* patch_logits_row_lse = nullptr;  // B x P
  acc_t* patch_logits_col_lse = nullptr;  // B x P
  acc_t* sent_logits_row_lse = nullptr;   // N
  acc_t* sent_logits_col_lse = nullptr;   // N
  acc_t* ce_lse_i2t = nullptr;     // B: log-sum-exps of the contrastive cross-entropy over I2T
  acc_t* ce_lse_t2i = nullptr;     // B: ... over T2I

  // Backward.
  const acc_t* grad_terms = nullptr;  // kNumTerms (the loss only; null: the FILIP backward)
  const acc_t* grad_i2t = nullptr;    // M x R: the incoming gradients
  const acc_t* grad_t2i = nullptr;    // M x R
  acc_t* d_i2t = nullptr;             // M x R: dL/dI2T, the contrastive term's included
  acc_t* d_t2i = nullptr;             // M x R: dL/dT2I
  acc_t* coef = nullptr;              // kNumCoefs (Coef)
  acc_t* dX = nullptr;                // N x P: t * dL/dA of the matched similarities (MLCE), null for FILIP
  acc_t* dt_k = nullptr;              // B: each report's MLCE and mapping part of d t; null for FILIP
  acc_t* d_mapped_patch = nullptr;    // B * P x D
  acc_t* d_mapped_sent = nullptr;     // N x D
  acc_t* row_dt = nullptr;            // B * P + N: per-row sums of the mapping part of d t
  scalar_t* d_patch = nullptr;        // M x P x D
  scalar_t* d_sent = nullptr;         // N x D
  acc_t* d_scale = nullptr;           // one element
};

// The launchers, one per step of an op, each enqueueing its kernels on stream.
template <typename scalar_t, typename acc_t>
struct Launch {
  using Params = LaunchParams<scalar_t, acc_t>;
  // FILIP forward (both ops): I2T, T2I, the argmax routes and, when matched is set, the matched similarities.
  static void similarity_forward(const Params& params, cudaStream_t stream);
  // The loss's per-report terms (report_terms) and its totals, after similarity_forward.
  static void loss_forward(const Params& params, cudaStream_t stream);
  // From the matched similarities: the MLCE log-sum-exps, the mapping weights, mapped features, logits and
  // their log-sum-exps (the loss forward, and recomputed by its backward).
  static void report_terms(const Params& params, cudaStream_t stream);
  // The backward ops: d_patch, d_sent and d_scale.
  static void loss_backward(const Params& params, cudaStream_t stream);
  static void similarity_backward(const Params& params, cudaStream_t stream);
};

}  // namespace egma_cuda

// Explicit instantiation of a launcher for the four dtype pairs, in the .cu file that defines it.
#define EGMA_INSTANTIATE_LAUNCHER(member)                                                                      \
  template void Launch<double, double>::member(const LaunchParams<double, double>&, cudaStream_t);            \
  template void Launch<float, float>::member(const LaunchParams<float, float>&, cudaStream_t);                \
  template void Launch<c10::Half, float>::member(const LaunchParams<c10::Half, float>&, cudaStream_t);        \
  template void Launch<c10::BFloat16, float>::member(const LaunchParams<c10::BFloat16, float>&, cudaStream_t);
