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
#include <structmember.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <cmath>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include "cpu/cpu_simd.h"
#include "common/grad_table.h"
#include "common/scale_each.h"
#include "in_backward.h"
#include "plain_tensor.h"

namespace fusedclip {
namespace {

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
    // capture before making the copy (csrc/cuda/clip_cuda.cu refuse_copies_under_capture)
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

// The sharded paths' two passes over a rank's local tensors (fusedclip/distributed/: DTensors' local shards,
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

// DTensor gradients (fusedclip/distributed/dtensor.py, fast_norm): the local shards and specs read straight out of the
// DTensors' slots, the per-spec plan looked up in C++, and the unrounded norm of each rank set's counted shards,
// in one call; the scale pass later takes the tensors read here (dtensor_scale, on the returned handle), so a call
// reads the Python objects once. The ~2 us a DTensor of Python (a .grad read through __torch_function__, two
// attribute reads, a dict lookup, a list per pass) becomes tens of ns.
//
// Ownership, unlike above: the local tensors (through a reference to each one's Python object, which owns it: see
// BorrowedTensors) and their storages are owned by the handle from the moment they are read, and the ops run with
// the GIL held (see dtensor_norm);
// each gradient and spec is owned (a reference) for the call, since `classify`, Python, runs between reading the
// specs and using them and may let another thread drop the gradient that held one.

// Where a slot (__slots__ entry) of a type lives: DTensor's _local_tensor and _spec. Found once per type.
struct DTensorSlots {
  PyObject* type = nullptr;  // owned: the offsets are valid for this type only
  Py_ssize_t local = -1, spec = -1;
};

Py_ssize_t slot_offset(PyObject* type, const char* name) {
  PyObject* d = PyObject_GetAttrString(type, name);
  if (!d) {
    PyErr_Clear();
    return -1;
  }
  Py_ssize_t off = -1;
  if (Py_IS_TYPE(d, &PyMemberDescr_Type)) {
    const PyMemberDef* m = reinterpret_cast<PyMemberDescrObject*>(d)->d_member;
    if (m->type == T_OBJECT_EX && !(m->flags & READONLY)) off = m->offset;
  }
  Py_DECREF(d);
  return off;
}

// The slots of `type` (a DTensor class), or null when it does not keep them as plain object slots (a torch whose
// DTensor is laid out otherwise: the Python path then runs).
const DTensorSlots* dtensor_slots(PyObject* type) {
  static DTensorSlots slots;
  if (slots.type != type) {
    DTensorSlots s;
    s.local = slot_offset(type, "_local_tensor");
    s.spec = slot_offset(type, "_spec");
    if (s.local < 0 || s.spec < 0) return nullptr;
    Py_INCREF(type);
    Py_XDECREF(slots.type);
    s.type = type;
    slots = s;
  }
  return &slots;
}

// What a rank does with a gradient of a spec (distributed/dtensor.py, _classify): its rank set's key, whether this rank
// counts its shard, whether it is Partial (the Python path reduces those).
struct DKind {
  int64_t bucket = 0;
  bool counted = false;
  bool partial = false;
};

// spec -> kind, holding a reference to each spec (so an address is never reused while it is a key); emptied
// when it outgrows kMaxSpecs (specs made anew every step just miss it). Never destroyed: no Python at exit.
// Only touched with the GIL held, and never across a call into Python.
constexpr size_t kMaxSpecs = size_t(1) << 17;
std::unordered_map<PyObject*, DKind>& spec_kinds() {
  static auto* m = new std::unordered_map<PyObject*, DKind>();
  return *m;
}

// The last call's specs (owned) and their kinds: a training loop passes the same specs every step, so a call
// compares pointers and looks nothing up.
struct LastSpecs {
  std::vector<PyObject*> specs;
  std::vector<DKind> kinds;
};
LastSpecs& last_specs() {
  static auto* l = new LastSpecs();
  return *l;
}

void drop_refs(std::vector<PyObject*>& objects) {
  std::vector<PyObject*> old;
  old.swap(objects);  // decrefs may run Python (a spec freed): never on a vector still in use
  for (PyObject* o : old) Py_DECREF(o);
}

struct OwnedRefs {
  std::vector<PyObject*> refs;
  ~OwnedRefs() { drop_refs(refs); }
};

bool kind_of(PyObject* spec, PyObject* classify, PyObject* fn, DKind* out) {
  auto& map = spec_kinds();
  const auto it = map.find(spec);
  if (it != map.end()) {
    *out = it->second;
    return true;
  }
  PyObject* r = PyObject_CallFunctionObjArgs(classify, spec, fn, nullptr);  // may raise: the mesh lacks this rank
  if (!r) return false;
  DKind k;
  const bool ok = PyTuple_Check(r) && PyTuple_GET_SIZE(r) == 3;
  if (ok) {
    k.bucket = PyLong_AsLongLong(PyTuple_GET_ITEM(r, 0));
    k.counted = PyObject_IsTrue(PyTuple_GET_ITEM(r, 1)) == 1;
    k.partial = PyObject_IsTrue(PyTuple_GET_ITEM(r, 2)) == 1;
  }
  Py_DECREF(r);
  if (!ok || PyErr_Occurred()) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "fusedclip: classify must return (int, bool, bool)");
    return false;
  }
  if (map.size() >= kMaxSpecs) {
    std::vector<PyObject*> keys;
    keys.reserve(map.size());
    for (const auto& kv : map) keys.push_back(kv.first);
    map.clear();
    drop_refs(keys);
  }
  if (map.emplace(spec, k).second) Py_INCREF(spec);
  *out = k;
  return true;
}

