// Device helpers shared by the forward and backward kernels: conversions,
// explicitly rounded arithmetic, deterministic reductions, thread groups and
// the barriers between phases. Included by forward.cuh and backward.cu only.
#pragma once

#include <cstdint>

#include <cooperative_groups.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/args.h"

namespace bsn {
namespace cuda {

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

// Explicitly rounded arithmetic. Every product that meets a sum in the kernels
// goes through these, so ptxas has no mul+add left to contract: the Single,
// Coop and Multi kernels (different kernels that inline the same phases) give
// the same bits by construction, not by the compiler's per-kernel choice.
// fma_rn(a, b, c) = a * b + c rounded once; mul_rn / add_rn / sub_rn round
// once each and are never fused.
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// 16 bytes of weight elements, for 128-bit loads of W's rows.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
  T v[kN];
};

// max(x, eps) that propagates NaN like torch's clamp_min.
template <typename T>
__device__ __forceinline__ T clamp_eps(T x, T eps) {
  return x < eps ? eps : x;
}

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

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

// Barrier between phases. kMinBlocks: the fused forward kernel's
// __launch_bounds__ minimum of resident blocks per SM, which sets ptxas's
// register cap (65536 / (kThreads * kMinBlocks)). Single mode runs one block,
// so occupancy is moot, and 1 lets ptxas use up to 255 registers (float64
// spilled 148 bytes at the cap of 128 ptxas chose without it). Coop mode keeps
// 2 blocks per SM (128 registers): its grid is every co-resident block.
struct BlockSync {  // Single mode: the grid is one block
  static constexpr int kMinBlocks = 1;
  static __device__ __forceinline__ void sync() { __syncthreads(); }
};
struct GridSync {  // Coop mode: launched with cudaLaunchCooperativeKernel
  static constexpr int kMinBlocks = 2;
  static __device__ __forceinline__ void sync() { cooperative_groups::this_grid().sync(); }
};

// Dynamic shared memory of a kernel, as acc_t (layout: see kSmemAccOffset).
#define BSN_SMEM_DECL(scalar_t)                                 \
  extern __shared__ __align__(16) unsigned char bsn_smem_raw[]; \
  acc_t<scalar_t>* smem = reinterpret_cast<acc_t<scalar_t>*>(bsn_smem_raw)

}  // namespace cuda
}  // namespace bsn
