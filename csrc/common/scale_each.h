// The scale_each_ op (per-tensor coefficients, AdaGC's scaling pass): the argument check both kernels share.
// Each tensor i is multiplied by coefs[i] converted to the tensor's opmath type (float for fp16/bf16/fp32,
// double for fp64) -- what torch's grads[i].mul_(coefs[i]) computes on the CPU -- and a tensor whose
// coefficient is exactly 1 there is not written at all.
#pragma once

#include <ATen/ATen.h>

#include "common/grad_table.h"

namespace fusedclip {

inline void check_scale_each(const GradTable& g, const at::Tensor& coefs) {
  TORCH_CHECK_VALUE(coefs.device() == g.device, "fusedclip.scale_each_: coefs must be on the tensors' device (",
                    g.device, "), got ", coefs.device());
  TORCH_CHECK_VALUE(coefs.scalar_type() == at::kFloat || coefs.scalar_type() == at::kDouble,
                    "fusedclip.scale_each_: coefs must be float32 or float64, got ", coefs.scalar_type());
  TORCH_CHECK_VALUE(coefs.dim() == 1 && coefs.numel() == g.n_tensors,
                    "fusedclip.scale_each_: coefs must be 1-D with one value per tensor (", g.n_tensors,
                    "), got shape ", coefs.sizes());
}

// grads[i] *= coefs[i] on a CPU table (coefs: one value per tensor, the coefficients as double), written only where
// the factor in the tensor's opmath type is not 1; bumps the version counters (g.to_bump) when it writes. The
// scale_each_ op's CPU kernel, and AdaGC's fast path (python_module.cpp).
void scale_each_table_cpu(const GradTable& g, const double* coefs);

}  // namespace fusedclip
