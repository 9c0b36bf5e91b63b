// Fused SN / BSN forward and backward on the CPU. See docs/design.md for the math.
//
// Work is split into chunks whose count and bounds depend only on the shape;
// each chunk writes its own partial sums, which are then added in chunk order.
// So results do not depend on the number of threads.
#include "kernels_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace bsn {
namespace cpu {
namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows handled together in the update loops (matches axpy4 in vec.h).
constexpr int kGroup = 4;
// Rows this short cost more in per-row calls than in arithmetic: the row
// passes take them 16 at a time (skinny_rows16).
constexpr int64_t kSkinnyCols = 32;

// Fixed work split of `rows` rows of `row_len` elements each.
struct Chunks {
  int64_t rows_per_chunk;
  int64_t count;
  int64_t begin(int64_t c) const { return c * rows_per_chunk; }
};

Chunks split_rows(int64_t rows, int64_t row_len) {
  constexpr int64_t kMinChunkElements = 32768;  // below this a thread is not worth it
  constexpr int64_t kMaxChunks = 32;            // bounds the partial-sum memory
  const int64_t total = rows * row_len;
  int64_t count = std::clamp<int64_t>(total / kMinChunkElements, 1, kMaxChunks);
  // More than two chunks: the nearest multiple of 8, so that 2, 4 or 8 threads
  // get equal shares (each chunk costs a partial sum of a row's length).
  if (count > 2) count = std::min<int64_t>(std::max<int64_t>((count + 4) / 8, 1) * 8, kMaxChunks);
  count = std::min(count, rows);
  const int64_t per = (rows + count - 1) / count;
  return {per, (rows + per - 1) / per};
}

// f(c0, c1) over chunks [0, count), in parallel when there is more than one:
// at::parallel_for opens an OpenMP region even for a single task.
template <typename F>
void for_chunks(int64_t count, const F& f) {
  if (count == 1) {
    f(int64_t{0}, int64_t{1});
  } else {
    at::parallel_for(0, count, 1, f);
  }
}

// The k-th of chunks [c0, c1), visited in reverse when `reverse`. Passes over W
// alternate their direction: each thread gets the same chunk range in every
// pass (same count, same static split), so the chunks a thread read last are
// still in its cache when the next pass starts there.
inline int64_t chunk_at(int64_t c0, int64_t c1, int64_t k, bool reverse) {
  return reverse ? c1 - 1 - (k - c0) : k;
}

// A pointer to n values of src as acc type: src itself when it already is,
// else a conversion into buf (unused, and may be null, in the first case).
template <typename T, typename A>
const A* as_acc(const T* src, int64_t n, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

// Scratch memory kept per thread and slot across calls: these kernels run on
// every forward and backward, and fresh heap blocks of tens of KB per call make
// glibc trim its heap and page-fault it back in. Buffers that are alive at the
// same time in one thread need different slots (the calling thread also runs
// chunks of the parallel loops). Contents are unspecified: callers initialize.
enum Slot { kPartial, kSums, kRepeated, kRowBuf, kPattern, kAcc, kLanes, kGradBuf, kOutBuf };
template <typename A, Slot slot>
A* scratch(int64_t n) {
  thread_local std::vector<A> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// out[c] = sum over chunks k (in order) of partial[k * n + c]. Parallel over
// column blocks, the order of the sum per element is fixed.
template <typename A>
void sum_partials(const A* partial, int64_t chunks, int64_t n, A* out) {
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, chunks * kBlock >= 65536 ? 1 : blocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kBlock, c1 = std::min(n, c0 + kBlock);
      std::copy(partial + c0, partial + c1, out + c0);
      for (int64_t k = 1; k < chunks; ++k) axpy(A(1), partial + k * n + c0, out + c0, c1 - c0);
    }
  });
}

// BSN's dim-1 vectors enter the dim-0 rows periodically: a segment of length
// r (the trailing kernel size) repeats along a row. The kernels tile it over
// the smallest period that is a multiple of r and of the widest vector (16
// floats), so that every period starts vector-aligned.
int64_t pattern_period(int64_t r) { return r / std::gcd(r, int64_t{16}) * 16; }
// The pattern length the row primitives get for rows of len elements (len a
// multiple of r): the period, repeated to at least 128 elements so that their
// inner loops are long enough to run at full speed, and no longer than a row
// (it is filled once per row: on short rows the fill would cost more than the row).
int64_t pattern_tile(int64_t r, int64_t len) {
  const int64_t period = pattern_period(r);
  return std::min((128 + period - 1) / period * period, len);
}
// period * 2^j of about 1K elements: the block pass 2 accumulates over.
int64_t pattern_block(int64_t r) {
  const int64_t period = pattern_period(r);
  int64_t block = period;
  while (block * 2 <= 1024) block *= 2;
  return block;
}

