// The CUDA side of csrc/cuda/device_table_cache.h, shared by the clip and AGC caches.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "cuda/device_table_cache.h"

namespace fusedclip {

struct CudaEvent {  // a cudaEvent_t owned by the cache entry (destroyed with it)
  cudaEvent_t e = nullptr;
  CudaEvent() = default;
  explicit CudaEvent(cudaEvent_t ev) : e(ev) {}
  CudaEvent(CudaEvent&& o) noexcept : e(std::exchange(o.e, nullptr)) {}
  CudaEvent& operator=(CudaEvent&& o) noexcept {
    std::swap(e, o.e);
    return *this;
  }
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  ~CudaEvent() {
    if (e) C10_CUDA_CHECK_WARN(cudaEventDestroy(e));  // (pending work keeps its own reference)
  }
};

struct CudaTables {
  using Table = at::Tensor;
  using Event = CudaEvent;
  using Stream = c10::cuda::CUDAStream;

  // The table through pinned memory (so the copy is asynchronous; the host allocator keeps the buffer until
  // the copy ran) on `s`, which is the current stream of `device` (the callers' guard has set it).
  Table upload(int device, const std::vector<int64_t>& key, Stream s) {
    const int64_t n = static_cast<int64_t>(key.size());
    at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(key.begin(), key.end(), host.data_ptr<int64_t>());
    at::Tensor table = at::empty({n}, at::TensorOptions().dtype(at::kLong).device(at::kCUDA, device));
    TORCH_INTERNAL_ASSERT(c10::cuda::getCurrentCUDAStream(device) == s);
    table.copy_(host, /*non_blocking=*/true);
    return table;
  }
  Event record(Stream s) {
    cudaEvent_t e;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    CudaEvent owned(e);
    C10_CUDA_CHECK(cudaEventRecord(e, s.stream()));
    return owned;
  }
  bool done(Event& e) {
    const cudaError_t r = cudaEventQuery(e.e);
    if (r == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it
      return false;
    }
    C10_CUDA_CHECK(r);
    return true;
  }
  void wait(Stream s, Event& e) { C10_CUDA_CHECK(cudaStreamWaitEvent(s.stream(), e.e, 0)); }
  void sync_under_capture(Event& e) {
    // A capture in the default (global) mode forbids host syncs in this thread; this one waits for an event
    // recorded before the capture began, on work outside it, which the relaxed mode allows.
    c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    C10_CUDA_CHECK(cudaEventSynchronize(e.e));
  }
  void record_stream(Table& t, Stream s) { c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), s); }
};

inline bool is_capturing(const c10::cuda::CUDAStream& s) {
  cudaStreamCaptureStatus capture;
  C10_CUDA_CHECK(cudaStreamIsCapturing(s.stream(), &capture));
  return capture != cudaStreamCaptureStatusNone;
}

}  // namespace fusedclip
