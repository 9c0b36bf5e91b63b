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


def forward_phases(p, gpu, s=4):
    """The phases of a forward in Multi / Coop order: (name, bytes, efficiency, dependent rounds
    of loads per item, items, latency per round), without launches and barriers."""
    E, acc = p["numel"], 4
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
    # Accumulators in global memory: every row loads and stores a_narr arrays of cols
    # entries (L2 traffic: L1 is write-through), at L2 bandwidth: as bytes at bw * L2_BW / bw.
    extra_l2 = 0.0 if p["a_acc_smem"] else 2 * p["a_narr"] * E * acc
    items_b = p["b_items0"] + p["b_items1"]
    # Phase B, per item: its 32-column slabs, each a warp's chunks (a_chunks / 8 per warp),
    # UNROLL loads in flight, from L2.
    rounds_b = (math.ceil(max(p["b_cpi0"] if p["b_items0"] else p["b_cpi1"], 32) / 32) *
                math.ceil(chunks / 8 / UNROLL["B_fused" if fused else "B"]))
    # Phase C: per row, ceil(cols / (group * 4)) rounds (unroll 4); 8 rows at once in warp mode.
    gt = 32 if p["c_warp"] else 256
    rounds_c = math.ceil(p["c_rpc"] / (8 if p["c_warp"] else 1)) * math.ceil(cols / (gt * 4))
    out = []
    for _ in range(iters):
        out.append(("A", E * s + partials, EFF["A"], rounds_a, chunks, LAT_HBM, extra_l2))
        if p["update"]:
            out.append(("B", partials, EFF["B"], rounds_b, items_b, LAT_L2, 0.0))
            if p["has_str"]:
                out.append(("C", E * s, EFF["C"], rounds_c, p["c_chunks"], LAT_L2, 0.0))
    # Phase D: one round of loads per tile (kEPT elements per thread), W from HBM.
    out.append(("D", 2 * E * s, EFF["D"], 1, p["e_tiles"], LAT_HBM, 0.0))
    return out


def forward_time(p, gpu, s=4):
    """Seconds of one forward (p: a forward plan), s: bytes per weight element."""
    E = p["numel"]
    if p["mode"] == 1:  # Single: one block does everything
        return (p["elem_passes"] * E * s) / SINGLE_BW + p["phases"] * BLOCK_SYNC + COOP_LAUNCH
    bw = gpu["bw"]
    t = 0.0
    for name, bytes_, eff, rounds, items, lat, extra_l2 in forward_phases(p, gpu, s):
        t += phase(bytes_, bw * eff, rounds, items, resident(p, gpu, name), lat) + extra_l2 / L2_BW
    if p["mode"] == 3:
        t += p["launches"] * LAUNCH_GAP
    else:
        t += COOP_LAUNCH + p["grid_syncs"] * GRID_SYNC
    return t


# Grouped launches (launch.cu, "Grouped launches"): launch k runs phase k of every layer.
GROUP_PER_SM = 2  # the grouped forward kernel's register cap (128 registers, group.cuh)
TABLE_COPY = 2.5e-6  # the descriptor table's host-to-device copy before the first launch
TABLE_BW = 25e9  # its bytes over PCIe (pinned)