// [x[0] (times r), x[1] (times r), ..., x[n - 1] (times r)], in scratch.
template <typename A>
const A* repeat_each(const A* x, int64_t n, int64_t r) {
  A* out = scratch<A, kRepeated>(n * r);
  for (int64_t j = 0; j < n; ++j) std::fill_n(out + j * r, r, x[j]);
  return out;
}

// pattern[k] = src[k % r] for k < n, n a multiple of r. Unrolled copies for the
// common 3x3 and 4x4 kernels (this runs once per row), doubling copies otherwise.
template <typename A>
void fill_pattern(const A* src, int64_t r, int64_t n, A* pattern) {
  auto tile = [&](auto fixed_r) {
    constexpr int R = decltype(fixed_r)::value;
    for (int64_t k = 0; k < n; k += R) {
      for (int j = 0; j < R; ++j) pattern[k + j] = src[j];
    }
  };
  if (r == 9) return tile(std::integral_constant<int, 9>{});
  if (r == 16) return tile(std::integral_constant<int, 16>{});
  std::copy(src, src + r, pattern);
  for (int64_t filled = r; filled < n; filled *= 2) {
    std::copy(pattern, pattern + std::min(filled, n - filled), pattern + filled);
  }
}

// ---------------------------------------------------------------------------
// SN along any dim: A[m, p * R + r] = W[(p * M + m) * R + r].
// s = A v, and if t != nullptr also t = A^T s, in one pass over W.
template <typename T, typename A>
void sn_pass(const T* w, const Matricization& mat, const A* v, A* s, A* t, bool reverse) {
  const int64_t M = mat.rows, R = mat.inner, P = mat.outer, N = mat.cols();
  const Chunks chunks = split_rows(M, N);
  // Zeroed by the chunk that owns it, in the parallel region.
  A* const partial = t ? scratch<A, kPartial>(chunks.count * N) : nullptr;
  const bool direct = P == 1 && std::is_same_v<T, A>;
  const bool skinny = direct && N <= kSkinnyCols;
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    A* const row_buf = direct ? nullptr : scratch<A, kRowBuf>(kGroup * N);
    // Row m as contiguous acc values: in place when possible, else converted or
    // gathered (P > 1: the row is P strided segments) into slot's scratch.
    auto load_row = [&](int64_t m, int slot) -> const A* {
      A* dst = row_buf ? row_buf + slot * N : nullptr;
      if (P == 1) return as_acc(w + m * R, N, dst);
      for (int64_t p = 0; p < P; ++p) {
        const T* src = w + (p * M + m) * R;
        for (int64_t r = 0; r < R; ++r) dst[p * R + r] = static_cast<A>(src[r]);
      }
      return dst;
    };
    A* const lanes = skinny ? scratch<A, kLanes>(16 * N) : nullptr;  // skinny rows: t's sums per row lane
    for (int64_t k = c0; k < c1; ++k) {
      const int64_t c = chunk_at(c0, c1, k, reverse);
      A* tc = t ? partial + c * N : nullptr;
      if (tc) std::fill_n(tc, N, A(0));
      const int64_t m1 = std::min(M, chunks.begin(c + 1));
      int64_t m = chunks.begin(c);
      if (skinny && m + 16 <= m1) {  // 16 rows at a time, then the lanes into tc
        const A* wa = reinterpret_cast<const A*>(w);
        std::fill_n(lanes, 16 * N, A(0));
        for (; m + 16 <= m1; m += 16) skinny_rows16(wa + m * N, N, v, s + m, tc ? lanes : nullptr);
        for (int64_t n = 0; tc && n < N; ++n) {
          for (int i = 0; i < 16; ++i) tc[n] += lanes[n * 16 + i];
        }
      }
      // Groups of kGroup rows: one pass over tc per group.
      for (; tc && m + kGroup <= m1; m += kGroup) {
        const A* rows[kGroup];
        A coef[kGroup];
        for (int g = 0; g < kGroup; ++g) {
          rows[g] = load_row(m + g, g);
          coef[g] = s[m + g] = dot(rows[g], v, N);
        }
        axpy4(coef, rows, tc, N);
      }
      for (; m < m1; ++m) {
        const A* row = load_row(m, 0);
        const A sm = dot(row, v, N);
        s[m] = sm;
        if (tc) axpy(sm, row, tc, N);
      }
    }
  });
  if (t) sum_partials(partial, chunks.count, N, t);
}

