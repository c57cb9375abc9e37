// The math of a fused clip, shared by the CPU and the CUDA kernel.
//
// Everything here is __host__ __device__ (C10_HOST_DEVICE): the chunk-to-tensor
// mapping, the per-dtype loads and accumulation, the fixed-order reduction of
// partials and the clip-coefficient rule. The CPU kernel calls these functions
// with one "lane"; the CUDA kernel with one lane per thread. Only the thread
// orchestration and the grid-wide sync are GPU-only (clip_cuda.cu); the host's
// SIMD forms of the scaling loops are cpu_simd.h.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>


// Unroll the fixed-width loops on both compilers (their pragmas differ).
#ifdef __CUDACC__
#define FC_UNROLL _Pragma("unroll")
#else
#define FC_UNROLL _Pragma("GCC unroll 64")
#endif
// The GPU's strided vector loops, unrolled so that each thread has four independent 16-byte loads in flight
// (the loop bound is dynamic; without the pragma nvcc issues one load, waits, accumulates).
#ifdef __CUDA_ARCH__
#define FC_UNROLL_LOADS _Pragma("unroll 4")
#else
#define FC_UNROLL_LOADS
#endif

namespace fusedclip {

// Work is split into chunks of this many elements; a chunk never spans two
// tensors. A multiple of every vector width, so chunk starts keep the
// alignment of their tensor's base pointer.
constexpr int64_t kChunkElems = 16384;

// dtype codes stored in the table
enum DtypeCode : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

enum class NormKind : int { L2 = 0, Inf = 1, NegInf = 2, P = 3 };

// The device-side table (one int64 tensor), built on the host by build_table():
//   [ptr[n] | numel[n] | dtype[n] | chunk_begin[n + 1]]
// chunk_begin is the prefix sum of each tensor's chunk count; its last entry
// is the total number of chunks.
struct TableView {
  const int64_t* data;
  int64_t n;

  C10_HOST_DEVICE void* ptr(int64_t i) const { return reinterpret_cast<void*>(data[i]); }
  C10_HOST_DEVICE int64_t numel(int64_t i) const { return data[n + i]; }
  C10_HOST_DEVICE int64_t dtype(int64_t i) const { return data[2 * n + i]; }
  C10_HOST_DEVICE int64_t chunk_begin(int64_t i) const { return data[3 * n + i]; }
  C10_HOST_DEVICE int64_t n_chunks() const { return data[4 * n]; }
};

constexpr int64_t table_size(int64_t n_tensors) { return 4 * n_tensors + 1; }

// One chunk: which tensor, and which elements of it.
struct Chunk {
  int64_t tensor;
  int64_t offset;  // first element
  int64_t len;
};

// Binary search for the last tensor whose first chunk is <= c. Empty tensors
// own no chunk and share their begin with the next tensor, so "last" skips them.
C10_HOST_DEVICE inline Chunk locate_chunk(const TableView& t, int64_t c) {
  int64_t lo = 0, hi = t.n;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (t.chunk_begin(mid) <= c) lo = mid; else hi = mid;
  }
  const int64_t offset = (c - t.chunk_begin(lo)) * kChunkElems;
  const int64_t left = t.numel(lo) - offset;
  return Chunk{lo, offset, left < kChunkElems ? left : kChunkElems};
}

// Chunk c, given `tensor`, the owner of a chunk next to c: a walk through
// consecutive chunks (either way) moves `tensor` along in O(1) amortized
// instead of searching per chunk (the search misses cache when there are
// thousands of tensors). Empty tensors own no chunk and are stepped over.
C10_HOST_DEVICE inline Chunk step_to_chunk(const TableView& t, int64_t& tensor, int64_t c) {
  while (t.chunk_begin(tensor + 1) <= c) ++tensor;
  while (t.chunk_begin(tensor) > c) --tensor;
  const int64_t offset = (c - t.chunk_begin(tensor)) * kChunkElems;
  const int64_t left = t.numel(tensor) - offset;
  return Chunk{tensor, offset, left < kChunkElems ? left : kChunkElems};
}

// ---- scalar math, in the accumulation type (float, or double for fp64) ----

