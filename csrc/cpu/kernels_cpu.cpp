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

// A pointer to n values of src as acc type: src itself when it already is,
// else a conversion into scratch.
template <typename T, typename A>
const A* as_acc(const T* src, int64_t n, A* scratch) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<A>(src[i]);
    return scratch;
  }
}

// out[c] = sum over chunks k (in order) of partial[k * n + c]. Parallel over
// column blocks, the order of the sum per element is fixed.
template <typename A>
void sum_partials(const std::vector<A>& partial, int64_t chunks, int64_t n, A* out) {
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, chunks * kBlock >= 65536 ? 1 : blocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kBlock, c1 = std::min(n, c0 + kBlock);
      std::copy(partial.begin() + c0, partial.begin() + c1, out + c0);
      for (int64_t k = 1; k < chunks; ++k) axpy(A(1), partial.data() + k * n + c0, out + c0, c1 - c0);
    }
  });
}

// Length of the blocks a row of BSN's dim-0 matricization is cut into, so that
// a pattern of period r (a dim-1 vector segment) lines up with every block: a
// multiple of r and of the widest vector (16 floats), about 1K elements so each
// primitive call does real work.
int64_t pattern_period(int64_t r) { return r / std::gcd(r, int64_t{16}) * 16; }
// period * 2^j, so that a block folds onto one period by halving.
int64_t pattern_block(int64_t r) {
  const int64_t period = pattern_period(r);
  int64_t block = period;
  while (block * 2 <= 1024) block *= 2;
  return block;
}

// pattern[k] = src[k % r] for k < n: one copy of src, then doubling copies.
template <typename A>
void fill_pattern(const A* src, int64_t r, int64_t n, A* pattern) {
  std::copy(src, src + std::min(r, n), pattern);
  for (int64_t filled = r; filled < n; filled *= 2) {
    std::copy(pattern, pattern + std::min(filled, n - filled), pattern + filled);
  }
}

// ---------------------------------------------------------------------------
// SN along any dim: A[m, p * R + r] = W[(p * M + m) * R + r].
// s = A v, and if t != nullptr also t = A^T s, in one pass over W.
template <typename T, typename A>
void sn_pass(const T* w, const Matricization& mat, const A* v, A* s, A* t) {
  const int64_t M = mat.rows, R = mat.inner, P = mat.outer, N = mat.cols();
  const Chunks chunks = split_rows(M, N);
  std::vector<A> partial(t ? chunks.count * N : 0, A(0));
  const bool direct = P == 1 && std::is_same_v<T, A>;
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    std::vector<A> row_buf(direct ? 0 : kGroup * N);
    // Row m as contiguous acc values: in place when possible, else converted or
    // gathered (P > 1: the row is P strided segments) into slot's scratch.
    auto load_row = [&](int64_t m, int slot) -> const A* {
      A* dst = row_buf.data() + slot * N;
      if (P == 1) return as_acc(w + m * R, N, dst);
      for (int64_t p = 0; p < P; ++p) {
        const T* src = w + (p * M + m) * R;
        for (int64_t r = 0; r < R; ++r) dst[p * R + r] = static_cast<A>(src[r]);
      }
      return dst;
    };
    for (int64_t c = c0; c < c1; ++c) {
      A* tc = t ? partial.data() + c * N : nullptr;
      const int64_t m1 = std::min(M, chunks.begin(c + 1));
      int64_t m = chunks.begin(c);
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

// BSN pass 1 over the rows i of W viewed [c_out, c_in, R] (pair 0 = dim 0):
//   s0 = A0 v0, t0 = A0^T s0 (if t0), s1 = A1 v1 where A1 = W_mat(1).
// s1 is accumulated as q[k] += W[i, k] * v1[i * R + k % R] and segment-summed.
template <typename T, typename A>
void bsn_pass1(const T* w, const Matricization* mat, const A* v0, const A* v1, A* s0,
               A* t0, A* s1) {
  const int64_t rows = mat[0].rows, L = mat[0].inner, R = mat[1].inner, cin = mat[1].rows;
  const int64_t block = std::min(pattern_block(R), L);
  const Chunks chunks = split_rows(rows, L);
  const int64_t nvec = t0 ? 2 : 1;  // per chunk: [q] or [q, t0]
  std::vector<A> partial(chunks.count * nvec * L, A(0));
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    std::vector<A> row_buf(std::is_same_v<T, A> ? 0 : kGroup * L);
    std::vector<A> pattern_buf(kGroup * block);
    for (int64_t c = c0; c < c1; ++c) {
      A* qc = partial.data() + c * nvec * L;
      A* tc = t0 ? qc + L : nullptr;
      const int64_t i1 = std::min(rows, chunks.begin(c + 1));
      int64_t i = chunks.begin(c);
      // Groups of kGroup rows: one pass over tc and qc per group.
      for (; tc && i + kGroup <= i1; i += kGroup) {
        const A* row[kGroup];
        const A* pattern[kGroup];
        A coef[kGroup];
        for (int g = 0; g < kGroup; ++g) {
          row[g] = as_acc(w + (i + g) * L, L, row_buf.data() + g * L);
          coef[g] = s0[i + g] = dot(row[g], v0, L);
          A* pat = pattern_buf.data() + g * block;
          fill_pattern(v1 + (i + g) * R, R, block, pat);
          pattern[g] = pat;
        }
        for (int64_t k = 0; k < L; k += block) {
          const A* row_k[kGroup] = {row[0] + k, row[1] + k, row[2] + k, row[3] + k};
          axpy4_and_mul_acc4(coef, row_k, tc + k, pattern, qc + k, std::min(block, L - k));
        }
      }
      for (; i < i1; ++i) {
        const A* row = as_acc(w + i * L, L, row_buf.data());
        const A si = dot(row, v0, L);
        s0[i] = si;
        A* pattern = pattern_buf.data();
        fill_pattern(v1 + i * R, R, block, pattern);
        for (int64_t k = 0; k < L; k += block) {
          const int64_t n = std::min(block, L - k);
          if (tc) {
            axpy_and_mul_acc(si, row + k, tc + k, pattern, qc + k, n);
          } else {
            mul_acc(row + k, pattern, qc + k, n);
          }
        }
      }
    }
  });
  // Reduce [q, t0] of every chunk in chunk order, then segment-sum q into s1.
  std::vector<A> sums(nvec * L);
  {
    // partial is laid out chunk-major with nvec * L values per chunk.
    sum_partials(partial, chunks.count, nvec * L, sums.data());
  }
  if (t0) std::copy(sums.begin() + L, sums.end(), t0);
  for (int64_t j = 0; j < cin; ++j) {
    A acc = 0;
    for (int64_t r = 0; r < R; ++r) acc += sums[j * R + r];
    s1[j] = acc;
  }
}

