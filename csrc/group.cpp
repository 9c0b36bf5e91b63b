// Host side of the grouped ops (csrc/group.h), shared by every backend (the
// CUDA kernel of the grouped ops: csrc/cuda/group_cuda.cpp).
#include "group.h"

#include <algorithm>
#include <string>

namespace bsn {
namespace {

constexpr const char* kForwardOp = "bsn_cuda::group_forward";
constexpr const char* kBackwardOp = "bsn_cuda::group_backward";

const char* kind_name(int64_t kind) {
  switch (kind) {
    case kGroupSN: return "sn";
    case kGroupBSN: return "bsn";
    default: return "sn_transposed";
  }
}

void check_lengths(const char* op, const char* name, size_t got, size_t expected) {
  TORCH_CHECK(got == expected, op, ": expected ", name, " to have ", expected,
              " elements (one per weight), got ", got);
}

void check_kind(const char* op, int64_t i, int64_t kind) {
  TORCH_CHECK(kind == kGroupSN || kind == kGroupBSN || kind == kGroupSNTransposed, op,
              ": expected kinds[", i, "] to be 0 (sn), 1 (bsn) or 2 (sn_transposed), got ", kind);
}

// W_mat of the legacy order: the weight's first dimension against the rest.
at::Tensor rows_view(const char* op, int64_t i, const at::Tensor& weight) {
  TORCH_CHECK(weight.defined(), op, ": layer ", i, ": expected weight to be a tensor, got None");
  TORCH_CHECK(weight.dim() >= 1, op, ": layer ", i,
              " (sn_transposed): expected weight with at least 1 dimension, got ", weight.dim());
  return weight.reshape({weight.size(0), -1});
}

// Runs a per-layer check with the group op and the layer in front of its message.
template <typename F>
auto in_layer(const char* op, int64_t i, int64_t kind, const F& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, op, ": layer ", i, " (", kind_name(kind), "): ", e.msg());
  }
}

bool vectors_independent(at::TensorList vectors) {
  std::vector<const void*> ptrs;
  ptrs.reserve(vectors.size());
  for (const at::Tensor& v : vectors) ptrs.push_back(v.const_data_ptr());
  std::sort(ptrs.begin(), ptrs.end());
  return std::adjacent_find(ptrs.begin(), ptrs.end()) == ptrs.end();
}

}  // namespace

PreparedGroupForward prepare_group_forward(at::TensorList weights, at::TensorList vectors,
                                           at::IntArrayRef kinds, at::IntArrayRef dims,
                                           at::IntArrayRef n_power_iterations,
                                           at::ArrayRef<double> eps, at::ArrayRef<double> scales,
                                           const c10::List<bool>& update) {
  const char* op = kForwardOp;
  const size_t n = weights.size();
  check_lengths(op, "kinds", kinds.size(), n);
  check_lengths(op, "dims", dims.size(), n);
  check_lengths(op, "n_power_iterations", n_power_iterations.size(), n);
  check_lengths(op, "eps", eps.size(), n);
  check_lengths(op, "scales", scales.size(), n);
  check_lengths(op, "update", update.size(), n);
  size_t expected_vectors = 0;
  for (size_t i = 0; i < n; ++i) {
    check_kind(op, static_cast<int64_t>(i), kinds[i]);
    expected_vectors += group_vectors_per_layer(kinds[i]);
  }
  TORCH_CHECK(vectors.size() == expected_vectors, op, ": expected vectors to have ",
              expected_vectors, " elements (2 per sn/sn_transposed layer, 4 per bsn layer), got ",
              vectors.size());
  PreparedGroupForward group;
  group.layers.reserve(n);
  group.outs.reserve(n);
  group.states.reserve(n);
  size_t vi = 0;
  for (size_t j = 0; j < n; ++j) {
    const int64_t i = static_cast<int64_t>(j), kind = kinds[j];
    TORCH_CHECK(!weights[j].defined() || weights[j].device() == weights[0].device(), op,
                ": expected every weight on one device (", weights[0].device(), "), got weights[",
                i, "] on ", weights[j].device());
    const at::TensorList v = vectors.slice(vi, group_vectors_per_layer(kind));
    vi += group_vectors_per_layer(kind);
    group.layers.push_back(in_layer(op, i, kind, [&] {
      if (kind == kGroupBSN) {
        return prepare_bsn_forward(weights[j], v[0], v[1], v[2], v[3], n_power_iterations[j],
                                   eps[j], scales[j], update[j]);
      }
      if (kind == kGroupSN) {
        return prepare_sn_forward(weights[j], v[0], v[1], dims[j], n_power_iterations[j], eps[j],
                                  scales[j], update[j]);
      }
      return prepare_sn_forward(rows_view(op, i, weights[j]), v[0], v[1], 1,
                                n_power_iterations[j], eps[j], scales[j], update[j]);
    }));
    const PreparedForward& prep = group.layers.back();
    group.outs.push_back(kind == kGroupSNTransposed ? prep.out.view(weights[j].sizes()) : prep.out);
    group.states.push_back(prep.state);
  }
  group.independent = vectors_independent(vectors);
  return group;
}

PreparedGroupBackward prepare_group_backward(at::TensorList grad_outs, at::TensorList weights,
                                             at::TensorList states, at::IntArrayRef kinds,
                                             at::IntArrayRef dims, at::ArrayRef<double> scales) {
  const char* op = kBackwardOp;
  const size_t n = weights.size();
  check_lengths(op, "grad_outs", grad_outs.size(), n);
  check_lengths(op, "states", states.size(), n);
  check_lengths(op, "kinds", kinds.size(), n);
  check_lengths(op, "dims", dims.size(), n);
  check_lengths(op, "scales", scales.size(), n);
  PreparedGroupBackward group;
  group.layers.reserve(n);
  group.grads.reserve(n);
  for (size_t j = 0; j < n; ++j) {
    const int64_t i = static_cast<int64_t>(j), kind = kinds[j];
    check_kind(op, i, kind);
    group.layers.push_back(in_layer(op, i, kind, [&] {
      if (kind == kGroupBSN) return prepare_bsn_backward(grad_outs[j], weights[j], states[j], scales[j]);
      if (kind == kGroupSN) {
        return prepare_sn_backward(grad_outs[j], weights[j], states[j], dims[j], scales[j]);
      }
      TORCH_CHECK(grad_outs[j].defined() && grad_outs[j].sizes() == weights[j].sizes(), op,
                  ": layer ", i, " (sn_transposed): expected grad_out of the weight's shape ",
                  weights[j].sizes(), ", got ",
                  grad_outs[j].defined() ? c10::str(grad_outs[j].sizes()) : std::string("None"));
      return prepare_sn_backward(rows_view(op, i, grad_outs[j]), rows_view(op, i, weights[j]),
                                 states[j], 1, scales[j]);
    }));
    const at::Tensor& grad = group.layers.back().grad_weight;
    group.grads.push_back(kind == kGroupSNTransposed ? grad.view(weights[j].sizes()) : grad);
  }
  return group;
}

}  // namespace bsn