template <typename acc_t>
C10_HOST_DEVICE inline acc_t fc_sqrt(acc_t x) {
  if constexpr (sizeof(acc_t) == 4) return sqrtf(x); else return sqrt(x);
}
template <typename acc_t>
C10_HOST_DEVICE inline acc_t fc_pow(acc_t x, acc_t y) {
  if constexpr (sizeof(acc_t) == 4) return powf(x, y); else return pow(x, y);
}
template <typename acc_t>
C10_HOST_DEVICE inline acc_t fc_inf() {
  if constexpr (sizeof(acc_t) == 4) return static_cast<acc_t>(HUGE_VALF); else return HUGE_VAL;
}

// max/min that let a NaN win, as torch's norms do (fmax would drop it).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t max_nan(acc_t a, acc_t b) { return (b > a || b != b) ? b : a; }
template <typename acc_t>
C10_HOST_DEVICE inline acc_t min_nan(acc_t a, acc_t b) { return (b < a || b != b) ? b : a; }

template <NormKind K, typename acc_t>
C10_HOST_DEVICE inline acc_t norm_identity() {
  if constexpr (K == NormKind::NegInf) return fc_inf<acc_t>(); else return acc_t(0);
}

template <NormKind K, typename acc_t>
C10_HOST_DEVICE inline acc_t norm_accumulate(acc_t acc, acc_t x, acc_t p) {
  if constexpr (K == NormKind::L2) {
    return acc + x * x;
  } else {
    const acc_t a = x < acc_t(0) ? -x : x;
    if constexpr (K == NormKind::Inf) return max_nan(acc, a);
    else if constexpr (K == NormKind::NegInf) return min_nan(acc, a);
    else return acc + fc_pow(a, p);
  }
}

template <NormKind K, typename acc_t>
C10_HOST_DEVICE inline acc_t norm_combine(acc_t a, acc_t b) {
  if constexpr (K == NormKind::Inf) return max_nan(a, b);
  else if constexpr (K == NormKind::NegInf) return min_nan(a, b);
  else return a + b;
}

template <NormKind K, typename acc_t>
C10_HOST_DEVICE inline acc_t norm_finish(acc_t acc, acc_t p) {
  if constexpr (K == NormKind::L2) return fc_sqrt(acc);
  else if constexpr (K == NormKind::P) return fc_pow(acc, acc_t(1) / p);
  else return acc;
}

// torch's rule: coef = max_norm / (norm + 1e-6), clamped to at most 1.
// A NaN norm gives a NaN coef (clamp keeps NaN), an inf norm gives 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t clip_coef(acc_t max_norm, acc_t norm) {
  const acc_t coef = max_norm / (norm + acc_t(1e-6));
  return coef > acc_t(1) ? acc_t(1) : coef;
}

// Only a factor of exactly 1 leaves the gradients alone; NaN must still spread.
// (The factor is the clip coef, times AMP's inverse scale when unscaling.)
template <typename acc_t>
C10_HOST_DEVICE inline bool needs_scaling(acc_t factor) { return !(factor == acc_t(1)); }

// What a lane, a block or a chunk accumulates: the norm partial, and a detector
// of non-finite values (x * 0 is NaN exactly when x is inf or NaN, so the sum
// stays 0 while every value seen is finite). The detector is what AMP's
// found_inf needs: the norm alone can overflow with finite values.
template <typename acc_t>
struct Partial {
  acc_t norm;
  acc_t nonfinite;
};

template <NormKind K, typename acc_t>
C10_HOST_DEVICE inline Partial<acc_t> partial_identity() {
  return {norm_identity<K, acc_t>(), acc_t(0)};
}

template <NormKind K, typename acc_t>
C10_HOST_DEVICE inline Partial<acc_t> partial_combine(Partial<acc_t> a, Partial<acc_t> b) {
  return {norm_combine<K>(a.norm, b.norm), a.nonfinite + b.nonfinite};
}

template <typename acc_t>
C10_HOST_DEVICE inline bool saw_nonfinite(Partial<acc_t> a) { return a.nonfinite != acc_t(0); }

// Partials are carried and combined in double past what one lane sums itself (a host lane: a run of a few
// dozen elements, cpu_simd.h; a GPU thread: its 32 elements of a chunk): the error of an fp32 sum grows with
// the number of terms, so combining thousands of chunk (tensor, block) partials in fp32 cost tens of ulps on
// long lists (measured, 10,000 tensors: 45.7 ulp, against torch's 6.8), while in double the only error left
// is the short fp32 sums' (the squares' rounding and a few adds) and the final rounding. Free where it
// happens: once per run, chunk or thread, not per element.
template <typename acc_t>
C10_HOST_DEVICE inline Partial<double> widen(Partial<acc_t> a) {
  return {static_cast<double>(a.norm), static_cast<double>(a.nonfinite)};
}

