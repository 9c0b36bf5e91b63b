// Forward kernels of the fused SN / BSN (phases A, B, C, B2, D; see the top of
// launch.cu for the design). Each phase is a __device__ function looping
// grid-stride over its chunks or items; the fused kernels (Single, Coop) run
// them all with a barrier between phases, the phase kernels (Multi) one each.
//
// Kernel bodies only: each forward_<dtype>.cu includes this header and
// instantiates forward_kernel for its one dtype (BSN_INSTANTIATE_FORWARD), so
// the four dtypes compile as four translation units, in parallel, each a
// quarter of the work (one file for all four took ~45 s of one core for sm_90,
// and a build is as fast as its slowest file).
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace bsn {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// Block mode's walk over the columns of row x with 128-bit loads: a scalar
// head up to the first 16-byte boundary (thread n takes column n < head), then
// 16-byte vectors (thread lane takes vectors lane, lane + kThreads, ...; their
// elements in order), then a scalar tail (thread n takes column tail + n). Which
// thread takes which column, and in what order, depends only on cols and on
// x's offset from a 16-byte boundary, never on the grid or the launch mode.
// f(n, w): column n, its value as acc_t. Unrolled 4 deep, 4 vectors in flight
// per thread: a block's rows follow one another (each row's loads wait for the
// previous row's reduction), so a row of up to 4096 float32 is one round of
// loads (at 2 deep: rows over 2048 took two).
template <typename scalar_t>
struct RowSections {  // for_row_vec's split of a row: [0, head) scalars, nvec vectors, [tail, cols) scalars
  int64_t head, nvec, tail;
  __device__ __forceinline__ RowSections(const scalar_t* x, int64_t cols) {
    constexpr int kN = Vec16<scalar_t>::kN;
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) & 15) /
                        static_cast<int64_t>(sizeof(scalar_t));
    head = imin(mis == 0 ? 0 : kN - mis, cols);
    nvec = (cols - head) / kN;
    tail = head + nvec * kN;
  }
};

template <typename scalar_t, typename F>
__device__ __forceinline__ void for_row_vec(const scalar_t* __restrict__ x, int64_t cols, int lane,
                                            F&& f) {
  using V = Vec16<scalar_t>;
  constexpr int kN = V::kN;
  const RowSections<scalar_t> S(x, cols);
  if (lane < S.head) f(static_cast<int64_t>(lane), to_acc(x[lane]));
  const V* __restrict__ xv = reinterpret_cast<const V*>(x + S.head);
#pragma unroll 4
  for (int64_t m = lane; m < S.nvec; m += kThreads) {
    const V q = xv[m];
#pragma unroll
    for (int e = 0; e < kN; ++e) f(S.head + m * kN + e, to_acc(q.v[e]));
  }
  if (S.tail + lane < cols) f(S.tail + lane, to_acc(x[S.tail + lane]));
}

// for_row_vec for the strided pair: f(n, r, w) also gets r = n % sr, tracked
// incrementally (one 64-bit remainder per thread and section, none per element).
// It walks the row a second time, after for_row_vec's dot product.
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_row_vec_r(const scalar_t* __restrict__ x, int64_t cols, int64_t sr,
                                              int lane, F&& f) {
  using V = Vec16<scalar_t>;
  constexpr int kN = V::kN;
  const RowSections<scalar_t> S(x, cols);
  if (lane < S.head) f(static_cast<int64_t>(lane), static_cast<int64_t>(lane) % sr, to_acc(x[lane]));
  const V* __restrict__ xv = reinterpret_cast<const V*>(x + S.head);
  const int64_t step = (int64_t{kThreads} * kN) % sr;  // r's advance from vector m to m + kThreads
  int64_t rm = (S.head + int64_t{lane} * kN) % sr;    // r of this thread's vector's first element
#pragma unroll 2  // 2 deep: at 4, bfloat16's fused Coop kernel spilled (its loop also loads v)
  for (int64_t m = lane; m < S.nvec; m += kThreads) {
    const V q = xv[m];
    int64_t r = rm;
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      f(S.head + m * kN + e, r, to_acc(q.v[e]));
      if (++r == sr) r = 0;
    }
    rm += step;
    if (rm >= sr) rm -= sr;
  }
  if (S.tail + lane < cols) f(S.tail + lane, (S.tail + lane) % sr, to_acc(x[S.tail + lane]));
}

