// The CPU implementations of the egma_kernels ops (TORCH_LIBRARY_IMPL; schemas in csrc/ops.cpp): input
// checks, contiguous copies, output allocation and the dispatch to the float and double kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../egma_common.h"
#include "kernels.h"

#include <atomic>
#include <cstdint>
#include <optional>
#include <tuple>

namespace egma_cpu {
namespace {

// The shared checks, allocation and input preparation (egma_common.h).
using namespace egma_common;

// The saved argmax indices the backward routes through: i2t_arg[a, r, i] is -1 (egma_compat's clamp to 0)
// or a sentence of report r, t2i_arg[a, u] a patch. Checked before any kernel uses them as offsets.
void check_argmax_indices(const at::Tensor& i2t_arg_t, const at::Tensor& t2i_arg_t, const EmbeddingInputs& x,
                          const char* op) {
  const int32_t* i2t_arg = i2t_arg_t.data_ptr<int32_t>();
  const int32_t* t2i_arg = t2i_arg_t.data_ptr<int32_t>();
  const int32_t* cu = x.cu.data_ptr<int32_t>();
  const int64_t R = x.R, P = x.P, N = x.N;
  std::atomic<bool> bad{false};
  at::parallel_for(0, x.M, 1, [&](int64_t begin, int64_t end) {
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

// The checks of every op, then the contiguous embeddings and offsets with the offsets checked.
EmbeddingInputs prepare_inputs(const at::Tensor& patch, const at::Tensor& sent, const at::Tensor& cu,
                               const at::Tensor& scale, const char* op) {
  TORCH_CHECK(patch.device().is_cpu() && sent.device().is_cpu() && cu.device().is_cpu() && scale.device().is_cpu(),
              "egma_kernels CPU op: all tensors must be on the CPU");
  egma_common::check_embedding_inputs(patch, sent, cu, scale);
  TORCH_CHECK(patch.scalar_type() == at::kFloat || patch.scalar_type() == at::kDouble,
              "egma_kernels CPU op: float32 or float64 inputs (upcast float16/bfloat16 first)");
  return EmbeddingInputs(patch, sent, cu);
}

// The kernels' view of the prepared inputs (the reports and the gaze outlive it).
template <typename T>
Inputs<T> kernel_inputs(const EmbeddingInputs& x, const Reports& reports, const at::Tensor& scale,
                        const GazeInputs* gaze = nullptr) {
  Inputs<T> in{x.patch.data_ptr<T>(), x.sent.data_ptr<T>(), x.M, x.P, x.D, x.N, &reports,
               scale.to(x.patch.scalar_type()).item<T>()};
  if (gaze != nullptr) {
    in.gaze = ptr_or_null<T>(gaze->gaze);
    in.gaze_mask = ptr_or_null<bool>(gaze->mask);
  }
  return in;
}

template <typename T>
Similarities<T> similarity_outputs(const at::Tensor& i2t, const at::Tensor& t2i, const at::Tensor& i2t_arg,
                                   const at::Tensor& t2i_arg, bool save_idx, const at::Tensor& matched) {
  return {i2t.data_ptr<T>(), t2i.data_ptr<T>(), save_idx ? i2t_arg.data_ptr<int32_t>() : nullptr,
          save_idx ? t2i_arg.data_ptr<int32_t>() : nullptr, ptr_or_null<T>(matched)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_fwd_cpu(
    const at::Tensor& patch_emb, const at::Tensor& sent_emb, const at::Tensor& cu_seqlens,
    const at::Tensor& logit_scale, const std::optional<at::Tensor>& gaze, const std::optional<at::Tensor>& gaze_mask,
    double alpha, double map_threshold, double w_con, double w_mlce, double w_map, bool egma_compat, bool save_idx) {
  const char* op = "loss_fwd";
  const auto x = prepare_inputs(patch_emb, sent_emb, cu_seqlens, logit_scale, op);
  const int64_t B = x.M, P = x.P, N = x.N;
  TORCH_CHECK(x.R == B, "egma_kernels: the loss needs one report per image");
  check_report_offsets(x.cu.data_ptr<int32_t>(), B, N, op);
  check_gaze_inputs(B, P, N, gaze, gaze_mask, op);
  const GazeInputs gz(gaze, gaze_mask, x.patch.scalar_type());
  const auto opts = x.patch.options();
  auto terms = new_out({kNumTerms}, opts);
  auto i2t = new_out({B, B}, opts);
  auto t2i = new_out({B, B}, opts);
  // The argmax routes (B x B x P) only when a backward may follow.
  auto i2t_arg = new_route_out(save_idx, {B, B, P}, opts);
  auto t2i_arg = new_route_out(save_idx, {B, N}, opts);
  auto matched = new_out({N, P}, opts);
  const auto loss_opts = egma_common::loss_options(alpha, map_threshold, w_con, w_mlce, w_map, egma_compat);
  AT_DISPATCH_FLOATING_TYPES(x.patch.scalar_type(), "egma_loss_fwd_cpu", [&] {
    const Reports reports(x.cu.data_ptr<int32_t>(), B, N);
    loss_forward<scalar_t>(kernel_inputs<scalar_t>(x, reports, logit_scale, &gz), loss_opts.cast<scalar_t>(),
                           similarity_outputs<scalar_t>(i2t, t2i, i2t_arg, t2i_arg, save_idx, matched),
                           terms.data_ptr<scalar_t>());
  });
  return {terms, i2t, t2i, i2t_arg, t2i_arg, matched};
}

// The saved forward outputs, contiguous, with the argmax indices checked.
struct SavedInputs {
  at::Tensor i2t, t2i, i2t_arg, t2i_arg, matched;

  SavedInputs(const at::Tensor& i2t_, const at::Tensor& t2i_, const at::Tensor& i2t_arg_, const at::Tensor& t2i_arg_,
              const at::Tensor& matched_, const EmbeddingInputs& x, const char* op)
      : i2t(i2t_.contiguous()),
        t2i(t2i_.contiguous()),
        i2t_arg(i2t_arg_.contiguous()),
        t2i_arg(t2i_arg_.contiguous()),
        matched(matched_.defined() ? matched_.contiguous() : at::Tensor()) {
    check_argmax_indices(i2t_arg, t2i_arg, x, op);
  }

  template <typename T>
  SavedSimilarities<T> pointers() const {
    return {i2t.data_ptr<T>(), t2i.data_ptr<T>(), i2t_arg.data_ptr<int32_t>(), t2i_arg.data_ptr<int32_t>(),
            ptr_or_null<T>(matched)};
  }
};

// Runs a backward kernel into the gradient outputs, with a T accumulator for d t written into d_scale.
template <typename T, typename Kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(GradientOutputs& out, Kernel&& kernel) {
  T d_scale_value = 0;
  kernel(Gradients<T>{out.d_patch.data_ptr<T>(), out.d_sent.data_ptr<T>(), &d_scale_value});
  out.d_scale.fill_(d_scale_value);
  return out.as_tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_bwd_cpu(
    const at::Tensor& grad_terms, const at::Tensor& grad_i2t, const at::Tensor& grad_t2i, const at::Tensor& patch_emb,
    const at::Tensor& sent_emb, const at::Tensor& cu_seqlens, const at::Tensor& logit_scale,
    const std::optional<at::Tensor>& gaze, const std::optional<at::Tensor>& gaze_mask, const at::Tensor& i2t,
    const at::Tensor& t2i, const at::Tensor& i2t_arg, const at::Tensor& t2i_arg, const at::Tensor& own, double alpha,
    double map_threshold, double w_con, double w_mlce, double w_map, bool egma_compat) {
  const char* op = "loss_bwd";
  const auto x = prepare_inputs(patch_emb, sent_emb, cu_seqlens, logit_scale, op);
  const int64_t B = x.M, P = x.P, N = x.N;
  check_loss_grad_inputs(B, P, N, x.cu.size(0), grad_terms, grad_i2t, grad_t2i, i2t, t2i, i2t_arg, t2i_arg, own, gaze,
                         gaze_mask);
  check_report_offsets(x.cu.data_ptr<int32_t>(), B, N, op);
  const auto dtype = x.patch.scalar_type();
  const auto g_terms = grad_terms.to(dtype).contiguous();
  const auto g_i2t = grad_i2t.to(dtype).contiguous();
  const auto g_t2i = grad_t2i.to(dtype).contiguous();
  const SavedInputs saved(i2t, t2i, i2t_arg, t2i_arg, own, x, op);
  const GazeInputs gz(gaze, gaze_mask, dtype);
  GradientOutputs out(x, logit_scale);
  const auto loss_opts = egma_common::loss_options(alpha, map_threshold, w_con, w_mlce, w_map, egma_compat);
  return AT_DISPATCH_FLOATING_TYPES(dtype, "egma_loss_bwd_cpu", [&] {
    const Reports reports(x.cu.data_ptr<int32_t>(), B, N);
    return run_backward<scalar_t>(out, [&](const Gradients<scalar_t>& grads) {
      loss_backward<scalar_t>(kernel_inputs<scalar_t>(x, reports, logit_scale, &gz), loss_opts.cast<scalar_t>(),
                              g_terms.data_ptr<scalar_t>(), g_i2t.data_ptr<scalar_t>(), g_t2i.data_ptr<scalar_t>(),
                              saved.pointers<scalar_t>(), grads);
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filip_fwd_cpu(const at::Tensor& patch_emb,
                                                                         const at::Tensor& sent_emb,
                                                                         const at::Tensor& cu_seqlens,
                                                                         const at::Tensor& logit_scale,
                                                                         bool egma_compat, bool save_idx) {
  const char* op = "filip_fwd";
  const auto x = prepare_inputs(patch_emb, sent_emb, cu_seqlens, logit_scale, op);
  const int64_t M = x.M, R = x.R, P = x.P, N = x.N;
  check_report_offsets(x.cu.data_ptr<int32_t>(), R, N, op);
  const auto opts = x.patch.options();
  auto i2t = new_out({M, R}, opts);
  auto t2i = new_out({M, R}, opts);
  auto i2t_arg = new_route_out(save_idx, {M, R, P}, opts);
  auto t2i_arg = new_route_out(save_idx, {M, N}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.patch.scalar_type(), "egma_filip_fwd_cpu", [&] {
    const Reports reports(x.cu.data_ptr<int32_t>(), R, N);
    similarity_forward<scalar_t>(kernel_inputs<scalar_t>(x, reports, logit_scale), egma_compat,
                                 similarity_outputs<scalar_t>(i2t, t2i, i2t_arg, t2i_arg, save_idx, at::Tensor()));
  });
  return {i2t, t2i, i2t_arg, t2i_arg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> filip_bwd_cpu(const at::Tensor& grad_i2t, const at::Tensor& grad_t2i,
                                                             const at::Tensor& patch_emb, const at::Tensor& sent_emb,
                                                             const at::Tensor& cu_seqlens,
                                                             const at::Tensor& logit_scale, const at::Tensor& i2t,
                                                             const at::Tensor& t2i, const at::Tensor& i2t_arg,
                                                             const at::Tensor& t2i_arg) {
  const char* op = "filip_bwd";
  const auto x = prepare_inputs(patch_emb, sent_emb, cu_seqlens, logit_scale, op);
  const int64_t M = x.M, R = x.R, P = x.P, N = x.N;
  check_report_offsets(x.cu.data_ptr<int32_t>(), R, N, op);
  const auto dtype = x.patch.scalar_type();
  check_similarity_grad_inputs(M, R, P, N, grad_i2t, grad_t2i, i2t, t2i, i2t_arg, t2i_arg, op);
  const auto g_i2t = grad_i2t.to(dtype).contiguous();
  const auto g_t2i = grad_t2i.to(dtype).contiguous();
  const SavedInputs saved(i2t, t2i, i2t_arg, t2i_arg, at::Tensor(), x, op);
  GradientOutputs out(x, logit_scale);
  return AT_DISPATCH_FLOATING_TYPES(dtype, "egma_filip_bwd_cpu", [&] {
    const Reports reports(x.cu.data_ptr<int32_t>(), R, N);
    return run_backward<scalar_t>(out, [&](const Gradients<scalar_t>& grads) {
      similarity_backward<scalar_t>(kernel_inputs<scalar_t>(x, reports, logit_scale), g_i2t.data_ptr<scalar_t>(),
                                    g_t2i.data_ptr<scalar_t>(), saved.pointers<scalar_t>(), grads);
    });
  });
}

}  // namespace
}  // namespace egma_cpu

TORCH_LIBRARY_IMPL(egma_kernels, CPU, m) {
  m.impl("loss_fwd", &egma_cpu::loss_fwd_cpu);
  m.impl("loss_bwd", &egma_cpu::loss_bwd_cpu);
  m.impl("filip_fwd", &egma_cpu::filip_fwd_cpu);
  m.impl("filip_bwd", &egma_cpu::filip_bwd_cpu);
}
