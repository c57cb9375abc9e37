// The Python module fusedclip._C. Importing it loads this library, and with it
// the operator registrations (ops.cpp, clip_cpu.cpp, clip_cuda.cu). Its
// functions are the eager fast path of fusedclip.clip_, get_total_norm and
// ZClip.step.
//
// Why a fast path: for thousands of small tensors, handing the dispatcher a
// Python list costs more than the kernel. Every tensor of the converted list
// holds a reference that, on a tensor with a Python object, also references
// that object, and the list is dropped with the GIL released, so each
// tensor re-takes the GIL (~0.3 us a tensor, measured). Here the tensors are
// read straight out of the Python objects with the GIL held.
//
// What it holds: the kernel runs with the GIL released, and meanwhile another
// thread may replace a gradient (p.grad = new, which frees the old tensor) or
// its storage (p.grad.data = new). So every tensor the kernel or the
// bookkeeping touches after the GIL is released is owned for the whole call:
// a reference (an at::Tensor copy) to each gradient, for its TensorImpl (the
// version counter bumped after the kernel writes: GradTable::to_bump), and one
// to each gradient's storage, for the memory the kernel reads and writes
// (p.grad.data = new swaps the storage of a tensor we hold; torch's own ops do
// not guard against that, so the op path does not either); ZClip's state and
// found_inf likewise. Taken in the loop that reads the gradients, the two cost
// what the storages alone did (measured: 2,000 and 10,000 tensors). The
// numbers of such a race are racy; the memory is sound. All of them are taken with the GIL held and dropped only after it
// is taken back (they are declared before the gil_scoped_release, so they are
// destroyed after it, on the exception path too): dropping the last C++
// reference to a tensor with a Python object decrefs that object, which
// without the GIL means taking it (the ~0.3 us above).
//
// It takes only calls that the ops would run the same way: plain dense CPU or
// CUDA tensors (no subclass, functorch or functionalization wrapper, no
// inference tensor), no dispatch or torch-function mode active, one device,
// valid dtypes. For anything else it returns None having touched nothing, and
// the caller takes the op path, which handles the rest and raises the errors.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <optional>
#include <vector>

#include "cpu_simd.h"
#include "grad_table.h"
#include "scale_each.h"

