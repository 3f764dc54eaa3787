// The CPU kernels' interface: the report layout, the parameter structs, and the entry points the op
// wrappers (ops_cpu.cpp) call. Defined for float and double in similarity.cpp, loss_forward.cpp and
// loss_backward.cpp.
#pragma once

#include "../egma_common.h"

#include <cstdint>
#include <vector>

namespace egma_cpu {

using egma_common::kContrastive;
using egma_common::kGazeMlce;
using egma_common::kMapping;
using egma_common::kTotal;
using egma_common::LossOptions;

constexpr int64_t PATCH_BLOCK = 64;  // patches per similarity block
constexpr int64_t SENT_BLOCK = 128;  // sentences per tile (whole reports; a longer report is its own tile)

// The reports (R host offsets cu, checked), grouped into the forward's tiles: blocks of whole reports of at
// most SENT_BLOCK sentences (a longer report forms a block of its own).
// The base holds the report of each sentence (owner) and the longest report (max_len).
struct Reports : egma_common::ReportOwners {
  const int32_t* cu;
  int64_t R;
  std::vector<int64_t> block_start;  // the first report of each tile's block, then R

  Reports(const int32_t* cu_, int64_t R_, int64_t N);
  int64_t num_blocks() const { return static_cast<int64_t>(block_start.size()) - 1; }
  int64_t len(int64_t r) const { return cu[r + 1] - cu[r]; }
};

// What every kernel reads: M images of P patches, N sentences in reports, embeddings of size D, the logit
// scale t, and for the loss (M == R == B) the optional gaze.
template <typename T>
struct Inputs {
  const T* patch;  // M x P x D
  const T* sent;   // N x D
  int64_t M, P, D, N;
  const Reports* reports;
  T scale;
  const T* gaze = nullptr;          // N x P; null: no report carries gaze
  const bool* gaze_mask = nullptr;  // M; null: every report carries gaze when gaze is given

  bool report_has_gaze(int64_t k) const { return gaze != nullptr && (gaze_mask == nullptr || gaze_mask[k]); }
};

// The similarity matrices and what the backward routes through: I2T and T2I (M x R), the argmax routes
// i2t_arg (M x R x P: the best sentence of each patch per report, -1 where egma_compat clamped the max to
// 0) and t2i_arg (M x N: the best patch of each sentence per image), and for the loss the matched
// similarities (N x P: matched[u, i] = A[o(u), i ; u]). Forward: written (routes and matched may be null:
// not saved); backward: read.
template <typename T, typename Index = int32_t>
struct Similarities {
  T* i2t;
  T* t2i;
  Index* i2t_arg;
  Index* t2i_arg;
  T* matched;
};
template <typename T>
using SavedSimilarities = Similarities<const T, const int32_t>;

// The gradients the backward ops return: d patch (M x P x D), d sent (N x D) and d t (one element).
template <typename T>
struct Gradients {
  T* d_patch;
  T* d_sent;
  T* d_scale;
};

// The gradients of the max terms, routed through the argmax indices: d_i2t and d_t2i (M x R) are dL/dI2T
// and dL/dT2I (for the loss, the contrastive term's included).
template <typename T>
struct MaxTermGrads {
  const T* d_i2t;
  const T* d_t2i;
  const int32_t* i2t_arg;
  const int32_t* t2i_arg;
};

// Per-thread buffers of the routing: the terms of one destination row after another (coef[k] times the
// embedding row rows[k]), row i's terms at row_start[i] .. row_start[i + 1].
template <typename T>
struct RoutingScratch {
  std::vector<T> coef;
  std::vector<const T*> rows;
  std::vector<int64_t> row_start;
};

// FILIP forward: I2T, T2I, the argmax routes (when not null) and the matched similarities (when not null;
// M == R).
template <typename T>
void similarity_forward(const Inputs<T>& in, bool egma_compat, const Similarities<T>& out);

// Adds the max terms' gradient of image a to d_patch_a (P x D), and of report b's sentences to their rows
// of d_sent.
template <typename T>
void route_to_image(int64_t a, const Inputs<T>& in, const MaxTermGrads<T>& g, T* d_patch_a, RoutingScratch<T>& scratch);
template <typename T>
void route_to_report(int64_t b, const Inputs<T>& in, const MaxTermGrads<T>& g, T* d_sent, RoutingScratch<T>& scratch);

// FILIP backward: the gradients of I2T and T2I (d_i2t, d_t2i: M x R) into grads.
template <typename T>
void similarity_backward(const Inputs<T>& in, const T* d_i2t, const T* d_t2i, const SavedSimilarities<T>& saved,
                         const Gradients<T>& grads);

// The loss forward: the similarities (out.matched required) and terms (kNumTerms).
template <typename T>
void loss_forward(const Inputs<T>& in, const LossOptions<T>& opts, const Similarities<T>& out, T* terms);

// The loss backward from the incoming gradients of terms (kNumTerms), I2T and T2I (B x B).
template <typename T>
void loss_backward(const Inputs<T>& in, const LossOptions<T>& opts, const T* grad_terms, const T* grad_i2t,
                   const T* grad_t2i, const SavedSimilarities<T>& saved, const Gradients<T>& grads);

}  // namespace egma_cpu
