// The one-launch CUDA clip: a persistent cooperative kernel that
//   1. walks all chunks of all tensors grid-stride, accumulating in registers;
//   2. writes one partial per block and crosses a grid-wide sync;
//   3. has every block reduce all partials in the same fixed order (so every
//      block gets the bit-identical norm and coef, and runs are deterministic);
//   4. scales in place only if coef < 1, walking its chunks in reverse so the
//      data it read last (still in L2) is written first.
// Optional, in the same pass: per-tensor norms (from per-chunk partials, since
// chunks never span tensors) and AMP's unscale + found_inf. ZClip (the zclip_
// op) takes its coefficient from zclip_rule.h instead of max_norm: every block
// reads the state before the grid sync, and block 0 writes the next one after
// it, when no block can still be reading the old one.
// The per-chunk math is clip_math.h, shared with the CPU kernel.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda/device_table_cuda.h"
#include "common/grad_table.h"
#include "common/scale_each.h"

namespace cg = cooperative_groups;

namespace fusedclip {
namespace {

constexpr int kThreads = 512;
constexpr int kGpuVecBytes = 16;  // one 128-bit load per thread per step
constexpr int kWarps = kThreads / 32;

// Blocks per SM the fused kernel is compiled for (__launch_bounds__' second argument, which caps registers at
// 65536 / (kThreads * blocks)). Two 512-thread blocks of the fp32 L2/inf kernels hold 1024 threads and, with
// four 16-byte loads in flight each (FC_UNROLL_LOADS), 64 KB per SM, above the ~40 KB an H100/H200 needs to
// approach its bandwidth. The fp64 kernels and the p-norm kernels (a pow per element: compute-bound) need
// more than 64 registers (they would spill): one block per SM. The launcher sizes the grid from the
// occupancy API for the exact instantiation (coresident_blocks); `python -m fusedclip info --kernels` and
// tests/tooling/test_kernel_info.py check in the built module that each instantiation fits this many blocks
// per SM without spilling.
template <NormKind K, typename acc_t>
constexpr int kMinBlocksPerSm = sizeof(acc_t) == 4 && K != NormKind::P ? 2 : 1;

// Fixed-shape tree over the block's threads: deterministic, and every thread
// gets the result. In double (clip_math.h: widen), as every partial past a thread's share of a chunk.
template <NormKind K, typename acc_t>
__device__ Partial<acc_t> block_reduce(Partial<acc_t> v, Partial<acc_t>* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) smem[threadIdx.x] = partial_combine<K>(smem[threadIdx.x], smem[threadIdx.x + s]);
    __syncthreads();
  }
  const Partial<acc_t> r = smem[0];
  __syncthreads();
  return r;
}

template <typename acc_t>
__device__ void store_norm(void* out, int64_t dtype, acc_t v) {
  switch (dtype) {
    case kFloat32: *static_cast<float*>(out) = static_cast<float>(v); break;
    case kFloat16: *static_cast<c10::Half*>(out) = c10::Half(static_cast<float>(v)); break;
    case kBFloat16: *static_cast<c10::BFloat16*>(out) = c10::BFloat16(static_cast<float>(v)); break;
    default: *static_cast<double*>(out) = static_cast<double>(v); break;
  }
}

template <typename acc_t>
__device__ acc_t load_norm(const void* p, int64_t dtype) {
  switch (dtype) {
    case kFloat32: return static_cast<acc_t>(*static_cast<const float*>(p));
    case kFloat16: return static_cast<acc_t>(static_cast<float>(*static_cast<const c10::Half*>(p)));
    case kBFloat16: return static_cast<acc_t>(static_cast<float>(*static_cast<const c10::BFloat16*>(p)));
    default: return static_cast<acc_t>(*static_cast<const double*>(p));
  }
}

// Each block takes one contiguous range of chunks, so it searches the table once and then steps from chunk to
// chunk (step_to_chunk), instead of a binary search per chunk; with `reversed` it walks the range backwards,
// so the scaling pass starts on the data the norm pass read last (still in L2).
template <typename F>
__device__ void for_my_chunks(const TableView& t, F&& f, bool reversed = false) {
  const int64_t n_chunks = t.n_chunks();
  const int64_t begin = n_chunks * blockIdx.x / gridDim.x;
  const int64_t end = n_chunks * (blockIdx.x + 1) / gridDim.x;
  if (begin >= end) return;
  int64_t tensor = locate_chunk(t, reversed ? end - 1 : begin).tensor;
  for (int64_t i = 0; i < end - begin; ++i) {
    const int64_t c = reversed ? end - 1 - i : begin + i;
    const Chunk ch = step_to_chunk(t, tensor, c);
    with_typed_ptr<kGpuVecBytes>(t.dtype(ch.tensor), t.ptr(ch.tensor),
                                 [&](auto w, auto* p) { f(c, w, p + ch.offset, ch.len); });
  }
}

