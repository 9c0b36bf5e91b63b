// Launchers of the CUDA kernels of bsn_cuda: the fused SN / BSN forward and backward.
//
// Design (see docs/design.md for the math and the state layout)
// ---------------------------------------------------------------
// The work is written as a few *phases*. A phase is a __device__ function that
// takes (block index, number of blocks) and loops over its *items* grid-stride;
// every item writes its results (and its partial sums) to its own workspace
// slots, and every reduction over items runs over those slots in item order.
// How the work is cut into items depends only on the shape (never on the grid,
// the device or the launch mode), and all in-block reductions have a fixed
// tree (kThreads is a compile-time constant), so the results are bitwise
// identical run after run, whatever the grid and the launch mode. There are no
// floating-point atomics anywhere.
//
// Phases of a training forward (update=True), per power iteration:
//   A  one pass over W by rows of the "row view" [rows, cols]:
//        row pair (SN dim 0, BSN pair 0): s_i = row_i . v (group reduction),
//          then t += s_i * row_i into a per-chunk accumulator (one-pass trick);
//        strided pair (SN dim > 0, BSN pair 1, W as [rows, sm, sr]):
//          q[n] += W[i, n] * v[i*sr + n % sr]; per chunk, s[j] = sum_r q[j*sr + r].
//        A chunk of rows is one item; its t / s partials go to the workspace.
//   B  column sums of the chunk partials (in chunk order): t -> v_raw = t / max(||s||, eps)
//        (row pair), s (strided pair); partial sums of squares per item.
//   C  (strided pair only) t[i*sr + r] = sum_j W[i, j, r] s[j] by rows of the row
//        view (a second read of W; BSN costs ~one extra pass, not double);
//        v_raw = t / max(||s||, eps).
//   B2 (between iterations only) v = v_raw / max(||v_raw||, eps) into the workspace.
// then D: norms and sigmas from the partials (every block sums the same partials in
// the same order), the accept rule, u / v written back (rounded to the weight dtype)
// and into the state, the state's sigmas, and out = W * (scale / sigma_eff).
// sigma = v_raw . v is computed as ||v_raw||^2 / max(||v_raw||, eps) (the same number
// up to rounding, no extra pass). Eval (update=False): A computes per-chunk partials
// of u^T A v for each pair, then D.
// Backward: BW1 partials of c = <G, W> over fixed flat items; BW2 dW = a*G - k*D
// with D from the state's u, v (no read of W).
//
// Launch modes (all with the same phases, hence the same bits):
//   Single: tiny weights: one block runs every phase (__syncthreads between them):
//           one launch per forward / backward.
//   Coop:   small and medium weights: one cooperative launch, grid-wide
//           cooperative_groups sync between phases (capturable in CUDA graphs);
//           the grid comes from cudaOccupancyMaxActiveBlocksPerMultiprocessor.
//   Multi:  large weights (or no cooperative launch): one kernel per phase:
//           A, B, [C], D = 3 (SN) or 4 (BSN) launches for one power iteration,
//           +3/+4 per extra iteration; eval: 2; backward: 2.
// BSN_CUDA_MODE=single|coop|multi (read by ops_cuda.cpp) forces a mode for tests
// and benchmarks; the default (auto) picks by size, and does not use Coop while
// the stream is being captured into a CUDA graph (ops_cuda.cpp; inside a graph
// the launch overhead Coop saves is gone, and plain launches are the safest to
// capture). Why cooperative groups rather than a hand-made grid barrier: the
// launch API guarantees co-residency (or fails cleanly), and grid.sync() gives
// the memory ordering between phases. When the driver refuses a cooperative
// launch (too large, e.g. under MPS or with fewer SMs usable than reported),
// the launcher clears that error and runs the Multi mode instead.
//
// Memory traffic: training SN reads W once per iteration (phase A) and once more
// to write out (phase D); BSN reads W twice per iteration. D walks W backwards
// after a forward pass (and C backwards after A) so that the tail still in L2 is
// reused. Chunk partials of t are at most kMaxChunksA rows of `cols` entries.
// Chunks are small (>= kMinChunkElems = 1024 elements, plan.h): a block's rows
// follow one another, each row's loads waiting for the previous row's
// reduction, so small weights need many chunks to keep the SMs busy; above
// kPartialElems a training chunk keeps >= 2 rows (the t partials are numel /
// rows-per-chunk elements). Phase A's accumulators stay in shared memory up to
// the device's opt-in maximum (2 blocks per SM up to kSmemCap, 1 above it);
// only wider rows accumulate in the workspace.
//
// Accumulation: acc_t = double for double weights, float otherwise (half and
// bfloat16 are converted on load). IEEE math only (sqrt, '/'; no fast math);
// every mul+add is an explicit fma_rn / mul_rn / add_rn (common.cuh), so no
// mode depends on ptxas's contraction choices. All offsets are int64_t.
//
// Grouped launches (issue 22; group.cuh, group_cuda.cpp): the layers of one
// group_forward / group_backward call with one dtype run one launch per phase
// step. Each layer keeps its own plan (make_forward_plan / make_backward_plan)
// and its Multi-mode phase sequence (A, B, [C], [B2] per iteration, D; eval A,
// D; backward BW1, BW2); launch s runs phase s of every layer that has one
// (shorter sequences drop out of the later launches). A device table holds
// every layer's FwdArgs / BwdArgs and, per launch, entries {start, nblk,
// layer, phase} sorted by start; the grouped kernel's block b finds the
// entry with start <= b < start + nblk and runs that phase's __device__
// function with (b - start, nblk): the code of the layer's Multi kernel, with
// a grid of nblk, hence the per-layer bits. nblk: the phase's items, at most
// one wave of resident blocks of the grouped kernel at the launch's shared
// memory (the largest of its layers' phases). One device buffer holds the
// table and every layer's workspace (256-byte aligned); the table is copied
// (GroupUpload, pinned memory on the stream) before the first launch, and
// everything is planned and checked before that copy.
//
// Files (csrc/cuda): plan.h / plan.cpp  chunks, items, workspace and mode
// (host integer logic, unit-tested on the CPU); args.h  kernel arguments and
// kernel tables; common.cuh  device helpers and reductions; forward.cuh
// phases and kernels of the forward, instantiated per dtype in
// forward_<dtype>.cu (one translation unit each); backward.cuh / backward.cu  the backward's;
// group.cuh / group_<dtype>.cu  the grouped kernels; launch.cu  (this file) grids,
// occupancy, launches; ops_cuda.cpp  the ops' CUDA dispatch (torch side); group_cuda.cpp
// the grouped ops' (torch side).

