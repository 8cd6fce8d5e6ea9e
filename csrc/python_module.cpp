// Python entry point of deeplab_fast._C. Importing the module loads the shared library, whose static
// initialisers register the ops with the dispatcher; the module itself exposes nothing else.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "deeplab_fast custom ops (see torch.ops.deeplab_fast)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
