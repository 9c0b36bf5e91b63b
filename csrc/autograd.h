// The autograd side of the forward ops that csrc/python_api.cpp calls directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace bsn {

// torch.nn.utils.spectral_norm's (legacy) power iteration runs v first on
// W_mat = weight.reshape(weight.size(0), -1): that is bsn_cuda::sn_forward on
// W_mat with dim=1 and the vectors' roles swapped (u = torch's v, v = torch's
// u). This runs it with the output in the weight's shape and, when autograd
// records, one graph node for the whole of it (no nodes for the two reshapes).
// Returns (out, state); state is the op's, for W_mat^T: [sigma, v, u].
std::tuple<at::Tensor, at::Tensor> sn_forward_transposed(const at::Tensor& weight, at::Tensor& u,
                                                         at::Tensor& v, int64_t n_power_iterations,
                                                         double eps, double scale, bool update);

}  // namespace bsn
