// Input checks and parameter filling shared by every backend's host code.
#pragma once

#include <ATen/ATen.h>

#include "bsn.h"

#include <optional>

namespace bsn {

struct PreparedForward {
  at::Tensor weight;  // contiguous (a copy if the input was not)
  at::Tensor out;
  at::Tensor state;
  ForwardParams params;
};

struct PreparedBackward {
  at::Tensor grad_out;  // contiguous
  at::Tensor weight;    // contiguous
  at::Tensor grad_weight;
  BackwardParams params;
};

// The weight dtypes the ops take (float32, float64, float16, bfloat16; Python:
// bsn_cuda/_contract.py FLOATING_DTYPES).
bool is_kernel_dtype(at::ScalarType dtype);

// The accumulation dtype: float64 for float64 weights, float32 otherwise.
at::ScalarType acc_dtype(at::ScalarType weight_dtype);

// The variant arguments (docs/design.md, Variants); the defaults are plain SN/BSN.
using OptTensor = std::optional<at::Tensor>;

PreparedForward prepare_sn_forward(const at::Tensor& weight, const at::Tensor& u,
                                   const at::Tensor& v, int64_t dim,
                                   int64_t n_power_iterations, double eps,
                                   double scale, bool update, double coeff = 0.0,
                                   const OptTensor& gamma = std::nullopt,
                                   bool track_only = false);
PreparedForward prepare_bsn_forward(const at::Tensor& weight, const at::Tensor& u0,
                                    const at::Tensor& v0, const at::Tensor& u1,
                                    const at::Tensor& v1, int64_t n_power_iterations,
                                    double eps, double scale, bool update, double coeff = 0.0,
                                    const OptTensor& gamma = std::nullopt,
                                    bool track_only = false);
PreparedBackward prepare_sn_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                                     const at::Tensor& state, int64_t dim, double scale,
                                     double coeff = 0.0, const OptTensor& gamma = std::nullopt);
PreparedBackward prepare_bsn_backward(const at::Tensor& grad_out,
                                      const at::Tensor& weight,
                                      const at::Tensor& state, double scale,
                                      double coeff = 0.0, const OptTensor& gamma = std::nullopt);

}  // namespace bsn