namespace fusedclip {
namespace {

// Keys by which a tensor, or the thread, asks to see every operator call.
const c10::DispatchKeySet kInterposingKeys({
    c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::Functionalize,
    c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
    c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode,
    c10::DispatchKey::BatchedNestedTensor, c10::DispatchKey::Conjugate, c10::DispatchKey::Negative,
    c10::DispatchKey::ZeroTensor});

bool plain_thread_state() {
  return !c10::impl::tls_local_dispatch_key_set().included_.has_any(kInterposingKeys) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !at::impl::torch_function_mode_enabled();
}

bool has_fused_kernel(c10::DeviceType type) {
#ifdef FUSEDCLIP_WITH_CUDA
  if (type == c10::DeviceType::CUDA) return true;
#endif
  return type == c10::DeviceType::CPU;
}

// A tensor the kernels read and write in place exactly as the op would.
bool plain_tensor(const at::Tensor& t) {
  return t.layout() == at::kStrided && has_fused_kernel(t.device().type()) && !t.is_nested() &&
         !t.key_set().has_any(kInterposingKeys) && !t.is_inference() &&
         (t.numel() == 0 || t.is_non_overlapping_and_dense());
}

// A Python float or int, as the op's `float` arguments take them; anything else
// (a tensor, a string such as 'inf') goes the Python way.
bool as_double(PyObject* o, double* out) {
  if (PyFloat_CheckExact(o)) {
    *out = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (PyLong_CheckExact(o)) {
    *out = PyLong_AsDouble(o);
    if (*out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

// ZClip's arguments (the zclip_ op's): the state tensor, the config (a list of floats), found_inf or None.
struct ZClipArgs {
  PyObject* state;
  PyObject* config;
  PyObject* found_inf;
};

// A plain tensor argument (THPVariable_CheckExact and plain_tensor), or null.
const at::Tensor* plain_arg(PyObject* o) {
  if (!THPVariable_CheckExact(o)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  return plain_tensor(t) ? &t : nullptr;
}

// The fused norm (and clip) of `items` (a list or tuple): of each item's .grad
// when of_grads (None grads skipped), else of the items. The norm in the
// promotion of the tensors' dtypes (with ZClip: the accumulation dtype), or
// None when the op path must run. With zargs, ZClip's rule (the L2 norm).
PyObject* fused_norm(PyObject* items, bool of_grads, PyObject* max_norm_obj, PyObject* norm_type_obj, bool clip,
                     const ZClipArgs* zargs = nullptr) {
  double max_norm = 0.0, norm_type = 2.0;
  // norm_type 0 is Python's (it counts tensors, as torch does).
  if ((!PyList_Check(items) && !PyTuple_Check(items)) || (!zargs && !as_double(norm_type_obj, &norm_type)) ||
      norm_type == 0.0 || std::isnan(norm_type) || (clip && !zargs && !as_double(max_norm_obj, &max_norm)) ||
      !plain_thread_state())
    Py_RETURN_NONE;
  // Everything below that the kernel or the bookkeeping uses is owned here (see the header). Declared before
  // the GIL is released, so destroyed after it is taken back, whichever way this function leaves.
  std::vector<at::Tensor> tensors;
  std::vector<c10::Storage> storages;
  std::optional<at::Tensor> zstate;
  std::optional<at::Tensor> found_inf;
  std::vector<double> zconfig;
  if (zargs) {
    const at::Tensor* s = plain_arg(zargs->state);
    if (!PyList_CheckExact(zargs->config) || !s) Py_RETURN_NONE;
    zstate = *s;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(zargs->config); ++i) {
      double v;
      if (!as_double(PyList_GET_ITEM(zargs->config, i), &v)) Py_RETURN_NONE;
      zconfig.push_back(v);
    }
    if (zargs->found_inf != Py_None) {
      const at::Tensor* f = plain_arg(zargs->found_inf);
      if (!f) Py_RETURN_NONE;
      found_inf = *f;
    }
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  PyObject** objects = PySequence_Fast_ITEMS(items);
  tensors.reserve(n);
  storages.reserve(n + 2);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(objects[i])) Py_RETURN_NONE;  // subclasses may override .grad or ops
    const at::Tensor& item = THPVariable_Unpack(objects[i]);
    const at::Tensor& t = of_grads ? item.grad() : item;
    if (of_grads && !t.defined()) continue;
    if (!t.defined() || !plain_tensor(t)) Py_RETURN_NONE;
    // a non-dense CUDA gradient (a dense copy each call): the op path, which refuses it under a CUDA-graph
    // capture before making the copy (csrc/clip_cuda.cu refuse_copies_under_capture)
    if (t.is_cuda() && t.numel() > 0 && !t.is_non_overlapping_and_dense()) Py_RETURN_NONE;
    tensors.push_back(t);
    storages.push_back(t.storage());  // the memory the table will point at (built below, the GIL still held)
  }
  if (tensors.empty()) Py_RETURN_NONE;
  GradTable g;
  std::optional<ZClipExtras> z;
  ClipExtras extras;
  try {
    // ZClip's checks come after the table: it is built as read-only and marked as written once they pass, so
    // a call declined here (the op path then runs and bumps the version counters itself) bumps them once,
    // not twice (CUDA tables bump them when built as written: issue 25, defect 11).
    g = build_table(tensors, clip ? "clip_" : "total_norm", clip && !zargs ? Access::kWrites : Access::kReads);
    if (zargs) {
      z = zclip_extras(g, *zstate, zconfig, std::nullopt, false);
      extras.found_inf = found_inf;
      extras.zclip = &*z;
      check_extras(g, extras);
    }
  } catch (const c10::Error&) {  // several devices, an integer tensor, a state elsewhere...: the op path explains
    Py_RETURN_NONE;
  }
  if (zargs && clip) {  // what Access::kWrites does in build_table
    if (g.device.is_cpu()) {
      g.to_bump.reserve(tensors.size());
      for (const at::Tensor& t : tensors) g.to_bump.push_back(t.unsafeGetTensorImpl());
    } else {
      for (const at::Tensor& t : tensors) t.unsafeGetTensorImpl()->bump_version();
    }
  }
  const at::ScalarType out_dtype = zargs ? g.acc_dtype() : g.result_dtype;
  if (zstate) storages.push_back(zstate->storage());
  if (found_inf) storages.push_back(found_inf->storage());
  RECORD_FUNCTION(zargs ? "fusedclip::zclip_" : clip ? "fusedclip::clip_" : "fusedclip::total_norm",
                  std::vector<c10::IValue>());
  at::Tensor norm;
  {
    pybind11::gil_scoped_release no_gil;
#ifdef FUSEDCLIP_WITH_CUDA
    if (g.device.is_cuda())
      norm = norm_and_maybe_clip_cuda(g, max_norm, norm_type, clip, out_dtype, extras);
    else
#endif
      norm = norm_and_maybe_clip_cpu(g, max_norm, norm_type, clip, out_dtype, extras);
  }
  return THPVariable_Wrap(std::move(norm));
}

PyObject* clip_grads(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, "clip_grads(params, max_norm, norm_type) takes 3 arguments");
  return fused_norm(args[0], /*of_grads=*/true, args[1], args[2], /*clip=*/true);
  END_HANDLE_TH_ERRORS
}

PyObject* total_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2, "total_norm(tensors, norm_type) takes 2 arguments");
  return fused_norm(args[0], /*of_grads=*/false, nullptr, args[1], /*clip=*/false);
  END_HANDLE_TH_ERRORS
}

PyObject* zclip_grads(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 4, "zclip_grads(params, state, config, found_inf) takes 4 arguments");
  const ZClipArgs z{args[1], args[2], args[3]};
  return fused_norm(args[0], /*of_grads=*/true, nullptr, nullptr, /*clip=*/true, &z);
  END_HANDLE_TH_ERRORS
}

// The sharded paths' two passes over a rank's local tensors (fusedclip/distributed.py: DTensors' local shards,
// thousands of them under FSDP2), with the collective between them in Python: the ops' device kernels called from
// here (redispatched to the tensors' backend key: the dispatcher does not walk every tensor's key set again, an
// extra pass of cache misses over scattered TensorImpls, measured ~0.1 us a tensor at 20,000) on the tensors read
// out of the list with the GIL held, for the reason at the top. As in the plain fast path, no autograd or
// ADInplaceOrView kernel runs (the kernels bump the version counters they write). Each returns None, having
// touched nothing, for anything the op path must handle (not plain tensors on one device, an active mode).
bool read_plain(PyObject* items, std::vector<at::Tensor>& tensors, std::vector<c10::Storage>& storages) {
  if ((!PyList_Check(items) && !PyTuple_Check(items)) || !plain_thread_state()) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  if (n == 0) return false;
  PyObject** objects = PySequence_Fast_ITEMS(items);
  tensors.reserve(n);
  storages.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(objects[i])) return false;
    const at::Tensor& t = THPVariable_Unpack(objects[i]);
    if (!plain_tensor(t) || (!tensors.empty() && t.device() != tensors.front().device())) return false;
    tensors.push_back(t);
    storages.push_back(t.storage());
  }
  return true;
}

