// CUDA kernels of bsn_cuda: the fused SN / BSN forward and backward.
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
// BSN_CUDA_MODE=single|coop|multi (read by sn_cuda.cpp) forces a mode for tests
// and benchmarks; the default (auto) picks by size, and does not use Coop while
// the stream is being captured into a CUDA graph (sn_cuda.cpp; inside a graph
// the launch overhead Coop saves is gone, and plain launches are the safest to
// capture). Why cooperative groups rather than a hand-made grid barrier: the
// launch API guarantees co-residency (or fails cleanly), and grid.sync() gives
// the memory ordering between phases.
//
// Memory traffic: training SN reads W once per iteration (phase A) and once more
// to write out (phase D); BSN reads W twice per iteration. D walks W backwards
// after a forward pass (and C backwards after A) so that the tail still in L2 is
// reused. Chunk partials of t are at most kMaxChunksA rows of `cols` entries.
//
// Accumulation: acc_t = double for double weights, float otherwise (half and
// bfloat16 are converted on load). IEEE math only (sqrt, '/'; no fast math).
// All offsets are int64_t.
#include "kernels.cuh"

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace bsn {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// Constants. Changing any of the "partition" ones changes the summation order
// (still deterministic); the others only change speed.
constexpr int kThreads = 256;             // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kScr = 64;                  // block-reduction scratch slots (>= kWarps + 1)
constexpr int kEPT = 8;                   // elements per thread per tile, elementwise passes
constexpr int64_t kTile = int64_t{kThreads} * kEPT;
constexpr int kWarpRegs = 8;              // row elements per lane in warp mode
constexpr int64_t kWarpColsMax = 32 * kWarpRegs;  // warp-per-row mode when cols <= this
// partition
constexpr int64_t kMinChunkElems = 8192;  // at least this many elements per row chunk
constexpr int64_t kMaxChunksA = 264;      // phase A chunks (t partials: chunks x cols)
constexpr int64_t kMaxChunksC = 1024;     // phase C chunks
constexpr int64_t kMaxItemsB = 1024;      // phase B items per vector
constexpr int64_t kMaxItemsBw = 1024;     // backward <G, W> items
// speed only
constexpr int64_t kTinyElems = 16384;            // Auto: single block up to this numel
constexpr int64_t kCoopMaxElems = int64_t{1} << 22;  // Auto: cooperative up to this numel
constexpr int64_t kSmemCap = 112640;      // dynamic shared memory cap per block (2 blocks/SM on H100)
constexpr int kBlocksPerSm = 8;           // Multi: grid cap = SMs * this (2048 threads/SM)

static_assert(kThreads % 32 == 0 && kWarps + 1 <= kScr, "bad block size");
static_assert(kThreads == 256, "the row-view modes assume 8 warps of 32");

// ---------------------------------------------------------------------------
// Types and scalar helpers.
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

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(c10::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_acc(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  return static_cast<T>(x);  // round to nearest even (c10::Half / BFloat16 ctors)
}

__device__ __forceinline__ float dev_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ bool dev_isfinite(float x) { return isfinite(x); }
__device__ __forceinline__ bool dev_isfinite(double x) { return isfinite(x); }

// max(x, eps) that propagates NaN like torch's clamp_min.
template <typename T>
__device__ __forceinline__ T clamp_eps(T x, T eps) {
  return x < eps ? eps : x;
}

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Deterministic reductions.

// Lane 0 gets the sum of x over the warp (fixed shuffle tree).
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  return x;
}

// Sum of x over the block in a fixed order; every thread gets the same value.
// Uses bscr[0..kWarps]; safe to call back to back (ends with a barrier).
// Every thread of the block must call it.
template <typename T>
__device__ T block_sum(T x, T* bscr) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) bscr[warp] = x;
  __syncthreads();
  if (warp == 0) {
    T y = lane < kWarps ? bscr[lane] : T(0);
    y = warp_sum(y);
    if (lane == 0) bscr[kWarps] = y;
  }
  __syncthreads();
  const T r = bscr[kWarps];
  __syncthreads();
  return r;
}

// Sum of a[0..n) in an order that depends only on n; every thread gets it.
template <typename T>
__device__ T block_sum_array(const T* a, int64_t n, T* bscr) {
  T x = T(0);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) x += a[k];
  return block_sum(x, bscr);
}

// A group of threads that handles one row at a time: a warp (warp mode, 8
// groups per block) or the whole block.
template <int GT>
struct Group;

template <>
struct Group<32> {
  static constexpr int kCount = kWarps;
  static __device__ __forceinline__ int lane() { return threadIdx.x & 31; }
  static __device__ __forceinline__ int id() { return threadIdx.x >> 5; }
  static __device__ __forceinline__ void sync() { __syncwarp(); }
  template <typename T>
  static __device__ __forceinline__ T allsum(T x, T* /*bscr*/) {
    x = warp_sum(x);
    return __shfl_sync(0xffffffffu, x, 0);
  }
};

template <>
struct Group<kThreads> {
  static constexpr int kCount = 1;
  static __device__ __forceinline__ int lane() { return threadIdx.x; }
  static __device__ __forceinline__ int id() { return 0; }
  static __device__ __forceinline__ void sync() { __syncthreads(); }
  template <typename T>
  static __device__ __forceinline__ T allsum(T x, T* bscr) {
    return block_sum(x, bscr);
  }
};

