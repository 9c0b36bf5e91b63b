// See vec.h. No torch headers here: this file is plain C++.
#include "vec.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define BSN_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BSN_MULTIVERSION
#endif

// The bodies must be inlined into each clone to be compiled for its ISA.
#define BSN_ALWAYS_INLINE inline __attribute__((always_inline))

namespace bsn {
namespace cpu {
namespace {

// Independent accumulator lanes: 8 AVX2 or 4 AVX-512 registers, enough to hide
// the FMA latency when the data comes from L1/L2. Lane k sums elements k,
// k + kLanes, ...
template <typename A>
constexpr int kLanes = 256 / sizeof(A);
// A reduction's tail (fewer than kLanes elements) in steps of one AVX2 vector.
template <typename A>
constexpr int kTail = 32 / sizeof(A);

template <typename A>
BSN_ALWAYS_INLINE A combine_lanes(A* acc) {
  for (int width = kLanes<A> / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) acc[k] += acc[k + width];
  }
  return acc[0];
}

template <typename A>
BSN_ALWAYS_INLINE A dot_body(const A* __restrict x, const A* __restrict y, int64_t n) {
  constexpr int L = kLanes<A>;
  A acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
#pragma omp simd
    for (int k = 0; k < L; ++k) acc[k] += x[i + k] * y[i + k];
  }
  // The tail goes to the same lanes (element i to lane i mod L), a vector at a time.
  int k = 0;
  for (; i + kTail<A> <= n; i += kTail<A>, k += kTail<A>) {
#pragma omp simd
    for (int j = 0; j < kTail<A>; ++j) acc[k + j] += x[i + j] * y[i + j];
  }
  for (; i < n; ++i, ++k) acc[k] += x[i] * y[i];
  return combine_lanes(acc);
}

// sum_k x[k]^2: dot_body's lanes and order (restrict only constrains writes,
// so x may be passed twice).
template <typename A>
BSN_ALWAYS_INLINE A sum_sq_body(const A* x, int64_t n) {
  return dot_body(x, x, n);
}

// acc[k] = sum_{q = k mod P, q < n} x[q] * y[q] for k < min(n, P), with the P
// partial sums in registers (no zero fill: the first period assigns).
template <int P, typename A>
BSN_ALWAYS_INLINE void periodic_acc_body(const A* __restrict x, const A* __restrict y, int64_t n,
                              A* __restrict acc_out) {
  if (n < P) {
    for (int64_t k = 0; k < n; ++k) acc_out[k] = x[k] * y[k];
    return;
  }
  A acc[P];
#pragma omp simd
  for (int k = 0; k < P; ++k) acc[k] = x[k] * y[k];
  int64_t i = P;
  for (; i + P <= n; i += P) {
#pragma omp simd
    for (int k = 0; k < P; ++k) acc[k] += x[i + k] * y[i + k];
  }
  for (int k = 0; i < n; ++i, ++k) acc[k] += x[i] * y[i];
#pragma omp simd
  for (int k = 0; k < P; ++k) acc_out[k] = acc[k];
}

// out[i * R + r] = sum_{j < len / R} acc[i * stride + j * R + r]: rows of
// periodic partial sums folded to their R residues, j in order.
template <int R, typename A>
BSN_ALWAYS_INLINE void fold_rows_body(const A* __restrict acc, int64_t rows, int64_t stride,
                                      int64_t len, A* __restrict out) {
  for (int64_t i = 0; i < rows; ++i) {
    const A* a = acc + i * stride;
    A o[R];
    for (int r = 0; r < R; ++r) o[r] = a[r];
    for (int64_t j = R; j < len; j += R) {
#pragma omp simd
      for (int r = 0; r < R; ++r) o[r] += a[j + r];
    }
    for (int r = 0; r < R; ++r) out[i * R + r] = o[r];
  }
}

}  // namespace

