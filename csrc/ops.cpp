// Op schemas of the compiled EGMA backends and the Python module initialiser.
//
// The forward and backward ops are defined here once (TORCH_LIBRARY); cpu/ops_cpu.cpp registers their CPU
// kernels and cuda/ops_cuda.cpp their CUDA kernels (TORCH_LIBRARY_IMPL). Fake (meta) kernels and the
// autograd formula live in Python (egma_kernels/compiled.py) through torch.library.
#include <torch/library.h>

#include "egma_common.h"

#include <pybind11/pybind11.h>

#ifndef EGMA_KERNELS_VERSION
#define EGMA_KERNELS_VERSION "0.1.0"
#endif

TORCH_LIBRARY(egma_kernels, m) {
  // Every op checks its own offsets and the shapes of what it indexes (egma_common.h), whatever the Python
  // layer checked.
  // Outputs: terms (4,) = [loss, contrastive, gaze_mlce, mapping] (egma_common::Term), i2t (B,B), t2i (B,B),
  // and what the backward needs: i2t_arg (B,B,P) int32 (best sentence of each patch per report, -1 where
  // egma_compat clamped the max to 0), t2i_arg (B,N) int32 (best patch of each sentence per image), and the
  // matched similarities A[o(u), i ; u] (N,P), which loss_bwd takes back as `own`. Without save_idx (no backward will follow) i2t_arg and t2i_arg
  // are empty (0,) tensors.
  m.def(
      "loss_fwd(Tensor patch_emb, Tensor sent_emb, Tensor cu_seqlens, Tensor logit_scale, Tensor? gaze, "
      "Tensor? gaze_mask, float alpha, float map_threshold, float w_con, float w_mlce, float w_map, "
      "bool egma_compat, bool save_idx) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "loss_bwd(Tensor grad_terms, Tensor grad_i2t, Tensor grad_t2i, Tensor patch_emb, Tensor sent_emb, "
      "Tensor cu_seqlens, Tensor logit_scale, Tensor? gaze, Tensor? gaze_mask, Tensor i2t, Tensor t2i, "
      "Tensor i2t_arg, Tensor t2i_arg, Tensor own, float alpha, float map_threshold, float w_con, "
      "float w_mlce, float w_map, bool egma_compat) -> (Tensor, Tensor, Tensor)");
  // FILIP similarity of M images against R reports: i2t (M,R), t2i (M,R) and, when save_idx, the argmax
  // indices i2t_arg (M,R,P) and t2i_arg (M,N) (empty (0,) tensors otherwise).
  m.def(
      "filip_fwd(Tensor patch_emb, Tensor sent_emb, Tensor cu_seqlens, Tensor logit_scale, bool egma_compat, "
      "bool save_idx) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "filip_bwd(Tensor grad_i2t, Tensor grad_t2i, Tensor patch_emb, Tensor sent_emb, Tensor cu_seqlens, "
      "Tensor logit_scale, Tensor i2t, Tensor t2i, Tensor i2t_arg, Tensor t2i_arg) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = EGMA_KERNELS_VERSION;
#ifdef EGMA_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef EGMA_CUDA_ARCHS
  info["cuda_archs"] = EGMA_CUDA_ARCHS;
#else
  info["cuda_archs"] = "";
#endif
  return info;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "egma_kernels compiled backends (ops registered under torch.ops.egma_kernels)";
  m.def("build_info", &build_info, "version of the extension and whether its CUDA kernels were built");
  m.def(
      "set_poison_outputs", [](bool on) { egma_common::poison_flag().store(on); },
      "tests: fill every output buffer with NaN (integers with -7) before the kernels write it");
}