#include "cuda/launch.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "cuda/args.h"

namespace bsn {
namespace cuda {
namespace {

// Host-side caches, so that a call after the first (e.g. inside a CUDA graph
// capture that follows a warm-up) makes no CUDA API call besides the launches.
std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

// Allows `bytes` of dynamic shared memory (only needed above 48 KiB) for
// `kernel` on `device` (the current device). A plain attribute call, no stream
// work; done once per kernel, device and size.
void allow_smem(const void* kernel, int64_t bytes, int device) {
  if (bytes <= 48 * 1024) return;
  static std::map<std::pair<const void*, int>, int64_t> allowed;
  std::lock_guard<std::mutex> lock(cache_mutex());
  int64_t& done = allowed[std::make_pair(kernel, device)];
  if (done >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  done = bytes;
}

// Blocks of `kernel` with `smem` bytes of dynamic shared memory that fit on one
// SM at once (the occupancy calculator; cached per kernel, device and size).
// allow_smem must have been called for `smem`.
int blocks_per_sm(const void* kernel, int64_t smem, const DeviceInfo& dev) {
  static std::map<std::tuple<const void*, int, int64_t>, int> occupancy;
  std::lock_guard<std::mutex> lock(cache_mutex());
  const auto key = std::make_tuple(kernel, dev.device, smem);
  const auto it = occupancy.find(key);
  if (it != occupancy.end()) return it->second;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               static_cast<size_t>(smem)));
  occupancy.emplace(key, per_sm);
  return per_sm;
}

// Grid of a Multi-mode kernel: one wave of resident blocks (no tail wave of a
// partly filled grid), at most `items`; plan.grid_cap if the calculator says 0.
unsigned multi_grid(const void* kernel, int64_t smem, const DeviceInfo& dev, int64_t items,
                    int grid_cap) {
  const int per_sm = blocks_per_sm(kernel, smem, dev);
  const int64_t wave = per_sm > 0 ? int64_t{per_sm} * dev.sm_count : grid_cap;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(items, wave)));
}