def group_step_time(items, gpu):
    """One grouped launch. items: per layer (bytes, eff, rounds, items, lat, extra_l2, a_smem).
    Every layer's run has min(items, wave) blocks; runs share the device, so the launch takes the
    sum of the bytes at bandwidth, or the slowest run's latency chain times the waves the whole
    grid needs, whichever is longer."""
    smem = max(x[6] for x in items)
    per_sm = max(1, min(GROUP_PER_SM, SM_SMEM // (smem + 1024)))
    res = gpu["sms"] * per_sm
    blocks = sum(max(1, min(n, res)) for _, _, _, n, _, _, _ in items)
    waves = math.ceil(blocks / res)
    bw_t = sum(b / (gpu["bw"] * e) + x / L2_BW for b, e, _, _, _, x, _ in items)
    lat_t = max(r * lat * math.ceil(n / max(1, min(n, res))) for _, _, r, n, lat, _, _ in items) * waves
    return max(bw_t, lat_t) + LAUNCH_GAP


def group_forward_time(ps, gpu, s=4, table_bytes=0):
    """Seconds of one grouped forward of the layers' Multi plans ps."""
    seqs = []
    for p in ps:
        seq = []
        for name, b, e, r, n, lat, x in forward_phases(p, gpu, s):
            seq.append((b, e, r, n, lat, x, p["a_smem"] if name == "A" else 0))
        seqs.append(seq)
    t = TABLE_COPY + table_bytes / TABLE_BW
    for k in range(max(len(q) for q in seqs)):
        t += group_step_time([q[k] for q in seqs if k < len(q)], gpu)
    return t


def group_backward_time(ps, gpu, s=4, table_bytes=0):
    """Seconds of one grouped backward: BW1 (<G, W>: G and W) and BW2 (G in, grad out)."""
    steps = [[(2 * p["numel"] * s, EFF["BW"], 1, p["items"], LAT_HBM, 0.0, 0) for p in ps],
             [(2 * p["numel"] * s, EFF["BW"], 1, p["e_tiles"], LAT_HBM, 0.0, 0) for p in ps]]
    return TABLE_COPY + table_bytes / TABLE_BW + sum(group_step_time(st, gpu) for st in steps)


def backward_time(p, gpu, s=4):
    E = p["numel"]
    if p["mode"] == 1:
        return 4 * E * s / SINGLE_BW + 2 * BLOCK_SYNC + COOP_LAUNCH
    t = 4 * E * s / (gpu["bw"] * EFF["BW"])
    return t + (2 * LAUNCH_GAP if p["mode"] == 3 else COOP_LAUNCH + GRID_SYNC)


FWD_ARGS_BYTES, BWD_ARGS_BYTES, ENTRY_BYTES = 464, 248, 24  # sizeof(FwdArgs<float>), BwdArgs, GroupEntry


def group_section(exe, gpu, dev, layers):
    """An SNGAN CNN D step's spectral norms (every layer: SN training forward, one
    iteration, and its backward): per-layer ops (each in its Auto mode) against the
    grouped launches (one per phase step), and the floor the issue sets them against."""
    shapes = [list(shape) for _, _, shape, _ in layers]
    multi = [d for d in dev]
    auto_f, auto_b, grp_f, grp_b = [], [], [], []
    for shape in shapes:
        shp = [len(shape), *shape]
        a_f, a_b, m_f, m_b = plans(exe, [["fwd", 0, 0, 4, 1, 1, 0, *dev, *shp], ["bwd", 0, 0, 4, 1, 1, 0, *dev, *shp],
                                          ["fwd", 0, 0, 4, 1, 1, 3, *multi, *shp], ["bwd", 0, 0, 4, 1, 1, 3, *multi, *shp]])
        auto_f.append(a_f)
        auto_b.append(a_b)
        grp_f.append(m_f)
        grp_b.append(m_b)
    n = len(shapes)
    steps_f = max(p["phases"] for p in grp_f)
    table_f = n * FWD_ARGS_BYTES + sum(p["phases"] for p in grp_f) * ENTRY_BYTES
    table_b = n * BWD_ARGS_BYTES + 2 * n * ENTRY_BYTES
    per_f = sum(forward_time(p, gpu) for p in auto_f)
    per_b = sum(backward_time(p, gpu) for p in auto_b)
    g_f = group_forward_time(grp_f, gpu, table_bytes=table_f)
    g_b = group_backward_time(grp_b, gpu, table_bytes=table_b)
    E = sum(math.prod(s) for s in shapes)
    one_pass = E * 4 / 3.35e12
    passes = 7 * E * 4 / gpu["bw"]  # forward: W twice, out once; backward: G, W, then G, grad
    fixed = 2 * TABLE_COPY + (table_f + table_b) / TABLE_BW + (steps_f + 2) * LAUNCH_GAP
    us = lambda x: f"{x * 1e6:.1f}"
    return [
        "## Grouped launches: an SNGAN CNN D step (issue 22)",
        "",
        f"The {n} SN layers of the SNGAN CNN discriminator ({', '.join(str(s) for s in shapes)};",
        f"{E:,} float32 elements, {E * 4 / 1e6:.1f} MB), SN training forward (one power iteration)",
        "and backward, GPU time of the ops alone. Per layer: each layer's own launches in its Auto",
        "mode, one after another (the sums of the table above). Grouped (launch.cu, \"Grouped",
        "launches\"): one launch per phase step for all layers (forward: A, B, D; backward: BW1,",
        "BW2), each layer's run at most one wave of its phase's items; a launch takes the sum of its",
        "layers' bytes at bandwidth or the slowest layer's latency chain (times the waves of the",
        f"whole grid), plus the launch gap; plus the table's copy ({TABLE_COPY * 1e6:.1f} us + bytes at",
        f"{TABLE_BW / 1e9:.0f} GB/s; {table_f:,} B forward, {table_b:,} B backward) before the first",
        f"launch; the grouped kernel at {GROUP_PER_SM} blocks per SM.",
        "",
        "| | launches | forward | backward | D step (fwd + bwd) |",
        "|---|---:|---:|---:|---:|",
        f"| per layer (Auto modes) | {sum(p['launches'] for p in auto_f)} + {sum(p['launches'] for p in auto_b)} | "
        f"{us(per_f)} | {us(per_b)} | {us(per_f + per_b)} |",
        f"| grouped | {steps_f} + 2 | {us(g_f)} | {us(g_b)} | {us(g_f + g_b)} |",
        f"| floor: 7 passes over the weights at {gpu['bw'] / 1e12:.1f} TB/s | | | | {us(passes)} |",
        f"| one pass over the {E * 4 / 1e6:.1f} MB at 3.35 TB/s (the issue's yardstick) | | | | {us(one_pass)} |",
        "",
        f"Grouped / one pass: {(g_f + g_b) / one_pass:.1f}x (per layer: {(per_f + per_b) / one_pass:.1f}x). Of the grouped",
        f"{us(g_f + g_b)} us, {us(fixed)} are the two table copies and {steps_f + 2} launch gaps; the rest is the phases",
        f"themselves ({us(g_f + g_b - fixed)} us against the {us(passes)} us of 7 passes at full bandwidth: the phase",
        "efficiencies and the largest layers' chains of dependent loads).",
        "",
    ]


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
    lines += group_section(exe, gpu, dev, SUITES["sngan_cnn"]["layers"])
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