template <typename acc_t>
__device__ void scale_my_chunks_reversed(const TableView& t, acc_t coef) {
  for_my_chunks(
      t, [&](int64_t, auto w, auto* p, int64_t len) { scale_chunk<decltype(w)::value>(p, len, threadIdx.x, kThreads, coef); },
      /*reversed=*/true);
}

// A fixed butterfly over the warp's lanes: deterministic, and every lane gets the same value.
template <NormKind K, typename acc_t>
__device__ acc_t warp_reduce(acc_t v) {
  for (int s = 16; s > 0; s >>= 1) v = norm_combine<K>(v, __shfl_xor_sync(0xffffffffu, v, s));
  return v;
}

// Per-tensor norms from the chunk partials, a warp per tensor: lane l takes the tensor's chunks l, l + 32, ...
// (a tensor can have thousands of chunks: an embedding's gradient), then the lanes are combined by
// warp_reduce. Deterministic, and independent of the grid size.
template <NormKind K, typename acc_t>
__device__ void per_tensor_norms(const TableView& t, const Partial<double>* chunk_partials, acc_t* out, acc_t pw) {
  const int lane = threadIdx.x % 32;
  const int64_t n_warps = int64_t(gridDim.x) * kWarps;
  for (int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; i < t.n; i += n_warps) {
    const double sum = warp_reduce<K>(reduce_partials<K>(chunk_partials, t.chunk_begin(i), t.chunk_begin(i + 1), lane, 32).norm);
    if (lane == 0) out[i] = t.numel(i) == 0 ? acc_t(0) : static_cast<acc_t>(norm_finish<K>(sum, static_cast<double>(pw)));
  }
}

template <typename acc_t>
struct FusedArgs {
  const int64_t* table;
  int64_t n_tensors;
  Partial<double>* block_partials;  // [grid]
  Partial<double>* chunk_partials;  // [n_chunks] when per-tensor norms are asked for, else null
  acc_t* per_tensor;               // [n_tensors] out, or null
  const float* inv_scale;          // AMP: multiply every element by it first; null: by 1
  float* found_inf;                // AMP: set to 1 when an unscaled element is inf/NaN; or null
  void* norm_out;
  int64_t out_dtype;
  acc_t max_norm;
  acc_t pw;
  bool clip;
  double* zstate;                  // ZClip: the state (zclip_rule.h), or null for max_norm's coefficient
  ZConfig zconfig;
  const void* given_norm;          // ZClip: the norm, already known (no norm pass), or null
  int64_t given_norm_dtype;
  float* coef_out;                 // ZClip: the factor goes here instead of into the grads, or null
};