// Blocks of a cooperative launch: all co-resident, at most the largest item
// count of any phase; 0 when the kernel cannot be co-resident at all.
int64_t coop_grid(const void* kernel, int64_t smem, const DeviceInfo& dev, int64_t max_items) {
  const int per_sm = blocks_per_sm(kernel, smem, dev);
  if (per_sm <= 0) return 0;
  const int64_t resident = static_cast<int64_t>(per_sm) * dev.sm_count;
  if (dev.coop_oversubscribe) return resident + 1;  // test only: the driver must refuse it
  return std::max<int64_t>(1, std::min<int64_t>(resident, max_items));
}

// One launch of `kernel` with its single argument A: kThreads threads per block.
template <typename Args>
cudaError_t launch_kernel(const void* kernel, unsigned grid, int64_t smem, cudaStream_t stream,
                          const Args& A, bool cooperative) {
#ifdef BSN_CUDA_EMU
  return emu::launch_kernel(kernel, grid, kThreads, static_cast<size_t>(smem), cooperative, A);
#else
  void* args[] = {const_cast<Args*>(&A)};
  if (cooperative) {
    return cudaLaunchCooperativeKernel(kernel, dim3(grid), dim3(kThreads), args,
                                       static_cast<size_t>(smem), stream);
  }
  return cudaLaunchKernel(kernel, dim3(grid), dim3(kThreads), args, static_cast<size_t>(smem),
                          stream);
#endif
}

// A non-cooperative launch: any error is thrown.
template <typename Args>
void launch_or_throw(const void* kernel, unsigned grid, int64_t smem, cudaStream_t stream,
                     const Args& A) {
  C10_CUDA_CHECK(launch_kernel(kernel, grid, smem, stream, A, false));
}

// Errors with which the driver refuses a cooperative launch as such (nothing
// ran, the context is fine): the multi-kernel mode still works.
bool coop_refused(cudaError_t e) {
  return e == cudaErrorCooperativeLaunchTooLarge || e == cudaErrorLaunchOutOfResources ||
         e == cudaErrorInvalidConfiguration || e == cudaErrorNotSupported ||
         e == cudaErrorNotPermitted;
}

// A cooperative launch. Returns false when the driver refused it (the error is
// cleared, so that the next launch check does not see it); throws on any other
// error.
template <typename Args>
bool try_coop_launch(const void* kernel, int64_t grid, int64_t smem, cudaStream_t stream,
                     const Args& A) {
  const cudaError_t e =
      launch_kernel(kernel, static_cast<unsigned>(grid), smem, stream, A, true);
  if (e == cudaSuccess) return true;
  if (coop_refused(e)) {
    (void)cudaGetLastError();  // the launch error is not sticky: clear it
    return false;
  }
  C10_CUDA_CHECK(e);
  return false;
}

// The kernels' argument of one layer (shared by the per-layer and the grouped launches).
template <typename scalar_t>
FwdArgs<scalar_t> fwd_args(const ForwardParams& p, const ForwardPlan& plan, void* workspace) {
  using acc = acc_t<scalar_t>;
  FwdArgs<scalar_t> A;
  A.w = static_cast<const scalar_t*>(p.weight);
  A.out = static_cast<scalar_t*>(p.out);
  for (int k = 0; k < 2; ++k) {
    A.ub[k] = static_cast<scalar_t*>(p.u[k]);
    A.vb[k] = static_cast<scalar_t*>(p.v[k]);
  }
  if (p.num_pairs == 1) {  // never dereferenced; keep them valid pointers anyway
    A.ub[1] = A.ub[0];
    A.vb[1] = A.vb[0];
  }
  A.state = static_cast<acc*>(p.state);
  A.ws = static_cast<acc*>(workspace);
  A.eps = static_cast<acc>(p.eps);
  A.scale = static_cast<acc>(p.scale);
  A.scale_k = static_cast<acc>(projected_scale(p.scale, p.coeff));
  A.coeff = static_cast<acc>(p.coeff);
  A.gamma = static_cast<const acc*>(p.gamma);
  A.P = plan;
  return A;
}

