// Launch plans of the CUDA backend: host-side integer logic only (no CUDA or
// torch headers), built by the host compiler (plan.cpp) and unit-tested on the
// CPU (tests/cuda/test_cuda_plans.py). The kernels (forward.cuh, backward.cu) read a
// plan as part of their arguments; the launchers (launch.cu) size grids from it.
//
// A plan holds everything the kernels need besides the pointers: the pairs'
// structure, how the work is cut into chunks and items (depends only on the
// shape, so the results are bitwise identical whatever the grid and the launch
// mode), where the workspace regions lie, and the launch mode.
//
// Words, as in the CPU backend: a *pass* is one read of W; a *chunk* is a run
// of rows of the row view handled by one block (one partial each); an *item*
// is any other unit of grid-stride work (columns of a reduction, tiles).
#pragma once

#include <cstdint>

#include "bsn.h"

namespace bsn {
namespace cuda {

// ---------------------------------------------------------------------------
// Constants shared by the plans and the kernels. Changing any of the
// "partition" ones changes the summation order (still deterministic); the
// others only change speed.
constexpr int kThreads = 256;             // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kScr = 64;                  // block-reduction scratch slots (>= kWarps + 1)
constexpr int kEPT = 8;                   // elements per thread per tile, elementwise passes
constexpr int64_t kTile = int64_t{kThreads} * kEPT;
constexpr int kWarpRegs = 8;              // row elements per lane in warp mode
constexpr int64_t kWarpColsMax = 32 * kWarpRegs;  // warp-per-row mode when cols <= this
// partition
// Row chunks: at least kMinChunkElems elements each (4 KiB of float32: a round or
// two of the block's 128-bit loads). Small, so that small weights still spread
// phase A (whose rows follow one another in a block, each row's loads waiting
// for the previous row's reduction) over many SMs; weights above kPartialElems
// keep at least 2 rows per chunk when phase A writes t partials (chunks x cols:
// numel / rows-per-chunk elements of workspace traffic). See tools/gpu/model.py.
constexpr int64_t kMinChunkElems = 1024;
constexpr int64_t kPartialElems = int64_t{1} << 17;
constexpr int64_t kMinItemElemsBw = 16384;  // backward <G, W> items: at least this many elements
constexpr int64_t kMaxChunksA = 264;      // phase A chunks (t partials: chunks x cols)
constexpr int64_t kMaxChunksC = 1024;     // phase C chunks
constexpr int64_t kMaxItemsB = 1024;      // phase B items per vector
constexpr int64_t kMaxItemsBw = 1024;     // backward <G, W> items
// speed only
constexpr int64_t kTinyElems = 16384;            // Auto: single block up to this numel
constexpr int64_t kCoopMaxElems = int64_t{1} << 22;  // Auto: cooperative up to this numel
constexpr int64_t kSmemCap = 112640;      // phase A smem per block for 2 blocks/SM on H100 (wider rows: opt-in max)
constexpr int kBlocksPerSm = 8;           // Multi: grid cap = SMs * this (2048 threads/SM)
// Shared memory layout of every phase (acc_t elements):
//   [0, kThreads)                 red: per-group trees, group partials
//   [kThreads, kThreads + kScr)   bscr: block_sum scratch
//   [kThreads + kScr, ...)        phase A accumulators (when in shared memory)
constexpr int kSmemAccOffset = kThreads + kScr;

static_assert(kThreads % 32 == 0 && kWarps + 1 <= kScr, "bad block size");
static_assert(kThreads == 256, "the row-view modes assume 8 warps of 32");

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What the plan needs to know about the device (filled by the host code from
// at::cuda::getCurrentDeviceProperties()).
struct DeviceInfo {
  int device = 0;
  int sm_count = 1;
  int64_t smem_optin = 48 * 1024;  // sharedMemPerBlockOptin
  bool cooperative = false;        // cooperativeLaunch
  // Test only (BSN_CUDA_TEST_COOP_OVERSUBSCRIBE=1): cooperative launches ask for
  // one block more than can be co-resident, so the driver refuses them and the
  // launcher's fallback to the multi-kernel mode runs.
  bool coop_oversubscribe = false;
};

// Launch mode. Auto picks Single for tiny weights, Coop for small/medium ones
// where the device supports cooperative launches, Multi otherwise. All modes
// give bitwise identical results (tests check this through BSN_CUDA_MODE).
enum class Mode : int { Auto = 0, Single = 1, Coop = 2, Multi = 3 };

struct ForwardPlan {
  Mode mode = Mode::Multi;  // resolved (never Auto)
  // Structure. The "row view" is W as [rows, cols] (contiguous rows).
  //  * row pair (SN with outer == 1, BSN pair 0): u has `rows`, v has `cols` entries,
  //    A = the row view itself.
  //  * strided pair (SN with outer > 1, BSN pair 1): W viewed [rows, sm, sr];
  //    u has sm entries, v has sv = rows * sr entries, A[j, i*sr + r] = W[i, j, r].
  int has_row = 0, has_str = 0;
  int row_pair = 0, str_pair = 0;  // index into ForwardParams::u/v/mat and the state
  int update = 1;
  int n_iter = 1;
  int64_t numel = 0, rows = 0, cols = 0;
  int64_t sm = 1, sr = 1, sv = 0;
  int64_t st_u[2] = {0, 0}, st_v[2] = {0, 0};  // state offsets per params pair
  // Phase A (the pass over W by rows of the row view).
  int a_warp = 0;       // 1: a warp per row; 0: the block per row
  int a_acc_smem = 1;   // accumulators in shared memory (else in the workspace)
  int a_narr = 0;       // accumulator arrays per group (t of the row pair, q of the strided pair)
  int64_t a_chunks = 1, a_rpc = 1;  // row chunks (one partial each) and rows per chunk
  int64_t a_smem = 0;   // dynamic shared memory of phase A, bytes
  // Phase B (column sums of the per-chunk partials).
  int64_t b_cpi0 = 32, b_items0 = 0;  // row pair: columns per item, items
  int64_t b_cpi1 = 32, b_items1 = 0;  // strided pair (s): entries per item, items
  // Phase C (strided pair: t = A^T s by rows of the row view).
  int c_warp = 0;
  int64_t c_chunks = 1, c_rpc = 1;
  int c_reverse = 0;
  // Phase D (scale pass and buffers/state).
  int64_t e_tiles = 1;
  int d_reverse = 0;
  int64_t scratch_smem = 0;  // dynamic shared memory of the other phases, bytes
  // Workspace regions, in acc_t elements.
  int64_t w_s0 = 0, w_sq0 = 0, w_t0 = 0, w_q = 0, w_s1p = 0;
  int64_t w_v0raw = 0, w_vp0 = 0, w_v0cur = 0;
  int64_t w_s1 = 0, w_s1sq = 0, w_v1raw = 0, w_vp1 = 0, w_v1cur = 0;
  int64_t w_sig0 = 0, w_sig1 = 0;
  int64_t ws_elems = 0;
  // Launch.
  int grid_cap = 1;  // Multi: grid when the occupancy calculator reports 0 blocks per SM
};

struct BackwardPlan {
  Mode mode = Mode::Multi;
  int has_row = 0, has_str = 0;
  int64_t numel = 0, rows = 0, cols = 0;
  int64_t sm = 1, sr = 1;
  // Traversal of W as [rows, tj, tr] (tj * tr == cols): (sm, sr) with a strided
  // pair, (cols, 1) without; inc_*: kThreads in that mixed radix.
  int64_t tj = 1, tr = 1, inc_i = 0, inc_j = 0, inc_r = 0;
  int64_t st_u[2] = {0, 0}, st_v[2] = {0, 0};
  int row_pair = 0, str_pair = 0;
  int64_t items = 1, item_size = 1;  // <G, W> partials
  int64_t e_tiles = 1;
  int64_t scratch_smem = 0;
  int64_t ws_elems = 0;
  int grid_cap = 1;
};

// Plans. acc_size: sizeof(acc_t), 8 for double weights, else 4.
ForwardPlan make_forward_plan(const ForwardParams& p, int acc_size, const DeviceInfo& dev,
                              Mode mode);
BackwardPlan make_backward_plan(const BackwardParams& p, int acc_size,
                                const DeviceInfo& dev, Mode mode);

// What a plan launches, mode by mode (the launchers follow the same sequence;
// the emulator's launch counts check it). Phases in order: A, B, [C], [B2] per
// power iteration, then D (training); A, D (eval); BW1, BW2 (backward).
struct LaunchCounts {
  int phases = 0;       // phases run (each a kernel launch in Multi mode)
  int grid_syncs = 0;   // barriers between phases in Single/Coop mode
  int launches = 0;     // kernel launches of the resolved mode
  int64_t elem_passes = 0;  // numel-sized arrays read or written (W, out, G, grad_weight)
};
LaunchCounts forward_counts(const ForwardPlan& P);
LaunchCounts backward_counts(const BackwardPlan& P);

// Largest item count of any phase: a cooperative grid larger than this would
// leave blocks without work.
int64_t forward_max_items(const ForwardPlan& P);
int64_t backward_max_items(const BackwardPlan& P);

}  // namespace cuda
}  // namespace bsn