// Barrier between phases.
struct BlockSync {  // Single mode: the grid is one block
  static __device__ __forceinline__ void sync() { __syncthreads(); }
};
struct GridSync {  // Coop mode: launched with cudaLaunchCooperativeKernel
  static __device__ __forceinline__ void sync() { cooperative_groups::this_grid().sync(); }
};

// ---------------------------------------------------------------------------
// Kernel arguments.
template <typename scalar_t>
struct FwdArgs {
  const scalar_t* w;
  scalar_t* out;
  scalar_t* ub[2];  // u buffers (params pair order)
  scalar_t* vb[2];  // v buffers
  acc_t<scalar_t>* state;
  acc_t<scalar_t>* ws;
  acc_t<scalar_t> eps;
  acc_t<scalar_t> scale;
  ForwardPlan P;
};

template <typename scalar_t>
struct BwdArgs {
  const scalar_t* g;
  const scalar_t* w;
  scalar_t* gw;
  const acc_t<scalar_t>* state;
  acc_t<scalar_t>* ws;
  acc_t<scalar_t> scale;
  BackwardPlan P;
};

// Shared memory layout of every phase (acc_t elements):
//   [0, kThreads)                 red: per-group trees, group partials
//   [kThreads, kThreads + kScr)   bscr: block_sum scratch
//   [kThreads + kScr, ...)        phase A accumulators (when in shared memory)
constexpr int kSmemAccOffset = kThreads + kScr;