c10::DispatchKeySet backend_keys(const at::Tensor& t) {
  return c10::DispatchKeySet(c10::computeDispatchKey(std::nullopt, t.layout(), t.device()));
}

// local_norm(tensors, norm_type): the op total_norm(tensors, norm_type, None, float64): the norm unrounded.
PyObject* local_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2, "local_norm(tensors, norm_type) takes 2 arguments");
  double norm_type = 2.0;
  std::vector<at::Tensor> tensors;
  std::vector<c10::Storage> storages;
  if (!as_double(args[1], &norm_type) || norm_type == 0.0 || std::isnan(norm_type) ||
      !read_plain(args[0], tensors, storages))
    Py_RETURN_NONE;  // norm_type 0 counts tensors: Python's
  static auto op = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("fusedclip::total_norm", "")
                        .typed<at::Tensor(at::TensorList, double, const std::optional<at::Tensor>&,
                                          std::optional<at::ScalarType>)>();
  at::Tensor norm;
  {
    pybind11::gil_scoped_release no_gil;
    norm = op.redispatch(backend_keys(tensors.front()), tensors, norm_type, std::nullopt, at::kDouble);
  }
  return THPVariable_Wrap(std::move(norm));
  END_HANDLE_TH_ERRORS
}

// scale_local(tensors, max_norm, total_norm): the op scale_(tensors, max_norm, total_norm); True, or None.
PyObject* scale_local(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, "scale_local(tensors, max_norm, total_norm) takes 3 arguments");
  double max_norm = 0.0;
  std::vector<at::Tensor> tensors;
  std::vector<c10::Storage> storages;
  const at::Tensor* norm = plain_arg(args[2]);
  if (!norm || !as_double(args[1], &max_norm) || !read_plain(args[0], tensors, storages)) Py_RETURN_NONE;
  const at::Tensor total = *norm;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedclip::scale_", "")
                       .typed<void(at::TensorList, double, const at::Tensor&)>();
  {
    pybind11::gil_scoped_release no_gil;
    op.redispatch(backend_keys(tensors.front()), tensors, max_norm, total);
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// adagc_grads(params, gamma, [lambda_rel, beta, eps]): fusedclip.AdaGC.step past its warm-up on the CPU, in one
// call: the per-tensor norms (the fused pass), AdaGC's rule for each tensor in double -- the same operations in
// the same order as AdaGC._rule's float64 tensor ops, so the same bits -- with gamma (float64, one per parameter,
// CPU: reading it is no sync) updated in place, then each gradient scaled by its coefficient rounded to the
// accumulation dtype (scale_each_table_cpu, which skips the tensors whose coefficient is 1). For many small tensors
// the Python path's per-tensor work (the list, the checks, a dozen small ops) cost ~10x the kernels. Returns the
// total norm in the accumulation dtype, or None (touching nothing) for what the Python path must handle: not plain
// CPU tensors, a gamma that is not a contiguous float64 CPU tensor of one value per parameter, an active mode.
PyObject* adagc_grads(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, "adagc_grads(params, gamma, config) takes 3 arguments");
  PyObject* items = args[0];
  const at::Tensor* gamma_arg = plain_arg(args[1]);
  double cfg[3];
  if ((!PyList_Check(items) && !PyTuple_Check(items)) || !gamma_arg || !PyList_CheckExact(args[2]) ||
      PyList_GET_SIZE(args[2]) != 3 || !plain_thread_state())
    Py_RETURN_NONE;
  for (int i = 0; i < 3; ++i)
    if (!as_double(PyList_GET_ITEM(args[2], i), &cfg[i])) Py_RETURN_NONE;
  const double lambda_rel = cfg[0], beta = cfg[1], eps = cfg[2];
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  const at::Tensor gamma = *gamma_arg;  // owned (see the header), as everything below
  if (!gamma.is_cpu() || gamma.scalar_type() != at::kDouble || !gamma.is_contiguous() || gamma.numel() != n)
    Py_RETURN_NONE;
  std::vector<at::Tensor> tensors;
  std::vector<c10::Storage> storages;
  std::vector<int64_t> slots;
  PyObject** objects = PySequence_Fast_ITEMS(items);
  tensors.reserve(n);
  storages.reserve(n + 1);
  slots.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(objects[i])) Py_RETURN_NONE;  // subclasses may override .grad or ops
    const at::Tensor& t = THPVariable_Unpack(objects[i]).grad();
    if (!t.defined()) continue;
    if (!plain_tensor(t) || !t.is_cpu()) Py_RETURN_NONE;
    tensors.push_back(t);
    storages.push_back(t.storage());
    slots.push_back(i);
  }
  if (tensors.empty()) Py_RETURN_NONE;
  storages.push_back(gamma.storage());
  GradTable g;
  try {
    g = build_table(tensors, "AdaGC.step", Access::kWrites);  // on the CPU: counters bumped only when written
  } catch (const c10::Error&) {
    Py_RETURN_NONE;
  }
  const at::ScalarType acc = g.acc_dtype();
  at::Tensor per_tensor = at::empty({g.n_tensors}, at::TensorOptions().dtype(acc));
  RECORD_FUNCTION("fusedclip::adagc", std::vector<c10::IValue>());
  at::Tensor norm;
  {
    pybind11::gil_scoped_release no_gil;
    norm = norm_and_maybe_clip_cpu(g, 0.0, 2.0, false, acc, ClipExtras{per_tensor, {}, {}});
    double* gam = gamma.data_ptr<double>();
    std::vector<double> coefs(g.n_tensors);
    dispatch_acc(g.any_double, [&](auto acc_zero) {
      using acc_t = decltype(acc_zero);
      const acc_t* norms = per_tensor.data_ptr<acc_t>();
      for (int64_t k = 0; k < g.n_tensors; ++k) {
        const double nk = static_cast<double>(norms[k]);
        const double old = gam[slots[k]];
        const double start = std::isinf(old) ? nk : old;  // first seen: its own norm
        double c = lambda_rel * start / (nk + eps);
        c = c > 1.0 ? 1.0 : c;  // clamp(max=1): NaN stays NaN
        const double clipped = c * nk;
        gam[slots[k]] = std::isfinite(clipped) ? beta * start + (1.0 - beta) * clipped : old;
        coefs[k] = static_cast<double>(static_cast<acc_t>(c));
      }
    });
    scale_each_table_cpu(g, coefs.data());
  }
  return THPVariable_Wrap(std::move(norm));
  END_HANDLE_TH_ERRORS
}

