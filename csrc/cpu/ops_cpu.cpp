// TORCH_LIBRARY_IMPL(bsn_cuda, CPU): host side of the CPU backend.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "host.h"
#include "kernels_cpu.h"

namespace bsn {
namespace {

#define BSN_DISPATCH_FLOATING(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> sn_forward_cpu(const at::Tensor& weight, at::Tensor& u,
                                                  at::Tensor& v, int64_t dim,
                                                  int64_t n_power_iterations, double eps,
                                                  double scale, bool update, double coeff,
                                                  const OptTensor& gamma, bool track_only) {
  PreparedForward prep = prepare_sn_forward(weight, u, v, dim, n_power_iterations, eps, scale,
                                            update, coeff, gamma, track_only);
  BSN_DISPATCH_FLOATING(weight.scalar_type(), "bsn_cuda::sn_forward",
                        [&] { cpu::forward<scalar_t>(prep.params); });
  return {prep.out, prep.state};
}

std::tuple<at::Tensor, at::Tensor> bsn_forward_cpu(const at::Tensor& weight, at::Tensor& u0,
                                                   at::Tensor& v0, at::Tensor& u1,
                                                   at::Tensor& v1, int64_t n_power_iterations,
                                                   double eps, double scale, bool update,
                                                   double coeff, const OptTensor& gamma,
                                                   bool track_only) {
  PreparedForward prep = prepare_bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps,
                                             scale, update, coeff, gamma, track_only);
  BSN_DISPATCH_FLOATING(weight.scalar_type(), "bsn_cuda::bsn_forward",
                        [&] { cpu::forward<scalar_t>(prep.params); });
  return {prep.out, prep.state};
}

at::Tensor sn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                           const at::Tensor& state, int64_t dim, double scale, double coeff,
                           const OptTensor& gamma) {
  PreparedBackward prep = prepare_sn_backward(grad_out, weight, state, dim, scale, coeff, gamma);
  BSN_DISPATCH_FLOATING(weight.scalar_type(), "bsn_cuda::sn_backward",
                        [&] { cpu::backward<scalar_t>(prep.params); });
  return prep.grad_weight;
}

at::Tensor bsn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                            const at::Tensor& state, double scale, double coeff,
                            const OptTensor& gamma) {
  PreparedBackward prep = prepare_bsn_backward(grad_out, weight, state, scale, coeff, gamma);
  BSN_DISPATCH_FLOATING(weight.scalar_type(), "bsn_cuda::bsn_backward",
                        [&] { cpu::backward<scalar_t>(prep.params); });
  return prep.grad_weight;
}

}  // namespace
}  // namespace bsn

TORCH_LIBRARY_IMPL(bsn_cuda, CPU, m) {
  m.impl("sn_forward", &bsn::sn_forward_cpu);
  m.impl("sn_backward", &bsn::sn_backward_cpu);
  m.impl("bsn_forward", &bsn::bsn_forward_cpu);
  m.impl("bsn_backward", &bsn::bsn_backward_cpu);
}
