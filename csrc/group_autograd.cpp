// TORCH_LIBRARY_IMPL(bsn_cuda, Autograd): autograd of bsn_cuda::group_forward.
//
// One graph node for every layer of the group (C++, as the per-layer forwards'
// nodes in autograd.cpp, for the same reason: it runs on every forward). Its
// backward makes one bsn_cuda::group_backward call for the layers whose output
// received a gradient and whose weight needs one; group_backward's own
// autograd (double backward) is registered in bsn_cuda/_double_backward.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "group.h"

namespace bsn {

const GroupForwardOp& group_forward_op() {
  static const GroupForwardOp op = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("bsn_cuda::group_forward", "")
                                       .typed<GroupForwardSignature>();
  return op;
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kOp = "bsn_cuda::group_forward";

// The non-tensor arguments, handed to the node's forward in one piece.
struct GroupArgs {
  at::TensorList vectors;
  at::IntArrayRef kinds, dims, n_power_iterations;
  at::ArrayRef<double> eps, scales;
  const c10::List<bool>* update;
};

GroupForwardResult call_group_forward(at::TensorList weights, const GroupArgs& a) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return group_forward_op().call(weights, a.vectors, a.kinds, a.dims, a.n_power_iterations, a.eps, a.scales,
                 *a.update);
}

std::vector<at::Tensor> call_group_backward(at::TensorList grad_outs, at::TensorList weights,
                                            at::TensorList states, at::IntArrayRef kinds,
                                            at::IntArrayRef dims, at::ArrayRef<double> scales) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bsn_cuda::group_backward", "")
                       .typed<std::vector<at::Tensor>(at::TensorList, at::TensorList,
                                                      at::TensorList, at::IntArrayRef,
                                                      at::IntArrayRef, at::ArrayRef<double>)>();
  // Its autograd (a Python kernel) only when the backward records a graph.
  if (at::GradMode::is_enabled()) return op.call(grad_outs, weights, states, kinds, dims, scales);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad_outs, weights, states, kinds, dims, scales);
}

// Where a weight's storage lives (0 for wrappers and fakes under a tracer, whose data cannot be read).
int64_t storage_address(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const c10::DispatchKeySet traced{c10::DispatchKey::Python, c10::DispatchKey::Functionalize};
  if (!impl->has_storage() || impl->key_set().has_any(traced)) return 0;
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(impl->storage().data()));
}

