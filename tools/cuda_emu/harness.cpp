// extern "C" entry points for ctypes (test only), and the CUDA runtime calls
// launch.cu makes besides the launches.
#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/launch.h"
#include "cuda/plan.h"
#include "emu.h"

extern "C" cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int, size_t) {
  *n = emu::occupancy_per_sm;
  return cudaSuccess;
}
extern "C" cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
extern "C" cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace {
// 1: every cooperative launch asks for one block more than is co-resident and
// is refused (DeviceInfo::coop_oversubscribe), so the launcher falls back.
int g_oversubscribe = 0;

// The launches a call made must be the ones its plan counts (plan.cpp).
bool check_launches(bsn::cuda::Mode mode, const bsn::cuda::LaunchCounts& c, long made, int occ,
                    const char* what) {
  const bool fell_back = mode == bsn::cuda::Mode::Coop && (g_oversubscribe || occ <= 0);
  const long expected = fell_back ? c.phases : c.launches;
  if (made != expected) {
    fprintf(stderr, "%s: %ld launches, the plan counts %ld\n", what, made, expected);
    return false;
  }
  return true;
}
}  // namespace

extern "C" void emu_set_coop_oversubscribe(int on) { g_oversubscribe = on; }

// The variant arguments of the next calls (docs/design.md, Variants): coeff,
// gamma (one acc-type element, or null) and track-only (the forward's out unused).
namespace {
double g_coeff = 0.0;
const void* g_gamma = nullptr;
bool g_track_only = false;
}  // namespace
extern "C" void emu_set_variant(double coeff, const void* gamma, int track_only) {
  g_coeff = coeff;
  g_gamma = gamma;
  g_track_only = track_only != 0;
}

namespace {
bsn::Matricization emu_matricize(const int64_t* shape, int ndim, int dim) {
  bsn::Matricization m;
  m.outer = 1;
  m.inner = 1;
  for (int d = 0; d < dim; ++d) m.outer *= shape[d];
  m.rows = shape[dim];
  for (int d = dim + 1; d < ndim; ++d) m.inner *= shape[d];
  return m;
}
}  // namespace

