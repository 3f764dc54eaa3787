// Host-side pieces shared by the CPU (egma_cpu.cpp) and CUDA (egma_cuda.cu) op wrappers: output
// allocation, the checks every op makes on its own inputs, and the report offsets.
//
// The ops check what memory safety needs themselves, whatever the Python layer did (its value checks can
// be turned off with validate=False, and torch.compile skips them): the report offsets must describe a
// partition of the N sentences into non-empty reports, and every tensor a kernel indexes must have the
// shape the kernel assumes. With those, no kernel reads or writes outside its tensors. The argmax indices
// the backward ops take are bounded where they are read (the CPU kernels check them here, the CUDA kernels
// clamp them on the device), so that even a raw torch.ops call with made-up saved tensors stays in bounds.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace egma_common {

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

// cu (R+1 host int32 offsets) must start at 0, end at N and grow by at least one sentence per report.
inline void check_report_offsets(const int32_t* cu, int64_t R, int64_t N, const char* op) {
  TORCH_CHECK(cu[0] == 0, "egma_kernels ", op, ": cu_seqlens must start at 0, got ", cu[0]);
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(cu[r + 1] > cu[r], "egma_kernels ", op, ": cu_seqlens must be strictly increasing (every report ",
                "at least one sentence), but report ", r, " spans [", cu[r], ", ", cu[r + 1], ")");
  TORCH_CHECK(cu[R] == N, "egma_kernels ", op, ": cu_seqlens must end at N=", N, " (the number of sentences), got ",
              cu[R]);
}

// A tensor the op indexes: exactly this shape (any strides; the wrappers make it contiguous).
inline void check_shape(const at::Tensor& x, at::IntArrayRef shape, const char* name, const char* op) {
  TORCH_CHECK(x.sizes() == shape, "egma_kernels ", op, ": ", name, " must have shape ", shape, ", got ", x.sizes());
}

inline void check_int32(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kInt, "egma_kernels ", op, ": ", name, " must be int32, got ", x.scalar_type());
}

// The optional gaze (N x P) and gaze mask (B) of the loss ops.
inline void check_gaze_inputs(int64_t B, int64_t P, int64_t N, const std::optional<at::Tensor>& gaze,
                              const std::optional<at::Tensor>& gaze_mask, const char* op) {
  if (gaze.has_value()) check_shape(*gaze, {N, P}, "gaze", op);
  if (gaze.has_value() && gaze_mask.has_value()) check_shape(*gaze_mask, {B}, "gaze_mask", op);
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

inline void check_loss_grad_inputs(int64_t B, int64_t P, int64_t N, int64_t num_offsets, const at::Tensor& g_terms,
                                   const at::Tensor& g_i2t, const at::Tensor& g_t2i, const at::Tensor& i2t,
                                   const at::Tensor& t2i, const at::Tensor& i2t_arg, const at::Tensor& t2i_arg,
                                   const at::Tensor& own, const std::optional<at::Tensor>& gaze,
                                   const std::optional<at::Tensor>& gaze_mask) {
  const char* op = "loss_bwd";
  TORCH_CHECK(num_offsets == B + 1, "egma_kernels ", op, ": the loss needs one report per image");
  check_shape(g_terms, {4}, "grad_terms", op);
  check_similarity_grad_inputs(B, B, P, N, g_i2t, g_t2i, i2t, t2i, i2t_arg, t2i_arg, op);
  check_shape(own, {N, P}, "own", op);
  check_gaze_inputs(B, P, N, gaze, gaze_mask, op);
}

// The options of the loss op, as one struct: what every kernel of the loss reads besides the tensors.
struct LossOptions {
  double alpha;
  double map_threshold;
  double w_con, w_mlce, w_map;
  bool egma_compat;
};

}  // namespace egma_common