template <typename scalar_t>
BwdArgs<scalar_t> bwd_args(const BackwardParams& p, const BackwardPlan& plan, void* workspace) {
  using acc = acc_t<scalar_t>;
  BwdArgs<scalar_t> A;
  A.g = static_cast<const scalar_t*>(p.grad_out);
  A.gw = static_cast<scalar_t*>(p.grad_weight);
  A.state = static_cast<const acc*>(p.state);
  A.ws = static_cast<acc*>(workspace);
  A.w = static_cast<const scalar_t*>(p.weight);
  A.scale = static_cast<acc>(p.scale);
  A.scale_k = static_cast<acc>(projected_scale(p.scale, p.coeff));
  A.coeff = static_cast<acc>(p.coeff);
  A.gamma = static_cast<const acc*>(p.gamma);
  A.P = plan;
  return A;
}

}  // namespace

template <typename scalar_t>
void launch_forward(const ForwardParams& p, const ForwardPlan& plan, void* workspace,
                    const DeviceInfo& dev, cudaStream_t stream) {
  const FwdArgs<scalar_t> A = fwd_args<scalar_t>(p, plan, workspace);
  const int64_t smem_a = plan.a_smem;
  const int64_t smem = plan.scratch_smem;
  auto K = [](FwdKernel k) { return forward_kernel<scalar_t>(k); };

  if (plan.mode == Mode::Coop) {
    const void* kern = K(FwdKernel::FusedCoop);
    allow_smem(kern, smem_a, dev.device);
    const int64_t grid = coop_grid(kern, smem_a, dev, forward_max_items(plan));
    // grid 0: cannot be co-resident; refused: see try_coop_launch. Multi then.
    if (grid >= 1 && try_coop_launch(kern, grid, smem_a, stream, A)) return;
  } else if (plan.mode == Mode::Single) {
    const void* kern = K(FwdKernel::FusedSingle);
    allow_smem(kern, smem_a, dev.device);
    launch_or_throw(kern, 1, smem_a, stream, A);
    return;
  }
  // Multi: one kernel per phase, in the order of fused_forward_kernel; each
  // grid one wave of resident blocks (the results do not depend on the grid).
  const int cap = plan.grid_cap;
  auto phase = [&](FwdKernel k, int64_t items, int64_t bytes) {
    const void* kern = K(k);
    allow_smem(kern, bytes, dev.device);
    launch_or_throw(kern, multi_grid(kern, bytes, dev, items, cap), bytes, stream, A);
  };
  const int64_t items_b = plan.b_items0 + plan.b_items1;
  const int64_t items_b2 = ceil_div(std::max<int64_t>(plan.cols, plan.sv), kThreads);
  if (plan.update) {
    for (int it = 0; it < plan.n_iter; ++it) {
      phase(it == 0 ? FwdKernel::PhaseATrainFromBuffers : FwdKernel::PhaseATrain, plan.a_chunks, smem_a);
      phase(FwdKernel::PhaseB, items_b, smem);
      if (plan.has_str) phase(FwdKernel::PhaseC, plan.c_chunks, smem);
      if (it + 1 < plan.n_iter) phase(FwdKernel::PhaseB2, items_b2, smem);
    }
    phase(FwdKernel::PhaseDTrain, plan.e_tiles, smem);
  } else {
    phase(FwdKernel::PhaseAEval, plan.a_chunks, smem_a);
    phase(FwdKernel::PhaseDEval, plan.e_tiles, smem);
  }
}

