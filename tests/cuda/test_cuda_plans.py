"""The CUDA backend's launch plans (csrc/cuda/plan.cpp), tested on the CPU.

tests/cuda/cuda_plan_dump.cpp is built with the host compiler against plan.cpp and
prints plans as JSON. They are checked against an independent Python account
of the rules (chunks, items, shared memory, mode, launches and barriers) for
every layer of every benchmark suite on an H100/H200, and for invariants
(workspace regions disjoint and inside the workspace, shared memory within the
device's limit, chunks covering the rows, the backward's index increments).
No GPU and no CUDA toolkit needed; skipped without a C++ compiler.
"""

import json
import math
import os
import shutil
import subprocess

import pytest
import torch
from conftest import REPO_ROOT as ROOT

from bsn_cuda.benchmark import SUITES

TORCH_DIR = os.path.dirname(torch.__file__)

# Constants of csrc/cuda/plan.h.
THREADS, SCR, TILE = 256, 64, 256 * 8
WARP_COLS_MAX = 256
MIN_CHUNK_ELEMS, MAX_CHUNKS_A, MAX_CHUNKS_C, MAX_ITEMS_B, MAX_ITEMS_BW = 1024, 264, 1024, 1024, 1024
PARTIAL_ELEMS, MIN_ITEM_ELEMS_BW = 1 << 17, 16384
TINY, COOP_MAX, SMEM_CAP, BLOCKS_PER_SM = 16384, 1 << 22, 112640, 8
AUTO, SINGLE, COOP, MULTI = 0, 1, 2, 3

# H100 SXM / H200: 132 SMs, 227 KiB of opt-in shared memory per block.
H100 = dict(sms=132, optin=232448, coop=1)


