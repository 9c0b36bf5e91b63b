// TORCH_LIBRARY_IMPL(bsn_cuda, Autograd): autograd of the two forward ops.
//
// In C++ rather than Python because it runs on every forward of every layer:
// a Python kernel at the Autograd key plus a Python autograd.Function cost
// 15-25 us per call, more than the whole fused kernel on most GAN layers.
// (torch.library.register_autograd would be the usual place, but it refuses
// ops that mutate inputs, and these update u/v in place.) The backward ops are
// functional; their own autograd (double backward) is bsn_cuda/_double_backward.py,
// registered by bsn_cuda/_library.py.
#include "autograd.h"
#include "bsn.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <utility>

namespace bsn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using ForwardResult = std::tuple<at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

// Power-iteration buffers are state, not parameters: an input that requires
// grad there is a user error (its gradient would silently be dropped).
void check_buffers(const char* op, const at::Tensor& weight,
                   std::initializer_list<std::pair<const char*, const at::Tensor*>> buffers) {
  TORCH_CHECK(weight.defined(), op, ": expected weight to be a tensor, got None");
  for (const auto& [name, buf] : buffers) {
    TORCH_CHECK(buf->defined(), op, ": expected ", name, " to be a tensor, got None");
    TORCH_CHECK(!buf->requires_grad(), op, ": expected ", name,
                " not to require grad (it is a power-iteration buffer updated in place; only "
                "the weight is differentiable), got requires_grad=True");
  }
}

// The fused ops have no forward derivative: a weight with a tangent (forward-
// mode AD) must fail loudly instead of giving an output without one.
// bsn_cuda's Python entry points route forward-mode AD and torch.func
// transforms to the differentiable reference before they get here.
void check_no_tangent(const char* op, const at::Tensor& weight) {
  TORCH_CHECK(!weight._fw_grad(/*level=*/0).defined(), op,
              ": expected a weight without a forward-mode tangent, got a dual tensor (the fused "
              "op has no forward derivative; bsn_cuda.functional and the module API run "
              "forward-mode AD through the reference implementation)");
}

// The kernels write u/v through raw pointers; tell autograd, as torch's own
// in-place ops do, so that a stale saved copy is detected. Inference tensors
// have no version counter.
void bump_versions(std::initializer_list<const at::Tensor*> buffers) {
  for (const at::Tensor* buf : buffers) {
    if (!buf->is_inference()) buf->unsafeGetTensorImpl()->bump_version();
  }
}

// The backward's result: one entry per forward argument, only the weight's
// (and gamma's) defined. (+1: the forwards' state_out pointer)
constexpr size_t kSNArgs = 12, kSNTransposedArgs = 8, kBSNArgs = 13;
constexpr size_t kSNGamma = 9, kBSNGamma = 10;  // gamma's position among them
variable_list weight_grad_only(at::Tensor grad_weight, size_t num_args) {
  variable_list grads(num_args);
  grads[0] = std::move(grad_weight);
  return grads;
}

bool records_graph(const at::Tensor& weight) {
  return at::GradMode::is_enabled() && weight.requires_grad();
}

bool has_gamma(const OptTensor& gamma) { return gamma.has_value() && gamma->defined(); }

// d loss / d gamma = a1 * <G, W> (docs/design.md, Variants), in the acc dtype,
// as torch ops (no host sync). Under create_graph it is differentiable, with
// sigma's dependence on W as u^T W_mat v (`live`: that product, u, v constant).
template <typename Live>
at::Tensor gamma_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& state,
                      double scale, double coeff, const at::Tensor& gamma, const Live& live) {
  const auto acc = state.scalar_type();
  const at::Tensor c = at::dot(grad.reshape(-1).to(acc), weight.reshape(-1).to(acc));
  at::Tensor sigma = state.select(0, 0);
  if (at::GradMode::is_enabled()) {
    const at::Tensor x = live(weight.to(acc));
    sigma = sigma + (x - x.detach());
  }
  const at::Tensor proj = coeff > 0 ? at::logical_not(sigma.le(coeff)) : sigma.ne(0);
  const at::Tensor sigma_p = at::where(proj, sigma, at::ones_like(sigma));
  const at::Tensor a1 = at::where(proj, projected_scale(scale, coeff) / sigma_p,
                                  at::full_like(sigma, scale));
  return (a1 * c).reshape(gamma.sizes()).to(gamma.scalar_type());
}