template <typename scalar_t>
void launch_backward(const BackwardParams& p, const BackwardPlan& plan, void* workspace,
                     const DeviceInfo& dev, cudaStream_t stream) {
  const BwdArgs<scalar_t> A = bwd_args<scalar_t>(p, plan, workspace);
  const int64_t smem = plan.scratch_smem;
  auto K = [](BwdKernel k) { return backward_kernel<scalar_t>(k); };
  if (plan.mode == Mode::Coop) {
    const void* kern = K(BwdKernel::FusedCoop);
    const int64_t grid = coop_grid(kern, smem, dev, backward_max_items(plan));
    if (grid >= 1 && try_coop_launch(kern, grid, smem, stream, A)) return;
  } else if (plan.mode == Mode::Single) {
    launch_or_throw(K(BwdKernel::FusedSingle), 1, smem, stream, A);
    return;
  }
  const int cap = plan.grid_cap;
  const void* dot = K(BwdKernel::Dot);
  const void* apply = K(BwdKernel::Apply);
  launch_or_throw(dot, multi_grid(dot, smem, dev, plan.items, cap), smem, stream, A);
  launch_or_throw(apply, multi_grid(apply, smem, dev, plan.e_tiles, cap), smem, stream, A);
}

// ---------------------------------------------------------------------------
// Grouped launches (see "Grouped launches" at the top of this file).
namespace {

constexpr int64_t kGroupAlign = 256;  // bytes: each layer's workspace, the workspaces' start
inline int64_t round_up(int64_t n, int64_t a) { return ceil_div(n, a) * a; }

// A layer's phases in launch order: those of its Multi mode (launch_forward),
// then grouped launch s runs phase s of every layer that has one.
std::vector<GroupPhase> forward_steps(const ForwardPlan& P) {
  std::vector<GroupPhase> s;
  if (P.update) {
    for (int it = 0; it < P.n_iter; ++it) {
      s.push_back(it == 0 ? GroupPhase::ATrainFromBuffers : GroupPhase::ATrain);
      s.push_back(GroupPhase::B);
      if (P.has_str) s.push_back(GroupPhase::C);
      if (it + 1 < P.n_iter) s.push_back(GroupPhase::B2);
    }
    s.push_back(GroupPhase::DTrain);
  } else {
    s.push_back(GroupPhase::AEval);
    s.push_back(GroupPhase::DEval);
  }
  return s;
}
std::vector<GroupPhase> backward_steps(const BackwardPlan&) {
  return {GroupPhase::BwDot, GroupPhase::BwApply};
}

// Items of a phase (its Multi-mode grid before the wave cap) and its shared memory.
int64_t phase_items(const ForwardPlan& P, GroupPhase ph) {
  switch (ph) {
    case GroupPhase::ATrainFromBuffers:
    case GroupPhase::ATrain:
    case GroupPhase::AEval:
      return P.a_chunks;
    case GroupPhase::B:
      return P.b_items0 + P.b_items1;
    case GroupPhase::C:
      return P.c_chunks;
    case GroupPhase::B2:
      return ceil_div(std::max<int64_t>(P.cols, P.sv), kThreads);
    default:
      return P.e_tiles;
  }
}
int64_t phase_items(const BackwardPlan& P, GroupPhase ph) {
  return ph == GroupPhase::BwDot ? P.items : P.e_tiles;
}
int64_t phase_smem(const ForwardPlan& P, GroupPhase ph) {
  const bool a = ph == GroupPhase::ATrainFromBuffers || ph == GroupPhase::ATrain ||
                 ph == GroupPhase::AEval;
  return a ? P.a_smem : P.scratch_smem;
}
int64_t phase_smem(const BackwardPlan& P, GroupPhase) { return P.scratch_smem; }

template <typename Plan>
int64_t max_steps(const std::vector<Plan>& plans) {
  size_t n = 0;
  for (const Plan& P : plans) {
    if constexpr (std::is_same_v<Plan, ForwardPlan>) {
      n = std::max(n, forward_steps(P).size());
    } else {
      n = std::max(n, backward_steps(P).size());
    }
  }
  return static_cast<int64_t>(n);
}

// Table and workspaces of a group: [Args x layers][entries of every launch]
// (uploaded), then the layers' workspaces, each kGroupAlign-aligned.
template <typename Args, typename Plan, typename StepsOf>
GroupLayout make_layout(const std::vector<Plan>& plans, int acc_size, const StepsOf& steps_of) {
  GroupLayout L;
  const int64_t n = static_cast<int64_t>(plans.size());
  int64_t entries = 0;
  for (const Plan& P : plans) {
    const int64_t k = static_cast<int64_t>(steps_of(P).size());
    entries += k;
    L.launches = std::max<int64_t>(L.launches, k);
  }
  L.entries_offset = round_up(n * static_cast<int64_t>(sizeof(Args)), 16);
  L.table_bytes = L.entries_offset + entries * static_cast<int64_t>(sizeof(GroupEntry));
  int64_t off = round_up(L.table_bytes, kGroupAlign);
  for (const Plan& P : plans) {
    L.ws_offset.push_back(off);
    off += round_up(std::max<int64_t>(P.ws_elems, 1) * acc_size, kGroupAlign);
  }
  L.total_bytes = off;
  return L;
}

// Fills the table (args of every layer, entries of every launch), uploads it,
// and makes one launch per step. Everything is planned (and checked) before
// the upload: an error throws before anything is enqueued.
template <typename Args, typename Plan, typename StepsOf>
void run_group(const void* kern, const std::vector<Args>& args, const std::vector<Plan>& plans,
               const GroupLayout& layout, void* buffer, const DeviceInfo& dev, cudaStream_t stream,
               const GroupUpload& upload, const StepsOf& steps_of) {
  const int64_t n = static_cast<int64_t>(plans.size());
  std::vector<std::vector<GroupPhase>> seq;
  seq.reserve(n);
  for (const Plan& P : plans) seq.push_back(steps_of(P));
  std::vector<GroupEntry> entries;
  struct Launch {
    int64_t first, count, grid, smem;
  };
  std::vector<Launch> launches;
  for (int64_t s = 0; s < layout.launches; ++s) {
    int64_t smem = 0;
    int grid_cap = 1;
    for (int64_t l = 0; l < n; ++l) {
      if (s < static_cast<int64_t>(seq[l].size())) {
        smem = std::max(smem, phase_smem(plans[l], seq[l][s]));
        grid_cap = std::max(grid_cap, plans[l].grid_cap);
      }
    }
    TORCH_CHECK(smem <= dev.smem_optin, "bsn_cuda: grouped launch: expected at most ",
                dev.smem_optin, " bytes of shared memory (the device's opt-in maximum), got ", smem);
    allow_smem(kern, smem, dev.device);
    // Each layer's run: its phase's items, at most one wave of resident blocks
    // (as its Multi-mode grid; the results do not depend on it).
    const int per_sm = blocks_per_sm(kern, smem, dev);
    const int64_t wave = per_sm > 0 ? int64_t{per_sm} * dev.sm_count : grid_cap;
    Launch L{static_cast<int64_t>(entries.size()), 0, 0, smem};
    for (int64_t l = 0; l < n; ++l) {
      if (s >= static_cast<int64_t>(seq[l].size())) continue;
      const GroupPhase ph = seq[l][s];
      const int64_t nblk = std::max<int64_t>(1, std::min<int64_t>(phase_items(plans[l], ph), wave));
      entries.push_back(GroupEntry{L.grid, nblk, static_cast<int32_t>(l), static_cast<int32_t>(ph)});
      L.grid += nblk;
      ++L.count;
    }
    TORCH_CHECK(L.grid <= 0x7fffffff, "bsn_cuda: grouped launch: expected a grid of at most ",
                0x7fffffff, " blocks, got ", L.grid);
    launches.push_back(L);
  }
  TORCH_CHECK(layout.entries_offset + static_cast<int64_t>(entries.size() * sizeof(GroupEntry)) ==
                  layout.table_bytes && layout.entries_offset >= n * static_cast<int64_t>(sizeof(Args)),
              "bsn_cuda: grouped launch: the layout does not match the plans");
  std::vector<unsigned char> table(static_cast<size_t>(layout.table_bytes));
  std::memcpy(table.data(), args.data(), args.size() * sizeof(Args));
  std::memcpy(table.data() + layout.entries_offset, entries.data(), entries.size() * sizeof(GroupEntry));
  upload(table.data(), buffer, layout.table_bytes);
  unsigned char* base = static_cast<unsigned char*>(buffer);
  for (const Launch& L : launches) {
    GroupLaunch<Args> A;
    A.layers = reinterpret_cast<const Args*>(base);
    A.entries = reinterpret_cast<const GroupEntry*>(base + layout.entries_offset) + L.first;
    A.n_entries = L.count;
    launch_or_throw(kern, static_cast<unsigned>(L.grid), L.smem, stream, A);
  }
}

}  // namespace

