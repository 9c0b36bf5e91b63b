// Launchers of the CUDA kernels (launch.cu). No torch headers here: the host
// code (ops_cuda.cpp) plans a call (plan.h), allocates the workspace the plan
// asks for and calls launch_forward / launch_backward with the weight's type.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

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

// Grouped launches (launch.cu, "Grouped launches"): the layers of one group
// call with one dtype, each planned by make_forward_plan / make_backward_plan
// (the mode is not used), run one launch per phase step for all of them.
// The group's device memory is one buffer of layout.total_bytes bytes: the
// descriptor table [layers' args][entries] (table_bytes, copied from the host
// by `upload` on `stream` before the launches), then each layer's workspace at
// ws_offset[layer].
struct GroupLayout {
  int64_t launches = 0;        // kernel launches of the group: its layers' most phases
  int64_t entries_offset = 0;  // bytes: where the entries start in the table
  int64_t table_bytes = 0;
  int64_t total_bytes = 0;
  std::vector<int64_t> ws_offset;
};
// upload(host, device, bytes): copy the table to the device, ordered on the stream
// before the launches (the host buffer is freed when launch_group_* returns).
using GroupUpload = std::function<void(const void* host, void* device, int64_t bytes)>;

template <typename scalar_t>
GroupLayout group_forward_layout(const std::vector<ForwardPlan>& plans);
template <typename scalar_t>
GroupLayout group_backward_layout(const std::vector<BackwardPlan>& plans);
template <typename scalar_t>
void launch_group_forward(const std::vector<ForwardParams>& params,
                          const std::vector<ForwardPlan>& plans, const GroupLayout& layout,
                          void* buffer, const DeviceInfo& dev, cudaStream_t stream,
                          const GroupUpload& upload);
template <typename scalar_t>
void launch_group_backward(const std::vector<BackwardParams>& params,
                           const std::vector<BackwardPlan>& plans, const GroupLayout& layout,
                           void* buffer, const DeviceInfo& dev, cudaStream_t stream,
                           const GroupUpload& upload);

}  // namespace cuda
}  // namespace bsn
