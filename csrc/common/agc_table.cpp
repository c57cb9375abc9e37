#include "common/agc_table.h"

#include "common/grad_table.h"

namespace fusedclip {

// Each row one block of `len` elements: dense, and dim 0 the outermost (its stride is the row size).
bool agc_rows_are_blocks(const at::Tensor& t) {
  if (!t.is_non_overlapping_and_dense()) return false;
  if (t.dim() <= 1 || t.size(0) == 1) return true;
  return t.stride(0) == t.numel() / t.size(0);
}

AgcTable build_agc_table(at::TensorList weights, at::TensorList grads, agc_items_fn items) {
  TORCH_CHECK_VALUE(!grads.empty(), "fusedclip.clip_agc_: empty tensor list");
  TORCH_CHECK_VALUE(weights.size() == grads.size(), "fusedclip.clip_agc_: ", weights.size(), " weights but ",
                    grads.size(), " gradients");
  const int64_t n = static_cast<int64_t>(grads.size());
  AgcTable a;
  a.n = n;
  a.device = grads[0].device();
  a.table.resize(agc_table_size(n));
  a.g_copy_of.assign(n, -1);
  a.g_copies.reserve(n);  // pointers into it must stay valid
  int64_t* tb = a.table.data();
  int64_t item = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(w.defined() && g.defined(), "fusedclip.clip_agc_: tensor ", i, " is undefined");
    TORCH_CHECK_NOT_IMPLEMENTED(w.layout() == at::kStrided && g.layout() == at::kStrided, "fusedclip.clip_agc_: ",
                                "pair ", i, " is not strided; only dense weights and gradients are supported");
    TORCH_CHECK_VALUE(w.device() == a.device && g.device() == a.device, "fusedclip.clip_agc_: tensors on several "
                      "devices (", a.device, ", ", w.device(), ", ", g.device(), ")");
    TORCH_CHECK_VALUE(w.sizes() == g.sizes(), "fusedclip.clip_agc_: pair ", i, ": weight of shape ", w.sizes(),
                      " but gradient of shape ", g.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == g.scalar_type(), "fusedclip.clip_agc_: pair ", i, ": weight is ",
                     w.scalar_type(), " but gradient is ", g.scalar_type());
    const int64_t dtype = dtype_code(g.scalar_type());
    const int64_t numel = g.numel();
    TORCH_CHECK_VALUE(numel > 0, "fusedclip.clip_agc_: pair ", i, " is empty (the Python layer drops those)");
    const int64_t rows = g.dim() > 1 ? g.size(0) : 1;
    const at::Tensor* wd = &w;
    if (!agc_rows_are_blocks(w)) {
      a.w_copies.push_back(w.contiguous());
      wd = &a.w_copies.back();
    }
    const at::Tensor* gd = &g;
    if (!agc_rows_are_blocks(g)) {
      a.g_copy_of[i] = static_cast<int64_t>(a.g_copies.size());
      a.g_copies.emplace_back(g, g.contiguous());
      gd = &a.g_copies.back().second;
    }
    tb[i] = reinterpret_cast<int64_t>(wd->data_ptr());
    tb[n + i] = reinterpret_cast<int64_t>(gd->data_ptr());
    tb[2 * n + i] = rows;
    tb[3 * n + i] = numel / rows;
    tb[4 * n + i] = dtype;
    tb[5 * n + i] = item;
    const int64_t elem = g.element_size();
    item += items(rows, numel / rows, elem);
    a.bytes += 2 * numel * elem;
  }
  tb[6 * n] = item;
  a.grads.assign(grads.begin(), grads.end());
  return a;
}

}  // namespace fusedclip
