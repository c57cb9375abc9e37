#include "common/grad_table.h"

#include <cmath>

namespace fusedclip {

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kDouble: return kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "fusedclip: gradients must be float32, float64, float16 or bfloat16, got ", t);
  }
}

NormKind norm_kind(double p) {
  TORCH_CHECK_VALUE(!std::isnan(p), "fusedclip: norm_type must not be NaN");
  TORCH_CHECK_VALUE(p != 0.0, "fusedclip: norm_type 0 is handled by the Python layer, not by the kernels");
  if (p == 2.0) return NormKind::L2;
  if (std::isinf(p)) return p > 0 ? NormKind::Inf : NormKind::NegInf;
  return NormKind::P;
}

GradTable build_table(at::TensorList tensors, const char* op, Access access) {
  TORCH_CHECK_VALUE(!tensors.empty(), "fusedclip.", op, ": empty tensor list");
  GradTable g;
  const int64_t n = static_cast<int64_t>(tensors.size());
  g.n_tensors = n;
  g.device = tensors[0].device();
  g.result_dtype = tensors[0].scalar_type();
  g.table.resize(table_size(n));
  int64_t* ptrs = g.table.data();
  int64_t* numels = ptrs + n;
  int64_t* dtypes = numels + n;
  int64_t* chunk_begin = dtypes + n;
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), "fusedclip.", op, ": tensor ", i, " is undefined");
    TORCH_CHECK_NOT_IMPLEMENTED(t.layout() == at::kStrided, "fusedclip.", op, ": tensor ", i, " has layout ",
                                t.layout(), "; only dense (strided) gradients are supported, use backend='torch'");
    TORCH_CHECK_VALUE(t.device() == g.device, "fusedclip.", op, ": tensors on several devices (", g.device,
                      " and ", t.device(), ")");
    const at::ScalarType st = t.scalar_type();
    dtypes[i] = dtype_code(st);
    if (st != g.result_dtype) g.result_dtype = c10::promoteTypes(g.result_dtype, st);  // not at::promote_types, an operator call
    g.any_double |= st == at::kDouble;
    const int64_t numel = t.numel();
    const at::Tensor* dense = &t;
    if (numel > 0 && !t.is_non_overlapping_and_dense()) {
      g.copies.emplace_back(t, t.contiguous());
      dense = &g.copies.back().second;
    }
    // A dense tensor, whatever its strides, covers [data_ptr, data_ptr + numel).
    ptrs[i] = reinterpret_cast<int64_t>(dense->data_ptr());
    numels[i] = numel;
    chunk_begin[i] = chunks;
    chunks += (numel + kChunkElems - 1) / kChunkElems;
  }
  chunk_begin[n] = chunks;
  g.n_chunks = chunks;
  if (access == Access::kWrites) {
    if (g.device.is_cpu()) {
      g.to_bump.reserve(tensors.size());
      for (const at::Tensor& t : tensors) g.to_bump.push_back(t.unsafeGetTensorImpl());
    } else {
      for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
    }
  }
  return g;
}

void check_extras(const GradTable& g, const ClipExtras& x) {
  if (x.per_tensor) {
    const at::Tensor& t = *x.per_tensor;
    TORCH_CHECK_VALUE(t.device() == g.device && t.scalar_type() == g.acc_dtype() && t.numel() == g.n_tensors &&
                          t.is_contiguous(),
                      "fusedclip: per_tensor must be a contiguous ", g.acc_dtype(), " tensor of ", g.n_tensors,
                      " elements on ", g.device);
  }
  for (const auto* opt : {&x.inv_scale, &x.found_inf}) {
    if (!*opt) continue;
    const at::Tensor& t = **opt;
    TORCH_CHECK_VALUE(t.device() == g.device && t.scalar_type() == at::kFloat && t.numel() == 1,
                      "fusedclip: inv_scale and found_inf must be one-element float32 tensors on ", g.device,
                      " (as torch.amp.GradScaler's are)");
  }
}

ZClipExtras zclip_extras(const GradTable& g, const at::Tensor& state, c10::ArrayRef<double> config,
                         const std::optional<at::Tensor>& norm, bool unscaling,
                         const std::optional<at::Tensor>& coef_out) {
  TORCH_CHECK_VALUE(config.size() == kZConfigLen, "fusedclip.ZClip: the config has ", config.size(),
                    " values, the kernels take ", int64_t(kZConfigLen), ": rebuild the extension");
  const ZConfig c = zconfig_from(config.data());
  TORCH_CHECK_VALUE(c.n_warmup >= 1, "fusedclip.ZClip: the warm-up takes at least one step");
  TORCH_CHECK_VALUE(state.device() == g.device && state.scalar_type() == at::kDouble && state.is_contiguous() &&
                        state.numel() == kZBuffer + c.n_warmup,
                    "fusedclip.ZClip: the state must be a contiguous float64 tensor of ", kZBuffer + c.n_warmup,
                    " elements on ", g.device);
  if (norm) {
    // AMP's found_inf comes from the norm pass, which a given norm skips
    TORCH_CHECK_VALUE(!unscaling, "fusedclip.ZClip: a given norm cannot be combined with AMP's unscale");
    TORCH_CHECK_VALUE(norm->device() == g.device && norm->numel() == 1,
                      "fusedclip.ZClip: the given norm must be a one-element tensor on ", g.device);
    dtype_code(norm->scalar_type());
  }
  if (coef_out)
    TORCH_CHECK_VALUE(coef_out->device() == g.device && coef_out->scalar_type() == at::kFloat && coef_out->numel() == 1,
                      "fusedclip.ZClip: coef_out must be a one-element float32 tensor on ", g.device);
  return ZClipExtras{state, c, norm ? std::optional<at::Tensor>(norm->reshape({}).contiguous()) : std::nullopt,
                     coef_out};
}

GradTable build_dense_table(at::TensorList tensors) {
  GradTable g = build_table(tensors, "table", Access::kReads);
  TORCH_CHECK_VALUE(g.copies.empty(), "fusedclip.table: every tensor must be dense (is_non_overlapping_and_dense)");
  return g;
}

void GradTable::write_back() const {
  for (const auto& [original, copy] : copies) original.copy_(copy);
}

at::ScalarType checked_norm_dtype(const GradTable& g, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType acc = g.acc_dtype();
  TORCH_CHECK_VALUE(!out_dtype || *out_dtype == acc || *out_dtype == at::kDouble,
                    "fusedclip.total_norm: out_dtype must be None, ", acc, " or torch.float64, got ", *out_dtype);
  return out_dtype.value_or(acc);
}

}  // namespace fusedclip
