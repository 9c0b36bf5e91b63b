// Plain parameter structs shared by the host code and every backend's kernels.
// No torch types here, so .cu files can include it cheaply.
#pragma once

#include <cstdint>

namespace bsn {

// The matrix A = W.movedim(d, 0).reshape(rows, -1) of a contiguous weight W
// viewed as [outer, rows, inner]:  A[m, p * inner + r] = W[(p * rows + m) * inner + r].
struct Matricization {
  int64_t outer = 1;  // prod(size[:d])
  int64_t rows = 0;   // size[d]       (length of u)
  int64_t inner = 1;  // prod(size[d+1:])
  int64_t cols() const { return outer * inner; }  // length of v
};

// Pair k's vectors inside the state snapshot (see docs/design.md):
//   SN  (num_pairs 1): [sigma, u, v]
//   BSN (num_pairs 2): [sigma, sigma_0, sigma_1, u0, v0, u1, v1]
inline int64_t state_header(int num_pairs) { return num_pairs == 1 ? 1 : 3; }
inline int64_t state_u_offset(const Matricization* mat, int num_pairs, int k) {
  int64_t off = state_header(num_pairs);
  for (int j = 0; j < k; ++j) off += mat[j].rows + mat[j].cols();
  return off;
}
inline int64_t state_v_offset(const Matricization* mat, int num_pairs, int k) {
  return state_u_offset(mat, num_pairs, k) + mat[k].rows;
}
inline int64_t state_size(const Matricization* mat, int num_pairs) {
  return state_u_offset(mat, num_pairs, num_pairs);
}

// One forward call. SN: num_pairs == 1, mat[0] is the matricization along dim.
// BSN: num_pairs == 2, mat[0] along dim 0 (outer == 1), mat[1] along dim 1
// (mat[1].outer == mat[0].rows, mat[1].rows * mat[1].inner == mat[0].inner).
struct ForwardParams {
  const void* weight = nullptr;  // numel elements, contiguous, weight dtype
  void* out = nullptr;           // numel elements, contiguous, weight dtype
  void* u[2] = {nullptr, nullptr};  // in/out buffers, weight dtype, mat[k].rows
  void* v[2] = {nullptr, nullptr};  // in/out buffers, weight dtype, mat[k].cols()
  void* state = nullptr;         // acc_t, state_size(mat, num_pairs) elements
  int64_t numel = 0;
  int num_pairs = 1;
  Matricization mat[2];
  int n_power_iterations = 1;
  double eps = 1e-12;
  double scale = 1.0;
  bool update = true;            // training: iterate and write u/v back
  // Variants (docs/design.md): soft bound (coeff > 0), learnable scale (gamma:
  // one acc_t element, nullptr = 1), track-only (no output pass; out unused).
  double coeff = 0.0;
  const void* gamma = nullptr;
  bool track_only = false;
};

struct BackwardParams {
  const void* grad_out = nullptr;  // numel elements, contiguous, weight dtype
  const void* weight = nullptr;    // numel elements, contiguous, weight dtype
  const void* state = nullptr;     // acc_t snapshot written by the forward
  void* grad_weight = nullptr;     // numel elements, contiguous, weight dtype
  int64_t numel = 0;
  int num_pairs = 1;
  Matricization mat[2];
  double scale = 1.0;
  double coeff = 0.0;            // as in ForwardParams
  const void* gamma = nullptr;
};

// Whether the output factor depends on sigma (docs/design.md, Variants):
// SN (coeff == 0) unless sigma == 0 (the zero rule); the soft bound unless
// sigma <= coeff (the tie takes the identity branch; NaN projects). When it
// does, a = gamma * (scale * k) / sigma with k = coeff or 1, and the backward
// subtracts (a <G, W> / sigma) D; otherwise a = gamma * scale.
template <typename A>
#if defined(__CUDACC__)
__host__ __device__
#endif
inline bool variant_projects(A sigma, A coeff) {
  return coeff > A(0) ? !(sigma <= coeff) : sigma != A(0);
}

// scale * k of the projecting branch, in double (as the reference computes it).
inline double projected_scale(double scale, double coeff) {
  return coeff > 0 ? scale * coeff : scale;
}

}  // namespace bsn
