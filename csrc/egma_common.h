// What the CPU (csrc/cpu/) and CUDA (csrc/cuda/) op wrappers share: the loss options, the layout of the
// loss op's terms output, output allocation, the input preparation and the checks every op makes on its
// own inputs, and the report offsets.
//
// The ops check what memory safety needs themselves, whatever the Python layer did (its value checks can
// be turned off with validate=False, and torch.compile skips them): the report offsets must describe a
// partition of the N sentences into non-empty reports, and every tensor a kernel indexes must have the
// shape the kernel assumes. With those, no kernel reads or writes outside its tensors. The argmax indices
// the backward ops take are bounded where they are read (the CPU kernels check them up front, the CUDA
// kernels clamp them on the device), so that even a raw torch.ops call with made-up saved tensors stays in
// bounds.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace egma_common {

// The options of the loss op (the float arguments of its schema and egma_compat), in the type the kernels
// compute in. Both backends read them from this one struct.
template <typename T>
struct LossOptions {
  T alpha;          // weight of the sentence-to-patch direction of the MLCE term
  T map_threshold;  // threshold of the min-max normalised similarities in the mapping weights (theta)
  T w_con, w_mlce, w_map;  // weights of the contrastive, MLCE and mapping terms in the total
  bool egma_compat;

  template <typename U>
  LossOptions<U> cast() const {
    return {static_cast<U>(alpha), static_cast<U>(map_threshold), static_cast<U>(w_con), static_cast<U>(w_mlce),
            static_cast<U>(w_map), egma_compat};
  }
};

inline LossOptions<double> loss_options(double alpha, double map_threshold, double w_con, double w_mlce,
                                        double w_map, bool egma_compat) {
  return {alpha, map_threshold, w_con, w_mlce, w_map, egma_compat};
}

// Elements of the loss op's first output, terms (4,), and of its incoming gradient grad_terms.
enum Term : int { kTotal = 0, kContrastive = 1, kGazeMlce = 2, kMapping = 3, kNumTerms = 4 };

// Test hook, outside the op schemas: when set, every output buffer starts as NaN (integers as -7), so an
// element a kernel forgot to write fails the comparison with the reference. Set from Python through
// egma_kernels._C.set_poison_outputs (egma_kernels._utils.poisoned_outputs()).
inline std::atomic<bool>& poison_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline at::Tensor new_out(at::IntArrayRef shape, const at::TensorOptions& opts) {
  if (poison_flag().load(std::memory_order_relaxed)) {
    if (at::isFloatingType(opts.dtype().toScalarType())) return at::full(shape, NAN, opts);
    return at::full(shape, -7, opts);
  }
  return at::empty(shape, opts);
}

// An argmax-route output (int32): the full shape when the forward saves its routes, else an empty (0,).
inline at::Tensor new_route_out(bool save, at::IntArrayRef shape, const at::TensorOptions& opts) {
  const auto int_opts = opts.dtype(at::kInt);
  return save ? new_out(shape, int_opts) : at::empty({0}, int_opts);
}

// cu (R+1 host int32 offsets) must start at 0, end at N and grow by at least one sentence per report.
inline void check_report_offsets(const int32_t* cu, int64_t R, int64_t N, const char* op) {
  TORCH_CHECK(cu[0] == 0, "egma_kernels ", op, ": cu_seqlens must start at 0, got ", cu[0]);
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(cu[r + 1] > cu[r], "egma_kernels ", op, ": cu_seqlens must be strictly increasing (every report ",
                "at least one sentence), but report ", r, " spans [", cu[r], ", ", cu[r + 1], ")");
  TORCH_CHECK(cu[R] == N, "egma_kernels ", op, ": cu_seqlens must end at N=", N, " (the number of sentences), got ",
              cu[R]);
}

// From checked host offsets: the report of each sentence and the longest report.
struct ReportOwners {
  std::vector<int32_t> owner;  // N: the report of each sentence
  int64_t max_len = 0;         // the longest report's number of sentences

  ReportOwners(const int32_t* cu, int64_t R, int64_t N) : owner(N) {
    for (int64_t r = 0; r < R; ++r) {
      max_len = std::max<int64_t>(max_len, cu[r + 1] - cu[r]);
      for (int64_t u = cu[r]; u < cu[r + 1]; ++u) owner[u] = static_cast<int32_t>(r);
    }
  }
};

// A tensor the op indexes: exactly this shape (any strides; the wrappers make it contiguous).
inline void check_shape(const at::Tensor& x, at::IntArrayRef shape, const char* name, const char* op) {
  TORCH_CHECK(x.sizes() == shape, "egma_kernels ", op, ": ", name, " must have shape ", shape, ", got ", x.sizes());
}

inline void check_int32(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kInt, "egma_kernels ", op, ": ", name, " must be int32, got ", x.scalar_type());
}

// The checks of the four embedding-side arguments every op takes (the backends add their device checks).
inline void check_embedding_inputs(const at::Tensor& patch, const at::Tensor& sent, const at::Tensor& cu,
                                   const at::Tensor& scale) {
  TORCH_CHECK(patch.dim() == 3 && sent.dim() == 2 && cu.dim() == 1, "egma_kernels: bad ranks");
  TORCH_CHECK(patch.size(2) == sent.size(1), "egma_kernels: embedding sizes differ");
  TORCH_CHECK(patch.scalar_type() == sent.scalar_type(), "egma_kernels: patch_emb and sent_emb dtypes differ");
  TORCH_CHECK(cu.scalar_type() == at::kInt, "egma_kernels: cu_seqlens must be int32");
  TORCH_CHECK(scale.numel() == 1, "egma_kernels: logit_scale must have one element");
  TORCH_CHECK(cu.size(0) >= 1, "egma_kernels: cu_seqlens must have at least one element");
  TORCH_CHECK(patch.size(1) >= 1 && patch.size(2) >= 1, "egma_kernels: patch_emb must have P >= 1 and D >= 1");
}