@pytest.fixture(scope="module")
def plan_dump(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = str(tmp_path_factory.mktemp("plans") / "cuda_plan_dump")
    # libc10's C++ ABI (older torch wheels, 2.4 among them, use the pre-C++11 std::string), or TORCH_CHECK
    # does not link.
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    cmd = [cxx, "-std=c++20", "-O1", abi, "-I" + os.path.join(ROOT, "csrc"), "-I" + os.path.join(TORCH_DIR, "include"),
           os.path.join(ROOT, "tests", "cuda", "cuda_plan_dump.cpp"), os.path.join(ROOT, "csrc", "cuda", "plan.cpp"),
           "-o", exe, "-L" + os.path.join(TORCH_DIR, "lib"), "-lc10", "-Wl,-rpath," + os.path.join(TORCH_DIR, "lib")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)

    def run(requests):
        lines = []
        for r in requests:
            kind, bsn, dim, acc, n_iter, update, mode, dev, shape = r
            lines.append(" ".join(map(str, [kind, int(bsn), dim, acc, n_iter, int(update), mode, dev["sms"],
                                            dev["optin"], dev["coop"], len(shape), *shape])))
        out = subprocess.run([exe], input="\n".join(lines) + "\n", check=True, capture_output=True, text=True).stdout
        return [json.loads(x) for x in out.splitlines()]

    return run


def cdiv(a, b):
    return -(-a // b)


def structure(shape, bsn, dim):
    """rows, cols, sm, sr, has_row, has_str of the row view (see plan.h)."""
    numel = math.prod(shape)
    if bsn:
        return shape[0], numel // shape[0], shape[1], math.prod(shape[2:]), 1, 1
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    if outer == 1:
        return shape[dim], numel // shape[dim], 1, 1, 1, 0
    return outer, shape[dim] * inner, shape[dim], inner, 0, 1


def chunks(rows, numel, max_chunks, min_rpc=1):
    n = max(1, min(cdiv(numel, MIN_CHUNK_ELEMS), cdiv(rows, min_rpc), rows, max_chunks))
    rpc = cdiv(rows, n)
    return cdiv(rows, rpc), rpc


def expected_mode(requested, numel, dev):
    if requested == SINGLE or requested == MULTI:
        return requested
    if requested == COOP:
        return COOP if dev["coop"] else MULTI
    if numel <= TINY:
        return SINGLE
    return COOP if dev["coop"] and numel <= COOP_MAX else MULTI


def expected_forward(shape, bsn, dim, acc, n_iter, update, mode, dev):
    numel = math.prod(shape)
    rows, cols, sm, sr, has_row, has_str = structure(shape, bsn, dim)
    e = dict(rows=rows, cols=cols, sm=sm, sr=sr, has_row=has_row, has_str=has_str, numel=numel)
    scratch = (THREADS + SCR) * acc
    narr = (1 if update and has_row else 0) + has_str
    e["a_warp"] = int(cols <= WARP_COLS_MAX)
    groups = 8 if e["a_warp"] else 1
    cap = min(SMEM_CAP, dev["optin"])
    if narr == 0:
        e["a_acc_smem"], e["a_smem"] = 1, scratch
    else:
        per_col = groups * narr * acc
        fits = lambda b: b > scratch and cols <= (b - scratch) // per_col
        # 2 blocks per SM up to SMEM_CAP, else the opt-in maximum, else global memory.
        e["a_acc_smem"] = int(fits(cap) or fits(dev["optin"]))
        e["a_smem"] = scratch + (per_col * cols if e["a_acc_smem"] else 0)
    e["a_narr"] = narr
    # t partials (chunks x cols) above PARTIAL_ELEMS: at least 2 rows per chunk.
    min_rpc = 2 if update and has_row and numel > PARTIAL_ELEMS else 1
    e["a_chunks"], e["a_rpc"] = chunks(rows, numel, MAX_CHUNKS_A, min_rpc)
    e["c_chunks"], e["c_rpc"] = chunks(rows, numel, MAX_CHUNKS_C)
    per_item = lambda n: 32 * max(1, cdiv(cdiv(n, 32), MAX_ITEMS_B))
    e["b_items0"] = cdiv(cols, per_item(cols)) if update and has_row else 0
    e["b_items1"] = cdiv(sm, per_item(sm)) if update and has_str else 0
    e["e_tiles"] = cdiv(numel, TILE)
    e["scratch_smem"] = scratch
    e["grid_cap"] = dev["sms"] * BLOCKS_PER_SM
    e["mode"] = expected_mode(mode, numel, dev)
    phases = n_iter * (2 + has_str) + (n_iter - 1) + 1 if update else 2
    e["phases"], e["grid_syncs"] = phases, phases - 1
    e["launches"] = phases if e["mode"] == MULTI else 1
    e["elem_passes"] = n_iter * (1 + has_str) + 2 if update else 3
    sv = rows * sr if has_str else 0
    e["max_items"] = max(e["a_chunks"], e["b_items0"] + e["b_items1"], e["c_chunks"], e["e_tiles"],
                         cdiv(max(rows, cols, sm, sv), THREADS))
    return e


def benchmark_layers():
    seen = []
    for suite in SUITES.values():
        for _, _, shape, _ in suite["layers"]:
            if tuple(shape) not in seen:
                seen.append(tuple(shape))
    return seen


LAYERS = benchmark_layers()


def forward_requests():
    reqs = []
    for shape in LAYERS:
        for bsn in (False, True):
            if bsn and len(shape) < 2:
                continue
            for acc in (4, 8):
                for n_iter, update in ((1, True), (2, True), (1, False)):
                    reqs.append(("fwd", bsn, 0, acc, n_iter, update, AUTO, H100, shape))
    return reqs


def regions(p):
    """Workspace regions a forward plan uses: (name, offset, length)."""
    out = []
    rows, cols, sm, chunks_a = p["rows"], p["cols"], p["sm"], p["a_chunks"]
    if p["update"] and p["has_row"]:
        out += [("s0", p["w_s0"], rows), ("sq0", p["w_sq0"], chunks_a), ("t0", p["w_t0"], chunks_a * cols),
                ("v0raw", p["w_v0raw"], cols), ("vp0", p["w_vp0"], p["b_items0"])]
        if p["n_iter"] > 1:
            out.append(("v0cur", p["w_v0cur"], cols))
    if p["has_str"] and not p["a_acc_smem"]:
        out.append(("q", p["w_q"], chunks_a * cols))
    if p["update"] and p["has_str"]:
        out += [("s1p", p["w_s1p"], chunks_a * sm), ("s1", p["w_s1"], sm), ("s1sq", p["w_s1sq"], p["b_items1"]),
                ("v1raw", p["w_v1raw"], p["sv"]), ("vp1", p["w_vp1"], p["c_chunks"])]
        if p["n_iter"] > 1:
            out.append(("v1cur", p["w_v1cur"], p["sv"]))
    if not p["update"]:
        if p["has_row"]:
            out.append(("sig0", p["w_sig0"], chunks_a))
        if p["has_str"]:
            out.append(("sig1", p["w_sig1"], chunks_a))
    return out


def test_forward_plans_of_benchmark_layers(plan_dump):
    reqs = forward_requests()
    plans = plan_dump(reqs)
    assert len(plans) == len(reqs)
    for req, p in zip(reqs, plans):
        _, bsn, dim, acc, n_iter, update, mode, dev, shape = req
        tag = f"{'bsn' if bsn else 'sn'} {shape} acc={acc} n_iter={n_iter} update={update}"
        assert "error" not in p, (tag, p)
        exp = expected_forward(shape, bsn, dim, acc, n_iter, update, mode, dev)
        got = {k: p[k] for k in exp}
        assert got == exp, (tag, {k: (got[k], exp[k]) for k in exp if got[k] != exp[k]})
        # Chunks cover the rows exactly once; shared memory fits the block.
        assert (p["a_chunks"] - 1) * p["a_rpc"] < p["rows"] <= p["a_chunks"] * p["a_rpc"], tag
        assert (p["c_chunks"] - 1) * p["c_rpc"] < p["rows"] <= p["c_chunks"] * p["c_rpc"], tag
        assert p["a_smem"] <= dev["optin"], tag
        # Workspace regions: 32-element aligned, disjoint, inside ws_elems.
        spans = sorted((off, off + n, name) for name, off, n in regions(p))
        for off, end, name in spans:
            assert off % 32 == 0 and end <= p["ws_elems"], (tag, name)
        for (_, end, a), (off, _, b) in zip(spans, spans[1:]):
            assert end <= off, (tag, a, b)


def test_biggan_widest_layer_plan(plan_dump):
    # BigGAN's [1536, 1536, 3, 3] (rows of 13,824): BSN training keeps phase A's
    # two accumulator arrays in shared memory (13,824 <= (112,640 - 1,280) / 8 =
    # 13,920), 256 chunks of 6 rows, Multi mode (numel > 4M): A, B, C, D.
    (bsn,) = plan_dump([("fwd", True, 0, 4, 1, True, AUTO, H100, (1536, 1536, 3, 3))])
    assert (bsn["a_acc_smem"], bsn["a_smem"], bsn["a_chunks"], bsn["a_rpc"]) == (1, 111872, 256, 6)
    assert (bsn["mode"], bsn["launches"], bsn["c_chunks"], bsn["e_tiles"]) == (MULTI, 4, 768, 10368)


def test_opt_in_shared_memory_above_the_two_blocks_cap(plan_dump):
    # Rows wider than the 2-blocks-per-SM cap keep phase A's accumulators in shared
    # memory up to the opt-in maximum (1 block per SM), and only then go global.
    reqs = [("fwd", True, 0, 4, 1, True, AUTO, H100, (2048, 2048, 3, 3)),  # BSN rows of 18,432
            ("fwd", True, 0, 4, 1, True, AUTO, dict(H100, optin=SMEM_CAP), (2048, 2048, 3, 3)),
            ("fwd", True, 0, 8, 1, True, AUTO, H100, (1536, 1536, 3, 3)),  # float64 BigGAN
            ("fwd", False, 0, 4, 1, True, AUTO, H100, (64, 57000)),  # SN, one array: up to 57,792
            ("fwd", True, 0, 4, 1, True, AUTO, H100, (8, 28896, 1)),  # BSN float32 limit: 28,896
            ("fwd", True, 0, 4, 1, True, AUTO, H100, (8, 28897, 1))]
    got = [(p["a_acc_smem"], p["a_smem"]) for p in plan_dump(reqs)]
    s4, s8 = (THREADS + SCR) * 4, (THREADS + SCR) * 8
    assert got == [(1, s4 + 8 * 18432), (0, s4), (1, s8 + 16 * 13824), (1, s4 + 4 * 57000),
                   (1, s4 + 8 * 28896), (0, s4)]
    assert got[0][1] > SMEM_CAP and got[2][1] > SMEM_CAP and got[4][1] == H100["optin"]


def test_small_weights_spread_over_many_chunks(plan_dump):
    # SNGAN CIFAR: chunks of >= 1,024 elements (64 x 1 rows for [64, 64, 4, 4]); above
    # 2^17 elements, training keeps >= 2 rows per chunk (t partials), eval does not.
    reqs = [("fwd", False, 0, 4, 1, upd, AUTO, H100, shape)
            for shape in ((64, 64, 4, 4), (128, 64, 3, 3), (256, 256, 4, 4)) for upd in (True, False)]
    got = [(p["a_chunks"], p["a_rpc"]) for p in plan_dump(reqs)]
    assert got == [(64, 1), (64, 1), (64, 2), (64, 2), (128, 2), (256, 1)]


def test_modes_and_launch_counts(plan_dump):
    shape = (64, 3, 3, 3)  # 1,728 elements: Auto picks Single
    no_coop = dict(H100, coop=0)
    reqs = [("fwd", False, 0, 4, 3, True, m, dev, shape) for m in (AUTO, SINGLE, COOP, MULTI) for dev in (H100, no_coop)]
    reqs += [("fwd", True, 0, 4, 1, True, AUTO, H100, (512, 256, 3, 3)),  # 1.2M: Coop
             ("fwd", True, 0, 4, 1, True, AUTO, no_coop, (512, 256, 3, 3)),  # no cooperative launch: Multi
             ("fwd", False, 0, 4, 1, False, AUTO, H100, (1536, 1536, 3, 3))]  # 21M: Multi, eval: A, D
    got = [(p["mode"], p["phases"], p["grid_syncs"], p["launches"]) for p in plan_dump(reqs)]
    # SN, 3 iterations: (A, B) x 3 + B2 x 2 + D = 9 phases.
    assert got == [(SINGLE, 9, 8, 1), (SINGLE, 9, 8, 1), (SINGLE, 9, 8, 1), (SINGLE, 9, 8, 1),
                   (COOP, 9, 8, 1), (MULTI, 9, 8, 9), (MULTI, 9, 8, 9), (MULTI, 9, 8, 9),
                   (COOP, 4, 3, 1), (MULTI, 4, 3, 4), (MULTI, 2, 1, 2)]


def test_strided_sn_and_warp_rows(plan_dump):
    # SN along dim 1 of a conv weight: strided pair only; narrow rows: a warp per row.
    p, q = plan_dump([("fwd", False, 1, 4, 1, True, AUTO, H100, (128, 64, 3, 3)),
                      ("fwd", False, 0, 8, 1, True, AUTO, H100, (64, 3, 3, 3))])
    assert (p["has_row"], p["has_str"], p["rows"], p["sm"], p["sr"], p["sv"]) == (0, 1, 128, 64, 9, 1152)
    assert (q["a_warp"], q["c_warp"], q["a_smem"]) == (1, 1, (THREADS + SCR) * 8 + 8 * 1 * 8 * 27)


def test_global_accumulators_when_shared_memory_is_small(plan_dump):
    # 48 KiB opt-in: rows of 13,824 no longer fit, phase A accumulates in the workspace.
    small = dict(H100, optin=48 * 1024)
    (p,) = plan_dump([("fwd", True, 0, 4, 1, True, AUTO, small, (1536, 1536, 3, 3))])
    assert (p["a_acc_smem"], p["a_smem"]) == (0, (THREADS + SCR) * 4)
    assert p["w_q"] >= 0 and ("q", p["w_q"], p["a_chunks"] * p["cols"]) in regions(p)


def test_backward_plans(plan_dump):
    reqs = []
    for shape in LAYERS:
        for bsn in (False, True):
            if not (bsn and len(shape) < 2):
                reqs.append(("bwd", bsn, 0, 4, 1, True, AUTO, H100, shape))
    reqs.append(("bwd", False, 1, 4, 1, True, AUTO, H100, (7, 5, 3, 3)))
    for req, p in zip(reqs, plan_dump(reqs)):
        _, bsn, dim, _, _, _, _, dev, shape = req
        numel = math.prod(shape)
        rows, cols, sm, sr, has_row, has_str = structure(shape, bsn, dim)
        items = max(1, min(cdiv(numel, MIN_ITEM_ELEMS_BW), MAX_ITEMS_BW))
        size = cdiv(numel, items)
        assert (p["item_size"], p["items"]) == (size, cdiv(numel, size)), req
        assert (p["items"] - 1) * p["item_size"] < numel <= p["items"] * p["item_size"], req
        assert p["e_tiles"] == cdiv(numel, TILE) and p["ws_elems"] >= p["items"], req
        assert (p["phases"], p["grid_syncs"], p["launches"]) == (2, 1, 2 if p["mode"] == MULTI else 1), req
        # bw_apply walks (i, j, r) in steps of kThreads by the plan's increments.
        tj, tr = (sm, sr) if has_str else (cols, 1)
        assert (p["tj"], p["tr"]) == (tj, tr), req
        for base in range(0, min(numel, 5000), 97):
            i, rem = divmod(base, cols)
            j, r = divmod(rem, tr)
            r += p["inc_r"]
            cy = int(r >= tr)
            r -= cy * tr
            j += p["inc_j"] + cy
            cy = int(j >= tj)
            j -= cy * tj
            i += p["inc_i"] + cy
            e = base + THREADS
            assert (i, j, r) == (e // cols, (e % cols) // tr, e % tr), (req, base)
