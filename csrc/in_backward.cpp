// ClipInBackward's hooks in C++, for CPU parameters and the native backend (fusedclip/in_backward.py).
//
// Why: a Python post-accumulate-grad hook costs ~1.2 us a parameter on top of its read, even when it calls one
// compiled function (600 small parameters: +5-7% on a whole training step), and clip_()'s eight small torch ops,
// run right after backward has evicted the interpreter's and the dispatcher's working set from the caches, cost
// ~0.4 ms (measured: ~50 us warm). Here the engine calls the hook without Python, and clip_() is one call.
//
// Where the hook sits: on each parameter's AccumulateGrad node, as a post hook (Node::add_post_hook), which the engine
// runs right after the node has stored the accumulated gradient. Not the tensor's post-accumulate-grad slot: torch
// keeps one per tensor, shared with Python's register_post_accumulate_grad_hook, which would replace ours. The node is
// owned here, so every backward reuses it (torch's DDP does the same); AccumulateGrad counts a post hook's reference
// to the incoming gradient, so the gradient is still taken over without a copy.
//
// What a hook does: bucket k's counter of hooks still to fire drops by one; at zero (its last gradient) the bucket's
// gradients are read with the fused CPU kernel, the unrounded float64 norm squared into partials[k] (the bits of the
// Python hook's total_norm(grads, 2.0, None, float64), n * n). It reads only plain dense CPU gradients in a plain
// thread state (plain_tensor.h); anything else marks the bucket for clip_(), which reads it the Python way. A hook
// never raises into backward.
//
// clip_() (record_hooks_finish): the buckets whose hooks did not all fire, or that got a gradient with no recording
// backward since the last clip_(), are read then, from the gradients as they are; the slots added in their order;
// the norm and the fused optimizer's grad_scale computed with the same float operations as the Python path
// (fusedclip/optimizers.py hand_over_coefficient), so the bits are the same.
//
// Under compiled autograd the engine does not run these hooks (compiled_args registers nothing): every bucket is
// then read by clip_() after backward, the same norm, one more pass; a warning says so once.
#include "in_backward.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <c10/util/SmallVector.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/grad_table.h"
#include "plain_tensor.h"

namespace fusedclip {
namespace {

using NodeRef = decltype(torch::autograd::impl::grad_accumulator(std::declval<const at::Tensor&>()));
constexpr const char* kHandleName = "fusedclip.record_hooks";

// A bucket's state since the last clip_().
enum Status : uint8_t { kUntouched = 0, kRead = 1, kForPython = 2 };

struct Recorder {
  at::Tensor partials;                      // float64, contiguous, CPU: a slot per bucket (also Python's `partials`)
  double* slots = nullptr;
  std::vector<int64_t> first;               // bucket k: members first[k] .. first[k + 1] - 1
  std::vector<NodeRef> nodes;               // each member's AccumulateGrad (owned: one node for every backward)
  std::vector<const at::Tensor*> params;    // each member's parameter: its node's `variable`
  std::vector<uintptr_t> keys;              // each member's hook in its node
  std::unique_ptr<std::atomic<int64_t>[]> left;  // per bucket: hooks still to fire
  std::unique_ptr<std::atomic<uint8_t>[]> status;
  std::atomic<bool> recording{true};
  bool attached = false;
  std::vector<int64_t> hook_reads, clip_reads;  // per bucket, since attached (tests: each bucket read once)

  int64_t n_buckets() const { return static_cast<int64_t>(first.size()) - 1; }
  int64_t size(int64_t k) const { return first[k + 1] - first[k]; }