template <typename scalar_t>
GroupLayout group_forward_layout(const std::vector<ForwardPlan>& plans) {
  return make_layout<FwdArgs<scalar_t>>(plans, sizeof(acc_t<scalar_t>), forward_steps);
}

template <typename scalar_t>
GroupLayout group_backward_layout(const std::vector<BackwardPlan>& plans) {
  return make_layout<BwdArgs<scalar_t>>(plans, sizeof(acc_t<scalar_t>), backward_steps);
}

// One grouped call: every layer's args (its workspace in the buffer), then run_group.
template <typename Args, typename Params, typename Plan, typename MakeArgs, typename StepsOf>
void launch_group(const char* what, const void* kern, const std::vector<Params>& params,
                  const std::vector<Plan>& plans, const GroupLayout& layout, void* buffer,
                  const DeviceInfo& dev, cudaStream_t stream, const GroupUpload& upload,
                  const MakeArgs& make_args, const StepsOf& steps_of) {
  TORCH_CHECK(params.size() == plans.size() && plans.size() == layout.ws_offset.size() && !plans.empty(),
              "bsn_cuda: grouped ", what, ": expected one plan and one workspace per layer, got ",
              params.size(), " layers, ", plans.size(), " plans, ", layout.ws_offset.size(),
              " workspaces");
  std::vector<Args> args;
  args.reserve(plans.size());
  for (size_t l = 0; l < plans.size(); ++l) {
    args.push_back(make_args(params[l], plans[l], static_cast<unsigned char*>(buffer) + layout.ws_offset[l]));
  }
  run_group(kern, args, plans, layout, buffer, dev, stream, upload, steps_of);
}

