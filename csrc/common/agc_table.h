// Adaptive gradient clipping (AGC): the (weight, gradient) pair table both AGC kernels walk, its host-side
// validation, and the per-unit rule (device and host).
//
// A pair's units are its rows (dim 0) when it has more than one dimension, else the whole tensor. Every unit
// is `len` consecutive elements in memory: build_agc_table() uses a tensor as it is when each row is one
// block of memory (contiguous, or dense with dim 0 outermost, as channels_last weights are) and a dense copy
// otherwise (copied back for gradients it wrote).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "common/clip_math.h"

namespace fusedclip {

// The table (one int64 tensor on the device): [w_ptr[n] | g_ptr[n] | rows[n] | len[n] | dtype[n] | item[n + 1]]
// where rows * len is the pair's element count and item the prefix sum of each pair's work items (what a
// kernel's thread, warp or block takes: the kernel's own decomposition, agc_items_fn).
struct AgcView {
  const int64_t* data;
  int64_t n;

  C10_HOST_DEVICE const void* w_ptr(int64_t i) const { return reinterpret_cast<const void*>(data[i]); }
  C10_HOST_DEVICE void* g_ptr(int64_t i) const { return reinterpret_cast<void*>(data[n + i]); }
  C10_HOST_DEVICE int64_t rows(int64_t i) const { return data[2 * n + i]; }
  C10_HOST_DEVICE int64_t len(int64_t i) const { return data[3 * n + i]; }
  C10_HOST_DEVICE int64_t dtype(int64_t i) const { return data[4 * n + i]; }
  C10_HOST_DEVICE int64_t item_begin(int64_t i) const { return data[5 * n + i]; }
  C10_HOST_DEVICE int64_t n_items() const { return data[6 * n]; }
};

constexpr int64_t agc_table_size(int64_t n_pairs) { return 6 * n_pairs + 1; }

// Work items of a pair of `rows` units of `len` elements of `elem_bytes` bytes each.
using agc_items_fn = int64_t (*)(int64_t rows, int64_t len, int64_t elem_bytes);

struct AgcTable {
  std::vector<int64_t> table;
  int64_t n = 0;
  int64_t bytes = 0;  // of weights and gradients together
  at::Device device = at::kCPU;
  std::vector<at::Tensor> grads;                            // as given, for the version counters
  std::vector<std::pair<at::Tensor, at::Tensor>> g_copies;  // (gradient, its dense copy), by pair
  std::vector<int64_t> g_copy_of;                           // pair -> index in g_copies, or -1
  std::vector<at::Tensor> w_copies;                         // kept alive while the kernel reads them

  AgcView view() const { return AgcView{table.data(), n}; }
};

// Checks (one device, same shapes and float dtypes, strided, no empty tensor) and builds the table; raises
// before anything is written. Empty pairs are the Python layer's to drop.
AgcTable build_agc_table(at::TensorList weights, at::TensorList grads, agc_items_fn items);

// Whether build_agc_table uses `t` as it is: each row one block of memory (dense, dim 0 outermost). A tensor
// for which this is false is processed through a dense copy (new memory on every call).
bool agc_rows_are_blocks(const at::Tensor& t);

#ifdef FUSEDCLIP_WITH_CUDA
// "agc_block_threads=...;agc_min_blocks=agc_kernel<L2>=n,...": the AGC kernel's launch configuration.
std::string agc_cuda_launch_info();
#endif

// Pair of item c: the last pair whose first item is <= c (pairs own at least one item each).
C10_HOST_DEVICE inline int64_t agc_locate(const AgcView& t, int64_t c) {
  int64_t lo = 0, hi = t.n;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (t.item_begin(mid) <= c) lo = mid; else hi = mid;
  }
  return lo;
}

// The unit rule, in the accumulation type: max = clip_factor * max(w_norm, eps); the gradient is scaled by
// max / max(g_norm, 1e-6) unless g_norm < max. Returns that factor, or exactly 1 when the unit is left alone.
// A NaN norm fails the comparison, so it gives a NaN factor (as timm's torch.where picks the scaled branch).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t agc_factor(acc_t w_norm, acc_t g_norm, acc_t clip_factor, acc_t eps) {
  const acc_t max_norm = (w_norm < eps ? eps : w_norm) * clip_factor;  // a NaN w_norm stays NaN (as clamp)
  if (g_norm < max_norm) return acc_t(1);
  const acc_t floor = acc_t(1e-6);
  return max_norm / (g_norm < floor ? floor : g_norm);
}

}  // namespace fusedclip