template <NormKind K, typename acc_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<K, acc_t>) fused_norm_clip_kernel(const FusedArgs<acc_t> a) {
  __shared__ Partial<double> smem[kThreads];
  const TableView t{a.table, a.n_tensors};
  const acc_t mul = a.inv_scale ? static_cast<acc_t>(*a.inv_scale) : acc_t(1);

  // A thread's share of one chunk (32 elements) is summed in acc_t, its chunks in double (clip_math.h: widen).
  Partial<double> acc = partial_identity<K, double>();
  if (!a.given_norm) {
    for_my_chunks(t, [&](int64_t c, auto w, auto* p, int64_t len) {
        // Always with the unscale work (mul is 1 without AMP): free in this memory-bound loop on a GPU.
        Partial<double> part =
            widen(chunk_partial<K, decltype(w)::value, true>(p, len, threadIdx.x, kThreads, a.pw, mul));
        if (a.chunk_partials) {  // per-tensor norms: keep every chunk's partial; thread 0 carries the block's
          part = block_reduce<K>(part, smem);
          if (threadIdx.x == 0) a.chunk_partials[c] = part;
          else part = partial_identity<K, double>();
        }
        acc = partial_combine<K>(acc, part);
      });
  }
  acc = block_reduce<K>(acc, smem);
  if (threadIdx.x == 0) a.block_partials[blockIdx.x] = acc;
  // ZClip's state: read before the sync (block 0 overwrites it after), and only now, so that no register
  // holds it through the loop above
  double z_steps = 0, z_mean = 0, z_var = 0;
  if (a.zstate) {
    z_steps = __ldcg(a.zstate + kZSteps);
    z_mean = __ldcg(a.zstate + kZMean);
    z_var = __ldcg(a.zstate + kZVar);
  }

  cg::this_grid().sync();

  const Partial<double> total =
      block_reduce<K>(reduce_partials<K>(a.block_partials, 0, gridDim.x, threadIdx.x, kThreads), smem);
  // rounded once, from double
  const double wide = a.given_norm   ? static_cast<double>(load_norm<acc_t>(a.given_norm, a.given_norm_dtype))
                      : t.n_chunks() ? norm_finish<K>(total.norm, static_cast<double>(a.pw))
                                     : 0.0;
  const acc_t norm = static_cast<acc_t>(wide);  // rounded once, from double
  acc_t coef = clip_coef(a.max_norm, norm);
  bool set_found_inf = saw_nonfinite(total);
  if (a.zstate) {
    const ZDecision d = zclip_decide(a.zconfig, z_steps, z_mean, z_var, static_cast<double>(norm));
    coef = zclip_coef(a.zconfig, d, norm);
    if (blockIdx.x == 0 && threadIdx.x == 0) zclip_update(a.zconfig, a.zstate, static_cast<double>(norm), d);
    set_found_inf = (a.inv_scale && set_found_inf) || d.skip;  // AMP's, or a skipped step
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    // a float64 result gets the norm unrounded (the sharded paths' partials)
    if (a.out_dtype == kFloat64) store_norm(a.norm_out, a.out_dtype, wide); else store_norm(a.norm_out, a.out_dtype, norm);
    if (a.found_inf && set_found_inf) *a.found_inf = 1.0f;
  }
  if (a.per_tensor) per_tensor_norms<K>(t, a.chunk_partials, a.per_tensor, a.pw);
  const acc_t factor = mul * coef;
  if (a.coef_out) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *a.coef_out = static_cast<float>(factor);
    return;
  }
  if (!a.clip) return;
  if (needs_scaling(factor)) scale_my_chunks_reversed(t, factor);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    scale_by_norm_kernel(const int64_t* __restrict__ table, int64_t n_tensors, const void* norm, int64_t norm_dtype,
                         acc_t max_norm) {
  const acc_t coef = clip_coef(max_norm, load_norm<acc_t>(norm, norm_dtype));
  if (needs_scaling(coef)) scale_my_chunks_reversed(TableView{table, n_tensors}, coef);
}

// scale_each_ (csrc/common/scale_each.h): each chunk times its tensor's coefficient, in the tensor's opmath type; a
// coefficient of exactly 1 skips the chunk (no write). The coefficients stay on the GPU: no sync.
template <typename coef_t>
__global__ void __launch_bounds__(kThreads)
    scale_each_kernel(const int64_t* __restrict__ table, int64_t n_tensors, const coef_t* __restrict__ coefs) {
  const TableView t{table, n_tensors};
  const int64_t n_chunks = t.n_chunks();
  const int64_t begin = n_chunks * blockIdx.x / gridDim.x;
  const int64_t end = n_chunks * (blockIdx.x + 1) / gridDim.x;
  if (begin >= end) return;
  int64_t tensor = locate_chunk(t, end - 1).tensor;  // then stepped backwards: no search per chunk
  for (int64_t i = 0; i < end - begin; ++i) {
    const Chunk ch = step_to_chunk(t, tensor, end - 1 - i);
    // copied out of the chunk before the typed call: a lambda holding the Chunk by reference gave the kernel an
    // 8-byte stack frame (cuobjdump, sm_90)
    const coef_t k = coefs[ch.tensor];
    const int64_t offset = ch.offset, len = ch.len;
    with_typed_ptr<kGpuVecBytes>(t.dtype(ch.tensor), t.ptr(ch.tensor), [=](auto w, auto* p) {
      using T = std::remove_pointer_t<decltype(p)>;
      using op_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
      const op_t factor = static_cast<op_t>(k);
      if (needs_scaling(factor)) scale_chunk<decltype(w)::value>(p + offset, len, threadIdx.x, kThreads, factor);
    });
  }
}

