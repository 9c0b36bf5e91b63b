// TORCH_LIBRARY_IMPL(bsn_cuda, CUDA): the grouped ops (csrc/group.h) on CUDA.
//
// The layers of a call are checked and prepared as the per-layer ops do
// (prepare_group_forward / _backward: their out / state / grad tensors), then
// split by dtype. The layers of one dtype (two or more) run as one grouped
// launch per phase step (launch.cu, "Grouped launches"; group.cuh): each layer
// planned by the per-layer planner, one device buffer holding the descriptor
// table and every layer's workspace, the table copied from pinned host memory
// on the current stream, then max(phases) launches. Same bits as the
// per-layer ops, whatever their launch mode.
//
// Per-layer launches (run_forward / run_backward, the per-layer ops' own path,
// in list order) instead, for the whole call:
//   * when two layers share a vector (their order matters; per-layer ops in
//     list order are the contract),
//   * while the current stream is being captured into a CUDA graph: the
//     table's copy would read pinned host memory at every replay, after the
//     host allocator has reused it; inside a graph the launch overhead the
//     grouped path saves is gone anyway,
//   * BSN_CUDA_GROUP=layers (tests and benchmarks; default: grouped);
// and for a dtype with one layer (its own mode: one launch in Single/Coop).
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "cuda/ops_cuda.h"
#include "group.h"

namespace bsn {
namespace cuda {
namespace {

constexpr const char* kForwardOp = "bsn_cuda::group_forward";
constexpr const char* kBackwardOp = "bsn_cuda::group_backward";

// BSN_CUDA_GROUP=grouped (default) | layers.
bool grouped_from_env() {
  const char* s = std::getenv("BSN_CUDA_GROUP");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "grouped") == 0) return true;
  if (std::strcmp(s, "layers") == 0) return false;
  TORCH_CHECK(false, "bsn_cuda: BSN_CUDA_GROUP must be grouped or layers, got '", s, "'");
}

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// The layers of each dtype, in list order.
template <typename Prepared>
std::map<at::ScalarType, std::vector<const Prepared*>> by_dtype(const std::vector<Prepared>& layers) {
  std::map<at::ScalarType, std::vector<const Prepared*>> m;
  for (const Prepared& l : layers) m[l.weight.scalar_type()].push_back(&l);
  return m;
}

// The group's device buffer (table, then workspaces) and the table's copy:
// pinned host memory, copied on the current stream (the caching host allocator
// keeps the pinned block until the copy has run).
at::Tensor group_buffer(const at::Tensor& like, int64_t bytes) {
  return at::empty({bytes}, like.options().dtype(at::kByte));
}
GroupUpload upload_to(const at::Tensor& buffer) {
  return [&buffer](const void* host, void* device, int64_t bytes) {
    TORCH_CHECK(device == buffer.data_ptr() && bytes <= buffer.numel(),
                "bsn_cuda: grouped launch: expected the table at the buffer's start, got ", device,
                " (buffer at ", buffer.data_ptr(), ")");
    at::Tensor pinned = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(pinned.data_ptr(), host, static_cast<size_t>(bytes));
    buffer.narrow(0, 0, bytes).copy_(pinned, /*non_blocking=*/true);
  };
}

void forward_grouped(const std::vector<const PreparedForward*>& layers, at::ScalarType dtype) {
  const DeviceInfo dev = device_info(Mode::Multi);
  std::vector<ForwardParams> params;
  std::vector<ForwardPlan> plans;
  for (const PreparedForward* l : layers) {
    params.push_back(l->params);
    plans.push_back(make_forward_plan(l->params, acc_size(dtype), dev, Mode::Multi));
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bsn_cuda_group_forward", [&] {
    const GroupLayout layout = group_forward_layout<scalar_t>(plans);
    const at::Tensor buffer = group_buffer(layers[0]->weight, layout.total_bytes);
    launch_group_forward<scalar_t>(params, plans, layout, buffer.data_ptr(), dev, stream,
                                   upload_to(buffer));
  });
}

void backward_grouped(const std::vector<const PreparedBackward*>& layers, at::ScalarType dtype) {
  const DeviceInfo dev = device_info(Mode::Multi);
  std::vector<BackwardParams> params;
  std::vector<BackwardPlan> plans;
  for (const PreparedBackward* l : layers) {
    params.push_back(l->params);
    plans.push_back(make_backward_plan(l->params, acc_size(dtype), dev, Mode::Multi));
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "bsn_cuda_group_backward", [&] {
    const GroupLayout layout = group_backward_layout<scalar_t>(plans);
    const at::Tensor buffer = group_buffer(layers[0]->weight, layout.total_bytes);
    launch_group_backward<scalar_t>(params, plans, layout, buffer.data_ptr(), dev, stream,
                                    upload_to(buffer));
  });
}

GroupForwardResult group_forward_cuda(at::TensorList weights, at::TensorList vectors,
                                      at::IntArrayRef kinds, at::IntArrayRef dims,
                                      at::IntArrayRef n_power_iterations, at::ArrayRef<double> eps,
                                      at::ArrayRef<double> scales, const c10::List<bool>& update) {
  // Every check (and error word) first; nothing is written before they pass.
  PreparedGroupForward group =
      prepare_group_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update);
  if (group.layers.empty()) return {std::move(group.outs), std::move(group.states)};
  check_cuda(kForwardOp, group.layers[0].weight);
  const c10::cuda::CUDAGuard guard(group.layers[0].weight.device());
  if (!group.independent || capturing() || !grouped_from_env()) {
    for (const PreparedForward& l : group.layers) run_forward(l);
  } else {
    for (const auto& [dtype, layers] : by_dtype(group.layers)) {
      if (layers.size() == 1) {
        run_forward(*layers[0]);
      } else {
        forward_grouped(layers, dtype);
      }
    }
  }
  return {std::move(group.outs), std::move(group.states)};
}

std::vector<at::Tensor> group_backward_cuda(at::TensorList grad_outs, at::TensorList weights,
                                            at::TensorList states, at::IntArrayRef kinds,
                                            at::IntArrayRef dims, at::ArrayRef<double> scales) {
  PreparedGroupBackward group = prepare_group_backward(grad_outs, weights, states, kinds, dims, scales);
  if (group.layers.empty()) return std::move(group.grads);
  check_cuda(kBackwardOp, group.layers[0].weight);
  const c10::cuda::CUDAGuard guard(group.layers[0].weight.device());
  if (capturing() || !grouped_from_env()) {
    for (const PreparedBackward& l : group.layers) run_backward(l);
  } else {
    for (const auto& [dtype, layers] : by_dtype(group.layers)) {
      if (layers.size() == 1) {
        run_backward(*layers[0]);
      } else {
        backward_grouped(layers, dtype);
      }
    }
  }
  return std::move(group.grads);
}

}  // namespace
}  // namespace cuda
}  // namespace bsn

TORCH_LIBRARY_IMPL(bsn_cuda, CUDA, m) {
  m.impl("group_forward", &bsn::cuda::group_forward_cuda);
  m.impl("group_backward", &bsn::cuda::group_backward_cuda);
}