  // Bucket k's squared norm into its slot, from its gradients as they are now (kRead), or kForPython.
  void read(int64_t k) {
    c10::SmallVector<at::Tensor, 4> grads;  // owned for the read: another thread may replace a gradient meanwhile
    c10::SmallVector<c10::Storage, 4> storages;
    for (int64_t m = first[k]; m < first[k + 1]; ++m) {
      const at::Tensor& g = params[m]->grad();
      if (!g.defined()) continue;
      if (!plain_tensor(g) || !g.is_cpu()) {
        status[k].store(kForPython);
        return;
      }
      grads.push_back(g);
      storages.push_back(g.storage());
    }
    if (grads.empty()) {
      slots[k] = 0.0;
      status[k].store(kRead);
      return;
    }
    if (!plain_thread_state()) {
      status[k].store(kForPython);
      return;
    }
    try {
      const GradTable table = build_table(at::TensorList(grads.data(), grads.size()), "total_norm", Access::kReads);
      const double n = unrounded_norm_cpu(table, 2.0);
      slots[k] = n * n;
      status[k].store(kRead);
    } catch (const std::exception&) {  // e.g. an integer gradient: Python's read raises the error, in clip_()
      status[k].store(kForPython);
    }
  }

  void on_gradient(int64_t k) {
    if (!recording.load(std::memory_order_relaxed)) return;
    if (left[k].fetch_sub(1) != 1) return;
    left[k].store(size(k));
    read(k);
    ++hook_reads[k];
  }

  void detach() {
    if (!attached) return;
    for (size_t m = 0; m < nodes.size(); ++m) nodes[m]->del_post_hook(keys[m]);
    attached = false;
    // the hooks (and their references to this object) are gone; the nodes are released with this object
  }
};

struct RecordHook final : torch::autograd::FunctionPostHook {
  RecordHook(std::shared_ptr<Recorder> r, int64_t k) : recorder(std::move(r)), bucket(k) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    recorder->on_gradient(bucket);
    return outputs;
  }
  // Compiled autograd asks each hook to register itself; this one does not (see the header). Two signatures: the
  // method is non-const in torch 2.6, const in 2.11 and 2.14 (the three this is built and tested against).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) const { warn_compiled(); }
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& /*args*/) { warn_compiled(); }
  static void warn_compiled() {
    TORCH_WARN_ONCE("fusedclip.ClipInBackward: under compiled autograd its hooks do not run; clip_() reads the "
                    "gradients after backward instead (the same norm, one more pass over the gradients)");
  }

  std::shared_ptr<Recorder> recorder;
  int64_t bucket;
};

std::shared_ptr<Recorder>* handle_of(PyObject* o) {
  auto* h = static_cast<std::shared_ptr<Recorder>*>(PyCapsule_GetPointer(o, kHandleName));
  TORCH_CHECK_TYPE(h, "fusedclip: not a record_hooks handle");
  return h;
}

void free_handle(PyObject* capsule) {
  auto* h = static_cast<std::shared_ptr<Recorder>*>(PyCapsule_GetPointer(capsule, kHandleName));
  if (!h) return;
  (*h)->detach();
  delete h;
}