// SN of a transposed matrix: inner == 1, outer > 1, i.e. A = W2^T with W2 the
// row-major [P, M] view of W (2-D weights along dim 1; the legacy flavour's
// v-first iteration runs as this, see csrc/autograd.h). s = A v sums
// whole rows of W2 (s += v[p] * W2[p, :]), and t = A^T s needs all of s, so
// this takes two passes over W where sn_pass takes one.
template <typename T, typename A>
void sn_pass_transposed(const T* w, const Matricization& mat, const A* v, A* s, A* t,
                        bool reverse) {
  const int64_t M = mat.rows, P = mat.outer;
  const Chunks chunks = split_rows(P, M);
  A* const partial = scratch<A, kPartial>(chunks.count * M);  // zeroed by its chunk
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    A* const row_buf = std::is_same_v<T, A> ? nullptr : scratch<A, kRowBuf>(kGroup * M);
    for (int64_t k = c0; k < c1; ++k) {
      const int64_t c = chunk_at(c0, c1, k, reverse);
      A* const sc = partial + c * M;
      std::fill_n(sc, M, A(0));
      const int64_t p1 = std::min(P, chunks.begin(c + 1));
      int64_t p = chunks.begin(c);
      for (; p + kGroup <= p1; p += kGroup) {
        const A* rows[kGroup];
        A coef[kGroup];
        for (int g = 0; g < kGroup; ++g) {
          rows[g] = as_acc(w + (p + g) * M, M, row_buf ? row_buf + g * M : nullptr);
          coef[g] = v[p + g];
        }
        axpy4(coef, rows, sc, M);
      }
      for (; p < p1; ++p) axpy(v[p], as_acc(w + p * M, M, row_buf), sc, M);
    }
  });
  sum_partials(partial, chunks.count, M, s);
  if (!t) return;
  // t[p] = W2[p, :] . s, over the same chunks in the other direction.
  const bool skinny = std::is_same_v<T, A> && M <= kSkinnyCols;
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    A* const row_buf = std::is_same_v<T, A> ? nullptr : scratch<A, kRowBuf>(M);
    for (int64_t k = c0; k < c1; ++k) {
      const int64_t c = chunk_at(c0, c1, k, !reverse);
      const int64_t p1 = std::min(P, chunks.begin(c + 1));
      int64_t p = chunks.begin(c);
      if (skinny) {
        const A* wa = reinterpret_cast<const A*>(w);
        for (; p + 16 <= p1; p += 16) skinny_rows16(wa + p * M, M, s, t + p, nullptr);
      }
      for (; p < p1; ++p) t[p] = dot(as_acc(w + p * M, M, row_buf), s, M);
    }
  });
}

inline bool is_transposed_2d(const Matricization& mat) { return mat.inner == 1 && mat.outer > 1; }