// ---------------------------------------------------------------------------
// Phase A: the pass over W by rows (see the top of launch.cu). SMEM_ACC: the
// accumulators live in shared memory (else in the workspace, block mode only),
// fixed at compile time so that their loads and stores are shared-memory
// instructions that cannot alias the global loads of W and v (with a generic
// pointer chosen at run time the compiler must keep them in program order).
template <typename scalar_t, bool TRAIN, bool FROM_BUF, int GT, bool SMEM_ACC>
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
    if constexpr (SMEM_ACC) {
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
            if (n < cols) d = fma_rn(xr[k], VR(n), d);
          }
          const acc s = G::allsum(d, bscr);
          if constexpr (TRAIN) {
#pragma unroll
            for (int k = 0; k < kWarpRegs; ++k) {
              const int64_t n = lane + 32 * k;
              if (n < cols) tacc[n] = fma_rn(s, xr[k], tacc[n]);
            }
            if (lane == 0) {
              ws[P.w_s0 + i] = s;
              part = fma_rn(s, s, part);
            }
          } else {
            if (lane == 0) part = fma_rn(to_acc(ub_r[i]), s, part);
          }
        }
        if (has_str) {
          int64_t r = r_init;
#pragma unroll
          for (int k = 0; k < kWarpRegs; ++k) {
            const int64_t n = lane + 32 * k;
            if (n < cols) qacc[n] = fma_rn(xr[k], VS(vbase + r), qacc[n]);
            r += r_step;
            if (r >= sr) r -= sr;
          }
        }
      } else {
        // Block mode: long rows, the block reduces; x is read again from L1/L2.
        // With a row pair, the loops walk x with 128-bit loads (for_row_vec,
        // for_row_vec_r); the columns of tacc and qacc change owners from row
        // to row when rows are not 16-byte multiples, which is safe: allsum's
        // barriers lie between one row's updates and the next's (and between
        // the zeroing above and the first row's). Each column still gets its
        // rows in row order: the same sums as the scalar walk.
        if (has_row) {
          acc d = acc(0);
          for_row_vec<scalar_t>(x, cols, lane, [&](int64_t n, acc w) { d = fma_rn(w, VR(n), d); });
          const acc s = G::allsum(d, bscr);
          if constexpr (TRAIN) {
            if (has_str) {
              for_row_vec_r<scalar_t>(x, cols, sr, lane, [&](int64_t n, int64_t r, acc w) {
                tacc[n] = fma_rn(s, w, tacc[n]);
                qacc[n] = fma_rn(w, VS(vbase + r), qacc[n]);
              });
            } else {
              for_row_vec<scalar_t>(x, cols, lane,
                                    [&](int64_t n, acc w) { tacc[n] = fma_rn(s, w, tacc[n]); });
            }
            if (lane == 0) {
              ws[P.w_s0 + i] = s;
              part = fma_rn(s, s, part);
            }
          } else {
            if (has_str) {
              for_row_vec_r<scalar_t>(x, cols, sr, lane, [&](int64_t n, int64_t r, acc w) {
                qacc[n] = fma_rn(w, VS(vbase + r), qacc[n]);
              });
            }
            if (lane == 0) part = fma_rn(to_acc(ub_r[i]), s, part);
          }
        } else {
          // Strided pair alone: no barrier between rows, so each thread keeps the
          // same columns in every row (scalar loads; a 128-bit walk would hand
          // columns to other threads when rows are not 16-byte multiples).
          int64_t r = r_init;
          for (int64_t n = lane; n < cols; n += GT) {
            qacc[n] = fma_rn(to_acc(x[n]), VS(vbase + r), qacc[n]);
            r += r_step;
            if (r >= sr) r -= sr;
          }
        }
      }
    }
    __syncthreads();  // every group's accumulators are complete

    // Combine the groups (in group order) and store the chunk's partials.
    if constexpr (SMEM_ACC) {
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
      const acc* q0 = SMEM_ACC ? accs + (use_t ? cols : 0) : ws + P.w_q + c * cols;
      acc sg = acc(0);
      for (int64_t j = tid; j < sm; j += kThreads) {
        const acc* qj = q0 + j * sr;
        acc q = acc(0);
        for (int64_t r = 0; r < sr; ++r) q += qj[r];
        if constexpr (TRAIN) {
          ws[P.w_s1p + c * sm + j] = q;
        } else {
          sg = fma_rn(to_acc(ub_s[j]), q, sg);
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
  if (A.P.a_warp) {  // warp mode always fits shared memory (plan.cpp)
    phase_a_impl<scalar_t, TRAIN, FROM_BUF, 32, true>(A, smem, bid, nblk);
  } else if (A.P.a_acc_smem) {
    phase_a_impl<scalar_t, TRAIN, FROM_BUF, kThreads, true>(A, smem, bid, nblk);
  } else {
    phase_a_impl<scalar_t, TRAIN, FROM_BUF, kThreads, false>(A, smem, bid, nblk);
  }
}

// ---------------------------------------------------------------------------
// Phase B: column sums of the chunk partials, in chunk order. Items: slabs of
// b_cpi* columns (multiples of 32); in a slab of 32 columns, warp w sums the
// chunks w, w + 8, ... and warp 0 adds the 8 warp sums in order. UNROLL: loads
// in flight per lane (speed only, the adds stay in chunk order): phase B's own
// kernel 8 (with small chunks a warp has up to kMaxChunksA / kWarps = 33, each
// an L2 round trip), the fused kernels 4 (at 8 the Coop kernel spilled).
template <typename scalar_t, int UNROLL>
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
#pragma unroll UNROLL
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
          sq = fma_rn(vr, vr, sq);
        } else {
          ws[P.w_s1 + n] = t;
          sq = fma_rn(t, t, sq);
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
          for (int64_t j = jg; j < J; j += JG) a = fma_rn(to_acc(x[j * R + r]), s1[j], a);
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
          sq = fma_rn(vr, vr, sq);
        }
        G::sync();  // red is reused by the next row
      } else {
        for (int64_t r = lane; r < R; r += GT) {
          acc a = acc(0);
#pragma unroll 4
          for (int64_t j = 0; j < J; ++j) a = fma_rn(to_acc(x[j * R + r]), s1[j], a);
          const acc vr = a / den;
          dst[r] = vr;
          sq = fma_rn(vr, vr, sq);
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
      if (e < E) out[e] = from_acc<scalar_t>(mul_rn(to_acc(v[k]), f));
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
  const acc sigma = both ? mul_rn(add_rn(sig_r, sig_s), acc(0.5)) : (P.has_row ? sig_r : sig_s);  // == / 2
  if (bid == 0 && threadIdx.x == 0) {
    A.state[0] = sigma;
    if (both) {
      A.state[1] = sig_r;  // pair 0 (dim 0)
      A.state[2] = sig_s;  // pair 1 (dim 1)
    }
  }
  if (A.out == nullptr) return;  // track-only: no output pass
  const acc f0 = variant_projects(sigma, A.coeff) ? A.scale_k / sigma : A.scale;
  const acc f = A.gamma != nullptr ? mul_rn(f0, *A.gamma) : f0;
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
// Kernels. __launch_bounds__' second argument (blocks per SM that must fit)
// sets ptxas's register cap (see common.cuh); without it ptxas picked caps of
// its own (128 for the fused kernels, where float64 spilled; 64 with a spill
// for float64's phase A eval). Phase A: 4 blocks per SM (64 registers; float64
// 3, 80 registers: at 64 it spills), where its shared memory and its chunk
// count allow them (at most kMaxChunksA chunks: 2 per SM on 132 SMs).
// The streaming phase kernels (B, C, B2, D) keep ptxas's choice (31-58
// registers, 4-8 blocks per SM): a bound of 4 made ptxas use up to 64
// registers there (fewer resident blocks, e.g. backward's dot 32 -> 42).
template <typename scalar_t>
constexpr int kMinBlocksA = sizeof(acc_t<scalar_t>) == 8 ? 3 : 4;
constexpr int kUnrollB = 8;       // phase B's chunk-loop unroll in its own kernel (see phase_b)
constexpr int kUnrollBFused = 4;  // and in the fused kernels
template <typename scalar_t, class Sync>
__global__ void __launch_bounds__(kThreads, Sync::kMinBlocks)
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
      phase_b<scalar_t, kUnrollBFused>(A, smem, bid, nblk);
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
__global__ void __launch_bounds__(kThreads, kMinBlocksA<scalar_t>) phase_a_kernel(const __grid_constant__ FwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  phase_a<scalar_t, TRAIN, FROM_BUF>(A, smem, blockIdx.x, gridDim.x);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) phase_b_kernel(const __grid_constant__ FwdArgs<scalar_t> A) {
  BSN_SMEM_DECL(scalar_t);
  phase_b<scalar_t, kUnrollB>(A, smem, blockIdx.x, gridDim.x);
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

}  // namespace

template <typename scalar_t>
const void* forward_kernel(FwdKernel k) {
  switch (k) {
    case FwdKernel::FusedSingle:
      return reinterpret_cast<const void*>(&fused_forward_kernel<scalar_t, BlockSync>);
    case FwdKernel::FusedCoop:
      return reinterpret_cast<const void*>(&fused_forward_kernel<scalar_t, GridSync>);
    case FwdKernel::PhaseATrainFromBuffers:
      return reinterpret_cast<const void*>(&phase_a_kernel<scalar_t, true, true>);
    case FwdKernel::PhaseATrain:
      return reinterpret_cast<const void*>(&phase_a_kernel<scalar_t, true, false>);
    case FwdKernel::PhaseAEval:
      return reinterpret_cast<const void*>(&phase_a_kernel<scalar_t, false, true>);
    case FwdKernel::PhaseB:
      return reinterpret_cast<const void*>(&phase_b_kernel<scalar_t>);
    case FwdKernel::PhaseC:
      return reinterpret_cast<const void*>(&phase_c_kernel<scalar_t>);
    case FwdKernel::PhaseB2:
      return reinterpret_cast<const void*>(&phase_b2_kernel<scalar_t>);
    case FwdKernel::PhaseDTrain:
      return reinterpret_cast<const void*>(&phase_d_kernel<scalar_t, true>);
    case FwdKernel::PhaseDEval:
      return reinterpret_cast<const void*>(&phase_d_kernel<scalar_t, false>);
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace bsn

// One dtype's kernels, compiled in the .cu file that expands this.
#define BSN_INSTANTIATE_FORWARD(scalar_t) \
  namespace bsn {                         \
  namespace cuda {                        \
  template const void* forward_kernel<scalar_t>(FwdKernel); \
  }                                       \
  }