// ---------------------------------------------------------------------------
// Phase A: the pass over W by rows (see the top comment).
template <typename scalar_t, bool TRAIN, bool FROM_BUF, int GT>
__device__ void phase_a_impl(const FwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                             int64_t nblk) {
  using acc = acc_t<scalar_t>;
  using G = Group<GT>;
  const ForwardPlan& P = A.P;
  acc* red = smem;
  acc* bscr = smem + kThreads;
  acc* accs = smem + kSmemAccOffset;
  acc* ws = A.ws;
  const int tid = threadIdx.x;
  const int lane = G::lane();
  const int gid = G::id();
  const int64_t cols = P.cols;
  const int64_t sr = P.sr;
  const int64_t sm = P.sm;
  const bool has_row = P.has_row != 0;
  const bool has_str = P.has_str != 0;
  const bool use_t = TRAIN && has_row;
  const int64_t gstride = static_cast<int64_t>(P.a_narr) * cols;  // per-group accumulators
  const scalar_t* W = A.w;
  const scalar_t* vb_r = A.vb[P.row_pair];
  const scalar_t* ub_r = A.ub[P.row_pair];
  const scalar_t* vb_s = A.vb[P.str_pair];
  const scalar_t* ub_s = A.ub[P.str_pair];
  const acc* vc_r = ws + P.w_v0cur;
  const acc* vc_s = ws + P.w_v1cur;
  // v of the row pair at column n, v of the strided pair at index k.
  auto VR = [&](int64_t n) -> acc {
    if constexpr (FROM_BUF) {
      return to_acc(vb_r[n]);
    } else {
      return vc_r[n];
    }
  };
  auto VS = [&](int64_t k) -> acc {
    if constexpr (FROM_BUF) {
      return to_acc(vb_s[k]);
    } else {
      return vc_s[k];
    }
  };
  // A lane's columns are n = lane + k * GT; r = n % sr is tracked incrementally.
  const int64_t r_step = static_cast<int64_t>(GT) % sr;
  const int64_t r_init = static_cast<int64_t>(lane) % sr;

  for (int64_t c = bid; c < P.a_chunks; c += nblk) {
    const int64_t r0 = c * P.a_rpc;
    const int64_t r1 = imin(r0 + P.a_rpc, P.rows);
    acc* tacc;  // row pair: t accumulator of this group (cols entries)
    acc* qacc;  // strided pair: q accumulator of this group (cols entries)
    if (P.a_acc_smem) {
      tacc = accs + gid * gstride;
      qacc = tacc + (use_t ? cols : 0);
    } else {  // block mode only (one group): accumulate in the workspace
      tacc = ws + P.w_t0 + c * cols;
      qacc = ws + P.w_q + c * cols;
    }
    // Lane-owned columns: no barrier needed until the groups are combined.
    for (int64_t n = lane; n < cols; n += GT) {
      if (use_t) tacc[n] = acc(0);
      if (has_str) qacc[n] = acc(0);
    }
    acc part = acc(0);  // lane 0 of the group: sum of s^2 (train) or of u * s (eval)
    for (int64_t i = r0 + gid; i < r1; i += G::kCount) {
      const scalar_t* x = W + i * cols;
      const int64_t vbase = i * sr;
      if constexpr (GT == 32) {
        // cols <= kWarpColsMax: the row lives in registers.
        acc xr[kWarpRegs];
#pragma unroll
        for (int k = 0; k < kWarpRegs; ++k) {
          const int64_t n = lane + 32 * k;
          xr[k] = n < cols ? to_acc(x[n]) : acc(0);
        }
        if (has_row) {
          acc d = acc(0);
#pragma unroll
          for (int k = 0; k < kWarpRegs; ++k) {
            const int64_t n = lane + 32 * k;
            if (n < cols) d += xr[k] * VR(n);
          }
          const acc s = G::allsum(d, bscr);
          if constexpr (TRAIN) {
#pragma unroll
            for (int k = 0; k < kWarpRegs; ++k) {
              const int64_t n = lane + 32 * k;
              if (n < cols) tacc[n] += s * xr[k];
            }
            if (lane == 0) {
              ws[P.w_s0 + i] = s;
              part += s * s;
            }
          } else {
            if (lane == 0) part += to_acc(ub_r[i]) * s;
          }
        }
        if (has_str) {
          int64_t r = r_init;
#pragma unroll
          for (int k = 0; k < kWarpRegs; ++k) {
            const int64_t n = lane + 32 * k;
            if (n < cols) qacc[n] += xr[k] * VS(vbase + r);
            r += r_step;
            if (r >= sr) r -= sr;
          }
        }
      } else {
        // Block mode: long rows, the block reduces; x is read again from L1/L2.
        if (has_row) {
          acc d = acc(0);
#pragma unroll 8
          for (int64_t n = lane; n < cols; n += GT) d += to_acc(x[n]) * VR(n);
          const acc s = G::allsum(d, bscr);
          if constexpr (TRAIN) {
            if (has_str) {
              int64_t r = r_init;
              for (int64_t n = lane; n < cols; n += GT) {
                const acc w = to_acc(x[n]);
                tacc[n] += s * w;
                qacc[n] += w * VS(vbase + r);
                r += r_step;
                if (r >= sr) r -= sr;
              }
            } else {
              for (int64_t n = lane; n < cols; n += GT) tacc[n] += s * to_acc(x[n]);
            }
            if (lane == 0) {
              ws[P.w_s0 + i] = s;
              part += s * s;
            }
          } else {
            if (has_str) {
              int64_t r = r_init;
              for (int64_t n = lane; n < cols; n += GT) {
                qacc[n] += to_acc(x[n]) * VS(vbase + r);
                r += r_step;
                if (r >= sr) r -= sr;
              }
            }
            if (lane == 0) part += to_acc(ub_r[i]) * s;
          }
        } else {
          int64_t r = r_init;
          for (int64_t n = lane; n < cols; n += GT) {
            qacc[n] += to_acc(x[n]) * VS(vbase + r);
            r += r_step;
            if (r >= sr) r -= sr;
          }
        }
      }
    }
    __syncthreads();  // every group's accumulators are complete

    // Combine the groups (in group order) and store the chunk's partials.
    if (P.a_acc_smem) {
      if (use_t) {
        acc* dst = ws + P.w_t0 + c * cols;
        for (int64_t n = tid; n < cols; n += kThreads) {
          acc t = accs[n];
          for (int g = 1; g < G::kCount; ++g) t += accs[g * gstride + n];
          dst[n] = t;
        }
      }
      if (has_str && G::kCount > 1) {
        acc* q0 = accs + (use_t ? cols : 0);
        for (int64_t n = tid; n < cols; n += kThreads) {
          acc q = q0[n];
          for (int g = 1; g < G::kCount; ++g) q += q0[g * gstride + n];
          q0[n] = q;  // only this thread touches column n in this loop
        }
        __syncthreads();  // combined q visible to the j-owners below
      }
    }
    if (has_str) {
      const acc* q0 = P.a_acc_smem ? accs + (use_t ? cols : 0) : ws + P.w_q + c * cols;
      acc sg = acc(0);
      for (int64_t j = tid; j < sm; j += kThreads) {
        const acc* qj = q0 + j * sr;
        acc q = acc(0);
        for (int64_t r = 0; r < sr; ++r) q += qj[r];
        if constexpr (TRAIN) {
          ws[P.w_s1p + c * sm + j] = q;
        } else {
          sg += to_acc(ub_s[j]) * q;
        }
      }
      if constexpr (!TRAIN) {
        const acc tot = block_sum(sg, bscr);
        if (tid == 0) ws[P.w_sig1 + c] = tot;
      }
    }
    if (has_row) {
      if (lane == 0) red[gid] = part;
      __syncthreads();
      if (tid == 0) {
        acc tot = red[0];
        for (int g = 1; g < G::kCount; ++g) tot += red[g];
        ws[(TRAIN ? P.w_sq0 : P.w_sig0) + c] = tot;
      }
    }
    __syncthreads();  // shared memory is reused by the next chunk
  }
}

template <typename scalar_t, bool TRAIN, bool FROM_BUF>
__device__ void phase_a(const FwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                        int64_t nblk) {
  if (A.P.a_warp) {
    phase_a_impl<scalar_t, TRAIN, FROM_BUF, 32>(A, smem, bid, nblk);
  } else {
    phase_a_impl<scalar_t, TRAIN, FROM_BUF, kThreads>(A, smem, bid, nblk);
  }
}