bool as_index(PyObject* o, int64_t* out) {
  if (!PyLong_CheckExact(o)) return false;
  *out = PyLong_AsLongLong(o);
  if (*out == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// The norm's float operations of the Python path, in the accumulation type T: norm = sqrt(sum) rounded to T;
// coef = clamp(max_norm / (norm + 1e-6), max=1) as torch evaluates it (reciprocal(norm + 1e-6) * max_norm, the
// Python scalars rounded to T); grad_scale = reciprocal(coef) rounded to float32.
template <typename T>
std::pair<T, float> norm_and_grad_scale(double sum, double max_norm) {
  const T norm = static_cast<T>(std::sqrt(sum));
  T coef = (T(1) / (norm + static_cast<T>(1e-6))) * static_cast<T>(max_norm);
  coef = coef > T(1) ? T(1) : coef;  // clamp(max=1): NaN stays NaN
  return {norm, static_cast<float>(T(1) / coef)};
}

at::Tensor scalar_of(double v, at::ScalarType dtype) {
  at::Tensor t = at::empty({}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "record_hooks_finish",
                                  [&] { *t.data_ptr<scalar_t>() = static_cast<scalar_t>(v); });
  return t;
}

}  // namespace

// record_hooks(params, ends, partials) -> handle, or None: a hook on each parameter's AccumulateGrad; bucket k is
// params[ends[k - 1]:ends[k]]; partials: float64, contiguous, CPU, one slot per bucket. None (nothing attached) unless
// every parameter is a plain dense CPU leaf that requires grad. The handle's release removes the hooks.
PyObject* record_hooks(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, "record_hooks(params, ends, partials) takes 3 arguments");
  PyObject* params = args[0];
  PyObject* ends = args[1];
  if (!PyList_Check(params) || !PyList_Check(ends) || !THPVariable_CheckExact(args[2])) Py_RETURN_NONE;
  const at::Tensor& partials = THPVariable_Unpack(args[2]);
  const Py_ssize_t n = PyList_GET_SIZE(params), nb = PyList_GET_SIZE(ends);
  if (!plain_tensor(partials) || !partials.is_cpu() || partials.scalar_type() != at::kDouble ||
      !partials.is_contiguous() || partials.numel() != nb)
    Py_RETURN_NONE;
  auto r = std::make_shared<Recorder>();
  r->partials = partials;
  r->slots = partials.data_ptr<double>();
  r->first.push_back(0);
  for (Py_ssize_t k = 0; k < nb; ++k) {
    int64_t end = 0;
    if (!as_index(PyList_GET_ITEM(ends, k), &end) || end <= r->first.back() || end > n) Py_RETURN_NONE;
    r->first.push_back(end);
  }
  if (r->first.back() != n) Py_RETURN_NONE;
  std::vector<torch::autograd::AccumulateGrad*> accs;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(params, i);
    if (!THPVariable_Check(o)) Py_RETURN_NONE;
    const at::Tensor& p = THPVariable_Unpack(o);
    if (!plain_tensor(p) || !p.is_cpu() || !p.requires_grad() || !p.is_leaf()) Py_RETURN_NONE;
    NodeRef node = torch::autograd::impl::grad_accumulator(p);
    auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(node.get());
    if (!acc) Py_RETURN_NONE;
    accs.push_back(acc);
    r->nodes.push_back(std::move(node));
    r->params.push_back(&acc->variable);
  }
  r->hook_reads.assign(nb, 0);
  r->clip_reads.assign(nb, 0);
  r->left.reset(new std::atomic<int64_t>[nb]);
  r->status.reset(new std::atomic<uint8_t>[nb]);
  for (Py_ssize_t k = 0; k < nb; ++k) {
    r->left[k].store(r->size(k));
    r->status[k].store(kUntouched);
  }
  for (Py_ssize_t k = 0; k < nb; ++k)
    for (int64_t m = r->first[k]; m < r->first[k + 1]; ++m)
      r->keys.push_back(accs[m]->add_post_hook(std::make_unique<RecordHook>(r, k)));
  r->attached = true;
  auto* handle = new std::shared_ptr<Recorder>(std::move(r));
  PyObject* capsule = PyCapsule_New(handle, kHandleName, &free_handle);
  if (!capsule) {
    (*handle)->detach();
    delete handle;
  }
  return capsule;
  END_HANDLE_TH_ERRORS
}

// record_hooks_recording(handle, on): whether the hooks read (ClipInBackward.no_record).
PyObject* record_hooks_recording(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2 && PyBool_Check(args[1]), "record_hooks_recording(handle, on: bool)");
  (*handle_of(args[0]))->recording.store(args[1] == Py_True);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// record_hooks_finish(handle, max_norm, into) -> (norm, norm in the accumulation dtype, grad_scale or None), or a list
