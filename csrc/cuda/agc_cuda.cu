// Adaptive gradient clipping on CUDA: one launch over all (weight, gradient) pairs of one table.
//
// Units are mapped by size: a pair whose units have at most kWarpMaxElems (2,048) elements is done a warp per unit
// (kWarps units per block), a larger one a block per unit. Each thread reads its share of the weight unit
// (for its norm only) and of the gradient unit, keeping the gradient in registers (kCacheVecs 16-byte vectors
// a thread) when the unit fits them; the warp or block reduces both norms by a fixed tree (deterministic),
// every thread derives the same factor, and, when the unit is clipped, the gradient is scaled from the
// registers, or, for a unit that did not fit, re-read (from L2: it was just read) and scaled. Units that are
// not clipped are never written. No unit depends on another, so there is no grid-wide step.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <list>
#include <mutex>

#include "common/agc_table.h"
#include "cuda/device_table_cuda.h"
#include "common/grad_table.h"

namespace fusedclip {
namespace {

constexpr int kAgcThreads = 256;
constexpr int kWarps = kAgcThreads / 32;
constexpr int kVecBytes = 16;
// 16-byte vectors of gradient a thread keeps in registers: as many as fit in the 80 registers without spilling,
// which ptxas makes fewer from sm_100 on (2 there; 3 still spilled the inf kernels on sm_100; checked for every
// architecture of the build by tests/tooling/test_kernel_info.py). Only the kernel decides what is cached.
#ifndef FC_AGC_CACHE_VECS
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000
#define FC_AGC_CACHE_VECS 2
#else
#define FC_AGC_CACHE_VECS 4
#endif
#endif
constexpr int kCacheVecs = FC_AGC_CACHE_VECS;
// Units up to this size: a warp each (cached up to 512 fp32 elements on sm_90, streamed above); larger ones a
// block each (cached up to 4,096 fp32 elements on sm_90): ViT-B's 768-element rows go to warps, its 3,072 ones
// to cached blocks.
constexpr int64_t kWarpMaxElems = 2048;

// Blocks per SM the kernel is compiled for (__launch_bounds__): 3 x 256 threads leaves 80 registers a thread
// (at 4 x 256, 64 registers, the cache and the weight loop's loads in flight spill); the p-norm kernel (a pow
// per element, fp64 pow in fp64 pairs) gets 128. 24 warps an SM, each with up to 2 KB (cached units) or four
// 16-byte loads a thread in flight: enough to approach the bandwidth.
#ifndef FC_AGC_MIN_BLOCKS  // (overridable for register experiments: nvcc -DFC_AGC_MIN_BLOCKS=n)
#define FC_AGC_MIN_BLOCKS 3
#endif
template <NormKind K>
constexpr int kAgcMinBlocksPerSm = K == NormKind::P ? 2 : FC_AGC_MIN_BLOCKS;

C10_HOST_DEVICE inline bool warp_mode(int64_t len) { return len <= kWarpMaxElems; }

int64_t cuda_items(int64_t rows, int64_t len, int64_t) {
  return warp_mode(len) ? (rows + kWarps - 1) / kWarps : rows;
}

template <NormKind K, typename acc_t>
struct Norms {
  acc_t w, g;
};

template <NormKind K, typename acc_t>
__device__ Norms<K, acc_t> warp_reduce(Norms<K, acc_t> v) {
  for (int s = 16; s > 0; s >>= 1) {
    v.w = norm_combine<K>(v.w, __shfl_xor_sync(0xffffffffu, v.w, s));
    v.g = norm_combine<K>(v.g, __shfl_xor_sync(0xffffffffu, v.g, s));
  }
  return v;
}

// Warps first, then warp 0 over the warps' results: a fixed tree; every thread gets the result.
template <NormKind K, typename acc_t>
__device__ Norms<K, acc_t> block_reduce(Norms<K, acc_t> v, Norms<K, acc_t>* smem) {
  v = warp_reduce<K>(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    Norms<K, acc_t> x = lane < kWarps ? smem[lane] : Norms<K, acc_t>{norm_identity<K, acc_t>(), norm_identity<K, acc_t>()};
    x = warp_reduce<K>(x);
    if (lane == 0) smem[kWarps] = x;
  }
  __syncthreads();
  const Norms<K, acc_t> r = smem[kWarps];
  __syncthreads();  // smem is reused by the next unit
  return r;
}

// The gradient cache: kCacheVecs raw 16-byte vectors a thread, whatever the dtype (with 4: fp32 16 elements,
// fp16/bf16 32, fp64 8). Raw, so that every dtype's code uses the same registers: with one typed array per dtype, the
// branches' shared code (the reductions) kept all of them live at once and spilled.
struct Raw {
  uint32_t w[4];
};

template <typename T>
__device__ __forceinline__ T raw_get(const Raw& r, int j) {  // element j of a vector of 16 / sizeof(T)
  if constexpr (sizeof(T) == 8) {
    return __hiloint2double(static_cast<int>(r.w[2 * j + 1]), static_cast<int>(r.w[2 * j]));
  } else if constexpr (sizeof(T) == 4) {
    return __uint_as_float(r.w[j]);
  } else {
    return T(static_cast<uint16_t>(r.w[j / 2] >> (16 * (j % 2))), T::from_bits());
  }
}

template <typename T>
__device__ __forceinline__ void raw_set(Raw& r, int j, T v) {
  if constexpr (sizeof(T) == 8) {
    const double d = v;
    r.w[2 * j] = static_cast<uint32_t>(__double2loint(d));
    r.w[2 * j + 1] = static_cast<uint32_t>(__double2hiint(d));
  } else if constexpr (sizeof(T) == 4) {
    r.w[j] = __float_as_uint(v);
  } else {
    const uint32_t shift = 16 * (j % 2);
    r.w[j / 2] = (r.w[j / 2] & ~(0xFFFFu << shift)) | (static_cast<uint32_t>(v.x) << shift);
  }
}

// Vector s of this lane: elements [first, first + 16 / sizeof(T)) of the unit, first = (lane + s * nlanes) * W.
// Whole and aligned vectors move as one 16-byte access; others element by element, within the unit.
template <typename T>
__device__ __forceinline__ void raw_load(Raw& r, const T* g, int64_t first, int64_t n, bool aligned) {
  constexpr int W = kVecBytes / sizeof(T);
  if (aligned && first + W <= n) {
    __builtin_assume(__isGlobal(g));
    const uint4 x = *reinterpret_cast<const uint4*>(g + first);
    r.w[0] = x.x, r.w[1] = x.y, r.w[2] = x.z, r.w[3] = x.w;
    return;
  }
  r.w[0] = r.w[1] = r.w[2] = r.w[3] = 0;
FC_UNROLL
  for (int j = 0; j < W; ++j)
    if (first + j < n) raw_set<T>(r, j, g[first + j]);
}

template <typename T>
__device__ __forceinline__ void raw_store(const Raw& r, T* g, int64_t first, int64_t n, bool aligned) {
  constexpr int W = kVecBytes / sizeof(T);
  if (aligned && first + W <= n) {
    __builtin_assume(__isGlobal(g));
    *reinterpret_cast<uint4*>(g + first) = make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]);
    return;
  }
FC_UNROLL
  for (int j = 0; j < W; ++j)
    if (first + j < n) g[first + j] = raw_get<T>(r, j);
}

