// Launch plans of the CUDA backend (see plan.h): host-only integer logic,
// compiled by the host compiler, unit-tested on the CPU.
#include "plan.h"

#include <algorithm>

#include <c10/util/Exception.h>

namespace bsn {
namespace cuda {
namespace {

// Chunks of rows: at least kMinChunkElems elements and min_rpc rows each, at
// most max_chunks.
void chunk_rows(int64_t rows, int64_t numel, int64_t max_chunks, int64_t min_rpc, int64_t* nchunks,
                int64_t* rpc) {
  int64_t n = ceil_div(numel, kMinChunkElems);
  n = std::min<int64_t>(n, ceil_div(rows, min_rpc));
  n = std::max<int64_t>(1, std::min<int64_t>(n, std::min<int64_t>(rows, max_chunks)));
  *rpc = ceil_div(rows, n);
  *nchunks = ceil_div(rows, *rpc);
}

int64_t items_per(int64_t n, int64_t max_items) {  // columns per phase-B item
  return 32 * std::max<int64_t>(1, ceil_div(ceil_div(n, 32), max_items));
}

Mode resolve_mode(Mode requested, int64_t numel, const DeviceInfo& dev) {
  switch (requested) {
    case Mode::Single:
      return Mode::Single;
    case Mode::Coop:
      return dev.cooperative ? Mode::Coop : Mode::Multi;
    case Mode::Multi:
      return Mode::Multi;
    case Mode::Auto:
    default:
      if (numel <= kTinyElems) return Mode::Single;
      if (dev.cooperative && numel <= kCoopMaxElems) return Mode::Coop;
      return Mode::Multi;
  }
}

// The pairs' structure, shared by the forward and backward plans: the row view
// [rows, cols] of W, and for a strided pair W as [rows, sm, sr].
template <typename Plan>
void fill_structure(Plan& P, const Matricization* mat, int num_pairs, int64_t numel) {
  P.numel = numel;
  if (num_pairs == 2) {
    TORCH_CHECK(mat[0].outer == 1 && mat[1].outer == mat[0].rows &&
                    mat[1].rows * mat[1].inner == mat[0].inner,
                "bsn_cuda: inconsistent BSN matricizations");
    P.has_row = 1;
    P.has_str = 1;
    P.row_pair = 0;
    P.str_pair = 1;
    P.rows = mat[0].rows;
    P.cols = mat[0].cols();
    P.sm = mat[1].rows;
    P.sr = mat[1].inner;
  } else if (mat[0].outer == 1) {
    P.has_row = 1;
    P.rows = mat[0].rows;
    P.cols = mat[0].cols();
  } else {
    P.has_str = 1;
    P.rows = mat[0].outer;
    P.sm = mat[0].rows;
    P.sr = mat[0].inner;
    P.cols = P.sm * P.sr;
  }
  TORCH_CHECK(P.rows >= 1 && P.cols >= 1 && P.sm >= 1 && P.sr >= 1 && P.rows * P.cols == numel,
              "bsn_cuda: matricization does not match numel");
  for (int k = 0; k < num_pairs; ++k) {
    P.st_u[k] = state_u_offset(mat, num_pairs, k);
    P.st_v[k] = state_v_offset(mat, num_pairs, k);
  }
}
}  // namespace

ForwardPlan make_forward_plan(const ForwardParams& p, int acc_size, const DeviceInfo& dev,
                              Mode mode) {
  TORCH_CHECK(p.num_pairs == 1 || p.num_pairs == 2, "bsn_cuda: bad num_pairs ", p.num_pairs);
  TORCH_CHECK(acc_size == 4 || acc_size == 8, "bsn_cuda: bad acc_size ", acc_size);
  TORCH_CHECK(p.numel > 0 && p.n_power_iterations >= 1, "bsn_cuda: bad forward params");
  ForwardPlan P;
  const Matricization* mat = p.mat;
  P.update = p.update ? 1 : 0;
  P.n_iter = p.n_power_iterations;
  fill_structure(P, mat, p.num_pairs, p.numel);
  P.sv = P.has_str ? P.rows * P.sr : 0;
  const int64_t E = p.numel;
  const int64_t scratch = int64_t{kSmemAccOffset} * acc_size;
  const int64_t cap = std::min<int64_t>(kSmemCap, dev.smem_optin);
  P.scratch_smem = scratch;

  // Phase A.
  P.a_narr = ((P.update && P.has_row) ? 1 : 0) + (P.has_str ? 1 : 0);
  P.a_warp = P.cols <= kWarpColsMax ? 1 : 0;
  const int64_t groups = P.a_warp ? kWarps : 1;
  if (P.a_narr == 0) {
    P.a_acc_smem = 1;
    P.a_smem = scratch;
  } else {
    const int64_t per_col = groups * P.a_narr * acc_size;
    auto fits = [&](int64_t bytes) { return bytes > scratch && P.cols <= (bytes - scratch) / per_col; };
    // Up to kSmemCap: 2 blocks per SM. Wider rows take the device's opt-in
    // maximum (1 block per SM; the grids come from the occupancy calculator)
    // rather than accumulate in global memory, where every row would load and
    // store the accumulators through L2 (tools/gpu/model.py: the slower one).
    P.a_acc_smem = (fits(cap) || fits(dev.smem_optin)) ? 1 : 0;
    // Warp mode needs at most 8 * 2 * 256 * 8 bytes + scratch (< 48 KiB): always fits.
    TORCH_CHECK(P.a_acc_smem || !P.a_warp, "bsn_cuda: warp mode does not fit shared memory");
    P.a_smem = scratch + (P.a_acc_smem ? per_col * P.cols : 0);
  }
  const bool t_partials = P.update && P.has_row;
  chunk_rows(P.rows, E, kMaxChunksA, (t_partials && E > kPartialElems) ? 2 : 1, &P.a_chunks, &P.a_rpc);

  // Phase B.
  if (P.update) {
    if (P.has_row) {
      P.b_cpi0 = items_per(P.cols, kMaxItemsB);
      P.b_items0 = ceil_div(P.cols, P.b_cpi0);
    }
    if (P.has_str) {
      P.b_cpi1 = items_per(P.sm, kMaxItemsB);
      P.b_items1 = ceil_div(P.sm, P.b_cpi1);
    }
  }
  // Phase C.
  P.c_warp = P.cols <= kWarpColsMax ? 1 : 0;
  chunk_rows(P.rows, E, kMaxChunksC, 1, &P.c_chunks, &P.c_rpc);
  P.c_reverse = 1;
  // Phase D: walk W against the direction of the last pass over it.
  P.e_tiles = ceil_div(E, kTile);
  P.d_reverse = (P.update && P.has_str) ? 0 : 1;

  // Workspace (acc_t elements; regions rounded up to 32 elements).
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t o = off;
    off += ceil_div(std::max<int64_t>(n, 1), 32) * 32;
    return o;
  };
  if (P.update && P.has_row) {
    P.w_s0 = take(P.rows);
    P.w_sq0 = take(P.a_chunks);
    P.w_t0 = take(P.a_chunks * P.cols);
    P.w_v0raw = take(P.cols);
    P.w_vp0 = take(P.b_items0);
    if (P.n_iter > 1) P.w_v0cur = take(P.cols);
  }
  if (P.has_str && !P.a_acc_smem) P.w_q = take(P.a_chunks * P.cols);
  if (P.update && P.has_str) {
    P.w_s1p = take(P.a_chunks * P.sm);
    P.w_s1 = take(P.sm);
    P.w_s1sq = take(P.b_items1);
    P.w_v1raw = take(P.sv);
    P.w_vp1 = take(P.c_chunks);
    if (P.n_iter > 1) P.w_v1cur = take(P.sv);
  }
  if (!P.update) {
    if (P.has_row) P.w_sig0 = take(P.a_chunks);
    if (P.has_str) P.w_sig1 = take(P.a_chunks);
  }
  P.ws_elems = off;