template <typename acc_t>
C10_HOST_DEVICE inline Partial<acc_t> load_partial(const Partial<acc_t>* p) {
#ifdef __CUDA_ARCH__
  return {__ldcg(&p->norm), __ldcg(&p->nonfinite)};  // written by other blocks: skip L1
#else
  return *p;
#endif
}

// The fixed order in which partials are combined: lane l takes partials
// l, l + nlanes, ... in increasing order. With one lane this is a plain
// left-to-right sum; on the GPU the lanes are then combined by a fixed tree.
template <NormKind K, typename acc_t>
C10_HOST_DEVICE inline Partial<acc_t> reduce_partials(const Partial<acc_t>* partials, int64_t begin, int64_t end,
                                                      int64_t lane, int64_t nlanes) {
  Partial<acc_t> acc = partial_identity<K, acc_t>();
  for (int64_t i = begin + lane; i < end; i += nlanes) acc = partial_combine<K>(acc, load_partial(partials + i));
  return acc;
}

// The norm of one tensor from its chunks' (double) partials (chunks never span tensors), rounded once to
// acc_t; an empty tensor has norm 0 whatever the norm type.
template <NormKind K, typename acc_t>
C10_HOST_DEVICE inline acc_t tensor_norm(const TableView& t, const Partial<double>* chunk_partials, int64_t i,
                                         acc_t pw) {
  if (t.numel(i) == 0) return acc_t(0);
  const double sum = reduce_partials<K>(chunk_partials, t.chunk_begin(i), t.chunk_begin(i + 1), 0, 1).norm;
  return static_cast<acc_t>(norm_finish<K>(sum, static_cast<double>(pw)));
}

// W lanes' accumulators to one Partial, combined in fold_t by a fixed tree (lane j with lane j + W/2, ...):
// vector operations on the host, where a chain of W dependent adds per run would cost more than the run.
template <NormKind K, int W, typename fold_t, typename acc_t>
C10_HOST_DEVICE inline Partial<fold_t> fold_lanes(const acc_t (&acc)[W], const acc_t (&nonfinite)[W]) {
  static_assert((W & (W - 1)) == 0, "lanes come in powers of two");
  fold_t a[W], f[W];
FC_UNROLL
  for (int j = 0; j < W; ++j) {
    a[j] = static_cast<fold_t>(acc[j]);
    f[j] = static_cast<fold_t>(nonfinite[j]);
  }
FC_UNROLL
  for (int h = W / 2; h > 0; h /= 2) {
FC_UNROLL
    for (int j = 0; j < h; ++j) {
      a[j] = norm_combine<K>(a[j], a[j + h]);
      f[j] += f[j + h];
    }
  }
  return {a[0], f[0]};
}

// ---- per-dtype element access ----

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

// Vector of W elements. The GPU uses 16-byte aligned vector loads; the host
// loads through memcpy, which is fine at any alignment and vectorizes.
template <typename T, int W>
struct alignas(sizeof(T) * W) Vec { T v[W]; };

template <typename T, int W>
C10_HOST_DEVICE inline bool vector_loadable(const T* p) {
#ifdef __CUDA_ARCH__
  return reinterpret_cast<uintptr_t>(p) % sizeof(Vec<T, W>) == 0;
#else
  (void)p;
  return true;
#endif
}

template <typename T, int W>
C10_HOST_DEVICE inline Vec<T, W> load_vec(const T* p) {
#ifdef __CUDA_ARCH__
  // Pointers come out of the int64 table, so nvcc cannot tell their address space and would issue generic
  // loads (LD.E.128); they always point at global memory (torch's CUDA tensors).
  __builtin_assume(__isGlobal(p));
  return *reinterpret_cast<const Vec<T, W>*>(p);
#else
  Vec<T, W> r;
  std::memcpy(&r, p, sizeof(r));
  return r;
#endif
}

template <typename T, int W>
C10_HOST_DEVICE inline void store_vec(T* p, const Vec<T, W>& x) {
#ifdef __CUDA_ARCH__
  __builtin_assume(__isGlobal(p));
  *reinterpret_cast<Vec<T, W>*>(p) = x;
#else
  std::memcpy(p, &x, sizeof(x));
#endif
}