// Both norms of one unit of dtype T (this lane's part, not yet reduced); the gradient into the cache when cached.
template <NormKind K, typename T, typename acc_t>
__device__ __forceinline__ Norms<K, acc_t> lane_norms(Raw (&cache)[kCacheVecs], const void* wp, const void* gp,
                                                      int64_t n, int lane, int nlanes, bool cached, acc_t pw) {
  constexpr int W = kVecBytes / sizeof(T);
  const T* w = static_cast<const T*>(wp);
  const T* g = static_cast<const T*>(gp);
  Norms<K, acc_t> v;
  v.w = chunk_partial<K, W, false>(w, n, lane, nlanes, pw, acc_t(1)).norm;
  if (!cached) {
    v.g = chunk_partial<K, W, false>(g, n, lane, nlanes, pw, acc_t(1)).norm;
    return v;
  }
  const bool aligned = vector_loadable<T, W>(g);
  acc_t acc = norm_identity<K, acc_t>();
FC_UNROLL
  for (int s = 0; s < kCacheVecs; ++s) {
    const int64_t first = (int64_t(lane) + int64_t(s) * nlanes) * W;
    raw_load<T>(cache[s], g, first, n, aligned);
FC_UNROLL
    for (int j = 0; j < W; ++j)
      if (first + j < n) acc = norm_accumulate<K>(acc, static_cast<acc_t>(raw_get<T>(cache[s], j)), pw);
  }
  v.g = acc;
  return v;
}

