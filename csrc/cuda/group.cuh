// Grouped kernels (issue 22): one launch runs one phase step of every layer of
// a group, driven by a device table of per-layer descriptors, in the spirit of
// apex's multi_tensor_apply (the idea only; no code from it).
//
// Design (see also launch.cu, "Grouped launches", and docs/design.md):
//   * The table holds each layer's FwdArgs / BwdArgs (pointers, factors and its
//     ForwardPlan / BackwardPlan, planned by the per-layer planner) and, per
//     launch, entries {start, nblk, layer, phase} sorted by start: blocks
//     [start, start + nblk) of the launch belong to `layer` and run `phase`.
//   * A block finds its entry (the block's threads scan the entries in
//     parallel, one match), then runs the layer's per-layer phase function with
//     the layer-local block id blockIdx.x - start and block count nblk: the very
//     code of the layer's Multi-mode phase kernel. The phases cut their work by
//     shape only and reduce in fixed order, whatever the grid (launch.cu's
//     design), so every output, u / v, state and gradient is bitwise the
//     per-layer op's (any mode).
//   * Layers with fewer steps (eval, one power iteration, no strided pair) are
//     absent from the later launches' entries; every layer ends with its D.
//   * Every block of a run takes the same branch: the phases' __syncthreads are
//     reached by the whole block, and no block waits for another (no grid sync:
//     the launch boundary is the barrier between phases, as in Multi mode).
//
// Kernel bodies only: group_<dtype>.cu instantiates them for one dtype each
// (BSN_INSTANTIATE_GROUP), as forward_<dtype>.cu does the forward's.
#pragma once

#include <cstdint>

#include "cuda/backward.cuh"
#include "cuda/forward.cuh"

namespace bsn {
namespace cuda {
namespace {

// The entry whose run holds block b: the block's threads read the entries in
// parallel (one round of loads for up to kThreads entries), the one match
// writes its index to shared memory. Uses the first 8 bytes of the dynamic
// shared memory, released (barrier) before the phase uses them.
__device__ __forceinline__ int64_t group_entry_of(const GroupEntry* __restrict__ entries, int64_t n,
                                                  int64_t b, unsigned char* smem_raw) {
  int64_t* found = reinterpret_cast<int64_t*>(smem_raw);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const int64_t s = entries[k].start;
    if (s <= b && b < s + entries[k].nblk) *found = k;  // the runs do not overlap: one writer
  }
  __syncthreads();
  const int64_t k = *found;
  __syncthreads();  // the phase may write shared memory from its first instruction
  return k;
}

// This block's run: its layer's args, phase, layer-local block id and block count.
template <typename Args>
struct GroupBlock {
  const Args* args;
  GroupPhase phase;
  int64_t bid, nblk;
};
template <typename Args>
__device__ __forceinline__ GroupBlock<Args> group_block(const GroupLaunch<Args>& L,
                                                        unsigned char* smem_raw) {
  const int64_t b = blockIdx.x;
  const GroupEntry& e = L.entries[group_entry_of(L.entries, L.n_entries, b, smem_raw)];
  return GroupBlock<Args>{L.layers + e.layer, static_cast<GroupPhase>(e.phase), b - e.start, e.nblk};
}

// __launch_bounds__: 2 blocks per SM (128 registers). One kernel holds every
// forward phase; at phase A's own bound (4 per SM, 64 registers; float64 3, 80)
// ptxas spilled 736 / 1392 B (float, stores / loads) and 544 / 868 B
// (float64), at 3 per SM still 348 / 660 B (float); at 2 none (float64: 44 B). A launch's
// runs are at most one wave each, and phase A has at most kMaxChunksA = 264
// chunks, 2 per SM on 132 SMs.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2)
    group_forward_kernel_impl(const __grid_constant__ GroupLaunch<FwdArgs<scalar_t>> L) {
  BSN_SMEM_DECL(scalar_t);
  const GroupBlock<FwdArgs<scalar_t>> g = group_block(L, bsn_smem_raw);
  const FwdArgs<scalar_t>& A = *g.args;
  const int64_t bid = g.bid, nblk = g.nblk;
  switch (g.phase) {
    case GroupPhase::ATrainFromBuffers:
      phase_a<scalar_t, true, true>(A, smem, bid, nblk);
      break;
    case GroupPhase::ATrain:
      phase_a<scalar_t, true, false>(A, smem, bid, nblk);
      break;
    case GroupPhase::AEval:
      phase_a<scalar_t, false, true>(A, smem, bid, nblk);
      break;
    case GroupPhase::B:
      phase_b<scalar_t, kUnrollB>(A, smem, bid, nblk);
      break;
    case GroupPhase::C:
      phase_c<scalar_t>(A, smem, bid, nblk);
      break;
    case GroupPhase::B2:
      phase_b2<scalar_t>(A, smem, bid, nblk);
      break;
    case GroupPhase::DTrain:
      phase_d_train<scalar_t>(A, smem, bid, nblk);
      break;
    case GroupPhase::DEval:
      phase_d_eval<scalar_t>(A, smem, bid, nblk);
      break;
    default:
      break;  // the launcher writes forward phases only (launch.cu)
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    group_backward_kernel_impl(const __grid_constant__ GroupLaunch<BwdArgs<scalar_t>> L) {
  BSN_SMEM_DECL(scalar_t);
  const GroupBlock<BwdArgs<scalar_t>> g = group_block(L, bsn_smem_raw);
  if (g.phase == GroupPhase::BwDot) {
    bw_dot<scalar_t>(*g.args, smem, g.bid, g.nblk);
  } else {
    bw_apply<scalar_t>(*g.args, smem, g.bid, g.nblk);
  }
}

}  // namespace

template <typename scalar_t>
const void* group_forward_kernel() {
  return reinterpret_cast<const void*>(&group_forward_kernel_impl<scalar_t>);
}

template <typename scalar_t>
const void* group_backward_kernel() {
  return reinterpret_cast<const void*>(&group_backward_kernel_impl<scalar_t>);
}

}  // namespace cuda
}  // namespace bsn

// One dtype's grouped kernels, compiled in the .cu file that expands this.
#define BSN_INSTANTIATE_GROUP(scalar_t)                        \
  namespace bsn {                                              \
  namespace cuda {                                             \
  template const void* group_forward_kernel<scalar_t>();       \
  template const void* group_backward_kernel<scalar_t>();      \
  }                                                            \
  }
