// The op schemas, declared once. Backends register in csrc/cpu and csrc/cuda;
// fake kernels live in bsn_cuda/_fakes.py, autograd in csrc/autograd.cpp (forwards)
// and bsn_cuda/_double_backward.py (double backward), both registered by
// bsn_cuda/_library.py; the _C module is csrc/python_api.cpp.
#include <torch/library.h>

TORCH_LIBRARY(bsn_cuda, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "sn_forward(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, "
      "int n_power_iterations, float eps, float scale, bool update, float coeff=0., "
      "Tensor? gamma=None, bool track_only=False) -> (Tensor, Tensor)",
      tags);
  m.def(
      "sn_backward(Tensor grad_out, Tensor weight, Tensor state, int dim, float scale, "
      "float coeff=0., Tensor? gamma=None) -> Tensor",
      tags);
  m.def(
      "bsn_forward(Tensor weight, Tensor(a!) u0, Tensor(b!) v0, Tensor(c!) u1, "
      "Tensor(d!) v1, int n_power_iterations, float eps, float scale, bool update, "
      "float coeff=0., Tensor? gamma=None, bool track_only=False) -> (Tensor, Tensor)",
      tags);
  m.def(
      "bsn_backward(Tensor grad_out, Tensor weight, Tensor state, float scale, "
      "float coeff=0., Tensor? gamma=None) -> Tensor",
      tags);
  // Grouped ops (csrc/group.h, docs/design.md "Grouped ops").
  m.def(
      "group_forward(Tensor[] weights, Tensor(a!)[] vectors, int[] kinds, int[] dims, "
      "int[] n_power_iterations, float[] eps, float[] scales, bool[] update) "
      "-> (Tensor[], Tensor[])",
      tags);
  m.def(
      "group_backward(Tensor[] grad_outs, Tensor[] weights, Tensor[] states, int[] kinds, "
      "int[] dims, float[] scales) -> Tensor[]",
      tags);
}