// u^T W_mat(dim) v for the pair whose u starts at `offset` in the state.
at::Tensor pair_product(const at::Tensor& w_acc, const at::Tensor& state, int64_t dim,
                        int64_t offset) {
  const int64_t d = dim < 0 ? dim + w_acc.dim() : dim;
  const int64_t m = w_acc.size(d);
  const int64_t n = w_acc.numel() / m;
  const at::Tensor w_mat = w_acc.movedim(d, 0).reshape({m, n});
  return at::dot(state.narrow(0, offset, m), at::mv(w_mat, state.narrow(0, offset + m, n)));
}

// Calls a backward op. Its own autograd (for double backward) is a Python
// kernel: go through it only when the backward records a graph
// (create_graph=True), and skip it otherwise.
template <typename Op, typename... Args>
at::Tensor call_backward_op(const Op& op, const Args&... args) {
  if (at::GradMode::is_enabled()) return op.call(args...);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(args...);
}

// What every forward's backward needs: the weight, the op's state and the scale.
//
// The node's only output is `out`. The state leaves the forward through
// `state_out` instead of as a second output marked non-differentiable: it is
// computed under the node's no-grad forward, so it needs no marking, and
// compiled autograd refuses C++ nodes with non-differentiable outputs.
void save_context(AutogradContext* ctx, const at::Tensor& weight, at::Tensor state,
                  double scale, at::Tensor* state_out, double coeff = 0.0,
                  const OptTensor& gamma = std::nullopt) {
  ctx->save_for_backward({weight, state, has_gamma(gamma) ? *gamma : at::Tensor()});
  ctx->set_materialize_grads(false);  // an undefined gradient: nothing to compute
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["coeff"] = coeff;
  *state_out = std::move(state);
}

OptTensor saved_gamma(const variable_list& saved) {
  return saved[2].defined() ? OptTensor(saved[2]) : OptTensor();
}

// ---------------------------------------------------------------------------
// SN

ForwardResult call_sn_forward(const at::Tensor& weight, at::Tensor& u, at::Tensor& v,
                              int64_t dim, int64_t n_power_iterations, double eps,
                              double scale, bool update, double coeff = 0.0,
                              const OptTensor& gamma = std::nullopt, bool track_only = false) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bsn_cuda::sn_forward", "")
                       .typed<ForwardResult(const at::Tensor&, at::Tensor&, at::Tensor&,
                                            int64_t, int64_t, double, double, bool, double,
                                            const OptTensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(weight, u, v, dim, n_power_iterations, eps, scale, update, coeff, gamma,
                 track_only);
}

at::Tensor call_sn_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                            const at::Tensor& state, int64_t dim, double scale,
                            double coeff = 0.0, const OptTensor& gamma = std::nullopt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bsn_cuda::sn_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, double, double,
                                         const OptTensor&)>();
  return call_backward_op(op, grad_out, weight, state, dim, scale, coeff, gamma);
}

