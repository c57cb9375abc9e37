// Host-side code shared by the CPU and the CUDA launchers: validation of the
// tensor list, the table of pointers/sizes/dtypes both kernels walk, and the
// compile-time dispatch on norm kind and accumulation type.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/clip_math.h"
#include "common/zclip_rule.h"

namespace fusedclip {

struct GradTable {
  std::vector<int64_t> table;  // the layout of TableView, ready to copy to the device
  int64_t n_tensors = 0;
  int64_t n_chunks = 0;
  bool any_double = false;              // accumulate in fp64 when any tensor is fp64
  at::ScalarType result_dtype = at::kFloat;  // promotion of the tensors' dtypes (what torch returns)
  at::Device device = at::kCPU;
  // Tensors that are not dense in memory are processed through a dense copy;
  // in-place ops copy the result back (pairs of original, copy).
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;

  // CPU in-place ops bump the version counters only when they write (the decision is on the host there,
  // and a counter is a separately allocated atomic: a cache miss per tensor that a no-clip call would pay
  // for nothing); CUDA ones bump them in build_table, since the decision stays on the GPU. Borrowed: see
  // build_table.
  std::vector<c10::TensorImpl*> to_bump;

  TableView view() const { return TableView{table.data(), n_tensors}; }
  void bump_versions() const {
    for (c10::TensorImpl* t : to_bump) t->bump_version();
  }
  at::ScalarType acc_dtype() const { return any_double ? at::kDouble : at::kFloat; }
  // After an in-place op: move the results of dense copies into their originals.
  void write_back() const;
};

// ZClip (the zclip_ op): the coefficient comes from the rule in zclip_rule.h, which also updates the state.
struct ZClipExtras {
  at::Tensor state;  // in/out: float64 [kZBuffer + n_warmup] on the gradients' device
  ZConfig config;
  std::optional<at::Tensor> norm;  // in: the norm, already known (a sharded clip's global one): no norm pass
  std::optional<at::Tensor> coef_out;  // out: one fp32 value, the factor, instead of scaling the grads
};

// The optional extras of the fused clip (the same for both kernels).
struct ClipExtras {
  std::optional<at::Tensor> per_tensor;  // out: [n_tensors] norms in the accumulation dtype
  std::optional<at::Tensor> inv_scale;   // in: one fp32 value; every element is multiplied by it first (AMP)
  std::optional<at::Tensor> found_inf;   // out: one fp32 value, set to 1 if an (unscaled) element is inf/NaN
                                         // (and, with ZClip, when the step is skipped)
  const ZClipExtras* zclip = nullptr;    // ZClip's rule instead of max_norm's
};

// What an op does to its tensors: kReads leaves them alone; kWrites may write
// them in place, so their version counters are bumped (as torch's in-place ops
// do; autograd checks them) once every check has passed: by build_table on CUDA,
// by the CPU kernel when it writes (GradTable::to_bump).
enum class Access { kReads, kWrites };

// Validates tensors (non-empty list, strided floating tensors on one device)
// and builds their table. Raises before anything is written. The table (its
// data pointers) and to_bump (the TensorImpls) borrow from `tensors`: the caller
// keeps them, and their storages, alive until the kernel has run (the op's
// arguments; the fast path's own references, python_module.cpp).
GradTable build_table(at::TensorList tensors, const char* op, Access access);

// The fused norm of a table, then, when `clip`, the in-place scaling (unless
// the factor is exactly 1); the norm is returned as a 0-dim out_dtype tensor.
// What the ops and the fast path run, per device.
at::Tensor norm_and_maybe_clip_cpu(const GradTable& g, double max_norm, double norm_type, bool clip,
                                   at::ScalarType out_dtype, const ClipExtras& x);
// The same norm pass (no extras), its float64 result returned as a number: no 0-dim tensor to make and read back,
// for a caller that runs it once per small tensor (ClipInBackward's CPU hook).
double unrounded_norm_cpu(const GradTable& g, double norm_type);
#ifdef FUSEDCLIP_WITH_CUDA
// "cuda_block_threads=...;cuda_min_blocks=kernel=n,...": the CUDA launch configuration, for build_info.
std::string cuda_launch_info();
at::Tensor norm_and_maybe_clip_cuda(const GradTable& g, double max_norm, double norm_type, bool clip,
                                    at::ScalarType out_dtype, const ClipExtras& x);
#endif

// total_norm's result dtype: the accumulation dtype by default, or float64 for the norm unrounded (the
// sharded paths reduce it across ranks: a norm rounded to fp32 first would cost up to an ulp).
at::ScalarType checked_norm_dtype(const GradTable& g, std::optional<at::ScalarType> out_dtype);

NormKind norm_kind(double norm_type);

// Calls f(std::integral_constant<NormKind, K>) for the kind of this norm_type.
template <typename F>
void dispatch_norm_kind(double norm_type, F&& f) {
  switch (norm_kind(norm_type)) {
    case NormKind::L2: f(std::integral_constant<NormKind, NormKind::L2>{}); break;
    case NormKind::Inf: f(std::integral_constant<NormKind, NormKind::Inf>{}); break;
    case NormKind::NegInf: f(std::integral_constant<NormKind, NormKind::NegInf>{}); break;
    case NormKind::P: f(std::integral_constant<NormKind, NormKind::P>{}); break;
  }
}

// Calls f(acc_t{}) with float, or double when fp64 is involved.
template <typename F>
void dispatch_acc(bool use_double, F&& f) {
  if (use_double) f(double{}); else f(float{});
}

// Checks the extras against the table (devices, dtypes, sizes). Raises before anything is written.
void check_extras(const GradTable& g, const ClipExtras& x);

// The zclip_ op's arguments checked and gathered. Raises before anything is written.
ZClipExtras zclip_extras(const GradTable& g, const at::Tensor& state, c10::ArrayRef<double> config,
                         const std::optional<at::Tensor>& norm, bool unscaling,
                         const std::optional<at::Tensor>& coef_out = std::nullopt);

// For the `table` op: tensors must be dense, since the caller cannot be handed copies to write back.
GradTable build_dense_table(at::TensorList tensors);

// The dtype code of a 0-dim norm tensor (any float dtype).
int64_t dtype_code(at::ScalarType t);

}  // namespace fusedclip