// ---------------------------------------------------------------------------
// Phase B: column sums of the chunk partials, in chunk order. Items: slabs of
// b_cpi* columns (multiples of 32); in a slab of 32 columns, warp w sums the
// chunks w, w + 8, ... and warp 0 adds the 8 warp sums in order.
template <typename scalar_t>
__device__ void phase_b(const FwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                        int64_t nblk) {
  using acc = acc_t<scalar_t>;
  const ForwardPlan& P = A.P;
  acc* red = smem;
  acc* bscr = smem + kThreads;
  acc* ws = A.ws;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  acc den0 = acc(1);
  if (P.has_row) den0 = clamp_eps(dev_sqrt(block_sum_array(ws + P.w_sq0, P.a_chunks, bscr)), A.eps);
  const int64_t items0 = P.has_row ? P.b_items0 : 0;
  const int64_t items1 = P.has_str ? P.b_items1 : 0;
  for (int64_t it = bid; it < items0 + items1; it += nblk) {
    const bool is_row = it < items0;
    const int64_t item = is_row ? it : it - items0;
    const int64_t ncols = is_row ? P.cols : P.sm;
    const int64_t cpi = is_row ? P.b_cpi0 : P.b_cpi1;
    const acc* part = ws + (is_row ? P.w_t0 : P.w_s1p);
    const int64_t n_begin = item * cpi;
    const int64_t n_end = imin(n_begin + cpi, ncols);
    acc sq = acc(0);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += 32) {
      const int64_t n = n0 + lane;
      acc a = acc(0);
      if (n < n_end) {
#pragma unroll 4
        for (int64_t ch = warp; ch < P.a_chunks; ch += kWarps) a += part[ch * ncols + n];
      }
      red[tid] = a;
      __syncthreads();
      if (warp == 0 && n < n_end) {
        acc t = red[lane];
        for (int g = 1; g < kWarps; ++g) t += red[g * 32 + lane];
        if (is_row) {
          const acc vr = t / den0;
          ws[P.w_v0raw + n] = vr;
          sq += vr * vr;
        } else {
          ws[P.w_s1 + n] = t;
          sq += t * t;
        }
      }
      __syncthreads();
    }
    const acc tot = block_sum(sq, bscr);
    if (tid == 0) ws[(is_row ? P.w_vp0 : P.w_s1sq) + item] = tot;
  }
}

// ---------------------------------------------------------------------------
// Phase C: strided pair, t[i*sr + r] = sum_j W[i, j, r] * s[j], by rows i of the
// row view (a [sm, sr] matrix each). With sr < GT, lane = jg * sr + r sums
// j = jg, jg + JG, ... (coalesced), then a fixed pairwise tree over jg.
template <typename scalar_t, int GT>
__device__ void phase_c_impl(const FwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                             int64_t nblk) {
  using acc = acc_t<scalar_t>;
  using G = Group<GT>;
  const ForwardPlan& P = A.P;
  acc* red = smem + G::id() * GT;  // this group's tree (kThreads in all)
  acc* bscr = smem + kThreads;
  acc* ws = A.ws;
  const int lane = G::lane();
  const acc den = clamp_eps(dev_sqrt(block_sum_array(ws + P.w_s1sq, P.b_items1, bscr)), A.eps);
  const acc* s1 = ws + P.w_s1;
  acc* v1raw = ws + P.w_v1raw;
  const int64_t J = P.sm;
  const int64_t R = P.sr;
  const int64_t cols = P.cols;
  for (int64_t it = bid; it < P.c_chunks; it += nblk) {
    const int64_t c = P.c_reverse ? P.c_chunks - 1 - it : it;
    const int64_t r0 = c * P.c_rpc;
    const int64_t r1 = imin(r0 + P.c_rpc, P.rows);
    acc sq = acc(0);
    for (int64_t i = r0 + G::id(); i < r1; i += G::kCount) {
      const scalar_t* x = A.w + i * cols;
      acc* dst = v1raw + i * R;
      if (R < GT) {
        const int Ri = static_cast<int>(R);
        const int JG = GT / Ri;
        const int active = JG * Ri;
        const int jg = lane / Ri;
        const int r = lane - jg * Ri;
        acc a = acc(0);
        if (lane < active) {
#pragma unroll 4
          for (int64_t j = jg; j < J; j += JG) a += to_acc(x[j * R + r]) * s1[j];
        }
        red[lane] = a;
        G::sync();
        for (int span = 1; span < JG; span <<= 1) {
          if (lane < active && (jg % (2 * span)) == 0 && jg + span < JG) red[lane] += red[lane + span * Ri];
          G::sync();
        }
        if (lane < Ri) {
          const acc vr = red[lane] / den;
          dst[lane] = vr;
          sq += vr * vr;
        }
        G::sync();  // red is reused by the next row
      } else {
        for (int64_t r = lane; r < R; r += GT) {
          acc a = acc(0);
#pragma unroll 4
          for (int64_t j = 0; j < J; ++j) a += to_acc(x[j * R + r]) * s1[j];
          const acc vr = a / den;
          dst[r] = vr;
          sq += vr * vr;
        }
      }
    }
    const acc tot = block_sum(sq, bscr);
    if (threadIdx.x == 0) ws[P.w_vp1 + c] = tot;
  }
}

template <typename scalar_t>
__device__ void phase_c(const FwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                        int64_t nblk) {
  if (A.P.c_warp) {
    phase_c_impl<scalar_t, 32>(A, smem, bid, nblk);
  } else {
    phase_c_impl<scalar_t, kThreads>(A, smem, bid, nblk);
  }
}

