// Grouped spectral normalization: many layers' SN/BSN in one op call
// (bsn_cuda::group_forward / group_backward, docs/design.md "Grouped ops").
//
// The host side builds a table of per-layer ForwardParams / BackwardParams
// (the structs of bsn.h, filled by the per-layer prepare_* functions, so every
// check and every bit of a layer is the per-layer op's). A backend runs the
// table: the CPU backend in one parallel region (csrc/cpu/group_cpu.cpp); a
// CUDA backend can take the same table as launch descriptors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <tuple>
#include <vector>

#include "host.h"

namespace bsn {

// What layer i of a group is (the `kinds` argument of the ops).
enum GroupKind : int64_t {
  kGroupSN = 0,            // sn_forward(weight, u, v, dims[i]): vectors u, v
  kGroupBSN = 1,           // bsn_forward(weight, u0, v0, u1, v1): four vectors
  kGroupSNTransposed = 2,  // sn_forward(weight.reshape(size(0), -1), u, v, dim=1):
                           // torch's legacy (v-first) order; u, v of that matrix
                           // (torch's v, u)
};

inline int64_t group_vectors_per_layer(int64_t kind) { return kind == kGroupBSN ? 4 : 2; }

struct PreparedGroupForward {
  std::vector<PreparedForward> layers;  // layers[i].params: the descriptor table
  std::vector<at::Tensor> outs;         // in each weight's shape
  std::vector<at::Tensor> states;
  bool independent = true;  // no two layers share a vector (else: run in list order)
};

struct PreparedGroupBackward {
  std::vector<PreparedBackward> layers;
  std::vector<at::Tensor> grads;  // in each weight's shape
};

// Checks the lists (equal lengths, known kinds, one device) and every layer
// as its per-layer op does; errors name the group op and the layer.
PreparedGroupForward prepare_group_forward(at::TensorList weights, at::TensorList vectors,
                                           at::IntArrayRef kinds, at::IntArrayRef dims,
                                           at::IntArrayRef n_power_iterations,
                                           at::ArrayRef<double> eps, at::ArrayRef<double> scales,
                                           const c10::List<bool>& update);

PreparedGroupBackward prepare_group_backward(at::TensorList grad_outs, at::TensorList weights,
                                             at::TensorList states, at::IntArrayRef kinds,
                                             at::IntArrayRef dims, at::ArrayRef<double> scales);

using GroupForwardResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;

}  // namespace bsn