extern "C" {
// dtype: 0 float, 1 double, 2 half, 3 bfloat16. mode: 0 auto, 1 single, 2 coop, 3 multi.
// Returns the resolved mode * 100 + launches, or -1 on error.
int emu_forward(int dtype, const void* w, void* u0, void* v0, void* u1, void* v1, void* out,
                void* state, const int64_t* shape, int ndim, int bsn, int dim, int n_iter,
                double eps, double scale, int update, int mode, int sm_count, long smem_optin,
                int occ) {
  try {
    bsn::ForwardParams p;
    p.weight = w;
    p.out = out;
    p.u[0] = u0;
    p.v[0] = v0;
    p.u[1] = u1;
    p.v[1] = v1;
    p.state = state;
    int64_t numel = 1;
    for (int d = 0; d < ndim; ++d) numel *= shape[d];
    p.numel = numel;
    if (bsn) {
      p.num_pairs = 2;
      p.mat[0] = emu_matricize(shape, ndim, 0);
      p.mat[1] = emu_matricize(shape, ndim, 1);
    } else {
      p.num_pairs = 1;
      p.mat[0] = emu_matricize(shape, ndim, dim);
    }
    p.n_power_iterations = n_iter;
    p.eps = eps;
    p.scale = scale;
    p.update = update != 0;
    p.coeff = g_coeff;
    p.gamma = g_gamma;
    p.track_only = g_track_only;
    if (g_track_only) p.out = nullptr;
    bsn::cuda::DeviceInfo dev;
    dev.device = 0;
    dev.sm_count = sm_count;
    dev.smem_optin = smem_optin;
    dev.cooperative = true;
    dev.coop_oversubscribe = g_oversubscribe != 0;
    emu::occupancy_per_sm = occ;
    emu::coop_max_blocks = static_cast<long>(occ) * sm_count;
    const int acc = dtype == 1 ? 8 : 4;
    const auto plan = bsn::cuda::make_forward_plan(p, acc, dev, static_cast<bsn::cuda::Mode>(mode));
    std::vector<unsigned char> ws(static_cast<size_t>(plan.ws_elems) * acc + 64);
    std::memset(ws.data(), 0xff, ws.size());  // NaN: reads of unwritten workspace show up
    const long before = emu::launches;
    switch (dtype) {
      case 0: bsn::cuda::launch_forward<float>(p, plan, ws.data(), dev, nullptr); break;
      case 1: bsn::cuda::launch_forward<double>(p, plan, ws.data(), dev, nullptr); break;
      case 2: bsn::cuda::launch_forward<c10::Half>(p, plan, ws.data(), dev, nullptr); break;
      case 3: bsn::cuda::launch_forward<c10::BFloat16>(p, plan, ws.data(), dev, nullptr); break;
      default: return -1;
    }
    const long made = emu::launches - before;
    if (!check_launches(plan.mode, bsn::cuda::forward_counts(plan), made, occ, "emu_forward")) return -1;
    return static_cast<int>(plan.mode) * 100 + static_cast<int>(made);
  } catch (const std::exception& e) {
    fprintf(stderr, "emu_forward: %s\n", e.what());
    return -1;
  }
}

int emu_backward(int dtype, const void* g, const void* w, const void* state, void* gw,
                 const int64_t* shape, int ndim, int bsn, int dim, double scale, int mode,
                 int sm_count, int occ) {
  try {
    bsn::BackwardParams p;
    p.grad_out = g;
    p.weight = w;
    p.state = state;
    p.grad_weight = gw;
    int64_t numel = 1;
    for (int d = 0; d < ndim; ++d) numel *= shape[d];
    p.numel = numel;
    if (bsn) {
      p.num_pairs = 2;
      p.mat[0] = emu_matricize(shape, ndim, 0);
      p.mat[1] = emu_matricize(shape, ndim, 1);
    } else {
      p.num_pairs = 1;
      p.mat[0] = emu_matricize(shape, ndim, dim);
    }
    p.scale = scale;
    p.coeff = g_coeff;
    p.gamma = g_gamma;
    bsn::cuda::DeviceInfo dev;
    dev.sm_count = sm_count;
    dev.smem_optin = 232448;
    dev.cooperative = true;
    dev.coop_oversubscribe = g_oversubscribe != 0;
    emu::occupancy_per_sm = occ;
    emu::coop_max_blocks = static_cast<long>(occ) * sm_count;
    const int acc = dtype == 1 ? 8 : 4;
    const auto plan = bsn::cuda::make_backward_plan(p, acc, dev, static_cast<bsn::cuda::Mode>(mode));
    std::vector<unsigned char> ws(static_cast<size_t>(plan.ws_elems) * acc + 64);
    std::memset(ws.data(), 0xff, ws.size());
    const long before = emu::launches;
    switch (dtype) {
      case 0: bsn::cuda::launch_backward<float>(p, plan, ws.data(), dev, nullptr); break;
      case 1: bsn::cuda::launch_backward<double>(p, plan, ws.data(), dev, nullptr); break;
      case 2: bsn::cuda::launch_backward<c10::Half>(p, plan, ws.data(), dev, nullptr); break;
      case 3: bsn::cuda::launch_backward<c10::BFloat16>(p, plan, ws.data(), dev, nullptr); break;
      default: return -1;
    }
    const long made = emu::launches - before;
    if (!check_launches(plan.mode, bsn::cuda::backward_counts(plan), made, occ, "emu_backward")) return -1;
    return static_cast<int>(plan.mode) * 100 + static_cast<int>(made);
  } catch (const std::exception& e) {
    fprintf(stderr, "emu_backward: %s\n", e.what());
    return -1;
  }
}
}

