// TORCH_LIBRARY_IMPL(bsn_cuda, CPU): the grouped ops (csrc/group.h).
//
// Every layer runs the per-layer kernel (cpu::forward / cpu::backward) on its
// own descriptor, so its bits are the per-layer op's: the kernels split work
// by shape only, never by thread count. Small layers (one chunk in the
// per-layer kernels) run concurrently in one parallel region, each on one
// thread (a parallel loop inside a parallel region runs inline), split into
// one contiguous run of layers per thread with about equal element counts;
// large layers then run one after another, each with every thread. Layers
// that share a vector run in list order, one at a time, as per-layer calls
// in that order would.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "group.h"
#include "kernels_cpu.h"

namespace bsn {
namespace {

// Below this many elements the per-layer kernels use one chunk (one thread).
constexpr int64_t kSmallLayer = 65536;
// A region costs a few microseconds to open: not for less work than this.
constexpr int64_t kMinRegionWork = 65536;
// Per-layer cost beyond its elements (descriptor, vectors, state), in elements.
constexpr int64_t kLayerOverhead = 256;

template <typename Params, typename Run>
void run_table(const std::vector<const Params*>& table, const std::vector<at::ScalarType>& dtypes,
               bool independent, const Run& run) {
  const int64_t n = static_cast<int64_t>(table.size());
  if (!independent) {
    for (int64_t i = 0; i < n; ++i) run(dtypes[i], *table[i]);
    return;
  }
  std::vector<int64_t> small;
  int64_t small_work = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (table[i]->numel < kSmallLayer) {
      small.push_back(i);
      small_work += table[i]->numel + kLayerOverhead;
    }
  }
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t tasks = small_work >= kMinRegionWork
                            ? std::min<int64_t>(threads, static_cast<int64_t>(small.size()))
                            : 1;
  if (tasks <= 1) {
    for (int64_t i : small) run(dtypes[i], *table[i]);
  } else {
    // Task t takes the small layers whose cumulative work starts in [t, t+1) * small_work / tasks.
    std::vector<size_t> bounds(tasks + 1, small.size());
    bounds[0] = 0;
    int64_t acc = 0;
    int64_t t = 1;
    for (size_t k = 0; k < small.size() && t < tasks; ++k) {
      while (t < tasks && acc >= t * small_work / tasks) bounds[t++] = k;
      acc += table[small[k]]->numel + kLayerOverhead;
    }
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        for (size_t k = bounds[task]; k < bounds[task + 1]; ++k) run(dtypes[small[k]], *table[small[k]]);
      }
    });
  }
  for (int64_t i = 0; i < n; ++i) {
    if (table[i]->numel >= kSmallLayer) run(dtypes[i], *table[i]);
  }
}

void forward_layer(at::ScalarType dtype, const ForwardParams& p) {
  switch (dtype) {
    case at::kFloat: return cpu::forward<float>(p);
    case at::kDouble: return cpu::forward<double>(p);
    case at::kHalf: return cpu::forward<c10::Half>(p);
    case at::kBFloat16: return cpu::forward<c10::BFloat16>(p);
    default: TORCH_CHECK(false, "bsn_cuda::group_forward: unexpected dtype ", dtype);
  }
}

void backward_layer(at::ScalarType dtype, const BackwardParams& p) {
  switch (dtype) {
    case at::kFloat: return cpu::backward<float>(p);
    case at::kDouble: return cpu::backward<double>(p);
    case at::kHalf: return cpu::backward<c10::Half>(p);
    case at::kBFloat16: return cpu::backward<c10::BFloat16>(p);
    default: TORCH_CHECK(false, "bsn_cuda::group_backward: unexpected dtype ", dtype);
  }
}

GroupForwardResult group_forward_cpu(at::TensorList weights, at::TensorList vectors,
                                     at::IntArrayRef kinds, at::IntArrayRef dims,
                                     at::IntArrayRef n_power_iterations, at::ArrayRef<double> eps,
                                     at::ArrayRef<double> scales, const c10::List<bool>& update) {
  PreparedGroupForward group =
      prepare_group_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update);
  std::vector<const ForwardParams*> table;
  std::vector<at::ScalarType> dtypes;
  table.reserve(group.layers.size());
  dtypes.reserve(group.layers.size());
  for (const PreparedForward& layer : group.layers) {
    table.push_back(&layer.params);
    dtypes.push_back(layer.weight.scalar_type());
  }
  run_table(table, dtypes, group.independent, forward_layer);
  return {std::move(group.outs), std::move(group.states)};
}

std::vector<at::Tensor> group_backward_cpu(at::TensorList grad_outs, at::TensorList weights,
                                           at::TensorList states, at::IntArrayRef kinds,
                                           at::IntArrayRef dims, at::ArrayRef<double> scales) {
  PreparedGroupBackward group = prepare_group_backward(grad_outs, weights, states, kinds, dims, scales);
  std::vector<const BackwardParams*> table;
  std::vector<at::ScalarType> dtypes;
  table.reserve(group.layers.size());
  dtypes.reserve(group.layers.size());
  for (const PreparedBackward& layer : group.layers) {
    table.push_back(&layer.params);
    dtypes.push_back(layer.weight.scalar_type());
  }
  run_table(table, dtypes, /*independent=*/true, backward_layer);
  return std::move(group.grads);
}

}  // namespace
}  // namespace bsn

TORCH_LIBRARY_IMPL(bsn_cuda, CPU, m) {
  m.impl("group_forward", &bsn::group_forward_cpu);
  m.impl("group_backward", &bsn::group_backward_cpu);
}