template <typename T, typename acc_t>
__device__ __forceinline__ void scale_unit(Raw (&cache)[kCacheVecs], void* gp, int64_t n, int lane, int nlanes,
                                           bool cached, acc_t factor) {
  constexpr int W = kVecBytes / sizeof(T);
  T* g = static_cast<T*>(gp);
  if (!cached) {
    scale_chunk<W>(g, n, lane, nlanes, factor);  // the second read of the unit: from L2
    return;
  }
  const bool aligned = vector_loadable<T, W>(g);
FC_UNROLL
  for (int s = 0; s < kCacheVecs; ++s) {
    const int64_t first = (int64_t(lane) + int64_t(s) * nlanes) * W;
FC_UNROLL
    for (int j = 0; j < W; ++j)
      raw_set<T>(cache[s], j, from_acc<T>(static_cast<acc_t>(raw_get<T>(cache[s], j)) * factor));
    raw_store<T>(cache[s], g, first, n, aligned);
  }
}

// One unit by `nlanes` threads (a warp, or the block), accumulating in acc_t (fp32; fp64 for fp64 pairs).
template <NormKind K, bool Block, typename acc_t>
__device__ __forceinline__ void agc_unit(const void* w, void* g, int64_t n, int64_t dtype, int lane, int nlanes,
                                         double clip, double eps, double p, void* smem) {
  const acc_t pw = static_cast<acc_t>(p);
  const int64_t per_vec = dtype == kFloat64 ? 2 : dtype == kFloat32 ? 4 : 8;
  const bool cached = n <= int64_t(kCacheVecs) * per_vec * nlanes;
  Raw cache[kCacheVecs];
  Norms<K, acc_t> v;
  if constexpr (sizeof(acc_t) == 8) {
    v = lane_norms<K, double>(cache, w, g, n, lane, nlanes, cached, pw);
  } else {
    if (dtype == kFloat32) v = lane_norms<K, float>(cache, w, g, n, lane, nlanes, cached, pw);
    else if (dtype == kFloat16) v = lane_norms<K, c10::Half>(cache, w, g, n, lane, nlanes, cached, pw);
    else v = lane_norms<K, c10::BFloat16>(cache, w, g, n, lane, nlanes, cached, pw);
  }
  if constexpr (Block) v = block_reduce<K>(v, static_cast<Norms<K, acc_t>*>(smem));
  else v = warp_reduce<K>(v);
  const acc_t factor = agc_factor(norm_finish<K>(v.w, pw), norm_finish<K>(v.g, pw), static_cast<acc_t>(clip),
                                  static_cast<acc_t>(eps));
  if (!needs_scaling(factor)) return;
  if constexpr (sizeof(acc_t) == 8) {
    scale_unit<double>(cache, g, n, lane, nlanes, cached, factor);
  } else {
    if (dtype == kFloat32) scale_unit<float>(cache, g, n, lane, nlanes, cached, factor);
    else if (dtype == kFloat16) scale_unit<c10::Half>(cache, g, n, lane, nlanes, cached, factor);
    else scale_unit<c10::BFloat16>(cache, g, n, lane, nlanes, cached, factor);
  }
}

template <NormKind K>
__global__ void __launch_bounds__(kAgcThreads, kAgcMinBlocksPerSm<K>)
    agc_kernel(const int64_t* __restrict__ table, int64_t n_pairs, double clip, double eps, double p) {
  __shared__ Norms<K, double> smem[kWarps + 1];  // (fp32 pairs use it as Norms<K, float>)
  const AgcView t{table, n_pairs};
  const int64_t n_items = t.n_items();
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const int64_t pair = agc_locate(t, item);  // uniform across the block
    const int64_t len = t.len(pair), k = item - t.item_begin(pair), dtype = t.dtype(pair);
    const bool warps = warp_mode(len);
    const int64_t unit = warps ? k * kWarps + threadIdx.x / 32 : k;
    if (unit >= t.rows(pair)) continue;  // the last item of a warp-mode pair may have idle warps (no block sync)
    const int64_t bytes = unit * len * (dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2);
    const void* w = static_cast<const char*>(t.w_ptr(pair)) + bytes;
    void* g = static_cast<char*>(t.g_ptr(pair)) + bytes;
    if (dtype == kFloat64) {
      if (warps) agc_unit<K, false, double>(w, g, len, dtype, threadIdx.x % 32, 32, clip, eps, p, smem);
      else agc_unit<K, true, double>(w, g, len, dtype, threadIdx.x, kAgcThreads, clip, eps, p, smem);
    } else {
      if (warps) agc_unit<K, false, float>(w, g, len, dtype, threadIdx.x % 32, 32, clip, eps, p, smem);
      else agc_unit<K, true, float>(w, g, len, dtype, threadIdx.x, kAgcThreads, clip, eps, p, smem);
    }
  }
}

