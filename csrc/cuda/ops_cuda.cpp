// The CUDA implementations of the egma_kernels ops (TORCH_LIBRARY_IMPL; schemas in csrc/ops.cpp): input
// checks, the device guard, contiguous copies, output and scratch allocation, the dispatch over float16 /
// bfloat16 / float32 (float32 accumulation) and float64, and the launch parameters.
//
// cu_seqlens is copied to the host once per call and checked there (report offsets for the launch shapes).
// Only c10/cuda headers are used (ATen/cuda/CUDAContext.h needs cuSPARSE headers).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../egma_common.h"
#include "launch.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace egma_cuda {
namespace {

// The shared checks, allocation and input preparation (egma_common.h).
using namespace egma_common;

// The device of the inputs, after the checks of every op.
c10::Device checked_device(const at::Tensor& patch, const at::Tensor& sent, const at::Tensor& cu,
                           const at::Tensor& scale) {
  TORCH_CHECK(patch.is_cuda() && sent.is_cuda() && cu.is_cuda() && scale.is_cuda(),
              "egma_kernels CUDA op: all tensors must be CUDA tensors");
  TORCH_CHECK(patch.device() == sent.device() && patch.device() == cu.device() && patch.device() == scale.device(),
              "egma_kernels CUDA op: tensors on different devices");
  check_embedding_inputs(patch, sent, cu, scale);
  return patch.device();
}

// What every op sets up first: the checks, the device guard and stream, the contiguous inputs, the
// accumulation dtype (float64 for float64 inputs, else float32) and the logit scale in it.
struct OpSetup {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  EmbeddingInputs x;
  at::ScalarType acc_type;
  at::TensorOptions aopts;
  at::Tensor scale;

  OpSetup(const at::Tensor& patch, const at::Tensor& sent, const at::Tensor& cu, const at::Tensor& logit_scale)
      : guard(checked_device(patch, sent, cu, logit_scale)),
        stream(c10::cuda::getCurrentCUDAStream()),
        x(patch, sent, cu),
        acc_type(x.patch.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
        aopts(x.patch.options().dtype(acc_type)),
        scale(logit_scale.to(acc_type).contiguous()) {}
};

// A host copy of the offsets, checked before any kernel indexes sentences through them: the longest
// report, and on the device the owner of each sentence and the offsets of the n_k x n_k sentence mapping
// logits.
struct ReportLayout {
  int max_len = 0;
  at::Tensor owner, sent_logits_offset;
  int64_t sent_logits_total = 0;

  ReportLayout(const at::Tensor& cu_dev, int64_t N, const char* op) {
    const auto cu_cpu = cu_dev.to(at::kCPU).contiguous();
    const int64_t R = cu_cpu.numel() - 1;
    const int32_t* cu = cu_cpu.data_ptr<int32_t>();
    check_report_offsets(cu, R, N, op);
    egma_common::ReportOwners owners(cu, R, N);
    max_len = static_cast<int>(owners.max_len);
    std::vector<int64_t> offset(R);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t n = cu[r + 1] - cu[r];
      offset[r] = sent_logits_total;
      sent_logits_total += n >= 2 ? n * n : 0;
    }
    const auto dev = cu_dev.device();
    owner = at::from_blob(owners.owner.data(), {N}, at::kInt).to(dev);
    sent_logits_offset = at::from_blob(offset.data(), {R}, at::kLong).to(dev);
  }
};

// The launch parameters' inputs: embeddings, offsets, report layout, scale (acc_t, on the device), shapes.
template <typename scalar_t, typename acc_t>
LaunchParams<scalar_t, acc_t> input_params(const EmbeddingInputs& x, const ReportLayout& layout,
                                           const at::Tensor& scale) {
  LaunchParams<scalar_t, acc_t> params;
  params.patch = x.patch.data_ptr<scalar_t>();
  params.sent = x.sent.data_ptr<scalar_t>();
  params.cu = x.cu.data_ptr<int32_t>();
  params.owner = layout.owner.data_ptr<int32_t>();
  params.sent_logits_offset = layout.sent_logits_offset.data_ptr<int64_t>();
  params.scale = scale.data_ptr<acc_t>();
  params.M = x.M;
  params.R = x.R;
  params.P = x.P;
  params.D = x.D;
  params.N = x.N;
  params.max_len = layout.max_len;
  return params;
}

// The launch parameters' inputs of the loss ops: input_params, the gaze and the options.
template <typename scalar_t, typename acc_t>
LaunchParams<scalar_t, acc_t> loss_params(const EmbeddingInputs& x, const ReportLayout& layout,
                                          const at::Tensor& scale, const GazeInputs& gaze,
                                          const LossOptions<double>& opts) {
  auto params = input_params<scalar_t, acc_t>(x, layout, scale);
  params.gaze = ptr_or_null<scalar_t>(gaze.gaze);
  params.gaze_mask = ptr_or_null<bool>(gaze.mask);
  params.opts = opts.cast<acc_t>();
  return params;
}

// The scratch buffers of one op call, in the accumulation dtype: one tensor each, kept alive until the
// call returns, its pointer written into the launch parameters.
class Workspace {
 public:
  explicit Workspace(const at::TensorOptions& aopts) : aopts_(aopts) {}