// W consecutive elements: on the GPU one vector load into registers; on the
// host plain loads, which the compiler vectorizes (a copy into a struct would
// defeat it).
template <typename T, int W>
struct VecRead {
#ifdef __CUDA_ARCH__
  Vec<T, W> x;
  C10_HOST_DEVICE explicit VecRead(const T* p) : x(load_vec<T, W>(p)) {}
  C10_HOST_DEVICE T operator[](int j) const { return x.v[j]; }
#else
  const T* p;
  C10_HOST_DEVICE explicit VecRead(const T* q) : p(q) {}
  C10_HOST_DEVICE T operator[](int j) const { return p[j]; }
#endif
};

// Accumulate one chunk (n elements at p) into W lane-local accumulators. With
// Amp (AMP's unscale), each element is multiplied by mul first and non-finite
// values are counted in the detectors; without, the loop does nothing else.
// This lane takes vectors lane, lane + nlanes, ...; the tail that does not fill
// a vector (or everything, when p is not aligned for vector loads) goes
// element by element into slot 0 (on the host: slots 0, 1, ...).
template <NormKind K, int W, bool Amp, typename T, typename acc_t>
C10_HOST_DEVICE inline void accumulate_chunk(acc_t (&acc)[W], acc_t (&nonfinite)[W], const T* p, int64_t n,
                                             int64_t lane, int64_t nlanes, acc_t pw, acc_t mul) {
  int64_t done = 0;
  if (vector_loadable<T, W>(p)) {
    const int64_t nvec = n / W;
FC_UNROLL_LOADS
    for (int64_t v = lane; v < nvec; v += nlanes) {
      const VecRead<T, W> x(p + v * W);
FC_UNROLL
      for (int j = 0; j < W; ++j) {
        if constexpr (Amp) {
          const acc_t u = static_cast<acc_t>(x[j]) * mul;
          acc[j] = norm_accumulate<K>(acc[j], u, pw);
          nonfinite[j] += u * acc_t(0);
        } else {
          acc[j] = norm_accumulate<K>(acc[j], static_cast<acc_t>(x[j]), pw);
        }
      }
    }
    done = nvec * W;
  }
#ifdef __CUDA_ARCH__
  constexpr bool kSpread = false;  // a dynamic index would put the GPU's accumulators in local memory
#else
  constexpr bool kSpread = true;   // the host's tail goes over the lanes: a handful of elements, no fp32 chain
#endif
  int j = 0;
  for (int64_t i = done + lane; i < n; i += nlanes) {
    const acc_t u = Amp ? static_cast<acc_t>(p[i]) * mul : static_cast<acc_t>(p[i]);
    acc[j] = norm_accumulate<K>(acc[j], u, pw);
    if constexpr (Amp) nonfinite[j] += u * acc_t(0);
    if constexpr (kSpread) j = j + 1 == W ? 0 : j + 1;
  }
}

// One chunk's contribution for this lane, its W lanes folded to a single Partial of fold_t (acc_t, or double
// on the host, where each lane sums only a short run: cpu_simd.h, ChunkLoops::partial).
template <NormKind K, int W, bool Amp, typename T, typename acc_t, typename fold_t = acc_t>
C10_HOST_DEVICE inline Partial<fold_t> chunk_partial(const T* p, int64_t n, int64_t lane, int64_t nlanes, acc_t pw,
                                                     acc_t mul) {
  acc_t acc[W], nonfinite[W];
FC_UNROLL
  for (int j = 0; j < W; ++j) {
    acc[j] = norm_identity<K, acc_t>();
    nonfinite[j] = acc_t(0);
  }
  accumulate_chunk<K, W, Amp>(acc, nonfinite, p, n, lane, nlanes, pw, mul);
  return fold_lanes<K, W, fold_t>(acc, nonfinite);
}

