// Vector primitives of the CPU kernels, on float or double rows.
//
// Each is compiled for x86-64-v4 (AVX-512), v3 (AVX2+FMA) and the baseline and
// picked at load time (GCC target_clones), so one wheel runs fast everywhere.
// Reductions keep a fixed number of lanes and a fixed combine order, so a
// result depends on the data only (not on threads or on where a row sits).
#pragma once

#include <cstdint>

namespace bsn {
namespace cpu {

#define BSN_DECLARE_VEC_PRIMITIVES(A)                                                   \
  /* sum_k x[k] * y[k] */                                                               \
  A dot(const A* x, const A* y, int64_t n);                                             \
  /* sum_k x[k]^2 */                                                                    \
  A sum_sq(const A* x, int64_t n);                                                      \
  /* y += a * x */                                                                      \
  void axpy(A a, const A* x, A* y, int64_t n);                                          \
  /* t += a * x;  q[k] += x[k] * p[k % period]   (BSN pass 1: dim-0 update and */      \
  /* dim-1 products; the period is a multiple of 16, p holds one period) */             \
  void axpy_and_periodic_mul_acc(A a, const A* x, A* t, const A* p, int64_t period,     \
                                 A* q, int64_t n);                                      \
  /* q[k] += x[k] * p[k % period] */                                                    \
  void periodic_mul_acc(const A* x, const A* p, int64_t period, A* q, int64_t n);       \
  /* acc += x * y */                                                                    \
  void mul_acc(const A* x, const A* y, A* acc, int64_t n);                              \
  /* out[k] = a * g[k] - b * v[k] - c * w[k] * p[k % period]   (BSN gradient row) */   \
  void scaled_diff2(A a, const A* g, A b, const A* v, A c, const A* w, const A* p,      \
                    int64_t period, A* out, int64_t n);                                 \
  /* x *= a */                                                                          \
  void scale_inplace(A a, A* x, int64_t n);                                             \
  /* out = a * x */                                                                     \
  void scale_copy(A a, const A* x, A* out, int64_t n);                                  \
  /* y += a[0] x[0] + ... + a[3] x[3]   (four rows at once: one pass over y) */         \
  void axpy4(const A* a, const A* const* x, A* y, int64_t n);                           \
  /* t += sum_r a[r] x[r];  q[k] += sum_r x[r][k] * p[r][k % period]  (four rows of */ \
  /* BSN pass 1) */                                                                     \
  void axpy4_and_periodic_mul_acc4(const A* a, const A* const* x, A* t,                 \
                                   const A* const* p, int64_t period, A* q, int64_t n); \
  /* Short rows (SN of tall, narrow weights, e.g. [24576, 20]): for 16 rows of n */      \
  /* elements starting at w, s[i] = w[i, :] . v and, if tacc, */                        \
  /* tacc[c * 16 + i] += w[i, c] * s[i] (lanes summed by the caller). Vectorized */     \
  /* across the rows, so the cost per row is a few instructions, not a call. */         \
  void skinny_rows16(const A* w, int64_t n, const A* v, A* s, A* tacc);                 \
  /* out[i, :] = a * g[i, :] - b * u[i] * v for rows i < rows of n elements */          \
  void scaled_diff_rows(A a, const A* g, A b, const A* u, const A* v, A* out,           \
                        int64_t rows, int64_t n);                                       \
  /* out[r] = sum_{k = r mod 16} x[k] * y[k] for r < 16 (4x4 kernels), partial */        \
  /* sums in registers; n a multiple of 16 */                                           \
  void periodic_dot16(const A* x, const A* y, int64_t n, A* out);                       \
  /* The same for 3x3 kernels in two steps: acc[k] = sum_{q = k mod 144} x[q] * y[q] */  \
  /* (the first min(n, 144) entries), then out[i * 9 + r] = the sum of row i's */       \
  /* acc[j * 9 + r] over j < len / 9, for rows of acc 144 apart. Folding a batch */     \
  /* of rows after their sums are stored avoids a serial fold per row. */               \
  void periodic_acc144(const A* x, const A* y, int64_t n, A* acc);                      \
  void fold9_rows(const A* acc, int64_t rows, int64_t len, A* out);

BSN_DECLARE_VEC_PRIMITIVES(float)
BSN_DECLARE_VEC_PRIMITIVES(double)

#undef BSN_DECLARE_VEC_PRIMITIVES

}  // namespace cpu
}  // namespace bsn