// ---------------------------------------------------------------------------
// Phase B2 (between iterations): v = v_raw / max(||v_raw||, eps).
template <typename scalar_t>
__device__ void phase_b2(const FwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                         int64_t nblk) {
  using acc = acc_t<scalar_t>;
  const ForwardPlan& P = A.P;
  acc* bscr = smem + kThreads;
  acc* ws = A.ws;
  const int64_t gt = bid * kThreads + threadIdx.x;
  const int64_t gs = nblk * kThreads;
  if (P.has_row) {
    const acc den = clamp_eps(dev_sqrt(block_sum_array(ws + P.w_vp0, P.b_items0, bscr)), A.eps);
    for (int64_t n = gt; n < P.cols; n += gs) ws[P.w_v0cur + n] = ws[P.w_v0raw + n] / den;
  }
  if (P.has_str) {
    const acc den = clamp_eps(dev_sqrt(block_sum_array(ws + P.w_vp1, P.c_chunks, bscr)), A.eps);
    for (int64_t k = gt; k < P.sv; k += gs) ws[P.w_v1cur + k] = ws[P.w_v1raw + k] / den;
  }
}

// ---------------------------------------------------------------------------
// Phase D.

// Training: the new vector is src / den rounded to the weight dtype; written to
// the buffer if accepted; the state gets what the buffer now holds.
template <typename scalar_t>
__device__ void store_vec(const acc_t<scalar_t>* src, acc_t<scalar_t> den, scalar_t* buf,
                          acc_t<scalar_t>* st, int64_t len, bool ok, int64_t gt, int64_t gs) {
  using acc = acc_t<scalar_t>;
  for (int64_t k = gt; k < len; k += gs) {
    acc val;
    if (ok) {
      const scalar_t q = from_acc<scalar_t>(src[k] / den);
      buf[k] = q;
      val = to_acc(q);
    } else {
      val = to_acc(buf[k]);
    }
    st[k] = val;
  }
}

// Eval: the state gets the buffers' values.
template <typename scalar_t>
__device__ void copy_vec(const scalar_t* buf, acc_t<scalar_t>* st, int64_t len, int64_t gt,
                         int64_t gs) {
  for (int64_t k = gt; k < len; k += gs) st[k] = to_acc(buf[k]);
}

// out = W * f over tiles of kTile elements (optionally in reverse tile order).
template <typename scalar_t>
__device__ void scale_pass(const scalar_t* w, scalar_t* out, int64_t E, acc_t<scalar_t> f,
                           int64_t tiles, bool reverse, int64_t bid, int64_t nblk) {
  for (int64_t t = bid; t < tiles; t += nblk) {
    const int64_t tile = reverse ? tiles - 1 - t : t;
    const int64_t base = tile * kTile + threadIdx.x;
    scalar_t v[kEPT];
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t e = base + int64_t{k} * kThreads;
      if (e < E) v[k] = w[e];
    }
#pragma unroll
    for (int k = 0; k < kEPT; ++k) {
      const int64_t e = base + int64_t{k} * kThreads;
      if (e < E) out[e] = from_acc<scalar_t>(to_acc(v[k]) * f);
    }
  }
}

// Sigma, the state's sigmas, and the output.
template <typename scalar_t>
__device__ void finish_forward(const FwdArgs<scalar_t>& A, acc_t<scalar_t> sig_r,
                               acc_t<scalar_t> sig_s, int64_t bid, int64_t nblk) {
  using acc = acc_t<scalar_t>;
  const ForwardPlan& P = A.P;
  const bool both = P.has_row && P.has_str;
  const acc sigma = both ? (sig_r + sig_s) / acc(2) : (P.has_row ? sig_r : sig_s);
  if (bid == 0 && threadIdx.x == 0) {
    A.state[0] = sigma;
    if (both) {
      A.state[1] = sig_r;  // pair 0 (dim 0)
      A.state[2] = sig_s;  // pair 1 (dim 1)
    }
  }
  const acc sigma_eff = sigma == acc(0) ? acc(1) : sigma;
  const acc f = A.scale / sigma_eff;
  scale_pass<scalar_t>(A.w, A.out, P.numel, f, P.e_tiles, P.d_reverse != 0, bid, nblk);
}

template <typename scalar_t>
__device__ void phase_d_train(const FwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                              int64_t nblk) {
  using acc = acc_t<scalar_t>;
  const ForwardPlan& P = A.P;
  acc* bscr = smem + kThreads;
  acc* ws = A.ws;
  const acc eps = A.eps;
  const int64_t gt = bid * kThreads + threadIdx.x;
  const int64_t gs = nblk * kThreads;
  acc sig_r = acc(0), sig_s = acc(0);
  if (P.has_row) {
    const acc ns = dev_sqrt(block_sum_array(ws + P.w_sq0, P.a_chunks, bscr));
    const acc ssq = block_sum_array(ws + P.w_vp0, P.b_items0, bscr);
    const acc nv = dev_sqrt(ssq);
    sig_r = ssq / clamp_eps(nv, eps);
    const bool ok = dev_isfinite(ns) && ns != acc(0) && dev_isfinite(nv) && nv != acc(0);
    const int k = P.row_pair;
    store_vec<scalar_t>(ws + P.w_s0, clamp_eps(ns, eps), A.ub[k], A.state + P.st_u[k], P.rows,
                        ok, gt, gs);
    store_vec<scalar_t>(ws + P.w_v0raw, clamp_eps(nv, eps), A.vb[k], A.state + P.st_v[k],
                        P.cols, ok, gt, gs);
  }
  if (P.has_str) {
    const acc ns = dev_sqrt(block_sum_array(ws + P.w_s1sq, P.b_items1, bscr));
    const acc ssq = block_sum_array(ws + P.w_vp1, P.c_chunks, bscr);
    const acc nv = dev_sqrt(ssq);
    sig_s = ssq / clamp_eps(nv, eps);
    const bool ok = dev_isfinite(ns) && ns != acc(0) && dev_isfinite(nv) && nv != acc(0);
    const int k = P.str_pair;
    store_vec<scalar_t>(ws + P.w_s1, clamp_eps(ns, eps), A.ub[k], A.state + P.st_u[k], P.sm, ok,
                        gt, gs);
    store_vec<scalar_t>(ws + P.w_v1raw, clamp_eps(nv, eps), A.vb[k], A.state + P.st_v[k], P.sv,
                        ok, gt, gs);
  }
  finish_forward<scalar_t>(A, sig_r, sig_s, bid, nblk);
}