class SNForward : public torch::autograd::Function<SNForward> {
 public:
  // Compiled autograd may trace the backward: it only calls dispatcher ops.
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, at::Tensor u,
                               at::Tensor v, int64_t dim, int64_t n_power_iterations,
                               double eps, double scale, bool update, double coeff,
                               const OptTensor& gamma, bool track_only, at::Tensor* state_out) {
    auto [out, state] = call_sn_forward(weight, u, v, dim, n_power_iterations, eps, scale,
                                        update, coeff, gamma, track_only);
    save_context(ctx, weight, std::move(state), scale, state_out, coeff, gamma);
    ctx->saved_data["dim"] = dim;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return weight_grad_only({}, kSNArgs);  // out did not reach the loss
    const variable_list saved = ctx->get_saved_variables();
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const double coeff = ctx->saved_data["coeff"].toDouble();
    const OptTensor gamma = saved_gamma(saved);
    at::Tensor grad_weight;
    if (saved[0].requires_grad()) {
      grad_weight = call_sn_backward(grads[0], saved[0], saved[1], dim, scale, coeff, gamma);
    }
    variable_list result = weight_grad_only(std::move(grad_weight), kSNArgs);
    if (has_gamma(gamma) && gamma->requires_grad()) {
      result[kSNGamma] = gamma_grad(grads[0], saved[0], saved[1], scale, coeff, *gamma,
                                    [&](const at::Tensor& w) {
                                      return pair_product(w, saved[1], dim, 1);
                                    });
    }
    return result;
  }
};

// Whether a forward records a graph: the weight or gamma requires grad (a
// track-only call never does: its output is the caller's weight itself).
bool records_variant_graph(const at::Tensor& weight, const OptTensor& gamma, bool track_only) {
  if (track_only) return false;
  return records_graph(weight) || (has_gamma(gamma) && records_graph(*gamma));
}

ForwardResult sn_forward_autograd(const at::Tensor& weight, at::Tensor& u, at::Tensor& v,
                                  int64_t dim, int64_t n_power_iterations, double eps,
                                  double scale, bool update, double coeff, const OptTensor& gamma,
                                  bool track_only) {
  check_buffers("bsn_cuda::sn_forward", weight, {{"u", &u}, {"v", &v}});
  check_no_tangent("bsn_cuda::sn_forward", weight);
  if (has_gamma(gamma)) check_no_tangent("bsn_cuda::sn_forward", *gamma);
  bump_versions({&u, &v});
  if (!records_variant_graph(weight, gamma, track_only)) {
    return call_sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, coeff, gamma,
                           track_only);
  }
  at::Tensor state;
  variable_list result = SNForward::apply(weight, u, v, dim, n_power_iterations, eps, scale,
                                          update, coeff, gamma, track_only, &state);
  return {std::move(result[0]), std::move(state)};
}

// ---------------------------------------------------------------------------
// SN with torch's legacy (v-first) order: the op on W_mat^T. See autograd.h.

