// Kernel arguments and the kernel tables: what the launchers (launch.cu) and
// the kernels (forward.cuh, backward.cu) agree on. Host-compatible (no device
// code): a kernel is handed to the launchers as its address, and every kernel
// takes one argument, its FwdArgs / BwdArgs by value.
#pragma once

#include <cstdint>

#include "cuda/plan.h"

namespace bsn {
namespace cuda {

// Accumulation type: double for double weights, float otherwise.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

template <typename scalar_t>
struct FwdArgs {
  const scalar_t* w;
  scalar_t* out;
  scalar_t* ub[2];  // u buffers (params pair order)
  scalar_t* vb[2];  // v buffers
  acc_t<scalar_t>* state;
  acc_t<scalar_t>* ws;
  acc_t<scalar_t> eps;
  acc_t<scalar_t> scale;    // the factor where it does not project (docs/design.md, Variants)
  acc_t<scalar_t> scale_k;  // scale * coeff (soft bound) or scale: divided by sigma where it projects
  acc_t<scalar_t> coeff;    // 0: SN; > 0: soft bound
  const acc_t<scalar_t>* gamma;  // learnable scale (one element) or nullptr
  ForwardPlan P;
};

template <typename scalar_t>
struct BwdArgs {
  const scalar_t* g;
  const scalar_t* w;
  scalar_t* gw;
  const acc_t<scalar_t>* state;
  acc_t<scalar_t>* ws;
  acc_t<scalar_t> scale;    // as in FwdArgs
  acc_t<scalar_t> scale_k;
  acc_t<scalar_t> coeff;
  const acc_t<scalar_t>* gamma;
  BackwardPlan P;
};

// Forward kernels. Fused*: every phase in one kernel (Single: one block,
// __syncthreads between phases; Coop: cooperative launch, grid sync). The
// others run one phase each (Multi mode).
enum class FwdKernel : int {
  FusedSingle,
  FusedCoop,
  PhaseATrainFromBuffers,  // first power iteration: v from the u/v buffers
  PhaseATrain,             // later iterations: v from the workspace
  PhaseAEval,
  PhaseB,
  PhaseC,
  PhaseB2,
  PhaseDTrain,
  PhaseDEval,
};
enum class BwdKernel : int { FusedSingle, FusedCoop, Dot, Apply };

// The address of a kernel (explicitly instantiated for float, double,
// c10::Half and c10::BFloat16 in forward_<dtype>.cu / backward.cu).
template <typename scalar_t>
const void* forward_kernel(FwdKernel k);
template <typename scalar_t>
const void* backward_kernel(BwdKernel k);

// ---------------------------------------------------------------------------
// Grouped launches (launch.cu, "Grouped launches"; group.cuh): one launch per
// phase step runs that step's phase of every layer of a group. The launch's
// blocks are cut into runs, one per layer still active at that step: blocks
// [start, start + nblk) run the layer's phase with the layer-local block id
// blockIdx.x - start and block count nblk, exactly as that layer's own
// Multi-mode kernel would with a grid of nblk.
enum class GroupPhase : int32_t {
  ATrainFromBuffers,  // forward phases, as FwdKernel's phase kernels
  ATrain,
  AEval,
  B,
  C,
  B2,
  DTrain,
  DEval,
  BwDot,  // backward phases, as BwdKernel::Dot / Apply
  BwApply,
};

struct GroupEntry {  // one layer's run of blocks in one launch (24 bytes)
  int64_t start;     // first block of the run
  int64_t nblk;      // blocks of the run (>= 1)
  int32_t layer;     // index into GroupLaunch::layers
  int32_t phase;     // GroupPhase
};

// The one argument of a grouped kernel: device pointers into the group's
// table (the per-layer FwdArgs / BwdArgs, then every step's entries, sorted by
// start; the launch's grid is the last entry's start + nblk).
template <typename Args>
struct GroupLaunch {
  const Args* layers;
  const GroupEntry* entries;  // this launch's entries
  int64_t n_entries;
};

// The address of a grouped kernel (group_<dtype>.cu): forward phases take
// GroupLaunch<FwdArgs<scalar_t>>, backward ones GroupLaunch<BwdArgs<scalar_t>>.
template <typename scalar_t>
const void* group_forward_kernel();
template <typename scalar_t>
const void* group_backward_kernel();

}  // namespace cuda
}  // namespace bsn
