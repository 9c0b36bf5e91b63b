"""Where the host time of one training forward goes, on a tiny weight.

Times, interleaved in rounds (minimum over rounds, µs per call), the layers
that stand between ``module.weight`` and the kernel, from the outside in:

  identity.weight   an identity parametrization: torch's parametrize floor
  torch_sn.weight   torch's parametrized SN
  ours.weight       bsn_cuda.spectral_norm
  norm(W)           our parametrization module called directly (nn.Module call + forward)
  _ops.sn_forward   the package entry point (routing checks + fast path + sigma log)
  _C.sn_forward     the C++ fast entry point (dispatcher, autograd node, kernel)
  ..no graph        the same with a weight that needs no gradient (no autograd node)
  ..inference       the same under inference_mode (no Autograd dispatch at all)
  torch.ops call    torch.ops.bsn_cuda.sn_forward (schema-parsed Python call)

Run: ``python -m bsn_cuda.benchmark.host_profile`` (1 thread).
"""

import time

import torch
from torch import nn
from torch.nn.utils import parametrize

import bsn_cuda

from .. import _ops
from .host_overhead import Identity


def main(rounds=25, calls=400):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ident = nn.Conv2d(2, 2, 3, bias=False)
    parametrize.register_parametrization(ident, "weight", Identity())
    theirs = torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(2, 2, 3, bias=False))
    ours = bsn_cuda.spectral_norm(nn.Conv2d(2, 2, 3, bias=False))
    norm = ours.parametrizations.weight[0]
    w = ours.parametrizations.weight.original
    b = norm._buffers
    u, v, log = b["_u"], b["_v"], b["_sigma"]
    w_plain = w.detach()

    def inference():
        with torch.inference_mode():
            return _ops.FAST_SN_FORWARD(w_plain, u, v, 0, 1, 1e-12, 1.0, True, None)

    steps = {
        "identity.weight": lambda: ident.weight,
        "torch_sn.weight": lambda: theirs.weight,
        "ours.weight": lambda: ours.weight,
        "norm(W)": lambda: norm(w),
        "_ops.sn_forward": lambda: _ops.sn_forward(w, u, v, 0, 1, 1e-12, 1.0, True, log),
        "_C.sn_forward": lambda: _ops.FAST_SN_FORWARD(w, u, v, 0, 1, 1e-12, 1.0, True, log),
        "..no graph": lambda: _ops.FAST_SN_FORWARD(w_plain, u, v, 0, 1, 1e-12, 1.0, True, None),
        "..inference": inference,
        "torch.ops call": lambda: _ops.SN_FORWARD_OP(w, u, v, 0, 1, 1e-12, 1.0, True),
    }
    best = {k: float("inf") for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            for _ in range(20):
                fn()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / calls * 1e6)
    print(f"training forward of Conv2d(2, 2, 3), torch {torch.__version__}, 1 thread; "
          f"min over {rounds} interleaved rounds of {calls} calls, µs per call")
    for name, t in best.items():
        print(f"  {name:16s} {t:7.2f}")


if __name__ == "__main__":
    main()
