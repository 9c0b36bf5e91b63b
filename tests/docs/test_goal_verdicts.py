"""A goal is met only when its margin exceeds the spread the benchmark records
(the quartiles of the per-call times); saved results without quartiles are
judged on the value alone and say so."""

import math

import pytest

from bsn_cuda.benchmark import host_overhead
from bsn_cuda.benchmark.summary import judge_goals, ratio_band, summarize, verdict


@pytest.mark.parametrize("value, op, threshold, band, threshold_band, status", [
    (3.76, ">=", 3.0, [3.15, 4.81], None, "met"),                     # margin 0.76 > spread 0.61
    (3.76, ">=", 5.0, [3.15, 4.81], None, "NOT met"),                 # misses by 1.24 > 1.05
    (3.10, ">=", 3.0, [2.80, 3.40], None, "within noise"),            # margin 0.10 < spread 0.30
    (2.90, ">=", 3.0, [2.80, 3.40], None, "within noise"),            # misses by 0.10 < 0.50
    (1.38, "<=", 1.3, [1.11, 1.76], None, "within noise"),
    (1.38, "<=", 1.2, [1.35, 1.41], None, "NOT met"),
    (1.21, "<=", 1.3, [1.18, 1.25], None, "met"),
    # a threshold that is itself measured: both bands count
    (3.79, ">=", 3.76, [3.78, 3.80], [3.70, 3.82], "within noise"),
    (3.90, ">=", 3.76, [3.85, 3.95], [3.70, 3.82], "met"),
])
def test_met_needs_a_margin_larger_than_the_spread(value, op, threshold, band, threshold_band, status):
    got = verdict(value, op, threshold, band, threshold_band)
    assert got["status"] == status, got
    sign = 1 if op == ">=" else -1
    assert math.isclose(got["margin"], sign * (value - threshold))


def test_without_a_band_the_verdict_says_so():
    assert verdict(3.01, ">=", 3.0)["status"] == "met (no spread recorded)"
    assert verdict(1.31, "<=", 1.3)["status"] == "NOT met (no spread recorded)"


def _rec(impl, mode, layer, median, q1, q3):
    return {"impl": impl, "mode": mode, "suite": "sngan_cnn", "layer": layer, "device": "cpu",
            "shape": [64, 3, 3, 3], "count": 1, "median_s": median, "q1_s": q1, "q3_s": q3}


def _records(quartiles=True):
    recs = []
    for layer, k in (("c0", 1.0), ("c1", 2.0)):
        for impl, t in (("torch_sn", 4.0), ("fused_sn", 1.0), ("fused_bsn", 1.2)):
            r = _rec(impl, "fwd_bwd", layer, k * t, k * t * 0.9, k * t * 1.1)
            if not quartiles:
                del r["q1_s"], r["q3_s"]
            recs.append(r)
    return recs


def test_summary_bands_come_from_the_quartiles():
    s = summarize(_records())[0][0]
    assert math.isclose(s["vs_torch_sn"], 4.0)
    lo, hi = s["band"]["vs_torch_sn"]
    assert math.isclose(lo, 4.0 * 0.9 / 1.1) and math.isclose(hi, 4.0 * 1.1 / 0.9)
    assert ratio_band({"q1_s": 1.0}, {"q3_s": 2.0}) is None  # a quartile missing: no band


def test_goals_of_a_result_without_quartiles_are_labelled():
    summary, _ = summarize(_records(quartiles=False))
    goals = {g["id"]: g for g in judge_goals(summary, {"cpu": True}, "float32", 2)}
    assert goals["fwd_bwd_3x"]["status"] == "met (no spread recorded)" and goals["fwd_bwd_3x"]["spread"] is None
    with_q = {g["id"]: g for g in judge_goals(summarize(_records())[0], {"cpu": True}, "float32", 2)}
    # 4.0 against 3: band 3.27-4.89, margin 1.0 > spread 0.73
    assert with_q["fwd_bwd_3x"]["status"] == "met"
    assert with_q["bsn_fwd_bwd_1.3"]["status"] == "within noise"  # 1.2 within 0.98-1.47 of 1.3


def test_host_goals_carry_band_and_verdict():
    recs = [{"kind": kind, "mode": "train", "impl": impl, "median_s": t, "q1_s": t * 0.99, "q3_s": t * 1.01}
            for kind in host_overhead.KINDS
            for impl, t in (("identity", 5e-6), ("torch_sn", 50e-6), ("fused", 11e-6), ("functional", 7e-6))]
    goals = [g for g in host_overhead.judge_host_goals(recs) if g["id"] == "host_train_3id"]
    assert len(goals) == len(host_overhead.KINDS)
    assert all(g["status"] == "met" and g["band"][0] < g["value"] < g["band"][1] for g in goals), goals


def test_a_host_goal_without_records_shows_unjudged():
    """A saved run older than a goal's mode (e.g. eval_cached) lists the goal as not measured."""
    recs = [{"kind": kind, "mode": "train", "impl": impl, "median_s": 1e-5, "q1_s": 1e-5, "q3_s": 1e-5}
            for kind in host_overhead.KINDS for impl in host_overhead.IMPLS]
    goals = host_overhead.judge_host_goals(recs)
    assert len(goals) == len(host_overhead.GOALS) * len(host_overhead.KINDS)
    missing = {g["status"] for g in goals if g["value"] is None}
    assert missing == {f"not measured (no {mode} records)" for _, _, mode, *_ in host_overhead.GOALS if mode != "train"}