// BSN pass 2: t1[i * R + r] = sum_j W[i, j, r] * s1[j]  (t1 = A1^T s1).
template <typename T, typename A>
void bsn_pass2(const T* w, const Matricization* mat, const A* s1, A* t1) {
  const int64_t rows = mat[0].rows, L = mat[0].inner, R = mat[1].inner;
  const int64_t period = pattern_period(R), full_block = pattern_block(R);
  const int64_t block = std::min(full_block, L);
  std::vector<A> s1_repeated(L);  // s1[k / R]
  for (int64_t k = 0; k < L; ++k) s1_repeated[k] = s1[k / R];
  const Chunks chunks = split_rows(rows, L);
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    std::vector<A> row_buf(std::is_same_v<T, A> ? 0 : L);
    std::vector<A> acc(std::max<int64_t>(block, 144));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i1 = std::min(rows, chunks.begin(c + 1));
      for (int64_t i = chunks.begin(c); i < i1; ++i) {
        const A* row = as_acc(w + i * L, L, row_buf.data());
        if (R == 16 || R == 9) {  // 4x4 and 3x3 kernels: partial sums in registers
          if (R == 16) {
            periodic_dot16(row, s1_repeated.data(), L, acc.data());
          } else {
            periodic_dot144(row, s1_repeated.data(), L, acc.data());
          }
          const int64_t len = R == 16 ? 16 : 144;
          for (int64_t r = 0; r < R; ++r) {
            A sum = 0;
            for (int64_t k = r; k < len; k += R) sum += acc[k];
            t1[i * R + r] = sum;
          }
          continue;
        }
        // acc[k] sums row[q] * s1[q / R] over q = k (mod block); then fold the
        // block down to its R residues mod R.
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t k = 0; k < L; k += block) {
          mul_acc(row + k, s1_repeated.data() + k, acc.data(), std::min(block, L - k));
        }
        int64_t len = block;
        if (block == full_block) {  // period * 2^j: fold by halving, vectorized
          while (len > period) {
            len /= 2;
            axpy(A(1), acc.data() + len, acc.data(), len);
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          A sum = 0;
          for (int64_t k = r; k < len; k += R) sum += acc[k];
          t1[i * R + r] = sum;
        }
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

template <typename A>
A effective_sigma(A sigma) {
  return sigma == A(0) ? A(1) : sigma;
}

// out = w * factor (elementwise, so the split does not matter).
template <typename T, typename A>
void rescale(const T* w, T* out, int64_t numel, A factor) {
  at::parallel_for(0, numel, 32768, [&](int64_t b, int64_t e) {
    if constexpr (std::is_same_v<T, A>) {
      scale_copy(factor, w + b, out + b, e - b);
    } else {
      for (int64_t i = b; i < e; ++i) out[i] = static_cast<T>(static_cast<A>(w[i]) * factor);
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

  if (p.update) {
    for (int it = 0; it < p.n_power_iterations; ++it) {
      if (p.num_pairs == 1) {
        sn_pass(w, p.mat[0], pairs[0].v.data(), pairs[0].s.data(), pairs[0].t.data());
      } else {
        bsn_pass1(w, p.mat, pairs[0].v.data(), pairs[1].v.data(), pairs[0].s.data(),
                  pairs[0].t.data(), pairs[1].s.data());
        bsn_pass2(w, p.mat, pairs[1].s.data(), pairs[1].t.data());
      }
      for (int k = 0; k < p.num_pairs; ++k) normalize_pair(pairs[k], eps);
    }
  } else {  // sigma = u^T A v with the stored vectors
    if (p.num_pairs == 1) {
      sn_pass<T, A>(w, p.mat[0], pairs[0].v.data(), pairs[0].s.data(), nullptr);
    } else {
      bsn_pass1<T, A>(w, p.mat, pairs[0].v.data(), pairs[1].v.data(), pairs[0].s.data(),
                      nullptr, pairs[1].s.data());
    }
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
  rescale(w, static_cast<T*>(p.out), p.numel, static_cast<A>(p.scale) / effective_sigma(sigma));
}

template <typename T>
void backward(const BackwardParams& p) {
  using A = acc_t<T>;
  const T* g = static_cast<const T*>(p.grad_out);
  const T* w = static_cast<const T*>(p.weight);
  T* dw = static_cast<T*>(p.grad_weight);
  const A* state = static_cast<const A*>(p.state);
  const A sigma = state[0];
  const A a = static_cast<A>(p.scale) / effective_sigma(sigma);

  if (sigma == A(0)) {  // the zero rule: sigma is the constant 1
    rescale(g, dw, p.numel, a);
    return;
  }

  // c = <G, W>, from fixed chunks added in order.
  constexpr int64_t kChunk = 32768;
  const int64_t nchunks = (p.numel + kChunk - 1) / kChunk;
  std::vector<A> partial(nchunks);
  for_chunks(nchunks, [&](int64_t c0, int64_t c1) {
    std::vector<A> gbuf(std::is_same_v<T, A> ? 0 : kChunk), wbuf(gbuf.size());
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kChunk, n = std::min(kChunk, p.numel - b);
      partial[c] = dot(as_acc(g + b, n, gbuf.data()), as_acc(w + b, n, wbuf.data()), n);
    }
  });
  A c = 0;
  for (A x : partial) c += x;
  const A k = a * c / sigma;  // dW = a * G - k * dsigma/dW

  const int64_t mat0_u = state_u_offset(p.mat, p.num_pairs, 0);
  const A* u0 = state + mat0_u;
  const A* v0 = u0 + p.mat[0].rows;
  if (p.num_pairs == 1) {
    // Segments of R contiguous elements: W[p, m, :] has dsigma/dW = u[m] * v[p*R : p*R+R].
    const int64_t M = p.mat[0].rows, R = p.mat[0].inner, segments = p.mat[0].outer * M;
    const Chunks chunks = split_rows(segments, R);
    for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
      std::vector<A> gbuf(std::is_same_v<T, A> ? 0 : R), obuf(R);
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t s1 = std::min(segments, chunks.begin(ch + 1));
        for (int64_t s = chunks.begin(ch); s < s1; ++s) {
          const int64_t pp = s / M, m = s % M;
          A* out = std::is_same_v<T, A> ? reinterpret_cast<A*>(dw + s * R) : obuf.data();
          scaled_diff(a, as_acc(g + s * R, R, gbuf.data()), k * u0[m], v0 + pp * R, out, R);
          if constexpr (!std::is_same_v<T, A>) {
            for (int64_t r = 0; r < R; ++r) dw[s * R + r] = static_cast<T>(out[r]);
          }
        }
      }
    });
    return;
  }

  // BSN: dsigma/dW[i, j, r] = (u0[i] v0[j*R + r] + u1[j] v1[i*R + r]) / 2.
  const A* u1 = v0 + p.mat[0].cols();
  const A* v1 = u1 + p.mat[1].rows;
  const int64_t rows = p.mat[0].rows, L = p.mat[0].inner, R = p.mat[1].inner;
  const int64_t block = std::min(pattern_block(R), L);
  const A half_k = k / A(2);
  std::vector<A> u1_repeated(L);  // u1[k / R]
  for (int64_t q = 0; q < L; ++q) u1_repeated[q] = u1[q / R];
  const Chunks chunks = split_rows(rows, L);
  for_chunks(chunks.count, [&](int64_t c0, int64_t c1) {
    std::vector<A> gbuf(std::is_same_v<T, A> ? 0 : L), obuf(L), pattern(block);
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t i1 = std::min(rows, chunks.begin(ch + 1));
      for (int64_t i = chunks.begin(ch); i < i1; ++i) {
        const A* grow = as_acc(g + i * L, L, gbuf.data());
        A* out = std::is_same_v<T, A> ? reinterpret_cast<A*>(dw + i * L) : obuf.data();
        fill_pattern(v1 + i * R, R, block, pattern.data());
        for (int64_t q = 0; q < L; q += block) {
          scaled_diff2(a, grow + q, half_k * u0[i], v0 + q, half_k, u1_repeated.data() + q,
                       pattern.data(), out + q, std::min(block, L - q));
        }
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
