// Prints the CUDA backend's launch plans (csrc/cuda/plan.cpp) as JSON, one
// line per request, for tests/cuda/test_cuda_plans.py. Built with the host compiler
// by that test; no GPU and no CUDA toolkit needed.
//
// stdin, one request per line:
//   fwd|bwd  bsn(0|1)  dim  acc_size  n_iter  update(0|1)  mode(0-3)  sm_count  smem_optin  coop(0|1)  ndim  shape...
#include <cstdint>
#include <cstdio>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/plan.h"

namespace {

bsn::Matricization matricize(const std::vector<int64_t>& shape, int dim) {
  bsn::Matricization m;
  for (int d = 0; d < dim; ++d) m.outer *= shape[d];
  m.rows = shape[dim];
  for (size_t d = dim + 1; d < shape.size(); ++d) m.inner *= shape[d];
  return m;
}

void counts_json(const bsn::cuda::LaunchCounts& c) {
  std::printf("\"phases\": %d, \"grid_syncs\": %d, \"launches\": %d, \"elem_passes\": %lld", c.phases,
              c.grid_syncs, c.launches, static_cast<long long>(c.elem_passes));
}

#define F(name) std::printf("\"" #name "\": %lld, ", static_cast<long long>(P.name))

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    std::istringstream in(line);
    std::string kind;
    int bsn_ = 0, dim = 0, acc = 4, n_iter = 1, update = 1, mode = 0, sms = 1, coop = 0, ndim = 0;
    long long optin = 0;
    in >> kind >> bsn_ >> dim >> acc >> n_iter >> update >> mode >> sms >> optin >> coop >> ndim;
    std::vector<int64_t> shape(ndim);
    int64_t numel = 1;
    for (auto& s : shape) {
      in >> s;
      numel *= s;
    }
    bsn::cuda::DeviceInfo dev;
    dev.sm_count = sms;
    dev.smem_optin = optin;
    dev.cooperative = coop != 0;
    bsn::Matricization mat[2];
    int pairs = 1;
    if (bsn_) {
      pairs = 2;
      mat[0] = matricize(shape, 0);
      mat[1] = matricize(shape, 1);
    } else {
      mat[0] = matricize(shape, dim);
    }
    try {
      if (kind == "fwd") {
        bsn::ForwardParams p;
        p.numel = numel;
        p.num_pairs = pairs;
        p.mat[0] = mat[0];
        p.mat[1] = mat[1];
        p.n_power_iterations = n_iter;
        p.update = update != 0;
        const auto P = bsn::cuda::make_forward_plan(p, acc, dev, static_cast<bsn::cuda::Mode>(mode));
        std::printf("{\"mode\": %d, ", static_cast<int>(P.mode));
        F(has_row); F(has_str); F(row_pair); F(str_pair); F(update); F(n_iter); F(numel); F(rows);
        F(cols); F(sm); F(sr); F(sv); F(a_warp); F(a_acc_smem); F(a_narr); F(a_chunks); F(a_rpc);
        F(a_smem); F(b_cpi0); F(b_items0); F(b_cpi1); F(b_items1); F(c_warp); F(c_chunks); F(c_rpc);
        F(c_reverse); F(e_tiles); F(d_reverse); F(scratch_smem); F(w_s0); F(w_sq0); F(w_t0); F(w_q);
        F(w_s1p); F(w_v0raw); F(w_vp0); F(w_v0cur); F(w_s1); F(w_s1sq); F(w_v1raw); F(w_vp1);
        F(w_v1cur); F(w_sig0); F(w_sig1); F(ws_elems); F(grid_cap);
        std::printf("\"st_u\": [%lld, %lld], \"st_v\": [%lld, %lld], ", static_cast<long long>(P.st_u[0]),
                    static_cast<long long>(P.st_u[1]), static_cast<long long>(P.st_v[0]),
                    static_cast<long long>(P.st_v[1]));
        std::printf("\"max_items\": %lld, ", static_cast<long long>(bsn::cuda::forward_max_items(P)));
        counts_json(bsn::cuda::forward_counts(P));
        std::printf("}\n");
      } else {
        bsn::BackwardParams p;
        p.numel = numel;
        p.num_pairs = pairs;
        p.mat[0] = mat[0];
        p.mat[1] = mat[1];
        const auto P = bsn::cuda::make_backward_plan(p, acc, dev, static_cast<bsn::cuda::Mode>(mode));
        std::printf("{\"mode\": %d, ", static_cast<int>(P.mode));
        F(has_row); F(has_str); F(numel); F(rows); F(cols); F(sm); F(sr); F(tj); F(tr); F(inc_i);
        F(inc_j); F(inc_r); F(items); F(item_size); F(e_tiles); F(scratch_smem); F(ws_elems); F(grid_cap);
        std::printf("\"max_items\": %lld, ", static_cast<long long>(bsn::cuda::backward_max_items(P)));
        counts_json(bsn::cuda::backward_counts(P));
        std::printf("}\n");
      }
    } catch (const std::exception& e) {
      std::string msg = e.what();
      msg = msg.substr(0, msg.find('\n'));
      for (auto& ch : msg) if (ch == '"' || ch == '\\') ch = '\'';
      std::printf("{\"error\": \"%s\"}\n", msg.c_str());
    }
    std::fflush(stdout);
  }
  return 0;
}
