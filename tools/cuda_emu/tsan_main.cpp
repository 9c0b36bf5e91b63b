// Race detection on the emulated kernels: random inputs, every mode, no reference.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>
extern "C" int emu_forward(int, const void*, void*, void*, void*, void*, void*, void*, const int64_t*, int, int, int, int, double, double, int, int, int, long, int);
extern "C" int emu_backward(int, const void*, const void*, const void*, void*, const int64_t*, int, int, int, double, int, int, int);
extern "C" void emu_set_coop_oversubscribe(int);

struct Case { std::vector<int64_t> shape; int bsn; int dim; };

int main(int argc, char** argv) {
  std::vector<Case> cases = {
      {{7, 5, 3, 3}, 0, 0}, {{7, 5, 3, 3}, 0, 1}, {{33, 65}, 0, 1}, {{3, 300}, 0, 0}, {{300, 2}, 0, 0},
      {{7, 5, 3, 3}, 1, 0}, {{5, 2, 64}, 1, 0}, {{3, 2, 300}, 1, 0}, {{4, 3, 1, 1}, 1, 0}, {{2, 40, 9}, 1, 0},
      // rows of 301 doubles: every other row starts off a 16-byte boundary, so
      // block mode's 128-bit walk hands the accumulator's columns to other threads
      {{3, 301}, 0, 0}, {{3, 301, 1}, 1, 0}};
  std::mt19937 rng(1);
  std::normal_distribution<double> nd;
  int failures = 0;
  for (const Case& c : cases) {
    int64_t numel = 1;
    for (auto s : c.shape) numel *= s;
    std::vector<double> w(numel), g(numel), out(numel), gw(numel);
    for (auto& x : w) x = nd(rng);
    for (auto& x : g) x = nd(rng);
    const int nd_ = static_cast<int>(c.shape.size());
    auto mk = [&](int d) {
      int64_t m = c.shape[d];
      std::vector<double> u(m), v(numel / m);
      for (auto& x : u) x = nd(rng);
      for (auto& x : v) x = nd(rng);
      return std::make_pair(u, v);
    };
    auto p0 = mk(c.bsn ? 0 : c.dim);
    auto p1 = mk(c.bsn ? 1 : c.dim);
    std::vector<double> state(4 + 2 * numel + 1000);
    for (int m : {1, 2, 3, 4}) {  // 4: Coop refused by the "driver", falls back to Multi
      const int mode = m == 4 ? 2 : m;
      emu_set_coop_oversubscribe(m == 4);
      for (int update : {1, 0}) {
        for (int smem : {232448, 49152}) {
          auto q0 = p0, q1 = p1;
          int rc = emu_forward(1, w.data(), q0.first.data(), q0.second.data(), q1.first.data(), q1.second.data(),
                               out.data(), state.data(), c.shape.data(), nd_, c.bsn, c.dim, 2, 1e-12, 1.5, update,
                               mode, 2, smem, 2);
          if (rc < 0) ++failures;
          rc = emu_backward(1, g.data(), w.data(), state.data(), gw.data(), c.shape.data(), nd_, c.bsn, c.dim, 1.5,
                            mode, 2, 2);
          if (rc < 0) ++failures;
        }
      }
    }
    std::printf("case done (numel %lld)\n", static_cast<long long>(numel));
    std::fflush(stdout);
  }
  std::printf("failures: %d\n", failures);
  return failures != 0;
}
