#!/usr/bin/env python
"""Memory soak test: many training steps of a small SN/BSN discriminator.

Reports the resident set size (RSS), live tensors and gc-tracked objects at
intervals; a leak shows as steady growth after warm-up. Each step is a GAN
discriminator step (two training forwards, one backward, Adam) plus sigma
logging, and every ``--eval-every`` steps an eval forward.

    python tests/training/memory_soak.py                   # 10,000 steps on the CPU
    python tests/training/memory_soak.py --device cuda --steps 50000

Exit status 1 if RSS (or CUDA memory) grew by more than ``--tolerance-mib``
between the first report after warm-up and the end.
"""

import argparse
import gc
import os
import resource
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # bsn_cuda, and the tests' discriminator
import bsn_cuda  # noqa: E402
from discriminator import build_discriminator  # noqa: E402


def rss_mib():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: peak RSS only (KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def live_tensors():
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def build(device):
    """The tests' discriminator, wider, on 16x16 images: BSN on the convs (a 1x1 one takes the SN path), scaled SN on the linear."""
    return build_discriminator("mixed", channels=(32, 64), pointwise=True, size=16, device=device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--interval", type=int, default=1_000, help="report every N steps")
    parser.add_argument("--warmup", type=int, default=1_000, help="steps before the baseline report")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--tolerance-mib", type=float, default=8.0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model = build(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.0, 0.9))
    gen = torch.Generator(device=device).manual_seed(1)
    real = torch.randn(args.batch, 3, 16, 16, device=device, generator=gen)
    fake = torch.randn(args.batch, 3, 16, 16, device=device, generator=gen)
    cuda = device.type == "cuda"

    print(f"bsn_cuda {bsn_cuda.__version__} (extension: {bsn_cuda.HAS_EXTENSION}), torch {torch.__version__}, "
          f"device {device}, threads {torch.get_num_threads()}, {args.steps} steps")
    header = f"{'step':>8} {'RSS MiB':>9} {'tensors':>8} {'gc objs':>9}" + (f" {'CUDA MiB':>9}" if cuda else "") + f" {'s/1k steps':>10}"
    print(header)
    baseline = None
    last = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = nn.functional.softplus(-model(real)).mean() + nn.functional.softplus(model(fake)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sigma = bsn_cuda.get_sigma(model[0])  # logging, as a training loop would
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                model(real)
            model.train()
        if step % args.interval == 0 or step == args.steps:
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            row = (step, rss_mib(), live_tensors(), len(gc.get_objects()))
            cuda_mib = torch.cuda.memory_allocated(device) / 2**20 if cuda else None
            rate = (now - last) / max(1, args.interval) * 1000
            last = now
            line = f"{row[0]:>8} {row[1]:>9.1f} {row[2]:>8} {row[3]:>9}"
            if cuda:
                line += f" {cuda_mib:>9.1f}"
            print(line + f" {rate:>10.2f}", flush=True)
            if step >= args.warmup and baseline is None:
                baseline = (row, cuda_mib)
            final = (row, cuda_mib)
    del sigma

    if baseline is None:
        print("no report after warm-up; nothing to compare")
        return 0
    (b_row, b_cuda), (f_row, f_cuda) = baseline, final
    growth = f_row[1] - b_row[1]
    print(f"after warm-up (step {b_row[0]} -> {f_row[0]}): RSS {growth:+.1f} MiB, "
          f"tensors {f_row[2] - b_row[2]:+d}, gc objects {f_row[3] - b_row[3]:+d}"
          + (f", CUDA {f_cuda - b_cuda:+.1f} MiB" if cuda else ""))
    leaked = growth > args.tolerance_mib or (cuda and f_cuda - b_cuda > args.tolerance_mib) or f_row[2] > b_row[2]
    print("LEAK?" if leaked else "no growth")
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
