// CPU emulation of the few CUDA features csrc/cuda uses: one OS thread per
// CUDA thread, std::barrier for __syncthreads / __syncwarp / grid sync,
// shuffles through a per-warp exchange buffer, the rounding intrinsics through
// std::fma and plain IEEE operations. Test-only.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include <cuda_runtime_api.h>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
using std::isfinite;
using std::sqrt;

// Explicitly rounded arithmetic (the host compiles without -ffp-contract=fast
// under -std=c++20, so a * b and a + b round once each, like __fmul_rn etc.).
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }

namespace emu {
struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
struct Warp {
  std::barrier<>* bar = nullptr;
  alignas(16) unsigned char raw[32][16];
};
struct Ctx {
  std::barrier<>* block_bar = nullptr;
  std::barrier<>* grid_bar = nullptr;
  Warp* warp = nullptr;
  unsigned char* smem = nullptr;
};
inline thread_local Ctx ctx;
inline int occupancy_per_sm = 2;
inline long coop_max_blocks = -1;  // cooperative launches above this are refused (-1: no limit)
inline long launches = 0;

inline void launch(int grid, int nthreads, size_t smem, bool cooperative,
                   const std::function<void()>& body);
}  // namespace emu

inline thread_local emu::Dim threadIdx, blockIdx, gridDim, blockDim;

inline void __syncthreads() { emu::ctx.block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::ctx.warp->bar->arrive_and_wait(); }
template <typename T>
T __shfl_down_sync(unsigned, T v, int delta) {
  emu::Warp* w = emu::ctx.warp;
  const int lane = threadIdx.x & 31;
  std::memcpy(w->raw[lane], &v, sizeof(T));
  w->bar->arrive_and_wait();
  T r = v;
  if (lane + delta < 32) std::memcpy(&r, w->raw[lane + delta], sizeof(T));
  w->bar->arrive_and_wait();
  return r;
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  emu::Warp* w = emu::ctx.warp;
  const int lane = threadIdx.x & 31;
  std::memcpy(w->raw[lane], &v, sizeof(T));
  w->bar->arrive_and_wait();
  T r;
  std::memcpy(&r, w->raw[src], sizeof(T));
  w->bar->arrive_and_wait();
  return r;
}

namespace cooperative_groups {
struct grid_group {
  void sync() { emu::ctx.grid_bar->arrive_and_wait(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

#define C10_CUDA_CHECK(x)                                                     \
  do {                                                                        \
    if ((x) != cudaSuccess) throw std::runtime_error("emu: CUDA error: " #x); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace emu {
inline void run_blocks(int first, int count, int grid, int nthreads, size_t smem,
                       std::barrier<>* grid_bar, const std::function<void()>& body) {
  const int nwarps = nthreads / 32;
  std::vector<std::unique_ptr<std::barrier<>>> bbars;
  std::vector<std::unique_ptr<std::barrier<>>> wbars;
  std::vector<std::unique_ptr<Warp[]>> warps;
  std::vector<std::unique_ptr<double[]>> smems;
  for (int b = 0; b < count; ++b) {
    bbars.emplace_back(new std::barrier<>(nthreads));
    warps.emplace_back(new Warp[nwarps]);
    for (int w = 0; w < nwarps; ++w) {
      wbars.emplace_back(new std::barrier<>(32));
      warps.back()[w].bar = wbars.back().get();
    }
    const size_t n = smem / sizeof(double) + 2;
    smems.emplace_back(new double[n]);
    std::memset(smems.back().get(), 0xff, n * sizeof(double));  // NaN garbage
  }
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(count) * nthreads);
  for (int b = 0; b < count; ++b) {
    for (int t = 0; t < nthreads; ++t) {
      threads.emplace_back([&, b, t] {
        threadIdx.x = t;
        blockIdx.x = first + b;
        gridDim.x = grid;
        blockDim.x = nthreads;
        ctx.block_bar = bbars[b].get();
        ctx.grid_bar = grid_bar;
        ctx.warp = &warps[b][t / 32];
        ctx.smem = reinterpret_cast<unsigned char*>(smems[b].get());
        body();
      });
    }
  }
  for (auto& th : threads) th.join();
}

inline void launch(int grid, int nthreads, size_t smem, bool cooperative,
                   const std::function<void()>& body) {
  ++launches;
  if (grid < 1 || nthreads % 32 != 0) throw std::runtime_error("bad launch");
  if (cooperative) {
    std::barrier<> gbar(static_cast<std::ptrdiff_t>(grid) * nthreads);
    run_blocks(0, grid, grid, nthreads, smem, &gbar, body);
  } else {
    for (int b = 0; b < grid; ++b) run_blocks(b, 1, grid, nthreads, smem, nullptr, body);
  }
}
}  // namespace emu

namespace emu {
// cudaLaunchKernel / cudaLaunchCooperativeKernel of launch.cu: the kernel's
// address is the host function the kernel became, taking its one argument.
template <class Args>
cudaError_t launch_kernel(const void* kernel, unsigned grid, int nthreads, size_t smem,
                          bool cooperative, const Args& A) {
  if (cooperative && coop_max_blocks >= 0 && static_cast<long>(grid) > coop_max_blocks) {
    return cudaErrorCooperativeLaunchTooLarge;
  }
  auto fn = reinterpret_cast<void (*)(Args)>(const_cast<void*>(kernel));
  launch(static_cast<int>(grid), nthreads, smem, cooperative, [&] { fn(A); });
  return cudaSuccess;
}
}  // namespace emu