  P.grid_cap = std::max(1, dev.sm_count * kBlocksPerSm);
  P.mode = resolve_mode(mode, E, dev);
  return P;
}

BackwardPlan make_backward_plan(const BackwardParams& p, int acc_size, const DeviceInfo& dev,
                                Mode mode) {
  TORCH_CHECK(p.num_pairs == 1 || p.num_pairs == 2, "bsn_cuda: bad num_pairs ", p.num_pairs);
  TORCH_CHECK(acc_size == 4 || acc_size == 8, "bsn_cuda: bad acc_size ", acc_size);
  TORCH_CHECK(p.numel > 0, "bsn_cuda: bad backward params");
  BackwardPlan P;
  const Matricization* mat = p.mat;
  fill_structure(P, mat, p.num_pairs, p.numel);
  if (P.has_str) {
    P.tj = P.sm;
    P.tr = P.sr;
  } else {
    P.tj = P.cols;
    P.tr = 1;
  }
  P.inc_r = kThreads % P.tr;
  P.inc_j = (kThreads / P.tr) % P.tj;
  P.inc_i = kThreads / P.cols;
  const int64_t E = p.numel;
  P.items = std::max<int64_t>(1, std::min<int64_t>(ceil_div(E, kMinItemElemsBw), kMaxItemsBw));
  P.item_size = ceil_div(E, P.items);
  P.items = ceil_div(E, P.item_size);
  P.e_tiles = ceil_div(E, kTile);
  P.scratch_smem = int64_t{kSmemAccOffset} * acc_size;
  P.ws_elems = ceil_div(P.items, 32) * 32;
  P.grid_cap = std::max(1, dev.sm_count * kBlocksPerSm);
  P.mode = resolve_mode(mode, E, dev);
  return P;
}


LaunchCounts forward_counts(const ForwardPlan& P) {
  LaunchCounts c;
  if (P.update) {
    // Per power iteration: A, B, C (strided pair), B2 (between iterations).
    const int per_iter = 2 + (P.has_str ? 1 : 0);
    c.phases = P.n_iter * per_iter + (P.n_iter - 1) + 1;
    c.elem_passes = int64_t{P.n_iter} * (1 + (P.has_str ? 1 : 0)) + 2;
  } else {
    c.phases = 2;  // A, D
    c.elem_passes = 3;
  }
  c.grid_syncs = c.phases - 1;
  c.launches = P.mode == Mode::Multi ? c.phases : 1;
  return c;
}

LaunchCounts backward_counts(const BackwardPlan& P) {
  LaunchCounts c;
  c.phases = 2;  // BW1 (<G, W> partials), BW2 (grad_weight)
  c.grid_syncs = 1;
  c.launches = P.mode == Mode::Multi ? 2 : 1;
  c.elem_passes = 4;  // G and W, then G and grad_weight
  return c;
}

int64_t forward_max_items(const ForwardPlan& P) {
  const int64_t vec = std::max<int64_t>(std::max<int64_t>(P.rows, P.cols), std::max<int64_t>(P.sm, P.sv));
  return std::max<int64_t>(std::max<int64_t>(P.a_chunks, P.b_items0 + P.b_items1),
              std::max<int64_t>(std::max<int64_t>(P.c_chunks, P.e_tiles), ceil_div(vec, kThreads)));
}

int64_t backward_max_items(const BackwardPlan& P) { return std::max<int64_t>(P.items, P.e_tiles); }

}  // namespace cuda
}  // namespace bsn