#define BSN_DEFINE_VEC_PRIMITIVES(A)                                                    \
  BSN_MULTIVERSION A dot(const A* x, const A* y, int64_t n) { return dot_body(x, y, n); } \
  BSN_MULTIVERSION A sum_sq(const A* x, int64_t n) { return sum_sq_body(x, n); }        \
  BSN_MULTIVERSION void axpy(A a, const A* __restrict x, A* __restrict y, int64_t n) {  \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];               \
  }                                                                                     \
  BSN_MULTIVERSION void axpy_and_periodic_mul_acc(A a, const A* __restrict x,          \
                                                  A* __restrict t, const A* __restrict p, \
                                                  int64_t period, A* __restrict q,      \
                                                  int64_t n) {                          \
    for (int64_t k = 0; k < n; k += period) {                                           \
      const int64_t m = n - k < period ? n - k : period;                                \
      const A *__restrict xk = x + k;                                                   \
      A *__restrict tk = t + k, *__restrict qk = q + k;                                 \
      _Pragma("omp simd") for (int64_t i = 0; i < m; ++i) {                             \
        tk[i] += a * xk[i];                                                             \
        qk[i] += xk[i] * p[i];                                                          \
      }                                                                                 \
    }                                                                                   \
  }                                                                                     \
  BSN_MULTIVERSION void periodic_mul_acc(const A* __restrict x, const A* __restrict p,  \
                                         int64_t period, A* __restrict q, int64_t n) {  \
    for (int64_t k = 0; k < n; k += period) {                                           \
      const int64_t m = n - k < period ? n - k : period;                                \
      const A *__restrict xk = x + k;                                                   \
      A *__restrict qk = q + k;                                                         \
      _Pragma("omp simd") for (int64_t i = 0; i < m; ++i) qk[i] += xk[i] * p[i];        \
    }                                                                                   \
  }                                                                                     \
  BSN_MULTIVERSION void mul_acc(const A* __restrict x, const A* __restrict y,           \
                                A* __restrict acc, int64_t n) {                         \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) acc[i] += x[i] * y[i];          \
  }                                                                                     \
  BSN_MULTIVERSION void scaled_diff2(A a, const A* __restrict g, A b,                   \
                                     const A* __restrict v, A c, const A* __restrict w, \
                                     const A* __restrict p, int64_t period,             \
                                     A* __restrict out, int64_t n) {                    \
    for (int64_t k = 0; k < n; k += period) {                                           \
      const int64_t m = n - k < period ? n - k : period;                                \
      const A *__restrict gk = g + k, *__restrict vk = v + k, *__restrict wk = w + k;   \
      A* __restrict ok = out + k;                                                       \
      _Pragma("omp simd") for (int64_t i = 0; i < m; ++i) {                             \
        ok[i] = a * gk[i] - b * vk[i] - c * wk[i] * p[i];                               \
      }                                                                                 \
    }                                                                                   \
  }                                                                                     \
  BSN_MULTIVERSION void scale_inplace(A a, A* __restrict x, int64_t n) {                \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) x[i] *= a;                      \
  }                                                                                     \
  BSN_MULTIVERSION void scale_copy(A a, const A* __restrict x, A* __restrict out,       \
                                   int64_t n) {                                         \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) out[i] = a * x[i];              \
  }                                                                                     \
  BSN_MULTIVERSION void axpy4(const A* a, const A* const* x, A* __restrict y, int64_t n) { \
    const A a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];                                 \
    const A *__restrict x0 = x[0], *__restrict x1 = x[1], *__restrict x2 = x[2],        \
            *__restrict x3 = x[3];                                                      \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) {                               \
      y[i] += a0 * x0[i] + a1 * x1[i] + a2 * x2[i] + a3 * x3[i];                        \
    }                                                                                   \
  }                                                                                     \
  BSN_MULTIVERSION void axpy4_and_periodic_mul_acc4(const A* a, const A* const* x,     \
                                                    A* __restrict t, const A* const* p, \
                                                    int64_t period, A* __restrict q,    \
                                                    int64_t n) {                        \
    const A a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];                                 \
    const A *__restrict p0 = p[0], *__restrict p1 = p[1], *__restrict p2 = p[2],        \
            *__restrict p3 = p[3];                                                      \
    for (int64_t k = 0; k < n; k += period) {                                           \
      const int64_t m = n - k < period ? n - k : period;                                \
      const A *__restrict x0 = x[0] + k, *__restrict x1 = x[1] + k,                     \
              *__restrict x2 = x[2] + k, *__restrict x3 = x[3] + k;                     \
      A *__restrict tk = t + k, *__restrict qk = q + k;                                 \
      _Pragma("omp simd") for (int64_t i = 0; i < m; ++i) {                             \
        tk[i] += a0 * x0[i] + a1 * x1[i] + a2 * x2[i] + a3 * x3[i];                     \
        qk[i] += x0[i] * p0[i] + x1[i] * p1[i] + x2[i] * p2[i] + x3[i] * p3[i];         \
      }                                                                                 \
    }                                                                                   \
  }                                                                                     \
  BSN_MULTIVERSION void skinny_rows16(const A* __restrict w, int64_t n,                 \
                                      const A* __restrict v, A* __restrict s,           \
                                      A* __restrict tacc) {                             \
    A sv[16] = {};                                                                      \
    for (int64_t c = 0; c < n; ++c) {                                                   \
      const A vc = v[c];                                                                \
      _Pragma("omp simd") for (int i = 0; i < 16; ++i) sv[i] += w[i * n + c] * vc;      \
    }                                                                                   \
    for (int i = 0; i < 16; ++i) s[i] = sv[i];                                          \
    if (!tacc) return;                                                                  \
    for (int64_t c = 0; c < n; ++c) {                                                   \
      A* __restrict tc = tacc + c * 16;                                                 \
      _Pragma("omp simd") for (int i = 0; i < 16; ++i) tc[i] += w[i * n + c] * sv[i];   \
    }                                                                                   \
  }                                                                                     \
  BSN_MULTIVERSION void scaled_diff_rows(A a, const A* __restrict g, A b,               \
                                         const A* __restrict u, const A* __restrict v,  \
                                         A* __restrict out, int64_t rows, int64_t n) {  \
    for (int64_t i = 0; i < rows; ++i) {                                                \
      const A bu = b * u[i];                                                            \
      const A* __restrict gi = g + i * n;                                               \
      A* __restrict oi = out + i * n;                                                   \
      _Pragma("omp simd") for (int64_t c = 0; c < n; ++c) oi[c] = a * gi[c] - bu * v[c]; \
    }                                                                                   \
  }                                                                                     \
  BSN_MULTIVERSION void periodic_dot16(const A* x, const A* y, int64_t n, A* out) {     \
    A acc[64]; /* four periods: four independent FMA chains */                          \
    periodic_acc_body<64>(x, y, n, acc);                                                \
    fold_rows_body<16>(acc, 1, 64, n < 64 ? n : 64, out);                               \
  }                                                                                     \
  BSN_MULTIVERSION void periodic_acc144(const A* x, const A* y, int64_t n, A* acc) {    \
    periodic_acc_body<144>(x, y, n, acc);                                               \
  }                                                                                     \
  BSN_MULTIVERSION void fold9_rows(const A* acc, int64_t rows, int64_t len, A* out) {   \
    fold_rows_body<9>(acc, rows, 144, len, out);                                        \
  }

BSN_DEFINE_VEC_PRIMITIVES(float)
BSN_DEFINE_VEC_PRIMITIVES(double)

#undef BSN_DEFINE_VEC_PRIMITIVES

}  // namespace cpu
}  // namespace bsn