template <typename scalar_t>
__device__ void phase_d_eval(const FwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                             int64_t nblk) {
  using acc = acc_t<scalar_t>;
  const ForwardPlan& P = A.P;
  acc* bscr = smem + kThreads;
  acc* ws = A.ws;
  const int64_t gt = bid * kThreads + threadIdx.x;
  const int64_t gs = nblk * kThreads;
  acc sig_r = acc(0), sig_s = acc(0);
  if (P.has_row) {
    sig_r = block_sum_array(ws + P.w_sig0, P.a_chunks, bscr);
    const int k = P.row_pair;
    copy_vec<scalar_t>(A.ub[k], A.state + P.st_u[k], P.rows, gt, gs);
    copy_vec<scalar_t>(A.vb[k], A.state + P.st_v[k], P.cols, gt, gs);
  }
  if (P.has_str) {
    sig_s = block_sum_array(ws + P.w_sig1, P.a_chunks, bscr);
    const int k = P.str_pair;
    copy_vec<scalar_t>(A.ub[k], A.state + P.st_u[k], P.sm, gt, gs);
    copy_vec<scalar_t>(A.vb[k], A.state + P.st_v[k], P.sv, gt, gs);
  }
  finish_forward<scalar_t>(A, sig_r, sig_s, bid, nblk);
}

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
      a0 += to_acc(g[e]) * to_acc(w[e]);
      if (e + kThreads < end) a1 += to_acc(g[e + kThreads]) * to_acc(w[e + kThreads]);
      if (e + 2 * kThreads < end) a2 += to_acc(g[e + 2 * kThreads]) * to_acc(w[e + 2 * kThreads]);
      if (e + 3 * kThreads < end) a3 += to_acc(g[e + 3 * kThreads]) * to_acc(w[e + 3 * kThreads]);
    }
    const acc tot = block_sum((a0 + a1) + (a2 + a3), bscr);
    if (threadIdx.x == 0) A.ws[it] = tot;
  }
}

// BW2: dW = a*G - k*D (or a*G when sigma == 0), tiles in reverse order.
template <typename scalar_t>
__device__ void bw_apply(const BwdArgs<scalar_t>& A, acc_t<scalar_t>* smem, int64_t bid,
                         int64_t nblk) {
  using acc = acc_t<scalar_t>;
  const BackwardPlan& P = A.P;
  acc* bscr = smem + kThreads;
  const acc c = block_sum_array(A.ws, P.items, bscr);
  const acc sigma = A.state[0];
  const bool zero = sigma == acc(0);
  const acc a = A.scale / (zero ? acc(1) : sigma);
  const acc kcoef = zero ? acc(0) : a * c / sigma;
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
        if (zero) {
          res = a * gv;
        } else {
          const acc dr = has_row ? ur[i] * vr[j * tr + r] : acc(0);
          const acc ds = has_str ? us[j] * vs[i * sr + r] : acc(0);
          const acc D = (has_row && has_str) ? (dr + ds) / acc(2) : (has_row ? dr : ds);
          res = a * gv - kcoef * D;
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
#define BSN_SMEM_DECL(scalar_t)                                 \
  extern __shared__ __align__(16) unsigned char bsn_smem_raw[]; \
  acc_t<scalar_t>* smem = reinterpret_cast<acc_t<scalar_t>*>(bsn_smem_raw)

template <typename scalar_t, class Sync>
__global__ void __launch_bounds__(kThreads)
    fused_forward_kernel(const __grid_constant__ FwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  const int64_t bid = blockIdx.x;
  const int64_t nblk = gridDim.x;
  const ForwardPlan& P = A.P;
  // Every block runs every phase and reaches every Sync::sync() (no early exit).
  if (P.update) {
    for (int it = 0; it < P.n_iter; ++it) {
      if (it == 0) {
        phase_a<scalar_t, true, true>(A, smem, bid, nblk);
      } else {
        phase_a<scalar_t, true, false>(A, smem, bid, nblk);
      }
      Sync::sync();
      phase_b<scalar_t>(A, smem, bid, nblk);
      Sync::sync();
      if (P.has_str) {
        phase_c<scalar_t>(A, smem, bid, nblk);
        Sync::sync();
      }
      if (it + 1 < P.n_iter) {
        phase_b2<scalar_t>(A, smem, bid, nblk);
        Sync::sync();
      }
    }
    phase_d_train<scalar_t>(A, smem, bid, nblk);
  } else {
    phase_a<scalar_t, false, true>(A, smem, bid, nblk);
    Sync::sync();
    phase_d_eval<scalar_t>(A, smem, bid, nblk);
  }
}

template <typename scalar_t, bool TRAIN, bool FROM_BUF>
__global__ void __launch_bounds__(kThreads) phase_a_kernel(const __grid_constant__ FwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  phase_a<scalar_t, TRAIN, FROM_BUF>(A, smem, blockIdx.x, gridDim.x);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) phase_b_kernel(const __grid_constant__ FwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  phase_b<scalar_t>(A, smem, blockIdx.x, gridDim.x);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) phase_c_kernel(const __grid_constant__ FwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  phase_c<scalar_t>(A, smem, blockIdx.x, gridDim.x);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) phase_b2_kernel(const __grid_constant__ FwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  phase_b2<scalar_t>(A, smem, blockIdx.x, gridDim.x);
}

template <typename scalar_t, bool TRAIN>
__global__ void __launch_bounds__(kThreads) phase_d_kernel(const __grid_constant__ FwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  if constexpr (TRAIN) {
    phase_d_train<scalar_t>(A, smem, blockIdx.x, gridDim.x);
  } else {
    phase_d_eval<scalar_t>(A, smem, blockIdx.x, gridDim.x);
  }
}

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

#undef BSN_SMEM_DECL

// ---------------------------------------------------------------------------
// Host helpers.

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

unsigned grid_for(int64_t items, int grid_cap) {
  return static_cast<unsigned>(imax(1, imin(items, grid_cap)));
}

// Blocks of a cooperative launch: all co-resident (blocks per SM from the
// occupancy calculator for this kernel and shared memory size, times the SMs),
// at most the largest item count of any phase; 0 when the kernel cannot be
// co-resident at all. allow_smem must have been called for `smem`.
int64_t coop_grid(const void* kernel, int64_t smem, const DeviceInfo& dev, int64_t max_items) {
  static std::map<std::tuple<const void*, int, int64_t>, int> occupancy;
  int per_sm = 0;
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    const auto key = std::make_tuple(kernel, dev.device, smem);
    const auto it = occupancy.find(key);
    if (it != occupancy.end()) {
      per_sm = it->second;
    } else {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                                   static_cast<size_t>(smem)));
      occupancy.emplace(key, per_sm);
    }
  }
  if (per_sm <= 0) return 0;
  return imax(1, imin(static_cast<int64_t>(per_sm) * dev.sm_count, max_items));
}