// BSN pass 1 over the rows i of W viewed [c_out, c_in, R] (pair 0 = dim 0):
//   s0 = A0 v0, t0 = A0^T s0 (if t0), s1 = A1 v1 where A1 = W_mat(1).
// s1 is accumulated as q[k] += W[i, k] * v1[i * R + k % R] and segment-summed.
template <typename T, typename A>
void bsn_pass1(const T* w, const Matricization* mat, const A* v0, const A* v1, A* s0,
               A* t0, A* s1, bool reverse) {
  const int64_t rows = mat[0].rows, L = mat[0].inner, R = mat[1].inner, cin = mat[1].rows;
  const int64_t period = pattern_tile(R, L);
  const Chunks chunks = split_rows(rows, L);
  const int64_t nvec = t0 ? 2 : 1;  // per chunk: [q] or [q, t0]
  A* const partial = scratch<A, kPartial>(chunks.count * nvec * L);  // zeroed by its chunk
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    A* const row_buf = std::is_same_v<T, A> ? nullptr : scratch<A, kRowBuf>(kGroup * L);
    A* const pattern_buf = scratch<A, kPattern>(kGroup * period);
    for (int64_t k = c0; k < c1; ++k) {
      const int64_t c = chunk_at(c0, c1, k, reverse);
      A* qc = partial + c * nvec * L;
      std::fill_n(qc, nvec * L, A(0));
      A* tc = t0 ? qc + L : nullptr;
      const int64_t i1 = std::min(rows, chunks.begin(c + 1));
      int64_t i = chunks.begin(c);
      // Groups of kGroup rows: one pass over tc and qc per group.
      for (; tc && i + kGroup <= i1; i += kGroup) {
        const A* row[kGroup];
        const A* pattern[kGroup];
        A coef[kGroup];
        for (int g = 0; g < kGroup; ++g) {
          row[g] = as_acc(w + (i + g) * L, L, row_buf ? row_buf + g * L : nullptr);
          coef[g] = s0[i + g] = dot(row[g], v0, L);
          A* pat = pattern_buf + g * period;
          fill_pattern(v1 + (i + g) * R, R, period, pat);
          pattern[g] = pat;
        }
        axpy4_and_periodic_mul_acc4(coef, row, tc, pattern, period, qc, L);
      }
      for (; i < i1; ++i) {
        const A* row = as_acc(w + i * L, L, row_buf);
        const A si = dot(row, v0, L);
        s0[i] = si;
        A* pattern = pattern_buf;
        fill_pattern(v1 + i * R, R, period, pattern);
        if (tc) {
          axpy_and_periodic_mul_acc(si, row, tc, pattern, period, qc, L);
        } else {
          periodic_mul_acc(row, pattern, period, qc, L);
        }
      }
    }
  });
  // Reduce [q, t0] of every chunk in chunk order, then segment-sum q into s1.
  // partial is laid out chunk-major with nvec * L values per chunk.
  A* const sums = scratch<A, kSums>(nvec * L);
  sum_partials(partial, chunks.count, nvec * L, sums);
  if (t0) std::copy(sums + L, sums + 2 * L, t0);
  for (int64_t j = 0; j < cin; ++j) {
    A acc = 0;
    for (int64_t r = 0; r < R; ++r) acc += sums[j * R + r];
    s1[j] = acc;
  }
}

// out[r] = the sum of acc[j * R + r] over j < len / R (len a multiple of R),
// in a fixed order: halve while the number of terms is even (vectorized),
// then add the remaining ones in order.
template <typename A>
void fold_residues(A* acc, int64_t len, int64_t R, A* out) {
  while ((len / R) % 2 == 0) {
    len /= 2;
    axpy(A(1), acc + len, acc, len);
  }
  std::copy(acc, acc + R, out);
  for (int64_t j = R; j < len; j += R) {
    for (int64_t r = 0; r < R; ++r) out[r] += acc[j + r];
  }
}

// BSN pass 2: t1[i * R + r] = sum_j W[i, j, r] * s1[j]  (t1 = A1^T s1).
template <typename T, typename A>
void bsn_pass2(const T* w, const Matricization* mat, const A* s1, A* t1, bool reverse) {
  const int64_t rows = mat[0].rows, L = mat[0].inner, R = mat[1].inner;
  const int64_t block = std::min(pattern_block(R), L);
  const A* const s1_repeated = repeat_each(s1, L / R, R);
  const Chunks chunks = split_rows(rows, L);
  constexpr int64_t kBatch = 32;  // 3x3 kernels: rows whose partial sums are folded together
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    A* const row_buf = std::is_same_v<T, A> ? nullptr : scratch<A, kRowBuf>(L);
    A* const acc = R == 16 ? nullptr : scratch<A, kAcc>(R == 9 ? kBatch * 144 : block);
    for (int64_t k = c0; k < c1; ++k) {
      const int64_t c = chunk_at(c0, c1, k, reverse);
      const int64_t i1 = std::min(rows, chunks.begin(c + 1));
      if (R == 9) {
        for (int64_t b = chunks.begin(c); b < i1; b += kBatch) {
          const int64_t nb = std::min(kBatch, i1 - b);
          for (int64_t j = 0; j < nb; ++j) {
            const A* row = as_acc(w + (b + j) * L, L, row_buf);
            periodic_acc144(row, s1_repeated, L, acc + j * 144);
          }
          fold9_rows(acc, nb, std::min<int64_t>(L, 144), t1 + b * R);
        }
        continue;
      }
      for (int64_t i = chunks.begin(c); i < i1; ++i) {
        const A* row = as_acc(w + i * L, L, row_buf);
        if (R == 16) {  // 4x4 kernels: partial sums in registers
          periodic_dot16(row, s1_repeated, L, t1 + i * R);
          continue;
        }
        // acc[k] sums row[q] * s1[q / R] over q = k (mod block); then fold the
        // block down to its R residues mod R.
        std::fill_n(acc, block, A(0));
        for (int64_t k = 0; k < L; k += block) {
          mul_acc(row + k, s1_repeated + k, acc, std::min(block, L - k));
        }
        fold_residues(acc, block, R, t1 + i * R);
      }
    }
  });
}

