// Python entry point of deeplab_fast._C. Importing the module loads the shared library, whose static
// initialisers register the ops with the dispatcher. It also installs the interrupt check of the CPU kernels
// (common/parallel.h): between mean-field iterations and images, the main Python thread runs Python's signal
// handlers, so Ctrl-C stops a long call promptly with KeyboardInterrupt.
#include <Python.h>
#include <torch/csrc/Exceptions.h>

#include "common/parallel.h"

namespace {

unsigned long main_thread = 0;  // Python's main thread: the only one where Python runs signal handlers

void check_python_signals() {
  if (main_thread == 0 || PyThread_get_thread_ident() != main_thread || !Py_IsInitialized()) return;
  PyGILState_STATE gil = PyGILState_Ensure();
  if (PyErr_CheckSignals() != 0) {
    python_error error;  // takes the pending Python exception (KeyboardInterrupt); torch re-raises it
    error.persist();
    PyGILState_Release(gil);
    throw error;
  }
  PyGILState_Release(gil);
}

unsigned long python_main_thread() {
  PyObject* threading = PyImport_ImportModule("threading");
  if (threading == nullptr) return 0;
  PyObject* main = PyObject_CallMethod(threading, "main_thread", nullptr);
  PyObject* ident = main != nullptr ? PyObject_GetAttrString(main, "ident") : nullptr;
  const unsigned long id = ident != nullptr ? PyLong_AsUnsignedLong(ident) : 0;
  Py_XDECREF(ident);
  Py_XDECREF(main);
  Py_DECREF(threading);
  if (PyErr_Occurred()) PyErr_Clear();
  return id;
}

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "deeplab_fast custom ops (see torch.ops.deeplab_fast)", -1, nullptr};
  main_thread = python_main_thread();
  deeplab_fast::parallel::set_interrupt_hook(&check_python_signals);
  return PyModule_Create(&module_def);
}
}
