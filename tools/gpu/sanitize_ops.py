"""Call every bsn_cuda op on CUDA, for compute-sanitizer (tools/gpu/gpu_check.sh).

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/gpu/sanitize_ops.py

Every dtype, every launch mode (single block, cooperative, multi-kernel),
training (2 power iterations) and eval forwards, and both backwards, on small
shapes that take every code path of csrc/cuda plus one moderately
sized weight; then sync(). Exits 1 if a result is not finite
or the modes disagree (they must be bitwise identical). Kept short: sanitizers
slow kernels down by orders of magnitude.

Modes: single, coop, multi, and coop-refused (the driver refuses the cooperative
launch, the launcher falls back to multi; BSN_CUDA_TEST_COOP_OVERSUBSCRIBE).
Seeds: crc32 of the case, the same in every process.

Options: --dtypes float32,bfloat16 --modes coop --quick (fewer shapes);
--device cpu runs the same calls on the CPU ops (gpu_check.sh --dry-run).
"""

import argparse
import os
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import bsn_cuda  # noqa: E402  (registers torch.ops.bsn_cuda)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (kind, shape, dim): warp / block rows, strided pairs, shared / global
# accumulators, phase C with sr = 1, 9, >= 32, >= 256.
SMALL = [
    ("sn", (7, 5, 3, 3), 0),
    ("sn", (7, 5, 3, 3), 1),
    ("sn", (33, 65), 1),
    ("sn", (1, 300), 0),
    ("sn", (300, 2), 0),
    ("sn", (3, 30000), 0),
    ("bsn", (7, 5, 3, 3), None),
    ("bsn", (5, 2, 64), None),
    ("bsn", (3, 2, 300), None),
    ("bsn", (4, 3, 1, 1), None),
    ("bsn", (2, 2000, 9), None),
]
MODERATE = [("bsn", (256, 128, 3, 3), None), ("sn", (256, 128, 3, 3), 1)]


DEVICE = "cuda"


def unit(n, dtype):
    x = torch.randn(n, dtype=torch.float64)
    return (x / x.norm()).to(DEVICE, dtype)


def run_case(kind, shape, dim, dtype, mode):
    os.environ["BSN_CUDA_MODE"] = "coop" if mode == "coop-refused" else mode
    if mode == "coop-refused":
        os.environ["BSN_CUDA_TEST_COOP_OVERSUBSCRIBE"] = "1"
    else:
        os.environ.pop("BSN_CUDA_TEST_COOP_OVERSUBSCRIBE", None)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(zlib.crc32(repr((kind, shape, dim)).encode()))  # same in every process
    weight = torch.randn(shape, dtype=torch.float64).to(DEVICE, dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(DEVICE, dtype)
    dims = (dim % len(shape),) if kind == "sn" else (0, 1)
    vectors = []
    numel = weight.numel()
    for d in dims:
        vectors += [unit(shape[d], dtype), unit(numel // shape[d], dtype)]
    torch.random.set_rng_state(gen_state)
    results = []
    for update in (True, False):
        vecs = [t.clone() for t in vectors]
        if kind == "sn":
            out, state = torch.ops.bsn_cuda.sn_forward(weight, *vecs, dim, 2, 1e-12, 1.5, update)
            g = torch.ops.bsn_cuda.sn_backward(grad, weight, state, dim, 1.5)
        else:
            out, state = torch.ops.bsn_cuda.bsn_forward(weight, *vecs, 2, 1e-12, 1.5, update)
            g = torch.ops.bsn_cuda.bsn_backward(grad, weight, state, 1.5)
        results += [out, state, g, *vecs]
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--modes", default="single,coop,multi,coop-refused")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="small shapes only, no moderate weight")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: no CUDA device")
        return 1
    if DEVICE == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("bsn_cuda::sn_forward", "CUDA"):
        print("sanitize_ops: the bsn_cuda CUDA kernels are not registered")
        return 1
    dtypes = [DTYPES[d] for d in args.dtypes.split(",") if d]
    modes = [m for m in args.modes.split(",") if m]
    cases = SMALL + ([] if args.quick else MODERATE)
    failures = 0
    calls = 0
    for dtype in dtypes:
        for kind, shape, dim in cases:
            per_mode = []
            for mode in modes:
                per_mode.append(run_case(kind, shape, dim, dtype, mode))
                calls += 6
            sync()
            for i, t in enumerate(per_mode[0]):
                if not torch.isfinite(t).all():
                    print(f"FAIL: non-finite result {i}: {kind} {shape} {dtype}")
                    failures += 1
            for mode, result in zip(modes[1:], per_mode[1:]):
                for i, (a, b) in enumerate(zip(result, per_mode[0])):
                    if not torch.equal(a, b):
                        print(f"FAIL: mode {mode} differs from {modes[0]} (result {i}): {kind} {shape} {dtype}")
                        failures += 1
    os.environ.pop("BSN_CUDA_MODE", None)
    os.environ.pop("BSN_CUDA_TEST_COOP_OVERSUBSCRIBE", None)
    sync()
    print(f"sanitize_ops: {calls} op calls, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
