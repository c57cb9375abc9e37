// ZClip's rule (Kumar et al., 2025; the rules of the zclip 1.0.0 package), as scalar code the CPU kernel and
// the CUDA kernel both run after the norm: the clipping coefficient from the state, then the next state.
// fusedclip/zclip.py documents the rule; fusedclip/backends/triton/zclip.py has the same in Triton, and
// fusedclip/zclip.py's torch path the same in torch ops.
//
// Every operation is one correctly rounded float64 operation in the order zclip's Python evaluates it, so the
// decisions are those of zclip's Python floats bit for bit: on the device through the _rn intrinsics (nvcc
// would otherwise contract a * b + c into one fma), on the host with -ffp-contract=off (build_config.py).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "common/clip_math.h"

namespace fusedclip {

// The state tensor (float64, on the gradients' device): these slots, then the warm-up buffer.
enum ZSlot : int64_t { kZSteps = 0, kZMean = 1, kZVar = 2, kZSkipped = 3, kZBuffer = 4 };

// The config, passed as a float[] (fusedclip/zclip.py _config): the same order.
enum ZConfigSlot : int64_t {
  kCfgAlpha, kCfgZThresh, kCfgCap, kCfgHasCap, kCfgEps, kCfgWarmup, kCfgPercentile, kCfgClipToMean,
  kCfgClipFactor, kCfgSkipUpdateOnSpike, kCfgSkipSpikes, kCfgSkipNonfinite, kZConfigLen
};

struct ZConfig {
  double alpha, z_thresh, cap, eps, clip_factor;
  int64_t n_warmup;  // >= 1
  bool has_cap, percentile, clip_to_mean, skip_update_on_spike, skip_spikes, skip_nonfinite;
};

inline ZConfig zconfig_from(const double* c) {
  ZConfig z;
  z.alpha = c[kCfgAlpha];
  z.z_thresh = c[kCfgZThresh];
  z.cap = c[kCfgCap];
  z.has_cap = c[kCfgHasCap] != 0.0;
  z.eps = c[kCfgEps];
  z.n_warmup = static_cast<int64_t>(c[kCfgWarmup]);
  z.percentile = c[kCfgPercentile] != 0.0;
  z.clip_to_mean = c[kCfgClipToMean] != 0.0;
  z.clip_factor = c[kCfgClipFactor];
  z.skip_update_on_spike = c[kCfgSkipUpdateOnSpike] != 0.0;
  z.skip_spikes = c[kCfgSkipSpikes] != 0.0;
  z.skip_nonfinite = c[kCfgSkipNonfinite] != 0.0;
  return z;
}

// One rounding per operation, never contracted.
C10_HOST_DEVICE inline double z_add(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
C10_HOST_DEVICE inline double z_sub(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
C10_HOST_DEVICE inline double z_mul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline double z_div(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
C10_HOST_DEVICE inline double z_sqrt(double a) {
#ifdef __CUDA_ARCH__
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// What one step decides from the state it starts from (steps, mean, var) and the norm x (the norm in the
// accumulation dtype, widened to float64).
struct ZDecision {
  bool warmup;     // a warm-up step: the coefficient is torch's clip_grad_norm_ one (zclip calls it)
  bool spike;
  bool nonfinite;  // x is inf or NaN
  bool skip;       // the step is to be skipped (on_spike / on_nonfinite "skip"): nothing is scaled
  double target;   // what the EMA is fed: the threshold on a spike, else x
  double coef;     // after warm-up: limit / (x + 1e-6) when x > limit, else 1
};

C10_HOST_DEVICE inline ZDecision zclip_decide(const ZConfig& c, double steps, double mean, double var, double x) {
  ZDecision d;
  d.warmup = steps < static_cast<double>(c.n_warmup);
  d.nonfinite = !(z_sub(x, x) == 0.0);
  d.spike = false;
  d.target = x;
  d.coef = 1.0;
  if (!d.warmup) {
    const double std_ = z_sqrt(var);
    double threshold;
    if (c.percentile) {
      threshold = z_add(mean, z_mul(c.z_thresh, std_));
      d.spike = x > threshold;
    } else {
      const double z = z_div(z_sub(x, mean), z_add(std_, c.eps));
      d.spike = z > c.z_thresh;
      if (c.clip_to_mean) {
        threshold = mean;
      } else {
        const double eta = z_div(z, c.z_thresh);  // a larger z, a lower threshold
        threshold = z_mul(z_add(mean, z_div(z_mul(c.z_thresh, std_), eta)), c.clip_factor);
      }
    }
    if (d.spike) d.target = threshold;
    // Python's min(target, cap): the cap only when it is smaller (a NaN target stays NaN)
    const double limit = c.has_cap && d.target > c.cap ? c.cap : d.target;
    if (x > limit) d.coef = z_div(limit, z_add(x, 1e-6));
  }
  d.skip = (c.skip_nonfinite && d.nonfinite) || (c.skip_spikes && d.spike);
  return d;
}

// The factor the gradients are multiplied by (1: left alone), in the accumulation dtype. During warm-up
// torch's coefficient as zclip's call of torch.nn.utils.clip_grad_norm_ computes it, in that dtype: there
// `max_norm / (norm + 1e-6)` is Tensor.__rtruediv__, which is (norm + 1e-6).reciprocal() * max_norm.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t zclip_coef(const ZConfig& c, const ZDecision& d, acc_t norm) {
  if (d.skip) return acc_t(1);
  if (d.warmup) {
    if (!c.has_cap) return acc_t(1);
    const acc_t coef = (acc_t(1) / (norm + acc_t(1e-6))) * static_cast<acc_t>(c.cap);
    return coef > acc_t(1) ? acc_t(1) : coef;
  }
  return static_cast<acc_t>(d.coef);
}

// The next state, written by one thread once every reader has read the old one. A skipped non-finite step
// leaves the statistics alone (a NaN would stay in the EMA for good) and counts only as skipped.
C10_HOST_DEVICE inline void zclip_update(const ZConfig& c, double* s, double x, const ZDecision& d) {
  if (d.skip) s[kZSkipped] = z_add(s[kZSkipped], 1.0);
  if (d.skip && d.nonfinite) return;
  const double steps = s[kZSteps];
  double* buf = s + kZBuffer;
  const int64_t n = c.n_warmup;
  if (d.warmup) {
    const int64_t i = static_cast<int64_t>(steps);
    buf[i] = x;
    if (i == n - 1) {  // the warm-up's norms start the EMA: their mean and population variance
      double total = buf[0];
      for (int64_t k = 1; k < n; ++k) total = z_add(total, buf[k]);  // left to right, as Python's sum()
      const double mean = z_div(total, static_cast<double>(n));
      double sq = 0.0;
      for (int64_t k = 0; k < n; ++k) {
        const double dev = z_sub(buf[k], mean);
        sq = k == 0 ? z_mul(dev, dev) : z_add(sq, z_mul(dev, dev));
      }
      s[kZMean] = mean;
      s[kZVar] = z_div(sq, static_cast<double>(n));
    }
  } else if (!(c.skip_update_on_spike && d.spike)) {
    const double a = c.alpha, b = z_sub(1.0, c.alpha);
    const double mean = z_add(z_mul(a, s[kZMean]), z_mul(b, d.target));
    const double dev = z_sub(d.target, mean);  // about the updated mean, as zclip does
    s[kZVar] = z_add(z_mul(a, s[kZVar]), z_mul(b, z_mul(dev, dev)));
    s[kZMean] = mean;
  }
  s[kZSteps] = z_add(steps, 1.0);
}

}  // namespace fusedclip
