// Backward kernels of the fused SN / BSN: BW1 partial sums of c = <G, W> over
// fixed flat items, BW2 dW = a*G - k*D with D from the state's u, v (no read
// of W). Fused (Single, Coop: a barrier between them) or one kernel each (Multi).
//
// Kernel bodies only: backward.cu instantiates backward_kernel for the four
// dtypes; group.cuh runs bw_dot / bw_apply from the grouped kernels.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace bsn {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// Backward.

// BW1: partial sums of <G, W> over flat items of item_size elements.
template <typename scalar_t>
__device__ void bw_dot(const BwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                       int64_t nblk) {
  using acc = acc_t<scalar_t>;
  const BackwardPlan& P = A.P;
  acc* bscr = smem + kThreads;
  const scalar_t* g = A.g;
  const scalar_t* w = A.w;
  for (int64_t it = bid; it < P.items; it += nblk) {
    const int64_t start = it * P.item_size;
    const int64_t end = imin(start + P.item_size, P.numel);
    acc a0 = acc(0), a1 = acc(0), a2 = acc(0), a3 = acc(0);
    for (int64_t e = start + threadIdx.x; e < end; e += 4 * kThreads) {
      a0 = fma_rn(to_acc(g[e]), to_acc(w[e]), a0);
      if (e + kThreads < end) a1 = fma_rn(to_acc(g[e + kThreads]), to_acc(w[e + kThreads]), a1);
      if (e + 2 * kThreads < end) a2 = fma_rn(to_acc(g[e + 2 * kThreads]), to_acc(w[e + 2 * kThreads]), a2);
      if (e + 3 * kThreads < end) a3 = fma_rn(to_acc(g[e + 3 * kThreads]), to_acc(w[e + 3 * kThreads]), a3);
    }
    const acc tot = block_sum((a0 + a1) + (a2 + a3), bscr);
    if (threadIdx.x == 0) A.ws[it] = tot;
  }
}

// BW2: dW = a*G - k*D (or a*G where the factor does not project: docs/design.md,
// Variants), tiles in reverse order.
template <typename scalar_t>
__device__ void bw_apply(const BwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                         int64_t nblk) {
  using acc = acc_t<scalar_t>;
  const BackwardPlan& P = A.P;
  acc* bscr = smem + kThreads;
  const acc c = block_sum_array(A.ws, P.items, bscr);
  const acc sigma = A.state[0];
  const bool proj = variant_projects(sigma, A.coeff);  // docs/design.md, Variants
  const acc a0 = proj ? A.scale_k / sigma : A.scale;
  const acc a = A.gamma != nullptr ? mul_rn(a0, *A.gamma) : a0;
  const acc kcoef = proj ? mul_rn(a, c) / sigma : acc(0);
  const bool has_row = P.has_row != 0;
  const bool has_str = P.has_str != 0;
  const acc* ur = A.state + P.st_u[P.row_pair];
  const acc* vr = A.state + P.st_v[P.row_pair];
  const acc* us = A.state + P.st_u[P.str_pair];
  const acc* vs = A.state + P.st_v[P.str_pair];
  const int64_t E = P.numel;
  const int64_t tj = P.tj, tr = P.tr, sr = P.sr;
  for (int64_t t = bid; t < P.e_tiles; t += nblk) {
    const int64_t tile = P.e_tiles - 1 - t;
    const int64_t base = tile * kTile + threadIdx.x;
    if (base >= E) continue;  // no barrier in this loop
    // (i, j, r): base = (i * tj + j) * tr + r; advanced by kThreads per step.
    int64_t i = base / P.cols;
    const int64_t rem = base - i * P.cols;
    int64_t j = rem / tr;
    int64_t r = rem - j * tr;
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t e = base + int64_t{k} * kThreads;
      if (e < E) {
        const acc gv = to_acc(A.g[e]);
        acc res;
        if (!proj) {  // the zero rule, or a soft bound at or below coeff
          res = mul_rn(a, gv);
        } else {
          const acc dr = has_row ? mul_rn(ur[i], vr[j * tr + r]) : acc(0);
          const acc ds = has_str ? mul_rn(us[j], vs[i * sr + r]) : acc(0);
          const acc D = (has_row && has_str) ? mul_rn(add_rn(dr, ds), acc(0.5)) : (has_row ? dr : ds);  // == / 2
          res = sub_rn(mul_rn(a, gv), mul_rn(kcoef, D));
        }
        A.gw[e] = from_acc<scalar_t>(res);
      }
      r += P.inc_r;
      int64_t cy = r >= tr ? 1 : 0;
      r -= cy * tr;
      j += P.inc_j + cy;
      cy = j >= tj ? 1 : 0;
      j -= cy * tj;
      i += P.inc_i + cy;
    }
  }
}


// ---------------------------------------------------------------------------
// Kernels.
template <typename scalar_t, class Sync>
__global__ void __launch_bounds__(kThreads)
    fused_backward_kernel(const __grid_constant__ BwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  const int64_t bid = blockIdx.x;
  const int64_t nblk = gridDim.x;
  bw_dot<scalar_t>(A, smem, bid, nblk);
  Sync::sync();
  bw_apply<scalar_t>(A, smem, bid, nblk);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bw_dot_kernel(const __grid_constant__ BwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  bw_dot<scalar_t>(A, smem, blockIdx.x, gridDim.x);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) bw_apply_kernel(const __grid_constant__ BwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  bw_apply<scalar_t>(A, smem, blockIdx.x, gridDim.x);
}

}  // namespace

template <typename scalar_t>
const void* backward_kernel(BwdKernel k) {
  switch (k) {
    case BwdKernel::FusedSingle:
      return reinterpret_cast<const void*>(&fused_backward_kernel<scalar_t, BlockSync>);
    case BwdKernel::FusedCoop:
      return reinterpret_cast<const void*>(&fused_backward_kernel<scalar_t, GridSync>);
    case BwdKernel::Dot:
      return reinterpret_cast<const void*>(&bw_dot_kernel<scalar_t>);
    case BwdKernel::Apply:
      return reinterpret_cast<const void*>(&bw_apply_kernel<scalar_t>);
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace bsn
