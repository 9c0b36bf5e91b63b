// The op schemas, declared once. Backends register in csrc/cpu and csrc/cuda;
// fake kernels live in bsn_cuda/_ops.py, autograd in csrc/autograd.cpp (forwards) and
// bsn_cuda/_ops.py (double backward).
#include <Python.h>
#include <torch/library.h>

// An empty module so that `import bsn_cuda._C` loads this library (and with it
// the registrations below) without linking against libpython's pybind11 layer.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "bsn_cuda's compiled ops (see torch.ops.bsn_cuda)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(bsn_cuda, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "sn_forward(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, "
      "int n_power_iterations, float eps, float scale, bool update) -> (Tensor, Tensor)",
      tags);
  m.def(
      "sn_backward(Tensor grad_out, Tensor weight, Tensor state, int dim, float scale) "
      "-> Tensor",
      tags);
  m.def(
      "bsn_forward(Tensor weight, Tensor(a!) u0, Tensor(b!) v0, Tensor(c!) u1, "
      "Tensor(d!) v1, int n_power_iterations, float eps, float scale, bool update) "
      "-> (Tensor, Tensor)",
      tags);
  m.def(
      "bsn_backward(Tensor grad_out, Tensor weight, Tensor state, float scale) -> Tensor",
      tags);
}