// ---------------------------------------------------------------------------
// State of one (u, v) pair during the forward.
template <typename A>
struct Pair {
  std::vector<A> u, v, s, t;
  A norm_s = 0, norm_v_raw = 0, sigma = 0;
};

// From s = A v and t = A^T s: the new u, v and sigma (see docs/design.md).
template <typename A>
void normalize_pair(Pair<A>& pr, A eps) {
  const int64_t M = pr.s.size(), N = pr.t.size();
  pr.norm_s = std::sqrt(sum_sq(pr.s.data(), M));
  const A inv_s = A(1) / std::max(pr.norm_s, eps);
  for (int64_t m = 0; m < M; ++m) pr.u[m] = pr.s[m] * inv_s;
  scale_inplace(inv_s, pr.t.data(), N);  // t is now v_raw
  pr.norm_v_raw = std::sqrt(sum_sq(pr.t.data(), N));
  const A inv_v = A(1) / std::max(pr.norm_v_raw, eps);
  for (int64_t n = 0; n < N; ++n) pr.v[n] = pr.t[n] * inv_v;
  pr.sigma = dot(pr.t.data(), pr.v.data(), N);
}

// Write the pair's vectors to the buffers if the update is valid, and the
// values now in the buffers to the state snapshot.
template <typename T, typename A>
void commit_pair(const Pair<A>& pr, bool update, T* u_buf, T* v_buf, A* state_u, A* state_v) {
  const int64_t M = pr.u.size(), N = pr.v.size();
  const bool valid = update && std::isfinite(pr.norm_s) && pr.norm_s > 0 &&
                     std::isfinite(pr.norm_v_raw) && pr.norm_v_raw > 0;
  if (valid) {
    for (int64_t m = 0; m < M; ++m) u_buf[m] = static_cast<T>(pr.u[m]);
    for (int64_t n = 0; n < N; ++n) v_buf[n] = static_cast<T>(pr.v[n]);
  }
  for (int64_t m = 0; m < M; ++m) state_u[m] = static_cast<A>(u_buf[m]);
  for (int64_t n = 0; n < N; ++n) state_v[n] = static_cast<A>(v_buf[n]);
}

// The output factor a (docs/design.md, Variants), and whether it projects.
template <typename A>
A variant_factor(A sigma, double scale, double coeff, const void* gamma, bool* projects) {
  const bool proj = variant_projects(sigma, static_cast<A>(coeff));
  if (projects != nullptr) *projects = proj;
  const A a = proj ? static_cast<A>(projected_scale(scale, coeff)) / sigma : static_cast<A>(scale);
  return gamma == nullptr ? a : a * *static_cast<const A*>(gamma);
}

// out[b:e] = w[b:e] * factor.
template <typename T, typename A>
void rescale_range(const T* w, T* out, int64_t b, int64_t e, A factor) {
  if constexpr (std::is_same_v<T, A>) {
    scale_copy(factor, w + b, out + b, e - b);
  } else {
    for (int64_t i = b; i < e; ++i) out[i] = static_cast<T>(static_cast<A>(w[i]) * factor);
  }
}

// out = w * factor (elementwise, so the split does not matter).
template <typename T, typename A>
void rescale(const T* w, T* out, int64_t numel, A factor) {
  at::parallel_for(0, numel, 32768,
                   [&](int64_t b, int64_t e) { rescale_range(w, out, b, e, factor); });
}

