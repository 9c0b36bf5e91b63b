// Launchers of the CUDA kernels (csrc/cuda/kernels.cu). No torch headers here:
// the host code (sn_cuda.cpp) plans a call, allocates the workspace the plan
// asks for and calls launch_forward / launch_backward with the weight's type.
//
// A plan holds everything the kernels need besides the pointers: the pairs'
// structure, how the work is cut into items (depends only on the shape, so the
// results are bitwise identical whatever the grid and launch mode), where the
// workspace regions lie, and the launch mode.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "bsn.h"

namespace bsn {
namespace cuda {

// What the plan needs to know about the device (filled by the host code from
// at::cuda::getCurrentDeviceProperties()).
struct DeviceInfo {
  int device = 0;
  int sm_count = 1;
  int64_t smem_optin = 48 * 1024;  // sharedMemPerBlockOptin
  bool cooperative = false;        // cooperativeLaunch
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
  int grid_cap = 1;  // blocks of a multi-mode kernel (at most)
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

// Plans (host only). acc_size: sizeof(acc_t), 8 for double weights, else 4.
ForwardPlan make_forward_plan(const ForwardParams& p, int acc_size, const DeviceInfo& dev,
                              Mode mode);
BackwardPlan make_backward_plan(const BackwardParams& p, int acc_size,
                                const DeviceInfo& dev, Mode mode);

// scalar_t: float, double, c10::Half, c10::BFloat16 (explicitly instantiated in
// kernels.cu). `workspace` holds plan.ws_elems acc_t elements (may be unused
// when ws_elems == 0). Everything is enqueued on `stream`; no host sync.
template <typename scalar_t>
void launch_forward(const ForwardParams& p, const ForwardPlan& plan, void* workspace,
                    const DeviceInfo& dev, cudaStream_t stream);
template <typename scalar_t>
void launch_backward(const BackwardParams& p, const BackwardPlan& plan, void* workspace,
                     const DeviceInfo& dev, cudaStream_t stream);

}  // namespace cuda
}  // namespace bsn