__global__ void __launch_bounds__(kThreads) clamp_kernel(const int64_t* __restrict__ table, int64_t n_tensors,
                                                         double clip_value) {
  for_my_chunks(TableView{table, n_tensors}, [&](int64_t, auto w, auto* p, int64_t len) {
    clamp_chunk<decltype(w)::value>(p, len, threadIdx.x, kThreads, clip_value);
  });
}

// ---- host side ----

int sm_count(int device) {
  static int counts[64] = {0};
  if (!counts[device])
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  return counts[device];
}

// How many blocks of this kernel can be resident at once on the whole device: the most a cooperative launch
// may have. Cached per kernel (instantiations of one template differ in registers) and device.
int coresident_blocks(const void* kernel, int device) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> per_sm;
  std::lock_guard<std::mutex> lock(mu);
  auto it = per_sm.find({kernel, device});
  if (it == per_sm.end()) {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
    TORCH_CHECK(blocks > 0, "fusedclip: a kernel cannot be resident on this GPU (its registers or shared memory)");
    it = per_sm.emplace(std::make_pair(kernel, device), blocks).first;
  }
  return it->second * sm_count(device);
}

constexpr const char* kNonDenseUnderCapture =
    "fusedclip: a gradient is not dense in memory (a strided view), so it cannot be clipped inside a CUDA graph: "
    "each call works on a new dense copy of it. Make the gradients dense before the capture (e.g. p.grad = "
    "p.grad.contiguous()), or clip outside the graph";

// A non-dense gradient is processed through a fresh dense copy at a new address on every call, so no table (nor
// graph) could ever be reused for it: refused under a capture before build_table makes the copies (they would
// be captured into the graph ahead of the error; issue 25, defect 11).
void refuse_copies_under_capture(at::TensorList tensors) {
  bool copies = false;
  for (const at::Tensor& t : tensors)
    copies |= t.defined() && t.layout() == at::kStrided && t.numel() > 0 && !t.is_non_overlapping_and_dense();
  if (!copies || !tensors[0].is_cuda()) return;
  TORCH_CHECK(!is_capturing(c10::cuda::getCurrentCUDAStream(tensors[0].device().index())), kNonDenseUnderCapture);
}

// Device copies of tables (csrc/cuda/device_table_cache.h): an entry a graph has used is never freed, and a table
// used from another stream before its copy is known to be done is waited for.
at::Tensor device_table(const GradTable& g, const c10::cuda::CUDAStream& stream) {
  static CudaTables ops;
  static DeviceTableCache<CudaTables> cache(16);
  const bool capturing = is_capturing(stream);
  TORCH_CHECK(!capturing || g.copies.empty(), kNonDenseUnderCapture);  // (refused before the copies already)
  std::optional<at::Tensor> table = cache.get(ops, g.device.index(), g.table, stream, capturing);
  TORCH_CHECK(table.has_value(),
              "fusedclip: these gradients were not seen before the CUDA graph capture began; call clip_ on "
              "them once outside the capture (a warm-up step) so their table is on the GPU already");
  return *table;
}

struct Launch {
  c10::cuda::CUDAGuard guard;
  c10::cuda::CUDAStream stream;
  at::Tensor table;
  explicit Launch(const GradTable& g)
      : guard(g.device), stream(c10::cuda::getCurrentCUDAStream(g.device.index())), table(device_table(g, stream)) {}
  at::TensorOptions options() const { return at::TensorOptions().device(table.device()); }
  // A grid-stride kernel's grid: one wave of the blocks that fit at once (the occupancy of this kernel), not a
  // fixed 4 per SM (the scale and clamp kernels fit 3 of 512 threads per SM on sm_90: 4 made 1.33 waves).
  int grid(int64_t n_chunks, const void* kernel) const {
    return static_cast<int>(std::min<int64_t>(std::max<int64_t>(n_chunks, 1),
                                              coresident_blocks(kernel, table.device().index())));
  }
};

}  // namespace