void chunk_rows(int64_t rows, int64_t numel, int64_t max_chunks, int64_t* nchunks, int64_t* rpc) {
  int64_t n = ceil_div(numel, kMinChunkElems);
  n = imax(1, imin(n, imin(rows, max_chunks)));
  *rpc = ceil_div(rows, n);
  *nchunks = ceil_div(rows, *rpc);
}

int64_t items_per(int64_t n, int64_t max_items) {  // columns per phase-B item
  return 32 * imax(1, ceil_div(ceil_div(n, 32), max_items));
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

}  // namespace

// ---------------------------------------------------------------------------
// Plans.

namespace {
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
  const int64_t cap = imin(kSmemCap, dev.smem_optin);
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
    P.a_acc_smem = (cap > scratch && P.cols <= (cap - scratch) / per_col) ? 1 : 0;
    // Warp mode needs at most 8 * 2 * 256 * 8 bytes + scratch (< 48 KiB): always fits.
    TORCH_CHECK(P.a_acc_smem || !P.a_warp, "bsn_cuda: warp mode does not fit shared memory");
    P.a_smem = scratch + (P.a_acc_smem ? per_col * P.cols : 0);
  }
  chunk_rows(P.rows, E, kMaxChunksA, &P.a_chunks, &P.a_rpc);

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
  chunk_rows(P.rows, E, kMaxChunksC, &P.c_chunks, &P.c_rpc);
  P.c_reverse = 1;
  // Phase D: walk W against the direction of the last pass over it.
  P.e_tiles = ceil_div(E, kTile);
  P.d_reverse = (P.update && P.has_str) ? 0 : 1;

  // Workspace (acc_t elements; regions rounded up to 32 elements).
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t o = off;
    off += ceil_div(imax(n, 1), 32) * 32;
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
  P.items = imax(1, imin(ceil_div(E, 2 * kMinChunkElems), kMaxItemsBw));
  P.item_size = ceil_div(E, P.items);
  P.items = ceil_div(E, P.item_size);
  P.e_tiles = ceil_div(E, kTile);
  P.scratch_smem = int64_t{kSmemAccOffset} * acc_size;
  P.ws_elems = ceil_div(P.items, 32) * 32;
  P.grid_cap = std::max(1, dev.sm_count * kBlocksPerSm);
  P.mode = resolve_mode(mode, E, dev);
  return P;
}

// ---------------------------------------------------------------------------
// Launchers.