// The same over contiguous rows of row_len elements, split like the passes
// over W before it (see chunk_at).
template <typename T, typename A>
void rescale_rows(const T* w, T* out, int64_t rows, int64_t row_len, A factor, bool reverse) {
  const Chunks chunks = split_rows(rows, row_len);
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    for (int64_t k = c0; k < c1; ++k) {
      const int64_t c = chunk_at(c0, c1, k, reverse);
      const int64_t r1 = std::min(rows, chunks.begin(c + 1));
      rescale_range(w, out, chunks.begin(c) * row_len, r1 * row_len, factor);
    }
  });
}

}  // namespace

template <typename T>
void forward(const ForwardParams& p) {
  using A = acc_t<T>;
  const T* w = static_cast<const T*>(p.weight);
  A* state = static_cast<A*>(p.state);
  const A eps = static_cast<A>(p.eps);

  Pair<A> pairs[2];
  for (int k = 0; k < p.num_pairs; ++k) {
    Pair<A>& pr = pairs[k];
    const int64_t M = p.mat[k].rows, N = p.mat[k].cols();
    pr.u.resize(M);
    pr.v.resize(N);
    pr.s.resize(M);
    pr.t.resize(N);
    const T* u_buf = static_cast<const T*>(p.u[k]);
    const T* v_buf = static_cast<const T*>(p.v[k]);
    for (int64_t m = 0; m < M; ++m) pr.u[m] = static_cast<A>(u_buf[m]);
    for (int64_t n = 0; n < N; ++n) pr.v[n] = static_cast<A>(v_buf[n]);
  }

  bool reverse = false;  // direction of the next pass over W (see chunk_at)
  if (p.update) {
    for (int it = 0; it < p.n_power_iterations; ++it) {
      if (p.num_pairs == 1 && is_transposed_2d(p.mat[0])) {
        sn_pass_transposed(w, p.mat[0], pairs[0].v.data(), pairs[0].s.data(),
                           pairs[0].t.data(), reverse);
        reverse = !reverse;  // its second pass ran the other way
      } else if (p.num_pairs == 1) {
        sn_pass(w, p.mat[0], pairs[0].v.data(), pairs[0].s.data(), pairs[0].t.data(),
                reverse);
      } else {
        bsn_pass1(w, p.mat, pairs[0].v.data(), pairs[1].v.data(), pairs[0].s.data(),
                  pairs[0].t.data(), pairs[1].s.data(), reverse);
        reverse = !reverse;
        bsn_pass2(w, p.mat, pairs[1].s.data(), pairs[1].t.data(), reverse);
      }
      reverse = !reverse;
      for (int k = 0; k < p.num_pairs; ++k) normalize_pair(pairs[k], eps);
    }
  } else {  // sigma = u^T A v with the stored vectors
    if (p.num_pairs == 1 && is_transposed_2d(p.mat[0])) {
      sn_pass_transposed<T, A>(w, p.mat[0], pairs[0].v.data(), pairs[0].s.data(), nullptr,
                               reverse);
    } else if (p.num_pairs == 1) {
      sn_pass<T, A>(w, p.mat[0], pairs[0].v.data(), pairs[0].s.data(), nullptr, reverse);
    } else {
      bsn_pass1<T, A>(w, p.mat, pairs[0].v.data(), pairs[1].v.data(), pairs[0].s.data(),
                      nullptr, pairs[1].s.data(), reverse);
    }
    reverse = !reverse;
    for (int k = 0; k < p.num_pairs; ++k) {
      pairs[k].sigma = dot(pairs[k].u.data(), pairs[k].s.data(), p.mat[k].rows);
    }
  }

  A sigma = pairs[0].sigma;
  if (p.num_pairs == 2) {
    sigma = (pairs[0].sigma + pairs[1].sigma) / A(2);
    state[1] = pairs[0].sigma;
    state[2] = pairs[1].sigma;
  }
  state[0] = sigma;
  for (int k = 0; k < p.num_pairs; ++k) {
    commit_pair(pairs[k], p.update, static_cast<T*>(p.u[k]), static_cast<T*>(p.v[k]),
                state + state_u_offset(p.mat, p.num_pairs, k),
                state + state_v_offset(p.mat, p.num_pairs, k));
  }
  if (p.track_only) return;  // no output pass: the caller returns the weight
  const A factor = variant_factor(sigma, p.scale, p.coeff, p.gamma, static_cast<bool*>(nullptr));
  if (p.mat[0].outer == 1) {  // the passes' rows are contiguous: follow their split
    rescale_rows(w, static_cast<T*>(p.out), p.mat[0].rows, p.mat[0].cols(), factor, reverse);
  } else if (p.num_pairs == 1 && is_transposed_2d(p.mat[0])) {  // rows of W2, as its passes
    rescale_rows(w, static_cast<T*>(p.out), p.mat[0].outer, p.mat[0].rows, factor, reverse);
  } else {
    rescale(w, static_cast<T*>(p.out), p.numel, factor);
  }
}