// A dense CPU/CUDA tensor with nothing in front of its kernels (no subclass,
// dispatch mode, functorch or functionalization wrapper, conj/neg bit) and
// concrete sizes (compiled autograd may run a backward on symbolic ones).
bool plain_dense(const at::Tensor& t) {
  static const c10::DispatchKeySet plain_keys{
      c10::DispatchKey::CPU,         c10::DispatchKey::CUDA,         c10::DispatchKey::ADInplaceOrView,
      c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutogradCUDA, c10::DispatchKey::AutocastCPU,
      c10::DispatchKey::AutocastCUDA};
  return plain_keys.isSupersetOf(t.key_set()) && t.layout() == at::kStrided &&
         !t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// W_mat of a weight: its first dimension against the rest (a 1-D weight is
// [n, 1]), for the op below autograd. A contiguous plain tensor gets an alias
// made without the dispatcher (a reshape is two calls through it, a
// microsecond of a small layer's forward); the alias shares the storage but
// not the version counter or autograd metadata, which no caller needs: the
// op only reads it. Anything else takes reshape.
at::Tensor rows_matrix(const at::Tensor& t) {
  if (plain_dense(t) && t.numel() > 0 && t.is_contiguous()) {
    auto alias = at::detail::make_tensor<c10::TensorImpl>(
        c10::TensorImpl::VIEW, c10::Storage(t.storage()), t.key_set(), t.dtype());
    alias.unsafeGetTensorImpl()->set_storage_offset(t.storage_offset());
    alias.unsafeGetTensorImpl()->set_sizes_contiguous({t.size(0), t.numel() / t.size(0)});
    return alias;
  }
  return t.reshape_symint({t.sym_size(0), -1});
}

// A kernel's fresh, contiguous result in the weight's shape: its sizes are set
// in place when nothing else holds it, else it is viewed (below autograd: a
// plain alias, not an autograd view; this node is its only producer).
at::Tensor in_weight_shape(at::Tensor result, const at::Tensor& weight) {
  if (plain_dense(result) && plain_dense(weight) && result.use_count() == 1 &&
      result.is_contiguous() && result.unsafeGetTensorImpl()->allow_tensor_metadata_change()) {
    result.unsafeGetTensorImpl()->set_sizes_contiguous(weight.sizes());
    return result;
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return result.view_symint(weight.sym_sizes());
}

// The legacy order itself, its one C++ home: sn_forward on W_mat with the
// vectors' roles swapped (u_op = torch's v, v_op = torch's u) along dim 1, the
// output back in the weight's shape; the state is [sigma, v, u].
ForwardResult call_sn_forward_transposed(const at::Tensor& weight, at::Tensor& u, at::Tensor& v,
                                         int64_t n_power_iterations, double eps, double scale,
                                         bool update) {
  auto [out, state] = call_sn_forward(rows_matrix(weight), v, u, /*dim=*/1, n_power_iterations,
                                      eps, scale, update);
  return {in_weight_shape(std::move(out), weight), std::move(state)};
}

class SNTransposedForward : public torch::autograd::Function<SNTransposedForward> {
 public:
  // Compiled autograd may trace the backward: it only calls dispatcher ops.
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, at::Tensor u,
                               at::Tensor v, int64_t n_power_iterations, double eps,
                               double scale, bool update, at::Tensor* state_out) {
    auto [out, state] =
        call_sn_forward_transposed(weight, u, v, n_power_iterations, eps, scale, update);
    save_context(ctx, weight, std::move(state), scale, state_out);
    return {std::move(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return weight_grad_only({}, kSNTransposedArgs);
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const double scale = ctx->saved_data["scale"].toDouble();
    if (at::GradMode::is_enabled()) {  // create_graph: differentiable reshapes for double backward
      at::Tensor grad_weight = call_sn_backward(grads[0].reshape_symint({weight.sym_size(0), -1}),
                                                weight.reshape_symint({weight.sym_size(0), -1}),
                                                saved[1], /*dim=*/1, scale);
      return weight_grad_only(grad_weight.view_symint(weight.sym_sizes()), kSNTransposedArgs);
    }
    at::Tensor grad_weight =
        call_sn_backward(rows_matrix(grads[0]), rows_matrix(weight), saved[1], /*dim=*/1, scale);
    return weight_grad_only(in_weight_shape(std::move(grad_weight), weight), kSNTransposedArgs);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> sn_forward_transposed(const at::Tensor& weight, at::Tensor& u,
                                                         at::Tensor& v, int64_t n_power_iterations,
                                                         double eps, double scale, bool update) {
  TORCH_CHECK(weight.defined(), "bsn_cuda::sn_forward: expected weight to be a tensor, got None");
  TORCH_CHECK(weight.dim() >= 1, "bsn_cuda::sn_forward: expected weight with at least 1 dimension "
              "(torch's legacy order), got ", weight.dim());
  check_buffers("bsn_cuda::sn_forward", weight, {{"u", &u}, {"v", &v}});
  check_no_tangent("bsn_cuda::sn_forward", weight);
  bump_versions({&u, &v});
  if (!records_graph(weight)) {
    return call_sn_forward_transposed(weight, u, v, n_power_iterations, eps, scale, update);
  }
  at::Tensor state;
  variable_list result =
      SNTransposedForward::apply(weight, u, v, n_power_iterations, eps, scale, update, &state);
  return {std::move(result[0]), std::move(state)};
}

namespace {

// ---------------------------------------------------------------------------
// BSN

ForwardResult call_bsn_forward(const at::Tensor& weight, at::Tensor& u0, at::Tensor& v0,
                               at::Tensor& u1, at::Tensor& v1, int64_t n_power_iterations,
                               double eps, double scale, bool update, double coeff,
                               const OptTensor& gamma, bool track_only) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bsn_cuda::bsn_forward", "")
          .typed<ForwardResult(const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                               at::Tensor&, int64_t, double, double, bool, double,
                               const OptTensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, coeff, gamma,
                 track_only);
}

at::Tensor call_bsn_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                             const at::Tensor& state, double scale, double coeff,
                             const OptTensor& gamma) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bsn_cuda::bsn_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double, double, const OptTensor&)>();
  return call_backward_op(op, grad_out, weight, state, scale, coeff, gamma);
}

class BSNForward : public torch::autograd::Function<BSNForward> {
 public:
  // Compiled autograd may trace the backward: it only calls dispatcher ops.
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, const at::Tensor& weight, at::Tensor u0,
                               at::Tensor v0, at::Tensor u1, at::Tensor v1,
                               int64_t n_power_iterations, double eps, double scale,
                               bool update, double coeff, const OptTensor& gamma,
                               bool track_only, at::Tensor* state_out) {
    auto [out, state] = call_bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale,
                                         update, coeff, gamma, track_only);
    save_context(ctx, weight, std::move(state), scale, state_out, coeff, gamma);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return weight_grad_only({}, kBSNArgs);
    const variable_list saved = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
    const double coeff = ctx->saved_data["coeff"].toDouble();
    const OptTensor gamma = saved_gamma(saved);
    at::Tensor grad_weight;
    if (saved[0].requires_grad()) {
      grad_weight = call_bsn_backward(grads[0], saved[0], saved[1], scale, coeff, gamma);
    }
    variable_list result = weight_grad_only(std::move(grad_weight), kBSNArgs);
    if (has_gamma(gamma) && gamma->requires_grad()) {
      const at::Tensor& st = saved[1];
      result[kBSNGamma] = gamma_grad(grads[0], saved[0], st, scale, coeff, *gamma,
                                     [&](const at::Tensor& w) {
                                       const int64_t off1 = 3 + w.size(0) + w.numel() / w.size(0);
                                       return (pair_product(w, st, 0, 3) +
                                               pair_product(w, st, 1, off1)) / 2;
                                     });
    }
    return result;
  }
};