class GroupForward : public torch::autograd::Function<GroupForward> {
 public:
  // Compiled autograd may trace the backward: it only calls dispatcher ops.
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, at::TensorList weights, const GroupArgs* args,
                               std::vector<at::Tensor>* states_out) {
    auto [outs, states] = call_group_forward(weights, *args);
    // The weights are kept outside save_for_backward, with their versions checked in the
    // backward for the layers it computes only: a layer that is not differentiated (its
    // output unused, e.g. replaced by a newer one under update="once") may change meanwhile,
    // as it may per layer, where it has a node of its own.
    ctx->save_for_backward(states);
    // The data pointers too: a write the version counter does not see (`.data = t`, a storage
    // freed or resized, as FSDP2 does when it reshards) must not reach the backward silently.
    c10::List<at::Tensor> kept;
    std::vector<int64_t> versions, pointers;
    for (const at::Tensor& w : weights) {
      kept.push_back(w);
      versions.push_back(w.requires_grad() ? static_cast<int64_t>(w._version()) : -1);
      pointers.push_back(storage_address(w));
    }
    ctx->saved_data["weights"] = kept;
    ctx->saved_data["versions"] = versions;
    ctx->saved_data["pointers"] = pointers;
    ctx->set_materialize_grads(false);
    ctx->saved_data["kinds"] = args->kinds.vec();
    ctx->saved_data["dims"] = args->dims.vec();
    ctx->saved_data["scales"] = args->scales.vec();
    // A layer whose weight needs no gradient gets an output without one, as per layer.
    variable_list frozen;
    for (size_t i = 0; i < weights.size(); ++i) {
      if (!weights[i].requires_grad()) frozen.push_back(outs[i]);
    }
    if (!frozen.empty()) ctx->mark_non_differentiable(frozen);
    *states_out = std::move(states);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();  // the states
    const size_t n = saved.size();
    const c10::List<at::Tensor> weights = ctx->saved_data["weights"].toTensorList();
    const std::vector<int64_t> versions = ctx->saved_data["versions"].toIntVector();
    const std::vector<int64_t> pointers = ctx->saved_data["pointers"].toIntVector();
    const std::vector<int64_t> kinds = ctx->saved_data["kinds"].toIntVector();
    const std::vector<int64_t> dims = ctx->saved_data["dims"].toIntVector();
    const std::vector<double> scales = ctx->saved_data["scales"].toDoubleVector();
    std::vector<size_t> index;
    std::vector<at::Tensor> g, w, s;
    std::vector<int64_t> k, d;
    std::vector<double> sc;
    for (size_t i = 0; i < n; ++i) {
      if (i >= grads.size() || !grads[i].defined() || !ctx->needs_input_grad(i)) continue;
      const at::Tensor weight = weights.get(i);
      TORCH_CHECK(static_cast<int64_t>(weight._version()) == versions[i],
                  "one of the variables needed for gradient computation has been modified by an "
                  "inplace operation: weights[", i, "] of bsn_cuda::group_forward (shape ",
                  weight.sizes(), ") is at version ", weight._version(), "; expected version ",
                  versions[i], " instead");
      TORCH_CHECK(storage_address(weight) == pointers[i],
                  "bsn_cuda::group_forward's backward: expected weights[", i, "] (shape ", weight.sizes(),
                  ") to hold the memory it had in the forward, got a tensor whose storage was replaced or "
                  "freed in between (e.g. `.data = t`, or FSDP2 resharding a grouped weight); such a "
                  "layer must run per layer (bsn_cuda.ungroup_spectral_norm)");
      index.push_back(i);
      g.push_back(grads[i]);
      w.push_back(weight);
      s.push_back(saved[i]);
      k.push_back(kinds[i]);
      d.push_back(dims[i]);
      sc.push_back(scales[i]);
    }
    variable_list result(n + 2);  // + the two non-tensor arguments of forward
    if (index.empty()) return result;
    std::vector<at::Tensor> grad_weights = call_group_backward(g, w, s, k, d, sc);
    for (size_t j = 0; j < index.size(); ++j) result[index[j]] = std::move(grad_weights[j]);
    return result;
  }
};

GroupForwardResult group_forward_autograd(at::TensorList weights, at::TensorList vectors,
                                          at::IntArrayRef kinds, at::IntArrayRef dims,
                                          at::IntArrayRef n_power_iterations,
                                          at::ArrayRef<double> eps, at::ArrayRef<double> scales,
                                          const c10::List<bool>& update) {
  bool records = false;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& weight = weights[i];
    TORCH_CHECK(weight.defined(), kOp, ": expected weights[", i, "] to be a tensor, got None");
    TORCH_CHECK(!weight._fw_grad(/*level=*/0).defined(), kOp, ": expected weights[", i,
                "] without a forward-mode tangent, got a dual tensor (the fused op has no forward "
                "derivative; bsn_cuda's module API runs forward-mode AD per layer through the "
                "reference implementation)");
    records = records || weight.requires_grad();
  }
  for (size_t i = 0; i < vectors.size(); ++i) {
    TORCH_CHECK(vectors[i].defined(), kOp, ": expected vectors[", i, "] to be a tensor, got None");
    TORCH_CHECK(!vectors[i].requires_grad(), kOp, ": expected vectors[", i,
                "] not to require grad (a power-iteration buffer updated in place; only the "
                "weights are differentiable), got requires_grad=True");
  }
  // The kernels write the vectors through raw pointers: tell autograd, as the per-layer ops do.
  for (const at::Tensor& v : vectors) {
    if (!v.is_inference()) v.unsafeGetTensorImpl()->bump_version();
  }
  const GroupArgs args{vectors, kinds, dims, n_power_iterations, eps, scales, &update};
  if (!(records && at::GradMode::is_enabled())) return call_group_forward(weights, args);
  std::vector<at::Tensor> states;
  variable_list outs = GroupForward::apply(weights, &args, &states);
  return {std::move(outs), std::move(states)};
}

}  // namespace
}  // namespace bsn

TORCH_LIBRARY_IMPL(bsn_cuda, Autograd, m) {
  m.impl("group_forward", &bsn::group_forward_autograd);
}