// Grouped launches (launch.cu, "Grouped launches"): n layers of one dtype, each
// described as emu_forward's arguments (arrays of n; shapes: n x 8 extents).
// Returns the launches made (checked against the layout's count), or -1.
namespace {
bsn::ForwardParams group_fwd_params(int l, const void* const* w, void* const* u0, void* const* v0,
                                    void* const* u1, void* const* v1, void* const* out,
                                    void* const* state, const int64_t* shapes, const int* ndims,
                                    const int* bsn, const int* dims, const int* n_iter,
                                    const int* update, double eps, double scale) {
  bsn::ForwardParams p;
  p.weight = w[l];
  p.out = out[l];
  p.u[0] = u0[l];
  p.v[0] = v0[l];
  p.u[1] = u1[l];
  p.v[1] = v1[l];
  p.state = state[l];
  const int64_t* shape = shapes + 8 * l;
  p.numel = 1;
  for (int d = 0; d < ndims[l]; ++d) p.numel *= shape[d];
  if (bsn[l]) {
    p.num_pairs = 2;
    p.mat[0] = emu_matricize(shape, ndims[l], 0);
    p.mat[1] = emu_matricize(shape, ndims[l], 1);
  } else {
    p.num_pairs = 1;
    p.mat[0] = emu_matricize(shape, ndims[l], dims[l]);
  }
  p.n_power_iterations = n_iter[l];
  p.eps = eps;
  p.scale = scale;
  p.update = update[l] != 0;
  return p;
}

bsn::cuda::DeviceInfo group_device(int sm_count, long smem_optin, int occ) {
  bsn::cuda::DeviceInfo dev;
  dev.device = 0;
  dev.sm_count = sm_count;
  dev.smem_optin = smem_optin;
  dev.cooperative = true;
  emu::occupancy_per_sm = occ;
  emu::coop_max_blocks = static_cast<long>(occ) * sm_count;
  return dev;
}

// The table's upload: a host copy here (cudaMemcpyAsync on the GPU).
void emu_upload(const void* host, void* device, int64_t bytes) {
  std::memcpy(device, host, static_cast<size_t>(bytes));
}

// The group's buffer: NaN everywhere, so reads of unwritten workspace show up.
std::vector<unsigned char> group_buffer(int64_t bytes) {
  std::vector<unsigned char> buf(static_cast<size_t>(bytes) + 256);
  std::memset(buf.data(), 0xff, buf.size());
  return buf;
}

// One grouped call through launch (launch_group_forward / _backward), its
// launches checked against the layout's count.
template <typename Params, typename Plan, typename Layout, typename Launch>
long run_group(const char* what, const std::vector<Params>& ps, const std::vector<Plan>& plans,
               const bsn::cuda::DeviceInfo& dev, const Layout& layout_of, const Launch& launch) {
  const bsn::cuda::GroupLayout layout = layout_of(plans);
  std::vector<unsigned char> buf = group_buffer(layout.total_bytes);
  const long before = emu::launches;
  launch(ps, plans, layout, buf.data(), dev, nullptr, emu_upload);
  const long made = emu::launches - before;
  if (made != layout.launches) {
    fprintf(stderr, "%s: %ld launches, the layout counts %ld\n", what, made,
            static_cast<long>(layout.launches));
    return -1;
  }
  return made;
}

template <typename T>
long run_group_fwd(const std::vector<bsn::ForwardParams>& ps,
                   const std::vector<bsn::cuda::ForwardPlan>& plans, const bsn::cuda::DeviceInfo& dev) {
  return run_group("emu_group_forward", ps, plans, dev, bsn::cuda::group_forward_layout<T>,
                   bsn::cuda::launch_group_forward<T>);
}

template <typename T>
long run_group_bwd(const std::vector<bsn::BackwardParams>& ps,
                   const std::vector<bsn::cuda::BackwardPlan>& plans, const bsn::cuda::DeviceInfo& dev) {
  return run_group("emu_group_backward", ps, plans, dev, bsn::cuda::group_backward_layout<T>,
                   bsn::cuda::launch_group_backward<T>);
}
}  // namespace

