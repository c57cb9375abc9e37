// What the Python-facing fast paths (python_module.cpp, in_backward.cpp) take without the dispatcher: plain dense
// tensors on a device with a fused kernel, in a thread with no dispatch or torch-function mode, so calling the
// kernel directly does exactly what the op would. Anything else goes the op's (or Python's) way.
#pragma once

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

namespace fusedclip {

// Keys by which a tensor, or the thread, asks to see every operator call.
inline const c10::DispatchKeySet kInterposingKeys({
    c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::Functionalize,
    c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
    c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode,
    c10::DispatchKey::BatchedNestedTensor, c10::DispatchKey::Conjugate, c10::DispatchKey::Negative,
    c10::DispatchKey::ZeroTensor});

inline bool plain_thread_state() {
  return !c10::impl::tls_local_dispatch_key_set().included_.has_any(kInterposingKeys) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !at::impl::torch_function_mode_enabled();
}

inline bool has_fused_kernel(c10::DeviceType type) {
#ifdef FUSEDCLIP_WITH_CUDA
  if (type == c10::DeviceType::CUDA) return true;
#endif
  return type == c10::DeviceType::CPU;
}

// A tensor the kernels read and write in place exactly as the op would.
inline bool plain_tensor(const at::Tensor& t) {
  return t.layout() == at::kStrided && has_fused_kernel(t.device().type()) && !t.is_nested() &&
         !t.key_set().has_any(kInterposingKeys) && !t.is_inference() &&
         (t.numel() == 0 || t.is_non_overlapping_and_dense());
}

}  // namespace fusedclip