  template <typename scalar_t, typename acc_t>
  void alloc(LaunchParams<scalar_t, acc_t>& params, acc_t* LaunchParams<scalar_t, acc_t>::*buffer, int64_t numel,
             bool zeroed = false) {
    tensors_.push_back(zeroed ? at::zeros({numel}, aopts_) : at::empty({numel}, aopts_));
    params.*buffer = tensors_.back().data_ptr<acc_t>();
  }

 private:
  at::TensorOptions aopts_;
  std::vector<at::Tensor> tensors_;
};

// The loss's per-report buffers (forward, and recomputed in the backward).
template <typename scalar_t, typename acc_t>
void alloc_report_buffers(LaunchParams<scalar_t, acc_t>& params, Workspace& ws, const ReportLayout& layout) {
  using Params = LaunchParams<scalar_t, acc_t>;
  const int64_t B = params.M, P = params.P, D = params.D, N = params.N;
  const std::pair<acc_t* Params::*, int64_t> buffers[] = {
      {&Params::sent_lse_neg, N}, {&Params::sent_lse_pos, N}, {&Params::patch_lse_neg, B * P},
      {&Params::patch_lse_pos, B * P}, {&Params::mlce_k, B}, {&Params::map_k, B}, {&Params::w1, N * P},
      {&Params::w2, N * P}, {&Params::mapped_patch, B * P * D}, {&Params::mapped_sent, N * D},
      {&Params::patch_logits, B * P * P}, {&Params::sent_logits, std::max<int64_t>(layout.sent_logits_total, 1)},
      {&Params::patch_logits_row_lse, B * P}, {&Params::patch_logits_col_lse, B * P},
      {&Params::sent_logits_row_lse, N}, {&Params::sent_logits_col_lse, N}, {&Params::ce_lse_i2t, B},
      {&Params::ce_lse_t2i, B}};
  for (const auto& [buffer, numel] : buffers) ws.alloc(params, buffer, numel);
}

// The backward's buffers common to both ops: dL/dI2T, dL/dT2I (M x R) and the coefficients (zeroed); the
// gradient outputs, with d t accumulated in acc_t apart where logit_scale has another dtype.
struct BackwardOutputs {
  GradientOutputs grads;
  at::Tensor d_scale_acc;

  BackwardOutputs(const EmbeddingInputs& x, const at::Tensor& logit_scale, const at::TensorOptions& aopts)
      : grads(x, logit_scale),
        d_scale_acc(grads.d_scale.scalar_type() == aopts.dtype().toScalarType() ? grads.d_scale
                                                                                : at::empty({}, aopts)) {}