extern "C" {
int emu_group_forward(int dtype, int n, const void* const* w, void* const* u0, void* const* v0,
                      void* const* u1, void* const* v1, void* const* out, void* const* state,
                      const int64_t* shapes, const int* ndims, const int* bsn, const int* dims,
                      const int* n_iter, const int* update, double eps, double scale, int sm_count,
                      long smem_optin, int occ) {
  try {
    const bsn::cuda::DeviceInfo dev = group_device(sm_count, smem_optin, occ);
    const int acc = dtype == 1 ? 8 : 4;
    std::vector<bsn::ForwardParams> ps;
    std::vector<bsn::cuda::ForwardPlan> plans;
    for (int l = 0; l < n; ++l) {
      ps.push_back(group_fwd_params(l, w, u0, v0, u1, v1, out, state, shapes, ndims, bsn, dims,
                                    n_iter, update, eps, scale));
      plans.push_back(bsn::cuda::make_forward_plan(ps.back(), acc, dev, bsn::cuda::Mode::Multi));
    }
    switch (dtype) {
      case 0: return static_cast<int>(run_group_fwd<float>(ps, plans, dev));
      case 1: return static_cast<int>(run_group_fwd<double>(ps, plans, dev));
      case 2: return static_cast<int>(run_group_fwd<c10::Half>(ps, plans, dev));
      case 3: return static_cast<int>(run_group_fwd<c10::BFloat16>(ps, plans, dev));
      default: return -1;
    }
  } catch (const std::exception& e) {
    fprintf(stderr, "emu_group_forward: %s\n", e.what());
    return -1;
  }
}

int emu_group_backward(int dtype, int n, const void* const* g, const void* const* w,
                       const void* const* state, void* const* gw, const int64_t* shapes,
                       const int* ndims, const int* bsn, const int* dims, double scale,
                       int sm_count, int occ) {
  try {
    const bsn::cuda::DeviceInfo dev = group_device(sm_count, 232448, occ);
    const int acc = dtype == 1 ? 8 : 4;
    std::vector<bsn::BackwardParams> ps;
    std::vector<bsn::cuda::BackwardPlan> plans;
    for (int l = 0; l < n; ++l) {
      bsn::BackwardParams p;
      p.grad_out = g[l];
      p.weight = w[l];
      p.state = state[l];
      p.grad_weight = gw[l];
      const int64_t* shape = shapes + 8 * l;
      p.numel = 1;
      for (int d = 0; d < ndims[l]; ++d) p.numel *= shape[d];
      if (bsn[l]) {
        p.num_pairs = 2;
        p.mat[0] = emu_matricize(shape, ndims[l], 0);
        p.mat[1] = emu_matricize(shape, ndims[l], 1);
      } else {
        p.num_pairs = 1;
        p.mat[0] = emu_matricize(shape, ndims[l], dims[l]);
      }
      p.scale = scale;
      ps.push_back(p);
      plans.push_back(bsn::cuda::make_backward_plan(p, acc, dev, bsn::cuda::Mode::Multi));
    }
    switch (dtype) {
      case 0: return static_cast<int>(run_group_bwd<float>(ps, plans, dev));
      case 1: return static_cast<int>(run_group_bwd<double>(ps, plans, dev));
      case 2: return static_cast<int>(run_group_bwd<c10::Half>(ps, plans, dev));
      case 3: return static_cast<int>(run_group_bwd<c10::BFloat16>(ps, plans, dev));
      default: return -1;
    }
  } catch (const std::exception& e) {
    fprintf(stderr, "emu_group_backward: %s\n", e.what());
    return -1;
  }
}
}