// at::Tensor values that take no reference to their TensorImpl (and drop none): each tensor is owned through its
// Python object, which the holder keeps a reference to. Why: an at::Tensor copy of a tensor that has a Python object
// also references that object, and dropping the copy goes through the Python interpreter; at 20,000 DTensors the
// copies and their release were a third of reading them (perf, torch 2.14), where a Python reference to the local
// tensor's object, already in cache, costs a plain increment. Only for tensors read out of Python objects held by
// the same owner (a DTensor's local tensor always has one).
struct BorrowedTensors {
  std::vector<at::Tensor> list;
  BorrowedTensors() = default;
  BorrowedTensors(BorrowedTensors&& other) noexcept = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(BorrowedTensors&&) = delete;
  void push_back(const at::Tensor& t) {
    list.emplace_back(c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim(t.unsafeGetTensorImpl()));
  }
  ~BorrowedTensors() {
    for (at::Tensor& t : list) t.unsafeReleaseTensorImpl();  // hand back without dropping a reference
  }
};

// What the handle owns: the local tensors' Python objects (so their TensorImpls live), the local tensors read from
// them (borrowed: all of them, to scale) and their storages. Destroyed with the GIL held (in dtensor_norm, or as
// the capsule's destructor): the borrowed tensors first, the storages, then the objects.
struct DTensorCall {
  OwnedRefs locals;
  std::vector<c10::Storage> storages;
  BorrowedTensors tensors;
};

constexpr const char* kHandleName = "fusedclip.dtensor_call";

void free_handle(PyObject* capsule) {
  delete static_cast<DTensorCall*>(PyCapsule_GetPointer(capsule, kHandleName));
}

