// Adaptive gradient clipping on the CPU: one parallel pass over work items of whole units (up to kChunkElems
// elements of rows), each unit's weight norm, gradient norm and, when clipped, its scaling done while the
// unit is in cache. A unit larger than a chunk is split into chunk items whose partial norms are combined in
// chunk order afterwards, then the chunks are scaled: the result never depends on the thread count. The
// chunk loops are cpu_simd.h's (the instruction set chosen at load time); the thread rule is the fused
// clip's (clip_cpu.cpp).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/agc_table.h"
#include "cpu/cpu_simd.h"
#include "common/grad_table.h"

namespace fusedclip {
namespace {

int64_t cpu_items(int64_t rows, int64_t len, int64_t) {
  if (len > kChunkElems) return rows * ((len + kChunkElems - 1) / kChunkElems);
  const int64_t per = kChunkElems / len;
  return (rows + per - 1) / per;
}

template <typename acc_t>
acc_t canonical(acc_t v) { return v != v ? std::numeric_limits<acc_t>::quiet_NaN() : v; }

// A NaN factor as a select (see clip_cpu.cpp): a NaN element keeps its own NaN, every other one becomes NaN.
template <typename T, typename acc_t>
void fill_nan(T* p, int64_t n, acc_t factor) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(p[i]);
    p[i] = from_acc<T>(x != x ? x + acc_t(0) : factor);
  }
}

template <NormKind K, typename Loops, typename T, typename acc_t>
acc_t unit_norm(CpuIsa isa, const T* p, int64_t n, acc_t pw) {
  const double sum = Loops::template partial<K, false>(isa, p, n, pw, acc_t(1)).norm;  // summed in double
  return canonical(static_cast<acc_t>(norm_finish<K>(sum, static_cast<double>(pw))));
}

template <typename Loops, typename T, typename acc_t>
void scale_unit(CpuIsa isa, T* g, int64_t n, acc_t factor) {
  if (factor != factor) fill_nan(g, n, factor);
  else Loops::scale(isa, g, n, factor);
}

struct Run {
  const AgcView t;
  double clip, eps, p;
  CpuIsa isa;
  std::vector<double> w_part, g_part;  // split items: their chunk's partial norms (in acc_t, exactly)
  std::vector<double> factor;          // split items: their unit's factor
  std::vector<char> wrote;             // per item
  bool any_split = false;
};

template <NormKind K>
void run_item(Run& r, int64_t pair, int64_t c) {
  const AgcView& t = r.t;
  const int64_t len = t.len(pair), rows = t.rows(pair), k = c - t.item_begin(pair);
  with_typed_ptr<kCpuVecBytes>(t.dtype(pair), t.g_ptr(pair), [&](auto width, auto* g) {
    using T = std::remove_pointer_t<decltype(g)>;
    using acc_t = typename AccType<T>::type;
    using Loops = ChunkLoops<decltype(width)::value, T>;
    const T* w = static_cast<const T*>(t.w_ptr(pair));
    const acc_t pw = static_cast<acc_t>(r.p);
    if (len > kChunkElems) {  // one chunk of a split unit: partials only
      const int64_t per_unit = (len + kChunkElems - 1) / kChunkElems;
      const int64_t off = (k / per_unit) * len + (k % per_unit) * kChunkElems;
      const int64_t n = std::min(kChunkElems, len - (k % per_unit) * kChunkElems);
      r.w_part[c] = Loops::template partial<K, false>(r.isa, w + off, n, pw, acc_t(1)).norm;
      r.g_part[c] = Loops::template partial<K, false>(r.isa, g + off, n, pw, acc_t(1)).norm;
      return;
    }
    const int64_t per = kChunkElems / len;
    const int64_t end = std::min(rows, (k + 1) * per);
    const acc_t clip = static_cast<acc_t>(r.clip), eps = static_cast<acc_t>(r.eps);
    for (int64_t u = k * per; u < end; ++u) {
      const int64_t off = u * len;
      const acc_t f = agc_factor(unit_norm<K, Loops>(r.isa, w + off, len, pw),
                                 unit_norm<K, Loops>(r.isa, g + off, len, pw), clip, eps);
      if (!needs_scaling(f)) continue;
      scale_unit<Loops>(r.isa, g + off, len, f);
      r.wrote[c] = 1;
    }
  });
}

