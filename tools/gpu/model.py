"""Predicted GPU time of the fused SN / BSN per benchmark layer (a bandwidth model).

    python tools/gpu/model.py [--gpu h200|h100] [--out tools/gpu/model_predictions.md]

The launch plans come from csrc/cuda/plan.cpp itself (tests/cuda/cuda_plan_dump.cpp,
built here with the host compiler), so the model follows the code: which mode,
how many kernels and grid barriers, how many passes over W, and the workspace
traffic of the chunk partials. Time = sum over phases of max(bandwidth time,
latency time) + launches x gap + grid barriers x cost. Bandwidth time: bytes /
(bandwidth x that phase's efficiency; assumptions from a reading of the sm_90
SASS, issue 10). Latency time (added 2026-12-02): a block whose next loads wait
for its previous ones (phase A: a row's loads wait for the previous row's block
reduction; phase B: a warp's chunk loop) needs rounds x LAT per item, and a
grid of at most the resident blocks takes ceil(items / resident) items each;
with few large items (8192-element chunks: 8 chunks of 8 rows for a [64, 64,
4, 4] weight on 132 SMs) this, not the bandwidth, is the time. Phase A is
assumed at 0.70 with 128-bit loads; the strided pair's q loop (BSN pair 1, SN
dim > 0) still loads scalars. The elementwise passes stream. It is GPU time of
the ops alone (back-to-back, L2 flushed), not the module API's host overhead;
the first GPU run (tools/gpu/gpu_check.sh) measures against it, LAT_* included.
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
# Latency: a block whose loads depend on its previous loads' results (a row's reduction
# before the next row) waits this long per round of loads, whatever the bandwidth.
LAT_HBM = 0.6e-6  # a round of loads from HBM under load
LAT_L2 = 0.3e-6  # a round of loads that hit L2 (partials, W read again in phase C)
L2_BW = 5.5e12  # L2 bandwidth (global-memory accumulators)
SM_SMEM = 233472  # shared memory per SM (228 KiB; a block also reserves 1 KiB)
# Loads in flight per thread (forward.cu's unrolls): phase A's 128-bit row loads and
# phase B's partial loads, in their own kernels (Multi) and in the fused kernel (Coop).
UNROLL = {"A": 4, "B": 8, "A_fused": 4, "B_fused": 4}


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


def resident(p, gpu, kind):
    """Blocks of a phase resident at once on the device (the grid of one wave)."""
    sms = gpu["sms"]
    if p["mode"] == 2:  # the fused Coop kernel: 2 blocks per SM (its register cap), fewer if the smem says so
        return sms * max(1, min(2, SM_SMEM // (p["a_smem"] + 1024)))
    if kind == "A":  # phase A's kernel: 4 blocks per SM (registers), fewer if its shared memory says so
        return sms * max(1, min(4, SM_SMEM // (p["a_smem"] + 1024)))
    return sms * 8


def phase(bytes_, bw, rounds_per_block, items, res, lat):
    """max(bandwidth time, latency time): a block runs `rounds_per_block` dependent rounds of
    loads per item, and a grid of at most `res` blocks takes ceil(items / res) items each."""
    if items <= 0:
        return bytes_ / bw
    return max(bytes_ / bw, rounds_per_block * lat * math.ceil(items / res))


def forward_time(p, gpu, s=4):
    """Seconds of one forward (p: a forward plan), s: bytes per weight element."""
    E, acc = p["numel"], 4
    if p["mode"] == 1:  # Single: one block does everything
        return (p["elem_passes"] * E * s) / SINGLE_BW + p["phases"] * BLOCK_SYNC + COOP_LAUNCH
    bw = gpu["bw"]
    t = 0.0
    iters = p["n_iter"] if p["update"] else 1
    rows, cols, chunks, rpc = p["rows"], p["cols"], p["a_chunks"], p["a_rpc"]
    partials = chunks * cols * acc * (1 if p["update"] and p["has_row"] else 0)
    partials += chunks * p["sm"] * acc * (1 if p["update"] and p["has_str"] else 0)
    # Phase A, per block: its rows one after the other (a row's loads wait for the previous
    # row's block reduction); a row is ceil(cols / (kThreads * 16 B * unroll)) rounds of
    # 128-bit loads in block mode; warp mode has 8 rows (one per warp) in flight, one round each.
    fused = p["mode"] == 2
    if p["a_warp"]:
        rounds_a = math.ceil(rpc / 8)
    else:
        rounds_a = rpc * math.ceil(cols * s / (256 * 16 * UNROLL["A_fused" if fused else "A"]))
    extra_l2 = 0.0
    if not p["a_acc_smem"]:
        # Accumulators in global memory: every row loads and stores a_narr arrays of cols
        # entries (L2 traffic: L1 is write-through).
        extra_l2 = 2 * p["a_narr"] * E * acc
    res_a = resident(p, gpu, "A")
    items_b = p["b_items0"] + p["b_items1"]
    # Phase B, per item: its 32-column slabs, each a warp's chunks (a_chunks / 8 per warp),
    # UNROLL loads in flight, from L2.
    rounds_b = (math.ceil(max(p["b_cpi0"] if p["b_items0"] else p["b_cpi1"], 32) / 32) *
                math.ceil(chunks / 8 / UNROLL["B_fused" if fused else "B"]))
    # Phase C: per row, ceil(cols / (group * 4)) rounds (unroll 4); 8 rows at once in warp mode.
    gt = 32 if p["c_warp"] else 256
    rounds_c = math.ceil(p["c_rpc"] / (8 if p["c_warp"] else 1)) * math.ceil(cols / (gt * 4))
    for _ in range(iters):
        t += phase(E * s + partials, bw * EFF["A"], rounds_a, chunks, res_a, LAT_HBM) + extra_l2 / L2_BW
        if p["update"]:
            t += phase(partials, bw * EFF["B"], rounds_b, items_b, resident(p, gpu, "B"), LAT_L2)
            if p["has_str"]:
                t += phase(E * s, bw * EFF["C"], rounds_c, p["c_chunks"], resident(p, gpu, "C"), LAT_L2)
    # Phase D: one round of loads per tile (kEPT elements per thread), W from HBM.
    t += phase(2 * E * s, bw * EFF["D"], 1, p["e_tiles"], resident(p, gpu, "D"), LAT_HBM)
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
        f"{LAUNCH_GAP * 1e6:.1f} us, cooperative launch {COOP_LAUNCH * 1e6:.1f} us, grid sync {GRID_SYNC * 1e6:.1f} us;",
        f"a round of dependent loads {LAT_HBM * 1e6:.1f} us from HBM, {LAT_L2 * 1e6:.1f} us from L2; unrolls {UNROLL}).",
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
