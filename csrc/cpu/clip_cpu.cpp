// The fused CPU kernel: one pass for the norm (a partial per chunk, reduced in
// chunk order, so the result does not depend on the thread count; per-tensor
// norms come from the same partials, since chunks never span tensors), then,
// only when the factor is not 1, one scaling pass. Both passes use threads only
// for work large enough to pay for waking them; the chunk loops are
// cpu_simd.h's, in the instruction set chosen at load time.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cpu/cpu_simd.h"
#include "common/grad_table.h"
#include "common/scale_each.h"

namespace fusedclip {
namespace {

int64_t elem_bytes(int64_t dtype) { return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2; }

// Chunks per range at least (for_each_chunk): one range below 2 * kMinBytesPerThread, so small sets run on the
// calling thread alone.
int64_t chunk_grain(const TableView& t) {
  int64_t bytes = 0;
  for (int64_t i = 0; i < t.n; ++i) bytes += t.numel(i) * elem_bytes(t.dtype(i));
  const int64_t chunks = std::max<int64_t>(t.n_chunks(), 1);
  if (bytes < 2 * kMinBytesPerThread) return chunks;
  const int64_t bytes_per_chunk = std::max<int64_t>(bytes / chunks, 1);
  return std::max<int64_t>(1, (kMinBytesPerThread + bytes_per_chunk - 1) / bytes_per_chunk);
}

// Ranges of chunks (at least chunk_grain each) claimed one at a time from a shared counter, by the calling
// thread and by helpers from torch's inter-op pool (at::launch). The caller waits only for ranges a helper has
// claimed, never for a helper that has not started: on a busy machine (another process on the other core) a
// woken helper waits a time slice to run, and the join of a parallel region (at::parallel_for) waited for it
// whatever its share: a 64 MB fp32 norm took 8.0 ms (median; 1.7 ms on one thread, torch's 2.2 ms; AMD EPYC,
// 2 cores, load 2). Each chunk's result is its own (partials by chunk index), so who runs a range does not
// change any bit. A helper that starts after the last range was claimed touches nothing but the counters (it
// may run after the call returned: they are shared, not on the caller's stack).
struct ChunkQueue {
  std::atomic<int64_t> next{0};  // the next range to claim
  std::atomic<int64_t> done{0};  // chunks finished
};

// f(chunk, its tensor, loops, pointer, length) for every chunk. `reversed` walks the chunks backwards (ranges from the
// end, each backwards), so the scaling pass starts on the chunks the norm pass read last (still in cache).
template <typename F>
void for_each_chunk(const TableView& t, F&& f, bool reversed = false) {
  const int64_t n = t.n_chunks();
  const auto run = [&](int64_t begin, int64_t end) {
    const auto chunk_at = [&](int64_t i) { return reversed ? end - 1 - (i - begin) : i; };
    int64_t tensor = locate_chunk(t, chunk_at(begin)).tensor;  // then stepped: no search per chunk
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = chunk_at(i);
      const Chunk ch = step_to_chunk(t, tensor, c);
      with_typed_ptr<kCpuVecBytes>(t.dtype(ch.tensor), t.ptr(ch.tensor), [&](auto w, auto* p) {
        f(c, ch.tensor, ChunkLoops<decltype(w)::value, std::remove_pointer_t<decltype(p)>>{}, p + ch.offset, ch.len);
      });
    }
  };
  if (n == 0) return;
  const int64_t grain = chunk_grain(t);
  const int64_t ranges = (n + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(at::get_num_threads() - 1, ranges - 1);
  if (helpers <= 0 || at::in_parallel_region()) {
    run(0, n);
    return;
  }
  auto queue = std::make_shared<ChunkQueue>();
  const auto work = [queue, n, grain, ranges, reversed, &run] {
    for (int64_t r = queue->next.fetch_add(1, std::memory_order_relaxed); r < ranges;
         r = queue->next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t b = reversed ? std::max<int64_t>(0, n - (r + 1) * grain) : r * grain;
      const int64_t e = reversed ? n - r * grain : std::min(n, (r + 1) * grain);
      run(b, e);
      queue->done.fetch_add(e - b, std::memory_order_release);  // publishes what run wrote
    }
  };
  for (int64_t i = 0; i < helpers; ++i) at::launch(work);
  work();
  // every range is claimed now; those still running belong to helpers that are running
  while (queue->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Which NaN a sum or product of two NaNs gives depends on the operand order the compiler picked, which
// differs between the ISA variants; so a NaN norm is made the one canonical NaN, and a NaN factor (from a NaN
// norm) is applied as a select: a NaN element keeps its own NaN (quieted), as torch's grad * coef gives on
// x86, and every other element becomes the factor.
template <typename acc_t>
acc_t canonical(acc_t v) { return v != v ? std::numeric_limits<acc_t>::quiet_NaN() : v; }

template <typename T, typename acc_t>
void fill_nan_factor(T* p, int64_t n, acc_t factor) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(p[i]);
    p[i] = from_acc<T>(x != x ? x + acc_t(0) : factor);  // x + 0 quiets a signaling NaN, keeps its payload
  }
}

template <typename acc_t>
void scale_all(const TableView& t, acc_t factor) {
  const CpuIsa isa = cpu_isa();
  if (factor != factor) {
    for_each_chunk(t, [&](int64_t, int64_t, auto, auto* p, int64_t len) { fill_nan_factor(p, len, factor); });
    return;
  }
  for_each_chunk(
      t, [&](int64_t, int64_t, auto loops, auto* p, int64_t len) { loops.scale(isa, p, len, factor); },
      /*reversed=*/true);
}

// The norm (accumulated in fp32, fp64 when any tensor is fp64; partials combined in double) of all tensors, each element multiplied by
// inv_scale first when given; per-tensor norms and found_inf when asked for; and, when clip, the in-place
// scaling by inv_scale * coef unless that is exactly 1. The coef is max_norm's, or with x.zclip ZClip's rule,
// which also advances the state (and, given the norm, there is no norm pass). Returns the norm rounded to
// acc_t, or with `unrounded` as computed in double (the sharded paths' partials: clip_math.h, widen).
template <NormKind K, typename acc_t>
double fused_norm_clip(const GradTable& g, double max_norm, double norm_type, bool clip, const ClipExtras& x,
                       bool unrounded) {
  const TableView t = g.view();
  const acc_t pw = static_cast<acc_t>(norm_type);
  const acc_t mul = x.inv_scale ? static_cast<acc_t>(x.inv_scale->item<float>()) : acc_t(1);
  acc_t norm = 0;
  double wide = 0;
  bool nonfinite = false;
  if (x.zclip && x.zclip->norm) {
    norm = x.zclip->norm->item().to<acc_t>();
    wide = static_cast<double>(norm);
  } else {
    std::vector<Partial<double>> partials(t.n_chunks());  // in double: cpu_simd.h, ChunkLoops::partial
    // The plain norm loop carries no unscale work: on the CPU it would halve the throughput.
    const CpuIsa isa = cpu_isa();
    if (x.inv_scale) {
      for_each_chunk(t, [&](int64_t c, int64_t, auto loops, auto* p, int64_t len) {
        partials[c] = loops.template partial<K, true>(isa, p, len, pw, mul);
      });
    } else {
      for_each_chunk(t, [&](int64_t c, int64_t, auto loops, auto* p, int64_t len) {
        partials[c] = loops.template partial<K, false>(isa, p, len, pw, mul);
      });
    }
    const Partial<double> total = reduce_partials<K>(partials.data(), 0, t.n_chunks(), 0, 1);
    wide = t.n_chunks() ? canonical(norm_finish<K>(total.norm, static_cast<double>(pw))) : 0.0;
    norm = canonical(static_cast<acc_t>(wide));  // rounded once, from double
    nonfinite = saw_nonfinite(total);  // found_inf's rule: an (unscaled) element was inf/NaN
    if (x.per_tensor) {
      acc_t* out = x.per_tensor->data_ptr<acc_t>();
      for (int64_t i = 0; i < t.n; ++i) out[i] = canonical(tensor_norm<K>(t, partials.data(), i, pw));
    }
  }
  acc_t coef = clip_coef(static_cast<acc_t>(max_norm), norm);
  if (x.zclip) {
    double* s = x.zclip->state.data_ptr<double>();
    const ZConfig& c = x.zclip->config;
    const ZDecision d = zclip_decide(c, s[kZSteps], s[kZMean], s[kZVar], static_cast<double>(norm));
    coef = zclip_coef(c, d, norm);
    zclip_update(c, s, static_cast<double>(norm), d);
    nonfinite = (x.inv_scale && nonfinite) || d.skip;  // with ZClip found_inf is AMP's, or a skipped step
  }
  if (x.found_inf && nonfinite) x.found_inf->fill_(1.0);
  if (x.zclip && x.zclip->coef_out) {  // handed to the optimizer instead
    x.zclip->coef_out->fill_(static_cast<double>(mul * coef));
    clip = false;
  }
  if (clip && t.n_chunks()) {
    const acc_t factor = mul * coef;
    if (needs_scaling(factor)) {
      g.bump_versions();
      scale_all(t, factor);
      g.write_back();
    }
  }
  return unrounded ? wide : static_cast<double>(norm);
}

}  // namespace

// Each tensor times its own coefficient (csrc/common/scale_each.h): a chunk's factor is its tensor's, converted to
// the tensor's opmath type; chunks whose factor is exactly 1 are skipped (no write). Chunks walked in
// reverse, as scale_all: the per-tensor norm pass just before read them forwards.
void scale_each_table_cpu(const GradTable& g, const double* coefs) {
  if (!g.n_chunks) return;
  const TableView t = g.view();
  std::vector<double> as_double(t.n);
  std::vector<float> as_float(t.n);
  bool any = false;
  for (int64_t i = 0; i < t.n; ++i) {
    as_double[i] = coefs[i];
    as_float[i] = static_cast<float>(coefs[i]);
    if (t.numel(i) > 0) any |= t.dtype(i) == kFloat64 ? needs_scaling(as_double[i]) : needs_scaling(as_float[i]);
  }
  if (!any) return;
  g.bump_versions();
  const CpuIsa isa = cpu_isa();
  for_each_chunk(
      t,
      [&](int64_t, int64_t i, auto loops, auto* p, int64_t len) {
        using T = std::remove_pointer_t<decltype(p)>;
        using op_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
        const op_t factor = std::is_same_v<op_t, double> ? static_cast<op_t>(as_double[i])
                                                         : static_cast<op_t>(as_float[i]);
        if (!needs_scaling(factor)) return;
        if (factor != factor) return fill_nan_factor(p, len, factor);
        loops.scale(isa, p, len, factor);
      },
      /*reversed=*/true);
  g.write_back();
}

double unrounded_norm_cpu(const GradTable& g, double norm_type) {
  double norm = 0.0;
  dispatch_norm_kind(norm_type, [&](auto kind) {
    dispatch_acc(g.any_double, [&](auto acc_zero) {
      norm = fused_norm_clip<decltype(kind)::value, decltype(acc_zero)>(g, 0.0, norm_type, false, ClipExtras{}, true);
    });
  });
  return norm;
}

at::Tensor norm_and_maybe_clip_cpu(const GradTable& g, double max_norm, double norm_type, bool clip,
                                   at::ScalarType out_dtype, const ClipExtras& x) {
  check_extras(g, x);
  double norm = 0.0;
  dispatch_norm_kind(norm_type, [&](auto kind) {
    dispatch_acc(g.any_double, [&](auto acc_zero) {
      norm = fused_norm_clip<decltype(kind)::value, decltype(acc_zero)>(g, max_norm, norm_type, clip, x,
                                                                        out_dtype == at::kDouble);
    });
  });
  return at::scalar_tensor(norm, at::TensorOptions().dtype(out_dtype));
}

namespace {

at::Tensor total_norm_cpu(at::TensorList tensors, double norm_type, const std::optional<at::Tensor>& per_tensor,
                          std::optional<at::ScalarType> out_dtype) {
  const GradTable g = build_table(tensors, "total_norm", Access::kReads);
  return norm_and_maybe_clip_cpu(g, 0.0, norm_type, false, checked_norm_dtype(g, out_dtype),
                                 ClipExtras{per_tensor, {}, {}});
}

at::Tensor clip_cpu(at::TensorList grads, double max_norm, double norm_type, const std::optional<at::Tensor>& per_tensor,
                    const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf) {
  const GradTable g = build_table(grads, "clip_", Access::kWrites);
  return norm_and_maybe_clip_cpu(g, max_norm, norm_type, true, g.result_dtype,
                                 ClipExtras{per_tensor, inv_scale, found_inf});
}

void scale_cpu(at::TensorList grads, double max_norm, const at::Tensor& total_norm) {
  const GradTable g = build_table(grads, "clip_grads_with_norm_", Access::kWrites);
  TORCH_CHECK_VALUE(total_norm.device() == g.device && total_norm.numel() == 1,
                    "fusedclip.clip_grads_with_norm_: total_norm must be a one-element tensor on ", g.device);
  dtype_code(total_norm.scalar_type());
  dispatch_acc(g.any_double || total_norm.scalar_type() == at::kDouble, [&](auto acc_zero) {
    using acc_t = decltype(acc_zero);
    const acc_t norm = total_norm.item().to<acc_t>();
    const acc_t coef = clip_coef(static_cast<acc_t>(max_norm), norm);
    if (g.n_chunks && needs_scaling(coef)) {
      g.bump_versions();
      scale_all(g.view(), coef);
      g.write_back();
    }
  });
}

void clamp_cpu(at::TensorList grads, double clip_value) {
  const GradTable g = build_table(grads, "clip_value_", Access::kWrites);
  g.bump_versions();
  if (!g.n_chunks) return;
  const CpuIsa isa = cpu_isa();
  for_each_chunk(g.view(),
                 [&](int64_t, int64_t, auto loops, auto* p, int64_t len) { loops.clamp(isa, p, len, clip_value); });
  g.write_back();
}

at::Tensor zclip_cpu(at::TensorList grads, at::Tensor& state, at::ArrayRef<double> config,
                     const std::optional<at::Tensor>& norm, const std::optional<at::Tensor>& inv_scale,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& coef_out) {
  const GradTable g = build_table(grads, "ZClip.step", Access::kWrites);
  const ZClipExtras z = zclip_extras(g, state, config, norm, inv_scale.has_value(), coef_out);
  ClipExtras x{std::nullopt, inv_scale, found_inf};
  x.zclip = &z;
  return norm_and_maybe_clip_cpu(g, 0.0, 2.0, true, g.acc_dtype(), x);
}

void scale_each_cpu(at::TensorList grads, const at::Tensor& coefs) {
  const GradTable g = build_table(grads, "scale_each_", Access::kWrites);
  check_scale_each(g, coefs);
  if (!g.n_chunks) return;
  // The coefficients are in CPU memory: reading them is no sync.
  const at::Tensor c = coefs.to(at::kDouble).contiguous();  // float32 -> double is exact
  scale_each_table_cpu(g, c.data_ptr<double>());
}

std::tuple<at::Tensor, int64_t, bool> table_cpu(at::TensorList tensors) {
  const GradTable g = build_dense_table(tensors);
  at::Tensor t = at::empty({static_cast<int64_t>(g.table.size())}, at::kLong);
  std::copy(g.table.begin(), g.table.end(), t.data_ptr<int64_t>());
  return {t, g.n_chunks, g.any_double};
}

}  // namespace

namespace {

CpuIsa best_cpu_isa() {
#if FC_HAVE_AVX2_VARIANT
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

CpuIsa initial_cpu_isa() {
  const char* env = std::getenv("FUSEDCLIP_CPU_ISA");
  return env && std::string(env) == "baseline" ? CpuIsa::kBaseline : best_cpu_isa();
}

std::atomic<int> current_isa{static_cast<int>(initial_cpu_isa())};

}  // namespace

CpuIsa cpu_isa() { return static_cast<CpuIsa>(current_isa.load(std::memory_order_relaxed)); }

const char* cpu_isa_name(CpuIsa isa) { return isa == CpuIsa::kAvx2 ? "avx2" : "baseline"; }

std::string supported_cpu_isas() {
  return best_cpu_isa() == CpuIsa::kAvx2 ? "baseline,avx2" : "baseline";
}

bool set_cpu_isa(const std::string& name) {
  for (CpuIsa isa : {CpuIsa::kBaseline, CpuIsa::kAvx2}) {
    if (name != cpu_isa_name(isa)) continue;
    if (static_cast<int>(isa) > static_cast<int>(best_cpu_isa())) return false;
    current_isa.store(static_cast<int>(isa));
    return true;
  }
  return false;
}

TORCH_LIBRARY_IMPL(fusedclip, CPU, m) {
  m.impl("table", &table_cpu);
  m.impl("total_norm", &total_norm_cpu);
  m.impl("clip_", &clip_cpu);
  m.impl("scale_", &scale_cpu);
  m.impl("clamp_", &clamp_cpu);
  m.impl("zclip_", &zclip_cpu);
  m.impl("scale_each_", &scale_each_cpu);
}

}  // namespace fusedclip