// The host's form of chunk_partial: the lanes sum runs of `run` elements in acc_t, and after each run every
// lane is added into a double lane of its own (a few vector instructions per run); the double lanes are
// folded once at the end. The same order whatever the instruction set.
template <NormKind K, int W, bool Amp, typename T, typename acc_t>
inline Partial<double> chunk_partial_runs(const T* p, int64_t n, int64_t run, acc_t pw, acc_t mul) {
  double wide[W], wide_nf[W];
FC_UNROLL
  for (int j = 0; j < W; ++j) {
    wide[j] = norm_identity<K, double>();
    wide_nf[j] = 0.0;
  }
  for (int64_t s = 0; s < n; s += run) {
    acc_t acc[W], nonfinite[W];
FC_UNROLL
    for (int j = 0; j < W; ++j) {
      acc[j] = norm_identity<K, acc_t>();
      nonfinite[j] = acc_t(0);
    }
    accumulate_chunk<K, W, Amp>(acc, nonfinite, p + s, n - s < run ? n - s : run, 0, 1, pw, mul);
FC_UNROLL
    for (int j = 0; j < W; ++j) {
      wide[j] = norm_combine<K>(wide[j], static_cast<double>(acc[j]));
      wide_nf[j] += static_cast<double>(nonfinite[j]);
    }
  }
  return fold_lanes<K, W, double>(wide, wide_nf);
}

// acc_t -> T. For bf16 the same round-to-nearest-even (NaN -> 0x7FC0) as
// c10::BFloat16(float), written without branches so that host loops vectorize.
template <typename T, typename acc_t>
C10_HOST_DEVICE inline T from_acc(acc_t v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const float f = static_cast<float>(v);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

// Multiply a chunk in place by coef, computed in the accumulation type (the GPU's form; the host walks chunks
// its own way, cpu_simd.h).
template <int W, typename T, typename acc_t>
C10_HOST_DEVICE inline void scale_chunk(T* p, int64_t n, int64_t lane, int64_t nlanes, acc_t coef) {
  int64_t done = 0;
  if (vector_loadable<T, W>(p)) {
    const int64_t nvec = n / W;
FC_UNROLL_LOADS
    for (int64_t v = lane; v < nvec; v += nlanes) {
      Vec<T, W> x = load_vec<T, W>(p + v * W);
FC_UNROLL
      for (int j = 0; j < W; ++j) x.v[j] = from_acc<T>(static_cast<acc_t>(x.v[j]) * coef);
      store_vec<T, W>(p + v * W, x);
    }
    done = nvec * W;
  }
  for (int64_t i = done + lane; i < n; i += nlanes) p[i] = from_acc<T>(static_cast<acc_t>(p[i]) * coef);
}

// clamp(x, -c, c) as torch's clip_grad_value_ does it: clamp_min(-c), then
// clamp_max(c), each letting NaN through, in the element's opmath type.
template <typename op_t>
C10_HOST_DEVICE inline op_t clamp_value(op_t x, op_t c) {
  x = x < -c ? -c : x;
  return x > c ? c : x;
}

template <int W, typename T>
C10_HOST_DEVICE inline void clamp_chunk(T* p, int64_t n, int64_t lane, int64_t nlanes, double clip_value) {
  using op_t = typename AccType<T>::type;
  const op_t c = static_cast<op_t>(clip_value);
  int64_t done = 0;
  if (vector_loadable<T, W>(p)) {
    const int64_t nvec = n / W;
    for (int64_t v = lane; v < nvec; v += nlanes) {
      Vec<T, W> x = load_vec<T, W>(p + v * W);
FC_UNROLL
      for (int j = 0; j < W; ++j) x.v[j] = from_acc<T>(clamp_value(static_cast<op_t>(x.v[j]), c));
      store_vec<T, W>(p + v * W, x);
    }
    done = nvec * W;
  }
  for (int64_t i = done + lane; i < n; i += nlanes)
    p[i] = from_acc<T>(clamp_value(static_cast<op_t>(p[i]), c));
}

// Calls f(std::integral_constant<int, W>, T*) with the chunk's pointer typed by
// its dtype code and the vector width W that makes VecBytes bytes for it.
template <int VecBytes, typename F>
C10_HOST_DEVICE inline void with_typed_ptr(int64_t dtype, void* ptr, F&& f) {
  switch (dtype) {
    case kFloat32: f(std::integral_constant<int, VecBytes / 4>{}, static_cast<float*>(ptr)); break;
    case kFloat16: f(std::integral_constant<int, VecBytes / 2>{}, static_cast<c10::Half*>(ptr)); break;
    case kBFloat16: f(std::integral_constant<int, VecBytes / 2>{}, static_cast<c10::BFloat16*>(ptr)); break;
    default: f(std::integral_constant<int, VecBytes / 8>{}, static_cast<double*>(ptr)); break;
  }
}

}  // namespace fusedclip
