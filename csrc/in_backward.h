// ClipInBackward's compiled hooks (in_backward.cpp): the module functions python_module.cpp lists.
#pragma once

#include <Python.h>

namespace fusedclip {

PyObject* record_hooks(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* record_hooks_recording(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* record_hooks_finish(PyObject*, PyObject* const* args, Py_ssize_t nargs);
PyObject* record_hooks_remove(PyObject*, PyObject* handle);
PyObject* record_hooks_reads(PyObject*, PyObject* handle);

}  // namespace fusedclip