constexpr const char* kAgcNonDenseUnderCapture =
    "fusedclip.clip_agc_: a weight or gradient is not dense in memory (a strided view), so it cannot be clipped "
    "inside a CUDA graph: each call works on a new dense copy of it. Make them dense before the capture, or clip "
    "outside the graph";

// A weight or gradient whose rows are not blocks of memory is processed through a fresh dense copy at a new
// address on every call, so no table (nor graph) could ever be reused for it: refused under a capture before
// build_agc_table makes the copies, which the capture would otherwise record into the graph ahead of the error
// (issue 25, defect 11; the clip ops' refuse_copies_under_capture). Only tensors build_agc_table would accept
// count: a bad argument still gets build_agc_table's own error.
void refuse_agc_copies_under_capture(at::TensorList weights, at::TensorList grads) {
  bool copies = false;
  for (const at::TensorList list : {weights, grads})
    for (const at::Tensor& t : list)
      copies |= t.defined() && t.layout() == at::kStrided && t.numel() > 0 && !agc_rows_are_blocks(t);
  if (!copies || grads.empty() || !grads[0].defined() || !grads[0].is_cuda()) return;
  TORCH_CHECK(!is_capturing(c10::cuda::getCurrentCUDAStream(grads[0].device().index())), kAgcNonDenseUnderCapture);
}

// Device copies of tables (csrc/cuda/device_table_cache.h, as the clip's): the same parameters step after step
// cost no host-to-device copy, an entry a captured graph has used is never freed, and a table used from
// another stream before its copy is known to be done is waited for.
at::Tensor device_agc_table(const AgcTable& a, const c10::cuda::CUDAStream& stream) {
  static CudaTables ops;
  static DeviceTableCache<CudaTables> cache(8);
  const bool capturing = is_capturing(stream);
  // (refused before the copies already: a backstop)
  TORCH_CHECK(!capturing || (a.g_copies.empty() && a.w_copies.empty()), kAgcNonDenseUnderCapture);
  std::optional<at::Tensor> table = cache.get(ops, a.device.index(), a.table, stream, capturing);
  TORCH_CHECK(table.has_value(),
              "fusedclip.clip_agc_: these parameters were not seen before the CUDA graph capture began; call "
              "clip_agc_ on them once outside the capture first");
  return *table;
}

void agc_cuda(at::TensorList weights, at::TensorList grads, double clip_factor, double eps, double norm_type) {
  norm_kind(norm_type);
  refuse_agc_copies_under_capture(weights, grads);
  const AgcTable a = build_agc_table(weights, grads, &cuda_items);
  for (const at::Tensor& g : a.grads) g.unsafeGetTensorImpl()->bump_version();  // the decision stays on the GPU
  c10::cuda::CUDAGuard guard(a.device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(a.device.index());
  const at::Tensor table = device_agc_table(a, stream);
  const int64_t items = a.view().n_items();
  const int grid = static_cast<int>(std::min<int64_t>(items, 1 << 30));
#ifdef FC_AGC_ONLY_L2  // register experiments: compile one kernel
  const auto dispatch = [](double, auto&& f) { f(std::integral_constant<NormKind, NormKind::L2>{}); };
#else
  const auto dispatch = [](double p, auto&& f) { dispatch_norm_kind(p, f); };
#endif
  dispatch(norm_type, [&](auto kind) {
    agc_kernel<decltype(kind)::value><<<grid, kAgcThreads, 0, stream.stream()>>>(
        table.data_ptr<int64_t>(), a.n, clip_factor, eps, norm_type);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  for (const auto& [original, copy] : a.g_copies) original.copy_(copy);
}

}  // namespace

std::string agc_cuda_launch_info() {
  std::string s = "agc_block_threads=" + std::to_string(kAgcThreads) + ";agc_min_blocks=";
  const char* kinds[] = {"L2", "inf", "-inf", "p"};
  for (int k = 0; k < 4; ++k)
    dispatch_norm_kind(k == 0 ? 2.0 : k == 1 ? INFINITY : k == 2 ? -INFINITY : 3.0, [&](auto kind) {
      s += std::string("agc_kernel<") + kinds[k] + ">=" + std::to_string(kAgcMinBlocksPerSm<decltype(kind)::value>) +
           ",";
    });
  return s;
}

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) { m.impl("agc_", &agc_cuda); }

}  // namespace fusedclip