template <typename T>
void backward(const BackwardParams& p) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(p.grad_out);
  const T* w = static_cast<const T*>(p.weight);
  T* dw = static_cast<T*>(p.grad_weight);
  const A* state = static_cast<const A*>(p.state);
  const A sigma = state[0];
  bool proj = true;
  const A a = variant_factor(sigma, p.scale, p.coeff, p.gamma, &proj);

  if (!proj) {  // the zero rule, or a soft bound below coeff: a constant factor
    rescale(g, dw, p.numel, a);
    return;
  }

  // Both passes (c = <G, W>, then dW) over the same contiguous chunks of
  // segments, in opposite directions (see chunk_at): SN segments W[p, m, :]
  // (outer * rows of inner elements), BSN rows of W viewed [c_out, c_in * R].
  // SN with inner == 1 (a 2-D weight along dim 1): rows of W2 = [P, M] instead,
  // also for P == 1 (a [1, N] weight, e.g. the legacy flavour's final
  // Linear(N, 1)), whose segments would otherwise be single elements.
  const bool transposed = p.num_pairs == 1 && p.mat[0].inner == 1;
  const int64_t seg_len =
      transposed ? p.mat[0].rows : (p.num_pairs == 1 ? p.mat[0].inner : p.mat[0].cols());
  const int64_t segments = p.numel / seg_len;
  const Chunks chunks = split_rows(segments, seg_len);
  // The first pass starts where a training forward's output pass ended (the
  // same chunks: see chunk_at), so that a backward that follows it directly
  // finds them in cache: at the last chunk after two passes per power
  // iteration (BSN, SN on rows of W2: the output pass runs forward), at the
  // first after one (SN on segments, one iteration: it runs in reverse). The
  // partial sums are added in chunk order, whatever order computes them.
  const bool first_reverse = p.num_pairs == 2 || is_transposed_2d(p.mat[0]);

  // c = <G, W>: one partial per chunk (over blocks in order), added in chunk order.
  std::vector<A> partial(chunks.count);
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    constexpr int64_t kBlock = 4096;
    A* const gbuf = std::is_same_v<T, A> ? nullptr : scratch<A, kGradBuf>(kBlock);
    A* const wbuf = std::is_same_v<T, A> ? nullptr : scratch<A, kOutBuf>(kBlock);
    for (int64_t kk = c0; kk < c1; ++kk) {
      const int64_t ch = chunk_at(c0, c1, kk, first_reverse);
      const int64_t b = chunks.begin(ch) * seg_len;
      const int64_t e = std::min(segments, chunks.begin(ch + 1)) * seg_len;
      A sum = 0;
      for (int64_t i = b; i < e; i += kBlock) {
        const int64_t n = std::min(kBlock, e - i);
        sum += dot(as_acc(g + i, n, gbuf), as_acc(w + i, n, wbuf), n);
      }
      partial[ch] = sum;
    }
  });
  A c = 0;
  for (A x : partial) c += x;
  const A k = a * c / sigma;  // dW = a * G - k * dsigma/dW

  const int64_t mat0_u = state_u_offset(p.mat, p.num_pairs, 0);
  const A* u0 = state + mat0_u;
  const A* v0 = u0 + p.mat[0].rows;
  if (transposed) {
    // Row q of W2: dsigma/dW2[q, :] = v[q] * u, so dW2[q, :] = a G2[q, :] - k v[q] u.
    const int64_t M = seg_len;
    for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
      A* const gbuf = std::is_same_v<T, A> ? nullptr : scratch<A, kGradBuf>(M);
      A* const obuf = std::is_same_v<T, A> ? nullptr : scratch<A, kOutBuf>(M);
      for (int64_t kk = c0; kk < c1; ++kk) {
        const int64_t ch = chunk_at(c0, c1, kk, !first_reverse);
        const int64_t q0 = chunks.begin(ch), q1 = std::min(segments, chunks.begin(ch + 1));
        if constexpr (std::is_same_v<T, A>) {
          scaled_diff_rows(a, g + q0 * M, k, v0 + q0, u0, dw + q0 * M, q1 - q0, M);
        } else {
          for (int64_t q = q0; q < q1; ++q) {
            scaled_diff_rows(a, as_acc(g + q * M, M, gbuf), k, v0 + q, u0, obuf, int64_t{1}, M);
            for (int64_t m = 0; m < M; ++m) dw[q * M + m] = static_cast<T>(obuf[m]);
          }
        }
      }
    });
    return;
  }
  if (p.num_pairs == 1) {
    // Segments of R contiguous elements: W[p, m, :] has dsigma/dW = u[m] * v[p*R : p*R+R].
    const int64_t M = p.mat[0].rows, R = seg_len;
    for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
      A* const gbuf = std::is_same_v<T, A> ? nullptr : scratch<A, kGradBuf>(R);
      A* const obuf = std::is_same_v<T, A> ? nullptr : scratch<A, kOutBuf>(R);
      for (int64_t kk = c0; kk < c1; ++kk) {
        const int64_t ch = chunk_at(c0, c1, kk, !first_reverse);
        const int64_t s1 = std::min(segments, chunks.begin(ch + 1));
        // Runs of segments with the same p share v's segment: one call per run
        // (with dim 0 the whole chunk is one run).
        for (int64_t s = chunks.begin(ch); s < s1;) {
          const int64_t pp = s / M, m = s % M;
          const int64_t run = std::min(s1, (pp + 1) * M) - s;
          if constexpr (std::is_same_v<T, A>) {
            scaled_diff_rows(a, g + s * R, k, u0 + m, v0 + pp * R, dw + s * R, run, R);
          } else {  // through acc-type buffers, one segment at a time
            for (int64_t j = 0; j < run; ++j) {
              const int64_t sj = s + j;
              scaled_diff_rows(a, as_acc(g + sj * R, R, gbuf), k, u0 + m + j, v0 + pp * R, obuf,
                               int64_t{1}, R);
              for (int64_t r = 0; r < R; ++r) dw[sj * R + r] = static_cast<T>(obuf[r]);
            }
          }
          s += run;
        }
      }
    });
    return;
  }

  // BSN: dsigma/dW[i, j, r] = (u0[i] v0[j*R + r] + u1[j] v1[i*R + r]) / 2.
  const A* u1 = v0 + p.mat[0].cols();
  const A* v1 = u1 + p.mat[1].rows;
  const int64_t rows = segments, L = seg_len, R = p.mat[1].inner;
  const int64_t period = pattern_tile(R, L);
  const A half_k = k / A(2);
  const A* const u1_repeated = repeat_each(u1, L / R, R);
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    A* const gbuf = std::is_same_v<T, A> ? nullptr : scratch<A, kGradBuf>(L);
    A* const obuf = scratch<A, kOutBuf>(L);
    A* const pattern = scratch<A, kPattern>(period);
    for (int64_t kk = c0; kk < c1; ++kk) {
      const int64_t ch = chunk_at(c0, c1, kk, !first_reverse);
      const int64_t i1 = std::min(rows, chunks.begin(ch + 1));
      for (int64_t i = chunks.begin(ch); i < i1; ++i) {
        const A* grow = as_acc(g + i * L, L, gbuf);
        A* out = std::is_same_v<T, A> ? reinterpret_cast<A*>(dw + i * L) : obuf;
        fill_pattern(v1 + i * R, R, period, pattern);
        scaled_diff2(a, grow, half_k * u0[i], v0, half_k, u1_repeated, pattern,
                     period, out, L);
        if constexpr (!std::is_same_v<T, A>) {
          for (int64_t q = 0; q < L; ++q) dw[i * L + q] = static_cast<T>(out[q]);
        }
      }
    }
  });
}

#define BSN_INSTANTIATE(T)                             \
  template void forward<T>(const ForwardParams&);      \
  template void backward<T>(const BackwardParams&);
BSN_INSTANTIATE(float)
BSN_INSTANTIATE(double)
BSN_INSTANTIATE(c10::Half)
BSN_INSTANTIATE(c10::BFloat16)
#undef BSN_INSTANTIATE

}  // namespace cpu
}  // namespace bsn