// of the buckets Python must read first (possibly empty: no gradient at all), after which Python finishes from the
// slots. grad_scale only when `into` and it is not 1. Either way the step's record is consumed: the counters and states reset; the slots zeroed by the tuple's
// path (by Python's otherwise).
PyObject* record_hooks_finish(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3 && PyFloat_CheckExact(args[1]) && PyBool_Check(args[2]),
                   "record_hooks_finish(handle, max_norm: float, into: bool)");
  Recorder& r = **handle_of(args[0]);
  TORCH_CHECK(r.attached, "fusedclip: record_hooks_finish after the hooks were removed");
  const double max_norm = PyFloat_AS_DOUBLE(args[1]);
  const bool into = args[2] == Py_True;
  std::vector<int64_t> for_python;
  bool any_grad = false, any_double = false;
  std::optional<at::ScalarType> promoted;
  for (int64_t k = 0; k < r.n_buckets(); ++k) {
    const bool partial = r.left[k].load() != r.size(k);
    r.left[k].store(r.size(k));
    bool has_grad = false;
    for (int64_t m = r.first[k]; m < r.first[k + 1]; ++m) {
      const at::Tensor& g = r.params[m]->grad();
      if (!g.defined()) continue;
      has_grad = true;
      any_double = any_double || g.scalar_type() == at::kDouble;
      promoted = promoted ? c10::promoteTypes(*promoted, g.scalar_type()) : g.scalar_type();
    }
    any_grad = any_grad || has_grad;
    if (partial || (r.status[k].load() == kUntouched && has_grad)) {  // with the GIL held: clip_()'s read
      r.read(k);
      ++r.clip_reads[k];
    }
    if (r.status[k].load() == kForPython) for_python.push_back(k);
    r.status[k].store(kUntouched);
  }
  if (!for_python.empty() || !any_grad || !promoted || !at::isFloatingType(*promoted)) {
    PyObject* out = PyList_New(static_cast<Py_ssize_t>(for_python.size()));
    if (!out) return nullptr;
    for (size_t i = 0; i < for_python.size(); ++i) PyList_SET_ITEM(out, i, PyLong_FromLongLong(for_python[i]));
    return out;
  }
  double sum = 0.0;  // the slots in their order
  for (int64_t k = 0; k < r.n_buckets(); ++k) {
    sum += r.slots[k];
    r.slots[k] = 0.0;
  }
  double norm = 0.0;
  float grad_scale = 0.0f;
  if (any_double) {
    std::tie(norm, grad_scale) = norm_and_grad_scale<double>(sum, max_norm);
  } else {
    std::tie(norm, grad_scale) = norm_and_grad_scale<float>(sum, max_norm);
  }
  const at::ScalarType acc = any_double ? at::kDouble : at::kFloat;
  at::Tensor acc_norm = scalar_of(norm, acc);
  at::Tensor out_norm = *promoted == acc ? acc_norm : scalar_of(static_cast<float>(norm), *promoted);
  // A grad_scale of exactly 1 divides by 1: nothing to hand over (the coefficient is read on the host here, which is
  // where these tensors live: no device sync). The fused step then skips its division and its store of the gradients.
  PyObject* scale = Py_None;
  if (into && grad_scale != 1.0f) {
    scale = THPVariable_Wrap(scalar_of(grad_scale, at::kFloat));
  } else {
    Py_INCREF(Py_None);
  }
  if (!scale) return nullptr;
  return Py_BuildValue("(NNN)", THPVariable_Wrap(std::move(out_norm)), THPVariable_Wrap(std::move(acc_norm)), scale);
  END_HANDLE_TH_ERRORS
}

// record_hooks_remove(handle): removes the hooks (ClipInBackward.remove); the handle's release does it too.
PyObject* record_hooks_remove(PyObject*, PyObject* handle) {
  HANDLE_TH_ERRORS
  (*handle_of(handle))->detach();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// record_hooks_reads(handle) -> (per bucket, the reads by its hooks; per bucket, the reads by clip_()), since attached.
PyObject* record_hooks_reads(PyObject*, PyObject* handle) {
  HANDLE_TH_ERRORS
  const Recorder& r = **handle_of(handle);
  PyObject* hooks = PyList_New(r.n_buckets());
  PyObject* clips = PyList_New(r.n_buckets());
  if (!hooks || !clips) {
    Py_XDECREF(hooks);
    Py_XDECREF(clips);
    return nullptr;
  }
  for (int64_t k = 0; k < r.n_buckets(); ++k) {
    PyList_SET_ITEM(hooks, k, PyLong_FromLongLong(r.hook_reads[k]));
    PyList_SET_ITEM(clips, k, PyLong_FromLongLong(r.clip_reads[k]));
  }
  return Py_BuildValue("(NN)", hooks, clips);
  END_HANDLE_TH_ERRORS
}

}  // namespace fusedclip