at::Tensor norm_and_maybe_clip_cuda(const GradTable& g, double max_norm, double norm_type, bool clip,
                                    at::ScalarType out_dtype, const ClipExtras& x) {
  check_extras(g, x);
  if (!g.n_chunks && !x.zclip) {  // only empty tensors: norm 0, nothing to scale
    norm_kind(norm_type);
    if (x.per_tensor) x.per_tensor->zero_();
    return at::zeros({}, at::TensorOptions().device(g.device).dtype(out_dtype));
  }
  Launch l(g);
  at::Tensor out = at::empty({}, l.options().dtype(out_dtype));
  dispatch_norm_kind(norm_type, [&](auto kind) {
    dispatch_acc(g.any_double, [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const void* kernel = reinterpret_cast<const void*>(fused_norm_clip_kernel<decltype(kind)::value, acc_t>);
      // ZClip with a given norm (or only empty tensors) still launches: its state update is in the kernel.
      const int grid = static_cast<int>(
          std::min<int64_t>(std::max<int64_t>(g.n_chunks, 1), coresident_blocks(kernel, g.device.index())));
      const auto partial_options = l.options().dtype(at::kDouble);
      // Partials are (norm, nonfinite) pairs of double (clip_math.h: widen).
      at::Tensor block_partials = at::empty({2 * grid}, partial_options);
      at::Tensor chunk_partials = x.per_tensor ? at::empty({2 * g.n_chunks}, partial_options) : at::Tensor();
      FusedArgs<acc_t> a{};
      a.table = l.table.data_ptr<int64_t>();
      a.n_tensors = g.n_tensors;
      a.block_partials = reinterpret_cast<Partial<double>*>(block_partials.data_ptr<double>());
      a.chunk_partials = x.per_tensor ? reinterpret_cast<Partial<double>*>(chunk_partials.data_ptr<double>()) : nullptr;
      a.per_tensor = x.per_tensor ? x.per_tensor->data_ptr<acc_t>() : nullptr;
      a.inv_scale = x.inv_scale ? x.inv_scale->data_ptr<float>() : nullptr;
      a.found_inf = x.found_inf ? x.found_inf->data_ptr<float>() : nullptr;
      a.norm_out = out.data_ptr();
      a.out_dtype = dtype_code(out_dtype);
      a.max_norm = static_cast<acc_t>(max_norm);
      a.pw = static_cast<acc_t>(norm_type);
      a.clip = clip;
      a.zstate = x.zclip ? x.zclip->state.data_ptr<double>() : nullptr;
      if (x.zclip) a.zconfig = x.zclip->config;
      a.given_norm = x.zclip && x.zclip->norm ? x.zclip->norm->data_ptr() : nullptr;
      a.given_norm_dtype = x.zclip && x.zclip->norm ? dtype_code(x.zclip->norm->scalar_type()) : 0;
      a.coef_out = x.zclip && x.zclip->coef_out ? x.zclip->coef_out->data_ptr<float>() : nullptr;
      void* args[] = {&a};
      C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(grid),
                                                 dim3(kThreads), args, 0, l.stream.stream()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (clip) g.write_back();
  return out;
}

namespace {

at::Tensor total_norm_cuda(at::TensorList tensors, double norm_type, const std::optional<at::Tensor>& per_tensor,
                           std::optional<at::ScalarType> out_dtype) {
  refuse_copies_under_capture(tensors);
  const GradTable g = build_table(tensors, "total_norm", Access::kReads);
  return norm_and_maybe_clip_cuda(g, 0.0, norm_type, false, checked_norm_dtype(g, out_dtype),
                                  ClipExtras{per_tensor, {}, {}});
}

at::Tensor clip_cuda(at::TensorList grads, double max_norm, double norm_type,
                     const std::optional<at::Tensor>& per_tensor, const std::optional<at::Tensor>& inv_scale,
                     const std::optional<at::Tensor>& found_inf) {
  refuse_copies_under_capture(grads);
  const GradTable g = build_table(grads, "clip_", Access::kWrites);
  return norm_and_maybe_clip_cuda(g, max_norm, norm_type, true, g.result_dtype,
                                  ClipExtras{per_tensor, inv_scale, found_inf});
}

at::Tensor zclip_cuda(at::TensorList grads, at::Tensor& state, at::ArrayRef<double> config,
                      const std::optional<at::Tensor>& norm, const std::optional<at::Tensor>& inv_scale,
                      const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& coef_out) {
  refuse_copies_under_capture(grads);
  const GradTable g = build_table(grads, "ZClip.step", Access::kWrites);
  const ZClipExtras z = zclip_extras(g, state, config, norm, inv_scale.has_value(), coef_out);
  ClipExtras x{std::nullopt, inv_scale, found_inf};
  x.zclip = &z;
  return norm_and_maybe_clip_cuda(g, 0.0, 2.0, true, g.acc_dtype(), x);
}

void scale_cuda(at::TensorList grads, double max_norm, const at::Tensor& total_norm) {
  refuse_copies_under_capture(grads);
  const GradTable g = build_table(grads, "clip_grads_with_norm_", Access::kWrites);
  TORCH_CHECK_VALUE(total_norm.device() == g.device && total_norm.numel() == 1,
                    "fusedclip.clip_grads_with_norm_: total_norm must be a one-element tensor on ", g.device);
  const int64_t norm_code = dtype_code(total_norm.scalar_type());
  if (!g.n_chunks) return;
  Launch l(g);
  const at::Tensor norm = total_norm.contiguous();
  dispatch_acc(g.any_double || total_norm.scalar_type() == at::kDouble, [&](auto acc_zero) {
    using acc_t = decltype(acc_zero);
    scale_by_norm_kernel<acc_t><<<l.grid(g.n_chunks, reinterpret_cast<const void*>(scale_by_norm_kernel<acc_t>)),
                                  kThreads, 0, l.stream.stream()>>>(
        l.table.data_ptr<int64_t>(), g.n_tensors, norm.data_ptr(), norm_code, static_cast<acc_t>(max_norm));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  g.write_back();
}

void scale_each_cuda(at::TensorList grads, const at::Tensor& coefs) {
  refuse_copies_under_capture(grads);
  const GradTable g = build_table(grads, "scale_each_", Access::kWrites);
  check_scale_each(g, coefs);
  if (!g.n_chunks) return;
  Launch l(g);
  const at::Tensor c = coefs.contiguous();
  auto launch = [&](auto* ptr) {
    using coef_t = std::remove_const_t<std::remove_pointer_t<decltype(ptr)>>;
    const void* kernel = reinterpret_cast<const void*>(scale_each_kernel<coef_t>);
    scale_each_kernel<coef_t><<<l.grid(g.n_chunks, kernel), kThreads, 0, l.stream.stream()>>>(
        l.table.data_ptr<int64_t>(), g.n_tensors, ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (c.scalar_type() == at::kDouble) launch(static_cast<const double*>(c.data_ptr<double>()));
  else launch(static_cast<const float*>(c.data_ptr<float>()));
  g.write_back();
}

void clamp_cuda(at::TensorList grads, double clip_value) {
  refuse_copies_under_capture(grads);
  const GradTable g = build_table(grads, "clip_value_", Access::kWrites);
  if (!g.n_chunks) return;
  Launch l(g);
  clamp_kernel<<<l.grid(g.n_chunks, reinterpret_cast<const void*>(clamp_kernel)), kThreads, 0, l.stream.stream()>>>(
      l.table.data_ptr<int64_t>(), g.n_tensors, clip_value);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  g.write_back();
}

std::tuple<at::Tensor, int64_t, bool> table_cuda(at::TensorList tensors) {
  const GradTable g = build_dense_table(tensors);
  c10::cuda::CUDAGuard guard(g.device);
  return {device_table(g, c10::cuda::getCurrentCUDAStream(g.device.index())), g.n_chunks, g.any_double};
}

}  // namespace

std::string cuda_launch_info() {
  std::string s = "cuda_block_threads=" + std::to_string(kThreads) + ";cuda_min_blocks=";
  const char* kinds[] = {"L2", "inf", "-inf", "p"};
  for (int k = 0; k < 4; ++k)
    dispatch_norm_kind(k == 0 ? 2.0 : k == 1 ? INFINITY : k == 2 ? -INFINITY : 3.0, [&](auto kind) {
      s += std::string("fused_norm_clip_kernel<") + kinds[k] + ", float>=" +
           std::to_string(kMinBlocksPerSm<decltype(kind)::value, float>) + ",";
      s += std::string("fused_norm_clip_kernel<") + kinds[k] + ", double>=" +
           std::to_string(kMinBlocksPerSm<decltype(kind)::value, double>) + ",";
    });
  return s;
}

TORCH_LIBRARY_IMPL(fusedclip, CUDA, m) {
  m.impl("table", &table_cuda);
  m.impl("total_norm", &total_norm_cuda);
  m.impl("clip_", &clip_cuda);
  m.impl("scale_", &scale_cuda);
  m.impl("clamp_", &clamp_cuda);
  m.impl("zclip_", &zclip_cuda);
  m.impl("scale_each_", &scale_each_cuda);
}

}  // namespace fusedclip