// Split units: their chunks' partials combined in chunk order, the unit's factor for each of its items.
template <NormKind K>
void finish_split(Run& r) {
  const AgcView& t = r.t;
  for (int64_t i = 0; i < t.n; ++i) {
    const int64_t len = t.len(i);
    if (len <= kChunkElems) continue;
    const int64_t per_unit = (len + kChunkElems - 1) / kChunkElems;
    dispatch_acc(t.dtype(i) == kFloat64, [&](auto zero) {
      using acc_t = decltype(zero);
      const acc_t pw = static_cast<acc_t>(r.p);
      for (int64_t u = 0; u < t.rows(i); ++u) {
        const int64_t first = t.item_begin(i) + u * per_unit;
        acc_t wa = norm_identity<K, acc_t>(), ga = norm_identity<K, acc_t>();
        for (int64_t c = first; c < first + per_unit; ++c) {
          wa = norm_combine<K>(wa, static_cast<acc_t>(r.w_part[c]));
          ga = norm_combine<K>(ga, static_cast<acc_t>(r.g_part[c]));
        }
        const acc_t f = agc_factor(canonical(norm_finish<K>(wa, pw)), canonical(norm_finish<K>(ga, pw)),
                                   static_cast<acc_t>(r.clip), static_cast<acc_t>(r.eps));
        for (int64_t c = first; c < first + per_unit; ++c) r.factor[c] = static_cast<double>(f);
      }
    });
  }
}

void scale_split_item(Run& r, int64_t pair, int64_t c) {
  const AgcView& t = r.t;
  const int64_t len = t.len(pair), k = c - t.item_begin(pair);
  with_typed_ptr<kCpuVecBytes>(t.dtype(pair), t.g_ptr(pair), [&](auto width, auto* g) {
    using T = std::remove_pointer_t<decltype(g)>;
    using acc_t = typename AccType<T>::type;
    using Loops = ChunkLoops<decltype(width)::value, T>;
    const acc_t f = static_cast<acc_t>(r.factor[c]);
    if (!needs_scaling(f)) return;
    const int64_t per_unit = (len + kChunkElems - 1) / kChunkElems;
    const int64_t off = (k / per_unit) * len + (k % per_unit) * kChunkElems;
    scale_unit<Loops>(r.isa, g + off, std::min(kChunkElems, len - (k % per_unit) * kChunkElems), f);
    r.wrote[c] = 1;
  });
}

// Each thread takes a contiguous range of items; one thread below 2 * kMinBytesPerThread in all.
template <typename F>
void for_each_item(const Run& r, int64_t bytes, F&& f) {
  const int64_t items = r.t.n_items();
  const int64_t grain = bytes < 2 * kMinBytesPerThread
                            ? items
                            : std::max<int64_t>(1, kMinBytesPerThread / std::max<int64_t>(bytes / items, 1));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    int64_t pair = agc_locate(r.t, begin);
    for (int64_t c = begin; c < end; ++c) {
      while (r.t.item_begin(pair + 1) <= c) ++pair;
      f(pair, c);
    }
  });
}

void agc_cpu(at::TensorList weights, at::TensorList grads, double clip_factor, double eps, double norm_type) {
  norm_kind(norm_type);  // raises on NaN and 0 before anything is built
  const AgcTable a = build_agc_table(weights, grads, &cpu_items);
  Run r{a.view(), clip_factor, eps, norm_type, cpu_isa(), {}, {}, {}, {}, false};
  const int64_t items = r.t.n_items();
  r.wrote.assign(items, 0);
  for (int64_t i = 0; i < a.n; ++i) r.any_split |= r.t.len(i) > kChunkElems;
  if (r.any_split) {
    r.w_part.assign(items, 0.0);
    r.g_part.assign(items, 0.0);
    r.factor.assign(items, 1.0);
  }
  dispatch_norm_kind(norm_type, [&](auto k) {
    constexpr NormKind K = decltype(k)::value;
    for_each_item(r, a.bytes, [&](int64_t pair, int64_t c) { run_item<K>(r, pair, c); });
    if (r.any_split) {
      finish_split<K>(r);
      for_each_item(r, a.bytes, [&](int64_t pair, int64_t c) {
        if (r.t.len(pair) > kChunkElems) scale_split_item(r, pair, c);
      });
    }
  });
  for (int64_t i = 0; i < a.n; ++i) {
    const bool wrote = std::any_of(r.wrote.begin() + r.t.item_begin(i), r.wrote.begin() + r.t.item_begin(i + 1),
                                   [](char x) { return x != 0; });
    if (!wrote) continue;
    a.grads[i].unsafeGetTensorImpl()->bump_version();
    if (a.g_copy_of[i] >= 0) {
      const auto& [original, copy] = a.g_copies[a.g_copy_of[i]];
      original.copy_(copy);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) { m.impl("agc_", &agc_cpu); }

}  // namespace fusedclip
