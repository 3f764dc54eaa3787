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

// The options of the loss op, as one struct: what every kernel of the loss reads besides the tensors.
struct LossOptions {
  double alpha;
  double map_threshold;
  double w_con, w_mlce, w_map;
  bool egma_compat;
};

}  // namespace egma_common
