"""Where BSN's extra CPU cost over SN goes, per SNGAN CNN layer (kernel level).

BSN needs two matricizations of a conv weight W [c_out, c_in, k, k]. The
kernel reads W row by row: pass 1 forms s0 = A0 v0, t0 = A0^T s0 (as SN does)
and s1 = A1 v1 (one more multiply-add stream per element); t1 = A1^T s1 needs
all of s1, so pass 2 reads W again. SN reads W once. Both then write W / sigma.

Times (µs per call, minimum over interleaved rounds, 1 thread, CPU time of
the calling thread, no autograd) the op calls whose differences isolate the
passes:

  SN train    one pass with s and t, plus the output write
  SN eval     a pass with s only (sigma = u^T s), plus the output write
  BSN train   pass 1 (s0, t0, s1), pass 2 (t1), plus the output write
  BSN eval    pass 1 without t0 (s0, s1), plus the output write
  W * c       the output write alone (an elementwise product: allocation + one read + one write)

Run: ``python -m bsn_cuda.benchmark.bsn_cost``.
"""

import math
import time

import torch

from .. import _ops

# The SNGAN CIFAR discriminator's conv layers (benchmark suite sngan_cnn).
SHAPES = [(64, 3, 3, 3), (64, 64, 4, 4), (128, 64, 3, 3), (128, 128, 4, 4), (256, 128, 3, 3),
          (256, 256, 4, 4), (512, 256, 3, 3)]


def _time(fn, calls):
    fn()
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls * 1e6


def measure(shape, rounds=7):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    c_out, c_in, r = shape[0], shape[1], shape[2] * shape[3]
    u0, v0 = torch.randn(c_out, generator=g), torch.randn(c_in * r, generator=g)
    u1, v1 = torch.randn(c_in, generator=g), torch.randn(c_out * r, generator=g)
    calls = max(10, int(4e6 / w.numel()))
    cases = {
        "SN train": lambda: _ops.FAST_SN_FORWARD(w, u0, v0, 0, 1, 1e-12, 1.0, True, None),
        "SN eval": lambda: _ops.FAST_SN_FORWARD(w, u0, v0, 0, 1, 1e-12, 1.0, False, None),
        "BSN train": lambda: _ops.FAST_BSN_FORWARD(w, u0, v0, u1, v1, 1, 1e-12, 1.0, True, None),
        "BSN eval": lambda: _ops.FAST_BSN_FORWARD(w, u0, v0, u1, v1, 1, 1e-12, 1.0, False, None),
        "W * c": lambda: w * 0.5,
    }
    best = dict.fromkeys(cases, math.inf)
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in cases.items():
                best[name] = min(best[name], _time(fn, calls))
    return best


def main():
    if not _ops.HAS_EXTENSION:
        raise SystemExit("bsn_cuda._C is not built")
    torch.set_num_threads(1)
    cols = ["SN train", "SN eval", "BSN train", "BSN eval", "W * c"]
    print("µs per call, 1 thread, no autograd (python -m bsn_cuda.benchmark.bsn_cost)")
    print(f"{'shape':>16} " + " ".join(f"{c:>9}" for c in cols)
          + f" {'BSN/SN':>7} {'pass 1 extra':>12} {'pass 2':>7}")
    ratios = []
    for shape in SHAPES:
        t = measure(shape)
        ratios.append(t["BSN train"] / t["SN train"])
        # pass 1's extra s1 stream: BSN eval - SN eval (both: one pass without t, one output write);
        # pass 2 and t0 together: BSN train - BSN eval, against SN's t: SN train - SN eval.
        extra1 = t["BSN eval"] - t["SN eval"]
        pass2 = (t["BSN train"] - t["BSN eval"]) - (t["SN train"] - t["SN eval"])
        print(f"{'x'.join(map(str, shape)):>16} " + " ".join(f"{t[c]:9.1f}" for c in cols)
              + f" {ratios[-1]:7.2f} {extra1:12.1f} {pass2:7.1f}")
    print(f"geometric mean BSN/SN (kernel only): {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}")


if __name__ == "__main__":
    main()