// The embeddings and offsets made contiguous, with their sizes: M images of P patches of size D, N
// sentences in R reports.
struct EmbeddingInputs {
  at::Tensor patch, sent, cu;
  int64_t M, P, D, N, R;

  EmbeddingInputs(const at::Tensor& patch_, const at::Tensor& sent_, const at::Tensor& cu_)
      : patch(patch_.contiguous()),
        sent(sent_.contiguous()),
        cu(cu_.contiguous()),
        M(patch.size(0)),
        P(patch.size(1)),
        D(patch.size(2)),
        N(sent.size(0)),
        R(cu.size(0) - 1) {}
};

// The gradient outputs of the backward ops: d patch_emb and d sent_emb (the embeddings' dtype) and d t
// (logit_scale's dtype).
struct GradientOutputs {
  at::Tensor d_patch, d_sent, d_scale;

  GradientOutputs(const EmbeddingInputs& x, const at::Tensor& scale)
      : d_patch(new_out({x.M, x.P, x.D}, x.patch.options())),
        d_sent(new_out({x.N, x.D}, x.patch.options())),
        d_scale(new_out({}, scale.options())) {}

  std::tuple<at::Tensor, at::Tensor, at::Tensor> as_tuple() const { return {d_patch, d_sent, d_scale}; }
};

// The optional gaze (N x P) and gaze mask (B) of the loss ops.
inline void check_gaze_inputs(int64_t B, int64_t P, int64_t N, const std::optional<at::Tensor>& gaze,
                              const std::optional<at::Tensor>& gaze_mask, const char* op) {
  if (gaze.has_value()) check_shape(*gaze, {N, P}, "gaze", op);
  if (gaze.has_value() && gaze_mask.has_value()) check_shape(*gaze_mask, {B}, "gaze_mask", op);
}

// The gaze in the embeddings' dtype and the mask as bool, both contiguous; undefined tensors where absent
// (a mask without gaze is ignored: no report carries gaze).
struct GazeInputs {
  at::Tensor gaze, mask;

  GazeInputs(const std::optional<at::Tensor>& gaze_, const std::optional<at::Tensor>& mask_, at::ScalarType dtype) {
    if (!gaze_.has_value()) return;
    gaze = gaze_->to(dtype).contiguous();
    if (mask_.has_value()) mask = mask_->to(at::kBool).contiguous();
  }
};

template <typename T>
T* ptr_or_null(const at::Tensor& x) {
  return x.defined() ? x.data_ptr<T>() : nullptr;
}

// What the backward ops index besides the embeddings: the incoming gradients of the (M x R) similarity
// matrices, the matrices themselves and the forward's argmax routes (M x R x P sentence indices, M x N patch
// indices). The loss (M == R == B) also passes its terms' gradient (4,), the matched similarities (N x P)
// and the gaze.
inline void check_similarity_grad_inputs(int64_t M, int64_t R, int64_t P, int64_t N, const at::Tensor& g_i2t,
                                         const at::Tensor& g_t2i, const at::Tensor& i2t, const at::Tensor& t2i,
                                         const at::Tensor& i2t_arg, const at::Tensor& t2i_arg, const char* op) {
  check_shape(g_i2t, {M, R}, "grad_i2t", op);
  check_shape(g_t2i, {M, R}, "grad_t2i", op);
  check_shape(i2t, {M, R}, "i2t", op);
  check_shape(t2i, {M, R}, "t2i", op);
  TORCH_CHECK(i2t_arg.numel() == M * R * P && t2i_arg.numel() == M * N, "egma_kernels ", op,
              ": the forward did not save its argmax routes (it ran without a gradient to compute), or they ",
              "are not the tensors it returned");
  check_shape(i2t_arg, {M, R, P}, "i2t_arg", op);
  check_shape(t2i_arg, {M, N}, "t2i_arg", op);
  check_int32(i2t_arg, "i2t_arg", op);
  check_int32(t2i_arg, "t2i_arg", op);
}

// matched: the schema's `own` argument, the matched similarities (N x P).
inline void check_loss_grad_inputs(int64_t B, int64_t P, int64_t N, int64_t num_offsets, const at::Tensor& g_terms,
                                   const at::Tensor& g_i2t, const at::Tensor& g_t2i, const at::Tensor& i2t,
                                   const at::Tensor& t2i, const at::Tensor& i2t_arg, const at::Tensor& t2i_arg,
                                   const at::Tensor& matched, const std::optional<at::Tensor>& gaze,
                                   const std::optional<at::Tensor>& gaze_mask) {
  const char* op = "loss_bwd";
  TORCH_CHECK(num_offsets == B + 1, "egma_kernels ", op, ": the loss needs one report per image");
  check_shape(g_terms, {kNumTerms}, "grad_terms", op);
  check_similarity_grad_inputs(B, B, P, N, g_i2t, g_t2i, i2t, t2i, i2t_arg, t2i_arg, op);
  check_shape(matched, {N, P}, "own", op);
  check_gaze_inputs(B, P, N, gaze, gaze_mask, op);
}

}  // namespace egma_common
