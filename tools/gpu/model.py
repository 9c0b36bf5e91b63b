"""Predicted GPU time of the fused SN / BSN per benchmark layer (a bandwidth model).

    python tools/gpu/model.py [--gpu h200|h100] [--out tools/gpu/model_predictions.md]

The launch plans come from csrc/cuda/plan.cpp itself (tests/cuda/cuda_plan_dump.cpp,
built here with the host compiler), so the model follows the code: which mode,
how many kernels and grid barriers, how many passes over W, and the workspace
traffic of the chunk partials. Time = sum over phases of bytes / (bandwidth x
that phase's efficiency) + launches x gap + grid barriers x cost. The
efficiencies are assumptions from a reading of the sm_90 SASS (issue 10). Phase
A was 0.60 when it issued scalar loads at 2 blocks per SM (112-127 registers);
it now reads the row pair's rows with 128-bit loads (4x the bytes in flight per
load instruction), so 0.70 is assumed until a GPU measures it. Its kernel
allows 4 blocks per SM (64 registers), but on 132 SMs the plan's at most 264
chunks (kMaxChunksA) still give 2 per SM, and the fused Coop kernel (122-128
registers) fits 2. The strided pair's q loop (BSN pair 1, SN dim > 0) still
loads scalars. The elementwise passes stream. It is
GPU time of the ops alone (back-to-back, L2 flushed), not the module API's host
overhead; the first GPU run (tools/gpu/gpu_check.sh) measures against it.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

GPUS = {
    # HBM bandwidth a device-to-device copy reaches (KINDS.md: ~4.3 TB/s on an H200),
    # and the nominal figure for an H100 SXM scaled the same way.
    "h200": dict(name="H200", bw=4.3e12, sms=132, optin=232448),
    "h100": dict(name="H100 SXM", bw=3.0e12, sms=132, optin=232448),
}
EFF = {"A": 0.70, "B": 0.70, "C": 0.70, "D": 0.85, "BW": 0.85}  # fraction of bw per phase
LAUNCH_GAP = 2.5e-6  # between dependent kernels of one stream (Multi)
COOP_LAUNCH = 4.0e-6  # one cooperative launch
GRID_SYNC = 1.5e-6  # one grid.sync() on 132 SMs
SINGLE_BW = 40e9  # one block (Single mode: weights <= 16384 elements)
BLOCK_SYNC = 0.3e-6  # __syncthreads-separated phase in one block


def build_dump():
    import torch

    tdir = os.path.dirname(torch.__file__)
    exe = os.path.join(tempfile.mkdtemp(), "cuda_plan_dump")
    cxx = shutil.which(os.environ.get("CXX", "g++")) or "c++"
    subprocess.run([cxx, "-std=c++20", "-O1", "-I" + os.path.join(ROOT, "csrc"), "-I" + os.path.join(tdir, "include"),
                    os.path.join(ROOT, "tests", "cuda", "cuda_plan_dump.cpp"), os.path.join(ROOT, "csrc", "cuda", "plan.cpp"),
                    "-o", exe, "-L" + os.path.join(tdir, "lib"), "-lc10", "-Wl,-rpath," + os.path.join(tdir, "lib")],
                   check=True)
    return exe


def plans(exe, reqs):
    lines = [" ".join(map(str, r)) for r in reqs]
    out = subprocess.run([exe], input="\n".join(lines) + "\n", check=True, capture_output=True, text=True).stdout
    return [json.loads(x) for x in out.splitlines()]


def forward_time(p, gpu, s=4):
    """Seconds of one forward (p: a forward plan), s: bytes per weight element."""
    E, acc = p["numel"], 4
    if p["mode"] == 1:  # Single: one block does everything
        return (p["elem_passes"] * E * s) / SINGLE_BW + p["phases"] * BLOCK_SYNC + COOP_LAUNCH
    bw = gpu["bw"]
    t = 0.0
    iters = p["n_iter"] if p["update"] else 1
    partials = p["a_chunks"] * p["cols"] * acc * (1 if p["update"] and p["has_row"] else 0)
    partials += p["a_chunks"] * p["sm"] * acc * (1 if p["update"] and p["has_str"] else 0)
    if not p["a_acc_smem"]:
        partials += 2 * p["a_chunks"] * p["cols"] * acc  # q accumulated in global memory
    for _ in range(iters):
        t += (E * s + partials) / (bw * EFF["A"])
        if p["update"]:
            t += partials / (bw * EFF["B"])
            if p["has_str"]:
                t += E * s / (bw * EFF["C"])
    t += 2 * E * s / (bw * EFF["D"])
    if p["mode"] == 3:
        t += p["launches"] * LAUNCH_GAP
    else:
        t += COOP_LAUNCH + p["grid_syncs"] * GRID_SYNC
    return t


def backward_time(p, gpu, s=4):
    E = p["numel"]
    if p["mode"] == 1:
        return 4 * E * s / SINGLE_BW + 2 * BLOCK_SYNC + COOP_LAUNCH
    t = 4 * E * s / (gpu["bw"] * EFF["BW"])
    return t + (2 * LAUNCH_GAP if p["mode"] == 3 else COOP_LAUNCH + GRID_SYNC)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h200", choices=list(GPUS))
    ap.add_argument("--out", default=os.path.join(HERE, "model_predictions.md"))
    args = ap.parse_args(argv)
    gpu = GPUS[args.gpu]
    from bsn_cuda.benchmark import SUITES

    exe = build_dump()
    dev = [gpu["sms"], gpu["optin"], 1]
    rows = []
    for suite, spec in SUITES.items():
        seen = set()
        for name, _, shape, _ in spec["layers"]:
            if tuple(shape) in seen:
                continue
            seen.add(tuple(shape))
            shp = [len(shape), *shape]
            reqs = [["fwd", 0, 0, 4, 1, 1, 0, *dev, *shp], ["fwd", 1, 0, 4, 1, 1, 0, *dev, *shp],
                    ["fwd", 0, 0, 4, 1, 0, 0, *dev, *shp], ["bwd", 0, 0, 4, 1, 1, 0, *dev, *shp],
                    ["bwd", 1, 0, 4, 1, 1, 0, *dev, *shp]]
            sn_t, bsn_t, sn_e, sn_b, bsn_b = plans(exe, reqs)
            E = math.prod(shape)
            roof = 3 * E * 4 / gpu["bw"]  # SN training forward: read W twice, write out once
            f_sn, f_bsn = forward_time(sn_t, gpu), forward_time(bsn_t, gpu)
            rows.append((suite, name, shape, E, "SCM"[sn_t["mode"] - 1], sn_t["launches"], f_sn,
                         "SCM"[bsn_t["mode"] - 1], bsn_t["launches"], f_bsn, forward_time(sn_e, gpu),
                         f_sn + backward_time(sn_b, gpu), f_bsn + backward_time(bsn_b, gpu), roof / f_sn))
    us = lambda x: f"{x * 1e6:.1f}"
    lines = [
        f"# Model predictions: fused SN / BSN on one {gpu['name']} (float32)",
        "",
        f"Generated by `python tools/gpu/model.py --gpu {args.gpu}` from the launch plans of",
        "csrc/cuda/plan.cpp; see the script's docstring for the model and its assumptions",
        f"(bandwidth {gpu['bw'] / 1e12:.1f} TB/s; phase efficiencies {EFF}; launch gap",
        f"{LAUNCH_GAP * 1e6:.1f} us, cooperative launch {COOP_LAUNCH * 1e6:.1f} us, grid sync {GRID_SYNC * 1e6:.1f} us).",
        "GPU time of the op alone, one power iteration, in microseconds; the benchmark's",
        "module-API numbers add the host's per-call overhead (tens of microseconds), which",
        "dominates every layer below about a million elements. Mode: S single block, C",
        "cooperative, M one kernel per phase (launches in parentheses). SN roofline: the",
        "training forward's 3 passes over W at full bandwidth, as a fraction of the prediction.",
        "",
        "| suite | layer | shape | numel | SN train fwd | BSN train fwd | SN eval fwd | SN fwd+bwd | BSN fwd+bwd | BSN/SN fwd | SN fwd vs roofline |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (suite, name, shape, E, m_sn, l_sn, f_sn, m_bsn, l_bsn, f_bsn, e_sn, fb_sn, fb_bsn, roof) in rows:
        lines.append(f"| {suite} | {name} | {list(shape)} | {E:,} | {us(f_sn)} ({m_sn}{l_sn}) | {us(f_bsn)} ({m_bsn}{l_bsn}) | "
                     f"{us(e_sn)} | {us(fb_sn)} | {us(fb_bsn)} | {f_bsn / f_sn:.2f} | {roof:.0%} |")
    lines += ["", "Measured (fill in from the first GPU run's bench.md / bench.json, same layers): see",
              "tools/gpu/gpu_check.sh's OUTDIR/bench.md.", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