// dtensor_norm(items, of_grads, norm_type, dtensor_type, classify, fn): for DTensors (of_grads: parameters of
// type dtensor_type, their .grad; None grads skipped) of one type, plain dense local shards on one device, no
// Partial spec, and norm_type > 0: ([(rank set key, this rank's unrounded float64 norm of its counted shards or
// None)] in order of first appearance, the first local tensor, the handle, the promoted dtype, whether any is
// float64, the first spec). None, having written nothing, for anything else: the Python path then runs.
PyObject* dtensor_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 6, "dtensor_norm(items, of_grads, norm_type, dtensor_type, classify, fn) takes 6 arguments");
  PyObject* items = args[0];
  const bool of_grads = PyObject_IsTrue(args[1]) == 1;
  PyObject* type = args[3];
  double norm_type = 0.0;
  if (!PyList_Check(items) && !PyTuple_Check(items)) Py_RETURN_NONE;
  if (!as_double(args[2], &norm_type) || !(norm_type > 0.0) || !PyType_Check(type) || !plain_thread_state())
    Py_RETURN_NONE;  // norm_type 0, negative or NaN: Python's
  const DTensorSlots* slots = dtensor_slots(type);
  if (!slots) Py_RETURN_NONE;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  PyObject** objects = PySequence_Fast_ITEMS(items);
  auto call = std::make_unique<DTensorCall>();
  OwnedRefs specs, grads;
  if (of_grads) grads.refs.reserve(n);
  call->tensors.list.reserve(n);
  call->storages.reserve(n);
  call->locals.refs.reserve(n);
  // 1. read: no Python code runs here (THPVariable_Wrap could allocate, and so collect garbage, only for a
  // gradient without a Python object, a plain one, which ends the call), so the borrowed items, gradients and specs
  // stay put
  std::vector<PyObject*> spec_ptrs;  // borrowed: owned below (by `specs`) before any Python runs
  spec_ptrs.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = objects[i];
    if (Py_TYPE(obj) != reinterpret_cast<PyTypeObject*>(type)) Py_RETURN_NONE;  // subclasses may override
    if (of_grads) {
      // the .grad field itself (Tensor::grad() adds a virtual call and the non-leaf warning's checks: ~10% of a
      // call at 20,000 DTensors, perf); a DTensor parameter is a leaf
      const torch::autograd::AutogradMeta* meta = torch::autograd::impl::get_autograd_meta(THPVariable_Unpack(obj));
      if (!meta || !meta->grad_.defined()) continue;
      const at::Tensor& grad = meta->grad_;
      PyObject* g = THPVariable_Wrap(grad);  // the gradient's Python object (a new reference, held for the call)
      if (!g) return nullptr;
      grads.refs.push_back(g);
      if (Py_TYPE(g) != reinterpret_cast<PyTypeObject*>(type)) Py_RETURN_NONE;  // a plain gradient: Python's
      obj = g;
    }
    PyObject* local = *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(obj) + slots->local);
    PyObject* spec = *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(obj) + slots->spec);
    if (!local || !spec || !THPVariable_CheckExact(local)) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(local);
    if (!plain_tensor(t) || (!call->tensors.list.empty() && t.device() != call->tensors.list.front().device()))
      Py_RETURN_NONE;
    Py_INCREF(local);
    call->locals.refs.push_back(local);
    call->tensors.push_back(t);
    call->storages.push_back(t.storage());
    spec_ptrs.push_back(spec);
  }
  if (call->tensors.list.empty()) Py_RETURN_NONE;
  // 2. the kinds: the last call's when the specs are the same objects (which `last` owns), else looked up (maybe
  // calling classify: the specs are owned first)
  LastSpecs& last = last_specs();
  std::vector<DKind> kinds;
  if (last.specs == spec_ptrs) {
    kinds = last.kinds;
  } else {
    for (PyObject* o : spec_ptrs) Py_INCREF(o);
    specs.refs = spec_ptrs;
    kinds.resize(specs.refs.size());
    for (size_t i = 0; i < specs.refs.size(); ++i)
      if (!kind_of(specs.refs[i], args[4], args[5], &kinds[i])) return nullptr;
    std::vector<PyObject*> keep(specs.refs);
    for (PyObject* o : keep) Py_INCREF(o);
    std::vector<PyObject*> old;
    old.swap(last.specs);
    last.specs = std::move(keep);
    last.kinds = kinds;
    drop_refs(old);
  }
  OwnedRefs first_spec;  // returned: owned here, since what runs below may run Python (an allocation collects)
  Py_INCREF(spec_ptrs.front());
  first_spec.refs.push_back(spec_ptrs.front());
  // 3. the buckets (rank sets) in order of first appearance, each with the shards this rank counts
  std::vector<int64_t> keys;
  std::vector<BorrowedTensors> counted;  // borrowed from call->tensors (owned by the handle)
  bool any_double = false;
  const std::vector<at::Tensor>& locals = call->tensors.list;
  at::ScalarType result = locals.front().scalar_type();
  for (size_t i = 0; i < kinds.size(); ++i) {
    const DKind& k = kinds[i];
    if (k.partial) Py_RETURN_NONE;  // reduced over its mesh first: Python's
    const at::ScalarType st = locals[i].scalar_type();
    if (st != at::kFloat && st != at::kDouble && st != at::kHalf && st != at::kBFloat16)
      Py_RETURN_NONE;  // the op path explains
    any_double |= st == at::kDouble;
    if (st != result) result = c10::promoteTypes(result, st);
    size_t b = 0;
    while (b < keys.size() && keys[b] != k.bucket) ++b;
    if (b == keys.size()) {
      keys.push_back(k.bucket);
      counted.emplace_back();
    }
    if (k.counted) counted[b].push_back(locals[i]);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedclip::total_norm", "")
                       .typed<at::Tensor(at::TensorList, double, const std::optional<at::Tensor>&,
                                         std::optional<at::ScalarType>)>();
  std::vector<at::Tensor> norms(keys.size());
  {
    // With the GIL held, unlike the plain fast path: the tensors are borrowed (BorrowedTensors), owned through their
    // Python objects, and without the GIL another thread could torch.utils.swap_tensors a local tensor (its
    // use-count check sees only the Python object's reference) and drop the swapped-in object, freeing the
    // TensorImpl the op reads. Storages alone (owned) would do without the GIL; the ops read the TensorImpls. On
    // CUDA the ops only launch; on the CPU other Python threads wait for the pass.
    const c10::DispatchKeySet ks = backend_keys(locals.front());
    for (size_t b = 0; b < keys.size(); ++b)
      if (!counted[b].list.empty())
        norms[b] = op.redispatch(ks, counted[b].list, norm_type, std::nullopt, at::kDouble);
  }
  PyObject* buckets = PyList_New(static_cast<Py_ssize_t>(keys.size()));
  if (!buckets) return nullptr;
  for (size_t b = 0; b < keys.size(); ++b) {
    PyObject* norm = norms[b].defined() ? THPVariable_Wrap(std::move(norms[b])) : (Py_INCREF(Py_None), Py_None);
    PyObject* pair = norm ? Py_BuildValue("(LN)", static_cast<long long>(keys[b]), norm) : nullptr;
    if (!pair) {
      Py_DECREF(buckets);
      return nullptr;
    }
    PyList_SET_ITEM(buckets, static_cast<Py_ssize_t>(b), pair);
  }
  PyObject* first = THPVariable_Wrap(locals.front());
  PyObject* handle = first ? PyCapsule_New(call.get(), kHandleName, &free_handle) : nullptr;
  if (!handle) {
    Py_DECREF(buckets);
    Py_XDECREF(first);
    return nullptr;
  }
  call.release();  // the capsule owns it
  PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(result));
  Py_INCREF(dtype);
  return Py_BuildValue("(NNNNOO)", buckets, first, handle, dtype, any_double ? Py_True : Py_False,
                       first_spec.refs.front());
  END_HANDLE_TH_ERRORS
}