  template <typename scalar_t, typename acc_t>
  void set(LaunchParams<scalar_t, acc_t>& params, Workspace& ws) const {
    ws.alloc(params, &LaunchParams<scalar_t, acc_t>::d_i2t, params.M * params.R);
    ws.alloc(params, &LaunchParams<scalar_t, acc_t>::d_t2i, params.M * params.R);
    ws.alloc(params, &LaunchParams<scalar_t, acc_t>::coef, kNumCoefs, /*zeroed=*/true);
    params.d_patch = grads.d_patch.data_ptr<scalar_t>();
    params.d_sent = grads.d_sent.data_ptr<scalar_t>();
    params.d_scale = d_scale_acc.data_ptr<acc_t>();
  }

  // After the kernels: d t into logit_scale's dtype where it was accumulated apart.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish() const {
    if (!d_scale_acc.is_same(grads.d_scale)) grads.d_scale.copy_(d_scale_acc);
    return grads.as_tuple();
  }
};

// The similarity outputs of the forward ops; t2i_arg and col_best are the tile kernel's scratch when the
// routes are not saved.
template <typename scalar_t, typename acc_t>
void set_similarity_outputs(LaunchParams<scalar_t, acc_t>& params, const at::Tensor& i2t, const at::Tensor& t2i,
                            const at::Tensor& i2t_arg, const at::Tensor& t2i_arg, const at::Tensor& col_best,
                            bool save_idx) {
  params.i2t = i2t.data_ptr<acc_t>();
  params.t2i = t2i.data_ptr<acc_t>();
  params.i2t_arg = save_idx ? i2t_arg.data_ptr<int32_t>() : nullptr;
  params.t2i_arg = t2i_arg.data_ptr<int32_t>();
  params.col_best = col_best.data_ptr<acc_t>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_fwd_cuda(
    const at::Tensor& patch_emb, const at::Tensor& sent_emb, const at::Tensor& cu_seqlens,
    const at::Tensor& logit_scale, const std::optional<at::Tensor>& gaze, const std::optional<at::Tensor>& gaze_mask,
    double alpha, double map_threshold, double w_con, double w_mlce, double w_map, bool egma_compat, bool save_idx) {
  const char* op = "loss_fwd";
  const OpSetup setup(patch_emb, sent_emb, cu_seqlens, logit_scale);
  const auto& x = setup.x;
  const auto& aopts = setup.aopts;
  const int64_t B = x.M, P = x.P, N = x.N;
  TORCH_CHECK(x.R == B, "egma_kernels: the loss needs one report per image");
  check_gaze_inputs(B, P, N, gaze, gaze_mask, op);
  const GazeInputs gz(gaze, gaze_mask, x.patch.scalar_type());
  const ReportLayout layout(x.cu, N, op);
  auto terms = new_out({kNumTerms}, aopts);
  auto i2t = new_out({B, B}, aopts);
  auto t2i = new_out({B, B}, aopts);
  // The argmax routes only when a backward may follow (the tile kernel uses t2i_arg as scratch either way).
  auto i2t_arg = new_route_out(save_idx, {B, B, P}, aopts);
  auto t2i_arg = save_idx ? new_out({B, N}, aopts.dtype(at::kInt)) : at::empty({B, N}, aopts.dtype(at::kInt));
  auto matched = new_out({N, P}, aopts);
  auto col_best = at::empty({B, N}, aopts);
  const auto loss_opts = loss_options(alpha, map_threshold, w_con, w_mlce, w_map, egma_compat);
  Workspace ws(aopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.patch.scalar_type(), "egma_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto params = loss_params<scalar_t, acc_t>(x, layout, setup.scale, gz, loss_opts);
    set_similarity_outputs(params, i2t, t2i, i2t_arg, t2i_arg, col_best, save_idx);
    params.matched = matched.data_ptr<acc_t>();
    params.terms = terms.data_ptr<acc_t>();
    alloc_report_buffers(params, ws, layout);
    Launch<scalar_t, acc_t>::similarity_forward(params, setup.stream);
    Launch<scalar_t, acc_t>::loss_forward(params, setup.stream);
  });
  if (!save_idx) t2i_arg = at::empty({0}, aopts.dtype(at::kInt));
  return {terms, i2t, t2i, i2t_arg, t2i_arg, matched};
}

