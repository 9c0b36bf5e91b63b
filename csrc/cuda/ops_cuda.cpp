// CUDA backend of the bsn_cuda ops: host side. Checks and allocation of out /
// state are shared with the other backends (host.cpp); this file plans the
// launch, allocates the workspace from the caching allocator (so a call can be
// captured in a CUDA graph), and launches on the current stream. No host
// synchronization anywhere.
//
// BSN_CUDA_MODE=auto|single|coop|multi forces a launch mode (see launch.cu);
// all modes give bitwise identical results. BSN_CUDA_TEST_COOP_OVERSUBSCRIBE=1
// (tests only) makes every cooperative launch fail, to test the fallback.
#include <cstdlib>
#include <cstring>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "cuda/ops_cuda.h"
#include "host.h"

namespace bsn {
namespace cuda {

Mode mode_from_env() {
  const char* s = std::getenv("BSN_CUDA_MODE");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return Mode::Auto;
  if (std::strcmp(s, "single") == 0) return Mode::Single;
  if (std::strcmp(s, "coop") == 0) return Mode::Coop;
  if (std::strcmp(s, "multi") == 0) return Mode::Multi;
  TORCH_CHECK(false, "bsn_cuda: BSN_CUDA_MODE must be auto, single, coop or multi, got '", s,
              "'");
}

// The current device (set by the caller's CUDAGuard). In Auto mode, while the
// current stream is being captured into a CUDA graph, the cooperative launch is
// not used (single-block or multi-kernel instead: same results): inside a graph
// the per-launch host overhead it saves is gone anyway, and this keeps graph
// capture (torch.compile mode="reduce-overhead") on plain kernel launches.
// BSN_CUDA_MODE=coop still captures the cooperative kernel (tests do).
DeviceInfo device_info(Mode mode) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  DeviceInfo d;
  d.device = static_cast<int>(c10::cuda::current_device());
  d.sm_count = prop->multiProcessorCount;
  d.smem_optin = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  d.cooperative = prop->cooperativeLaunch != 0;
  // Test only: make the driver refuse every cooperative launch (launch.cu falls
  // back to the multi-kernel mode), as it would under MPS.
  const char* over = std::getenv("BSN_CUDA_TEST_COOP_OVERSUBSCRIBE");
  d.coop_oversubscribe = over != nullptr && std::strcmp(over, "1") == 0;
  if (mode == Mode::Auto && d.cooperative &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    d.cooperative = false;
  }
  return d;
}

int acc_size(at::ScalarType dtype) { return dtype == at::kDouble ? 8 : 4; }

namespace {
at::Tensor workspace(const at::Tensor& like, int64_t elems) {
  return at::empty({elems > 0 ? elems : 1},
                   like.options().dtype(acc_dtype(like.scalar_type())));
}

// What every launch reads first: the mode, the device, the weight's dtype, the current stream.
struct LaunchContext {
  Mode mode;
  DeviceInfo dev;
  at::ScalarType dtype;
  cudaStream_t stream;
};

LaunchContext launch_context(const at::Tensor& weight) {
  const Mode mode = mode_from_env();
  return {mode, device_info(mode), weight.scalar_type(), at::cuda::getCurrentCUDAStream()};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> run_forward(const PreparedForward& prep) {
  const LaunchContext c = launch_context(prep.weight);
  const ForwardPlan plan = make_forward_plan(prep.params, acc_size(c.dtype), c.dev, c.mode);
  at::Tensor ws = workspace(prep.weight, plan.ws_elems);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "bsn_cuda_forward", [&] {
    launch_forward<scalar_t>(prep.params, plan, ws.data_ptr(), c.dev, c.stream);
  });
  return std::make_tuple(prep.out, prep.state);
}

at::Tensor run_backward(const PreparedBackward& prep) {
  const LaunchContext c = launch_context(prep.weight);
  const BackwardPlan plan = make_backward_plan(prep.params, acc_size(c.dtype), c.dev, c.mode);
  at::Tensor ws = workspace(prep.weight, plan.ws_elems);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "bsn_cuda_backward", [&] {
    launch_backward<scalar_t>(prep.params, plan, ws.data_ptr(), c.dev, c.stream);
  });
  return prep.grad_weight;
}

void check_cuda(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(weight.defined() && weight.is_cuda(), op,
              ": expected weight on a CUDA device (the CUDA kernel runs because an "
              "argument is on CUDA), got ",
              weight.defined() ? weight.device().str() : std::string("None"));
}

namespace {

// An op's CUDA kernel: the weight on a CUDA device, that device current, then `run`.
template <typename Run>
auto on_weights_device(const char* op, const at::Tensor& weight, const Run& run) {
  check_cuda(op, weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  return run();
}

// Signatures: mutable (Tensor(a!)) arguments as at::Tensor&, exactly as the CPU
// backend registers them (the dispatcher requires one C++ signature per op).
std::tuple<at::Tensor, at::Tensor> sn_forward_cuda(const at::Tensor& weight, at::Tensor& u,
                                                   at::Tensor& v, int64_t dim,
                                                   int64_t n_power_iterations, double eps,
                                                   double scale, bool update, double coeff,
                                                   const OptTensor& gamma, bool track_only) {
  return on_weights_device("bsn_cuda::sn_forward", weight, [&] {
    return run_forward(prepare_sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update,
                                          coeff, gamma, track_only));
  });
}

at::Tensor sn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                            const at::Tensor& state, int64_t dim, double scale, double coeff,
                            const OptTensor& gamma) {
  return on_weights_device("bsn_cuda::sn_backward", weight, [&] {
    return run_backward(prepare_sn_backward(grad_out, weight, state, dim, scale, coeff, gamma));
  });
}

std::tuple<at::Tensor, at::Tensor> bsn_forward_cuda(const at::Tensor& weight, at::Tensor& u0,
                                                    at::Tensor& v0, at::Tensor& u1, at::Tensor& v1,
                                                    int64_t n_power_iterations, double eps,
                                                    double scale, bool update, double coeff,
                                                    const OptTensor& gamma, bool track_only) {
  return on_weights_device("bsn_cuda::bsn_forward", weight, [&] {
    return run_forward(prepare_bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale,
                                           update, coeff, gamma, track_only));
  });
}

at::Tensor bsn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                             const at::Tensor& state, double scale, double coeff,
                             const OptTensor& gamma) {
  return on_weights_device("bsn_cuda::bsn_backward", weight, [&] {
    return run_backward(prepare_bsn_backward(grad_out, weight, state, scale, coeff, gamma));
  });
}

}  // namespace
}  // namespace cuda
}  // namespace bsn

TORCH_LIBRARY_IMPL(bsn_cuda, CUDA, m) {
  m.impl("sn_forward", &bsn::cuda::sn_forward_cuda);
  m.impl("sn_backward", &bsn::cuda::sn_backward_cuda);
  m.impl("bsn_forward", &bsn::cuda::bsn_forward_cuda);
  m.impl("bsn_backward", &bsn::cuda::bsn_backward_cuda);
}