// dtensor_scale(handle, max_norm, total_norm): the op scale_ on every local tensor dtensor_norm read (checked
// there: plain dense tensors on one device, no mode active); True.
PyObject* dtensor_scale(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, "dtensor_scale(handle, max_norm, total_norm) takes 3 arguments");
  auto* call = static_cast<DTensorCall*>(PyCapsule_GetPointer(args[0], kHandleName));
  if (!call) return nullptr;
  double max_norm = 0.0;
  const at::Tensor* norm = plain_arg(args[2]);
  TORCH_CHECK_TYPE(norm && as_double(args[1], &max_norm),
                   "dtensor_scale: max_norm must be a number and total_norm a plain dense tensor");
  const at::Tensor total = *norm;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fusedclip::scale_", "")
                       .typed<void(at::TensorList, double, const at::Tensor&)>();
  {
    // the handle (an argument of this call, so alive) owns the tensors' objects and storages; the GIL stays held,
    // as in dtensor_norm (the TensorImpls are borrowed)
    op.redispatch(backend_keys(call->tensors.list.front()), call->tensors.list, max_norm, total);
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
    {"record_hooks", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&record_hooks)), METH_FASTCALL,
     "record_hooks(params, ends, partials) -> ClipInBackward's hooks in C++ (a handle), or None (in_backward.cpp)"},
    {"record_hooks_recording", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&record_hooks_recording)),
     METH_FASTCALL, "record_hooks_recording(handle, on): whether the hooks read"},
    {"record_hooks_finish", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&record_hooks_finish)),
     METH_FASTCALL, "record_hooks_finish(handle, max_norm, into) -> (norm, acc norm, grad_scale), or buckets to read"},
    {"record_hooks_remove", &record_hooks_remove, METH_O, "record_hooks_remove(handle): removes the hooks"},
    {"record_hooks_reads", &record_hooks_reads, METH_O,
     "record_hooks_reads(handle) -> (reads by each bucket's hooks, reads by clip_()) since attached (tests)"},
    {"zclip_grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&zclip_grads)), METH_FASTCALL,
     "zclip_grads(params, state, config, found_inf): ZClip's fused step on the params' grads, or None"},
    {"total_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&total_norm)), METH_FASTCALL,
     "total_norm(tensors, norm_type): the fused norm of the tensors, or None (take the op path)"},
    {"local_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&local_norm)), METH_FASTCALL,
     "local_norm(tensors, norm_type): the op total_norm's unrounded (float64) norm of plain tensors, or None"},
    {"scale_local", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&scale_local)), METH_FASTCALL,
     "scale_local(tensors, max_norm, total_norm): the op scale_ on plain tensors; True, or None (take the op path)"},
    {"dtensor_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&dtensor_norm)), METH_FASTCALL,
     "dtensor_norm(items, of_grads, norm_type, dtensor_type, classify, fn): DTensors' local norms per rank set, "
     "or None"},
    {"dtensor_scale", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&dtensor_scale)), METH_FASTCALL,
     "dtensor_scale(handle, max_norm, total_norm): the op scale_ on the local tensors dtensor_norm read; True, or "
     "None"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fusedclip

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fusedclip::kMethods};
  return PyModule_Create(&module_def);
}