// The incoming gradients (in acc_t) and the saved forward outputs, contiguous.
struct SavedInputs {
  at::Tensor grad_i2t, grad_t2i, i2t, t2i, i2t_arg, t2i_arg;

  SavedInputs(at::ScalarType acc_type, const at::Tensor& grad_i2t_, const at::Tensor& grad_t2i_,
              const at::Tensor& i2t_, const at::Tensor& t2i_, const at::Tensor& i2t_arg_, const at::Tensor& t2i_arg_)
      : grad_i2t(grad_i2t_.to(acc_type).contiguous()),
        grad_t2i(grad_t2i_.to(acc_type).contiguous()),
        i2t(i2t_.contiguous()),
        t2i(t2i_.contiguous()),
        i2t_arg(i2t_arg_.contiguous()),
        t2i_arg(t2i_arg_.contiguous()) {}

  template <typename scalar_t, typename acc_t>
  void set(LaunchParams<scalar_t, acc_t>& params) const {
    params.grad_i2t = grad_i2t.data_ptr<acc_t>();
    params.grad_t2i = grad_t2i.data_ptr<acc_t>();
    params.i2t = i2t.data_ptr<acc_t>();
    params.t2i = t2i.data_ptr<acc_t>();
    params.i2t_arg = i2t_arg.data_ptr<int32_t>();
    params.t2i_arg = t2i_arg.data_ptr<int32_t>();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_bwd_cuda(
    const at::Tensor& grad_terms, const at::Tensor& grad_i2t, const at::Tensor& grad_t2i, const at::Tensor& patch_emb,
    const at::Tensor& sent_emb, const at::Tensor& cu_seqlens, const at::Tensor& logit_scale,
    const std::optional<at::Tensor>& gaze, const std::optional<at::Tensor>& gaze_mask, const at::Tensor& i2t,
    const at::Tensor& t2i, const at::Tensor& i2t_arg, const at::Tensor& t2i_arg, const at::Tensor& own, double alpha,
    double map_threshold, double w_con, double w_mlce, double w_map, bool egma_compat) {
  const char* op = "loss_bwd";
  const OpSetup setup(patch_emb, sent_emb, cu_seqlens, logit_scale);
  const auto& x = setup.x;
  const auto& aopts = setup.aopts;
  const int64_t B = x.M, P = x.P, N = x.N;
  check_loss_grad_inputs(B, P, N, x.cu.size(0), grad_terms, grad_i2t, grad_t2i, i2t, t2i, i2t_arg, t2i_arg, own, gaze,
                         gaze_mask);
  const auto g_terms = grad_terms.to(setup.acc_type).contiguous();
  const SavedInputs saved(setup.acc_type, grad_i2t, grad_t2i, i2t, t2i, i2t_arg, t2i_arg);
  const auto matched = own.contiguous();
  const GazeInputs gz(gaze, gaze_mask, x.patch.scalar_type());
  const ReportLayout layout(x.cu, N, op);
  const BackwardOutputs out(x, logit_scale, aopts);
  const auto loss_opts = loss_options(alpha, map_threshold, w_con, w_mlce, w_map, egma_compat);
  Workspace ws(aopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.patch.scalar_type(), "egma_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Params = LaunchParams<scalar_t, acc_t>;
    auto params = loss_params<scalar_t, acc_t>(x, layout, setup.scale, gz, loss_opts);
    params.grad_terms = g_terms.data_ptr<acc_t>();
    params.matched = matched.data_ptr<acc_t>();
    saved.set(params);
    out.set(params, ws);
    alloc_report_buffers(params, ws, layout);
    const int64_t D = x.D;
    const std::pair<acc_t* Params::*, int64_t> buffers[] = {{&Params::dt_k, B}, {&Params::dX, N * P},
                                                            {&Params::d_mapped_patch, B * P * D},
                                                            {&Params::d_mapped_sent, N * D},
                                                            {&Params::row_dt, B * P + N}};
    for (const auto& [buffer, numel] : buffers) ws.alloc(params, buffer, numel);
    Launch<scalar_t, acc_t>::loss_backward(params, setup.stream);
  });
  return out.finish();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filip_fwd_cuda(const at::Tensor& patch_emb,
                                                                          const at::Tensor& sent_emb,
                                                                          const at::Tensor& cu_seqlens,
                                                                          const at::Tensor& logit_scale,
                                                                          bool egma_compat, bool save_idx) {
  const OpSetup setup(patch_emb, sent_emb, cu_seqlens, logit_scale);
  const auto& x = setup.x;
  const auto& aopts = setup.aopts;
  const auto iopts = x.patch.options().dtype(at::kInt);
  const int64_t M = x.M, R = x.R, P = x.P, N = x.N;
  const ReportLayout layout(x.cu, N, "filip_fwd");
  auto i2t = new_out({M, R}, aopts);
  auto t2i = new_out({M, R}, aopts);
  auto i2t_arg = new_route_out(save_idx, {M, R, P}, aopts);
  auto t2i_arg = save_idx ? new_out({M, N}, iopts) : at::empty({M, N}, iopts);
  auto col_best = at::empty({M, N}, aopts);
  if (M > 0 && R > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.patch.scalar_type(), "egma_filip_fwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto params = input_params<scalar_t, acc_t>(x, layout, setup.scale);
      params.opts.egma_compat = egma_compat;
      set_similarity_outputs(params, i2t, t2i, i2t_arg, t2i_arg, col_best, save_idx);
      Launch<scalar_t, acc_t>::similarity_forward(params, setup.stream);
    });
  }
  if (!save_idx) t2i_arg = at::empty({0}, iopts);
  return {i2t, t2i, i2t_arg, t2i_arg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> filip_bwd_cuda(const at::Tensor& grad_i2t, const at::Tensor& grad_t2i,
                                                              const at::Tensor& patch_emb, const at::Tensor& sent_emb,
                                                              const at::Tensor& cu_seqlens,
                                                              const at::Tensor& logit_scale, const at::Tensor& i2t,
                                                              const at::Tensor& t2i, const at::Tensor& i2t_arg,
                                                              const at::Tensor& t2i_arg) {
  const char* op = "filip_bwd";
  const OpSetup setup(patch_emb, sent_emb, cu_seqlens, logit_scale);
  const auto& x = setup.x;
  check_similarity_grad_inputs(x.M, x.R, x.P, x.N, grad_i2t, grad_t2i, i2t, t2i, i2t_arg, t2i_arg, op);
  const SavedInputs saved(setup.acc_type, grad_i2t, grad_t2i, i2t, t2i, i2t_arg, t2i_arg);
  const ReportLayout layout(x.cu, x.N, op);
  const BackwardOutputs out(x, logit_scale, setup.aopts);
  Workspace ws(setup.aopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.patch.scalar_type(), "egma_filip_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto params = input_params<scalar_t, acc_t>(x, layout, setup.scale);
    saved.set(params);
    out.set(params, ws);
    Launch<scalar_t, acc_t>::similarity_backward(params, setup.stream);
  });
  return out.finish();
}

}  // namespace
}  // namespace egma_cuda

TORCH_LIBRARY_IMPL(egma_kernels, CUDA, m) {
  m.impl("loss_fwd", &egma_cuda::loss_fwd_cuda);
  m.impl("loss_bwd", &egma_cuda::loss_bwd_cuda);
  m.impl("filip_fwd", &egma_cuda::filip_fwd_cuda);
  m.impl("filip_bwd", &egma_cuda::filip_bwd_cuda);
}