// record_sq_norm(grad, partials, slot): ClipInBackward's post-accumulate-grad hook on the CPU in one call: the fused
// kernel's unrounded (double) L2 norm of the one gradient, squared, stored in partials[slot] (float64, contiguous,
// CPU) -- the bits of the Python hook's total_norm([grad], 2.0, None, float64), n * n, copy_. A hook runs once per
// parameter inside backward: the Python hook's five small ops cost ~10 us each call (600 parameters: +25% on a
// training step of small tensors). True, or None (touching nothing) for what the Python hook must handle.
PyObject* record_sq_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, "record_sq_norm(grad, partials, slot) takes 3 arguments");
  const at::Tensor* grad_arg = plain_arg(args[0]);
  const at::Tensor* partials_arg = plain_arg(args[1]);
  if (!grad_arg || !partials_arg || !PyLong_CheckExact(args[2]) || !plain_thread_state()) Py_RETURN_NONE;
  const int64_t slot = PyLong_AsLongLong(args[2]);
  if (slot == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  const at::Tensor grad = *grad_arg, partials = *partials_arg;  // owned (see the header)
  if (!grad.is_cpu() || !partials.is_cpu() || partials.scalar_type() != at::kDouble || !partials.is_contiguous() ||
      slot < 0 || slot >= partials.numel())
    Py_RETURN_NONE;
  std::vector<at::Tensor> tensors{grad};
  GradTable g;
  try {
    g = build_table(tensors, "total_norm", Access::kReads);
  } catch (const c10::Error&) {
    Py_RETURN_NONE;
  }
  const c10::Storage keep_grad = grad.storage(), keep_partials = partials.storage();
  {
    pybind11::gil_scoped_release no_gil;
    const double n = norm_and_maybe_clip_cpu(g, 0.0, 2.0, false, at::kDouble, ClipExtras{}).item<double>();
    partials.data_ptr<double>()[slot] = n * n;
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// The CPU loops' instruction set (cpu_simd.h): cpu_isa() -> "avx2"; set_cpu_isa("baseline") for tests.
PyObject* get_cpu_isa(PyObject*, PyObject*) {
  return Py_BuildValue("(ss)", cpu_isa_name(cpu_isa()), supported_cpu_isas().c_str());
}

PyObject* put_cpu_isa(PyObject*, PyObject* name) {
  HANDLE_TH_ERRORS
  const char* s = PyUnicode_AsUTF8(name);
  if (!s) return nullptr;
  TORCH_CHECK_VALUE(set_cpu_isa(s), "fusedclip: this processor or build cannot run the CPU loops as '", s,
                    "'; supported: ", supported_cpu_isas());
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"cpu_isa", &get_cpu_isa, METH_NOARGS, "cpu_isa() -> (the CPU loops' instruction set, the supported ones)"},
    {"set_cpu_isa", &put_cpu_isa, METH_O, "set_cpu_isa(name): run the CPU loops as 'baseline' or 'avx2' (tests)"},
    {"clip_grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&clip_grads)), METH_FASTCALL,
     "clip_grads(params, max_norm, norm_type): the fused clip of the params' grads, or None (take the op path)"},
    {"adagc_grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&adagc_grads)), METH_FASTCALL,
     "adagc_grads(params, gamma, config) -> AdaGC's post-warm-up step on the CPU (the norm), or None"},
    {"record_sq_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&record_sq_norm)), METH_FASTCALL,
     "record_sq_norm(grad, partials, slot) -> ClipInBackward's hook on the CPU (True), or None"},
    {"zclip_grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&zclip_grads)), METH_FASTCALL,
     "zclip_grads(params, state, config, found_inf): ZClip's fused step on the params' grads, or None"},
    {"total_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&total_norm)), METH_FASTCALL,
     "total_norm(tensors, norm_type): the fused norm of the tensors, or None (take the op path)"},
    {"local_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&local_norm)), METH_FASTCALL,
     "local_norm(tensors, norm_type): the op total_norm's unrounded (float64) norm of plain tensors, or None"},
    {"scale_local", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&scale_local)), METH_FASTCALL,
     "scale_local(tensors, max_norm, total_norm): the op scale_ on plain tensors; True, or None (take the op path)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fusedclip

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fusedclip::kMethods};
  return PyModule_Create(&module_def);
}
