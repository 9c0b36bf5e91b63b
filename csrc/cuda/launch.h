// Launchers of the CUDA kernels (launch.cu). No torch headers here: the host
// code (sn_cuda.cpp) plans a call (plan.h), allocates the workspace the plan
// asks for and calls launch_forward / launch_backward with the weight's type.
#pragma once

#include <cuda_runtime_api.h>

#include "bsn.h"
#include "cuda/plan.h"

namespace bsn {
namespace cuda {

// scalar_t: float, double, c10::Half, c10::BFloat16 (explicitly instantiated in
// launch.cu). `workspace` holds plan.ws_elems acc_t elements (may be unused
// when ws_elems == 0). Everything is enqueued on `stream`; no host sync. A Coop
// plan whose cooperative launch the driver refuses (e.g. too large under MPS)
// runs in the multi-kernel mode instead: same results.
template <typename scalar_t>
void launch_forward(const ForwardParams& p, const ForwardPlan& plan, void* workspace,
                    const DeviceInfo& dev, cudaStream_t stream);
template <typename scalar_t>
void launch_backward(const BackwardParams& p, const BackwardPlan& plan, void* workspace,
                     const DeviceInfo& dev, cudaStream_t stream);

}  // namespace cuda
}  // namespace bsn