template <typename scalar_t>
void launch_forward(const ForwardParams& p, const ForwardPlan& plan, void* workspace,
                    const DeviceInfo& dev, cudaStream_t stream) {
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
  A.P = plan;
  const int64_t smem_a = plan.a_smem;
  const int64_t smem = plan.scratch_smem;

  Mode mode = plan.mode;
  if (mode == Mode::Coop) {
    const void* kern = reinterpret_cast<const void*>(&fused_forward_kernel<scalar_t, GridSync>);
    allow_smem(kern, smem_a, dev.device);
    const int64_t vec = imax(imax(plan.rows, plan.cols), imax(plan.sm, plan.sv));
    const int64_t max_items =
        imax(imax(plan.a_chunks, plan.b_items0 + plan.b_items1),
             imax(imax(plan.c_chunks, plan.e_tiles), ceil_div(vec, kThreads)));
    const int64_t grid = coop_grid(kern, smem_a, dev, max_items);
    if (grid >= 1) {
      void* args[] = {static_cast<void*>(&A)};
      C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kern, dim3(static_cast<unsigned>(grid)),
                                                 dim3(kThreads), args,
                                                 static_cast<size_t>(smem_a), stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    mode = Mode::Multi;  // cannot be co-resident: fall back (same results)
  }
  if (mode == Mode::Single) {
    allow_smem(reinterpret_cast<const void*>(&fused_forward_kernel<scalar_t, BlockSync>), smem_a, dev.device);
    fused_forward_kernel<scalar_t, BlockSync><<<1, kThreads, smem_a, stream>>>(A);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Multi.
  const int cap = plan.grid_cap;
  const unsigned gA = grid_for(plan.a_chunks, cap);
  const unsigned gB = grid_for(plan.b_items0 + plan.b_items1, cap);
  const unsigned gC = grid_for(plan.c_chunks, cap);
  const unsigned gB2 = grid_for(ceil_div(imax(plan.cols, plan.sv), kThreads), cap);
  const unsigned gD = grid_for(plan.e_tiles, cap);
  if (plan.update) {
    for (int it = 0; it < plan.n_iter; ++it) {
      if (it == 0) {
        allow_smem(reinterpret_cast<const void*>(&phase_a_kernel<scalar_t, true, true>), smem_a, dev.device);
        phase_a_kernel<scalar_t, true, true><<<gA, kThreads, smem_a, stream>>>(A);
      } else {
        allow_smem(reinterpret_cast<const void*>(&phase_a_kernel<scalar_t, true, false>), smem_a, dev.device);
        phase_a_kernel<scalar_t, true, false><<<gA, kThreads, smem_a, stream>>>(A);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      phase_b_kernel<scalar_t><<<gB, kThreads, smem, stream>>>(A);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (plan.has_str) {
        phase_c_kernel<scalar_t><<<gC, kThreads, smem, stream>>>(A);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (it + 1 < plan.n_iter) {
        phase_b2_kernel<scalar_t><<<gB2, kThreads, smem, stream>>>(A);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    phase_d_kernel<scalar_t, true><<<gD, kThreads, smem, stream>>>(A);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    allow_smem(reinterpret_cast<const void*>(&phase_a_kernel<scalar_t, false, true>), smem_a, dev.device);
    phase_a_kernel<scalar_t, false, true><<<gA, kThreads, smem_a, stream>>>(A);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    phase_d_kernel<scalar_t, false><<<gD, kThreads, smem, stream>>>(A);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void launch_backward(const BackwardParams& p, const BackwardPlan& plan, void* workspace,
                     const DeviceInfo& dev, cudaStream_t stream) {
  using acc = acc_t<scalar_t>;
  BwdArgs<scalar_t> A;
  A.g = static_cast<const scalar_t*>(p.grad_out);
  A.gw = static_cast<scalar_t*>(p.grad_weight);
  A.state = static_cast<const acc*>(p.state);
  A.ws = static_cast<acc*>(workspace);
  A.w = static_cast<const scalar_t*>(p.weight);
  A.scale = static_cast<acc>(p.scale);
  A.P = plan;
  const int64_t smem = plan.scratch_smem;
  Mode mode = plan.mode;
  if (mode == Mode::Coop) {
    const void* kern = reinterpret_cast<const void*>(&fused_backward_kernel<scalar_t, GridSync>);
    const int64_t grid = coop_grid(kern, smem, dev, imax(plan.items, plan.e_tiles));
    if (grid >= 1) {
      void* args[] = {static_cast<void*>(&A)};
      C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kern, dim3(static_cast<unsigned>(grid)),
                                                 dim3(kThreads), args, static_cast<size_t>(smem),
                                                 stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    mode = Mode::Multi;
  }
  if (mode == Mode::Single) {
    fused_backward_kernel<scalar_t, BlockSync><<<1, kThreads, smem, stream>>>(A);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int cap = plan.grid_cap;
  bw_dot_kernel<scalar_t><<<grid_for(plan.items, cap), kThreads, smem, stream>>>(A);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bw_apply_kernel<scalar_t><<<grid_for(plan.e_tiles, cap), kThreads, smem, stream>>>(A);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define BSN_INSTANTIATE(T)                                                                   \
  template void launch_forward<T>(const ForwardParams&, const ForwardPlan&, void*,           \
                                  const DeviceInfo&, cudaStream_t);                          \
  template void launch_backward<T>(const BackwardParams&, const BackwardPlan&, void*,        \
                                   const DeviceInfo&, cudaStream_t);

BSN_INSTANTIATE(float)
BSN_INSTANTIATE(double)
BSN_INSTANTIATE(c10::Half)
BSN_INSTANTIATE(c10::BFloat16)

#undef BSN_INSTANTIATE

}  // namespace cuda
}  // namespace bsn