ForwardResult bsn_forward_autograd(const at::Tensor& weight, at::Tensor& u0, at::Tensor& v0,
                                   at::Tensor& u1, at::Tensor& v1,
                                   int64_t n_power_iterations, double eps, double scale,
                                   bool update, double coeff, const OptTensor& gamma,
                                   bool track_only) {
  check_buffers("bsn_cuda::bsn_forward", weight,
                {{"u0", &u0}, {"v0", &v0}, {"u1", &u1}, {"v1", &v1}});
  check_no_tangent("bsn_cuda::bsn_forward", weight);
  if (has_gamma(gamma)) check_no_tangent("bsn_cuda::bsn_forward", *gamma);
  bump_versions({&u0, &v0, &u1, &v1});
  if (!records_variant_graph(weight, gamma, track_only)) {
    return call_bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, coeff,
                            gamma, track_only);
  }
  at::Tensor state;
  variable_list result = BSNForward::apply(weight, u0, v0, u1, v1, n_power_iterations, eps,
                                           scale, update, coeff, gamma, track_only, &state);
  return {std::move(result[0]), std::move(state)};
}

}  // namespace
}  // namespace bsn

TORCH_LIBRARY_IMPL(bsn_cuda, Autograd, m) {
  m.impl("sn_forward", &bsn::sn_forward_autograd);
  m.impl("bsn_forward", &bsn::bsn_forward_autograd);
}