template <typename scalar_t>
void launch_group_forward(const std::vector<ForwardParams>& params,
                          const std::vector<ForwardPlan>& plans, const GroupLayout& layout,
                          void* buffer, const DeviceInfo& dev, cudaStream_t stream,
                          const GroupUpload& upload) {
  launch_group<FwdArgs<scalar_t>>("forward", group_forward_kernel<scalar_t>(), params, plans, layout,
                                  buffer, dev, stream, upload, fwd_args<scalar_t>, forward_steps);
}

template <typename scalar_t>
void launch_group_backward(const std::vector<BackwardParams>& params,
                           const std::vector<BackwardPlan>& plans, const GroupLayout& layout,
                           void* buffer, const DeviceInfo& dev, cudaStream_t stream,
                           const GroupUpload& upload) {
  launch_group<BwdArgs<scalar_t>>("backward", group_backward_kernel<scalar_t>(), params, plans, layout,
                                  buffer, dev, stream, upload, bwd_args<scalar_t>, backward_steps);
}

#define BSN_INSTANTIATE(T)                                                                   \
  template void launch_forward<T>(const ForwardParams&, const ForwardPlan&, void*,           \
                                  const DeviceInfo&, cudaStream_t);                          \
  template void launch_backward<T>(const BackwardParams&, const BackwardPlan&, void*,        \
                                   const DeviceInfo&, cudaStream_t);                         \
  template GroupLayout group_forward_layout<T>(const std::vector<ForwardPlan>&);             \
  template GroupLayout group_backward_layout<T>(const std::vector<BackwardPlan>&);           \
  template void launch_group_forward<T>(const std::vector<ForwardParams>&,                   \
                                        const std::vector<ForwardPlan>&, const GroupLayout&, \
                                        void*, const DeviceInfo&, cudaStream_t,              \
                                        const GroupUpload&);                                 \
  template void launch_group_backward<T>(const std::vector<BackwardParams>&,                 \
                                         const std::vector<BackwardPlan>&,                   \
                                         const GroupLayout&, void*, const DeviceInfo&,       \
                                         cudaStream_t, const GroupUpload&);

BSN_INSTANTIATE(float)
BSN_INSTANTIATE(double)
BSN_INSTANTIATE(c10::Half)
BSN_INSTANTIATE(c10::BFloat16)

#undef BSN_INSTANTIATE

}  // namespace cuda
}  // namespace bsn
