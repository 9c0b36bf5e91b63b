// Host helpers of the CUDA ops (ops_cuda.cpp), shared with the grouped ops'
// CUDA kernel (group_cuda.cpp).
#pragma once

#include <tuple>

#include <ATen/ATen.h>

#include "cuda/plan.h"
#include "host.h"

namespace bsn {
namespace cuda {

// BSN_CUDA_MODE (auto, single, coop, multi).
Mode mode_from_env();
// The current device's DeviceInfo (Auto: no cooperative launch while the
// current stream is being captured).
DeviceInfo device_info(Mode mode);
// sizeof(acc_t) of a weight dtype: 8 for float64, else 4.
int acc_size(at::ScalarType dtype);
// `op`'s error unless weight is a CUDA tensor.
void check_cuda(const char* op, const at::Tensor& weight);
// One layer's launches (plan, workspace, launch_forward / launch_backward) on
// the current stream and device, as the per-layer ops run them.
std::tuple<at::Tensor, at::Tensor> run_forward(const PreparedForward& prep);
at::Tensor run_backward(const PreparedBackward& prep);

}  // namespace cuda
}  // namespace bsn
