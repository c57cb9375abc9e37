// The operator schemas (one place for both backends). The CPU kernels are
// registered in clip_cpu.cpp, the CUDA ones in clip_cuda.cu; the Python module
// and its eager fast path are python_module.cpp.
#include <torch/library.h>

#include <string>

#include "common/agc_table.h"
#include "common/grad_table.h"
#include "common/zclip_rule.h"

// Set by the build (tools/build_config.py), for `python -m fusedclip info`.
#ifndef FUSEDCLIP_CUDA_ARCHS
#define FUSEDCLIP_CUDA_ARCHS ""
#endif
#ifndef FUSEDCLIP_TORCH_VERSION
#define FUSEDCLIP_TORCH_VERSION "unknown"
#endif

namespace fusedclip {

// "key=value;..." describing how the extension was built.
std::string build_info() {
#ifdef FUSEDCLIP_WITH_CUDA
  const std::string cuda = "1";
#else
  const std::string cuda = "0";
#endif
  std::string info = "cuda=" + cuda + ";cuda_archs=" + FUSEDCLIP_CUDA_ARCHS + ";torch=" + FUSEDCLIP_TORCH_VERSION +
                     ";chunk_elems=" + std::to_string(kChunkElems) +
                     // ZClip's layouts (zclip_rule.h), which fusedclip/ops.py checks its own against
                     ";zclip_config_len=" + std::to_string(kZConfigLen) + ";zclip_buffer=" + std::to_string(kZBuffer);
#ifdef FUSEDCLIP_WITH_CUDA
  info += ";" + cuda_launch_info() + ";" + agc_cuda_launch_info();
#endif
  return info;
}

TORCH_LIBRARY(fusedclip, m) {
  // Norm of all tensors, accumulated in fp32 (fp64 if any is fp64), partials combined in double, returned in
  // the accumulation dtype, or unrounded with out_dtype=torch.float64; each tensor's own norm into per_tensor
  // when given (same pass).
  m.def("total_norm(Tensor[] tensors, float norm_type, Tensor(b!)? per_tensor=None, ScalarType? out_dtype=None) "
        "-> Tensor");
  // The fused clip: norm, then (only if coef < 1) in-place scaling; returns the
  // norm in the promotion of the grads' dtypes, as torch does. AMP in the same
  // pass: with inv_scale, every element is unscaled first (the norm is the
  // unscaled gradients'), found_inf is set to 1 if an unscaled element is not
  // finite, and the grads are written as grad * inv_scale * coef.
  m.def("clip_(Tensor(a!)[] grads, float max_norm, float norm_type, Tensor(b!)? per_tensor=None, "
        "Tensor? inv_scale=None, Tensor(c!)? found_inf=None) -> Tensor");
  // Scale by max_norm / (total_norm + 1e-6) when that is < 1.
  m.def("scale_(Tensor(a!)[] grads, float max_norm, Tensor total_norm) -> ()");
  // ZClip's adaptive clip (csrc/common/zclip_rule.h): the L2 norm (or the given one), the coefficient from the
  // state, the in-place scaling only if it is not 1, and the state's update, in one pass; AMP's unscale as in
  // clip_; found_inf is also set when the step is skipped. With coef_out (one fp32 value) the factor is written
  // there instead of into the grads (for a fused optimizer's grad_scale). Returns the norm in the accumulation
  // dtype.
  m.def("zclip_(Tensor(a!)[] grads, Tensor(s!) state, float[] config, Tensor? norm=None, Tensor? inv_scale=None, "
        "Tensor(c!)? found_inf=None, Tensor(d!)? coef_out=None) -> Tensor");
  // clamp(-clip_value, clip_value) in place.
  m.def("clamp_(Tensor(a!)[] grads, float clip_value) -> ()");
  // The kernels' table of the tensors (csrc/common/clip_math.h: TableView), on their device (cached there), with
  // the number of chunks and whether fp64 accumulation is needed: for kernels written outside this
  // library (the Triton backend). Every tensor must be dense (is_non_overlapping_and_dense).
  m.def("table(Tensor[] tensors) -> (Tensor, int, bool)");
  // Adaptive gradient clipping (csrc/common/agc_table.h): each unit of grads[i] (a row for 2-D and up, else the whole
  // tensor) is scaled by max / max(|g_unit|, 1e-6) unless |g_unit| < max = clip_factor * max(|w_unit|, eps).
  // weights[i] and grads[i]: same shape and dtype, not empty. Kernels in agc_cpu.cpp and agc_cuda.cu.
  m.def("agc_(Tensor[] weights, Tensor(a!)[] grads, float clip_factor, float eps, float norm_type) -> ()");
  // Each tensor multiplied in place by its own coefficient: grads[i] *= coefs[i] (coefs: 1-D float32/float64, one
  // per tensor, on the tensors' device), in the tensor's opmath type (float, double for fp64), as torch's mul_
  // on the CPU; a tensor whose coefficient is exactly 1 is not written. AdaGC's scaling pass (csrc/common/scale_each.h).
  m.def("scale_each_(Tensor(a!)[] grads, Tensor coefs) -> ()");
  m.def("build_info() -> str", &build_info);
}

}  // namespace fusedclip
