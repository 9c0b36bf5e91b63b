"""From records to conclusions: per-layer ratios, geometric means over a suite's
layers, model totals (sum over layers with multiplicity) and the goals judged.

Every ratio comes with a band from the quartiles of the per-call times (the
spread the benchmark records for each case): a goal is met only when its
margin exceeds that spread (see :func:`verdict`)."""

from __future__ import annotations

import math

from .suites import ALL_SUITES, BSN_RATIO, COMPARISONS, GOALS, IMPLS, MODES, bsn_effective

__all__ = ["geomean", "index", "ratio", "ratio_band", "summarize", "verdict", "judge_goals"]


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    if not xs:
        return None
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def index(records):
    """{(device, suite, layer, mode): {impl: record}}"""
    idx = {}
    for r in records:
        if "suite" not in r:
            continue
        idx.setdefault((r["device"], r["suite"], r["layer"], r["mode"]), {})[r["impl"]] = r
    return idx


def seconds(rec, metric="median_s"):
    return rec.get(metric) if rec else None


def ratio(row, num, den, metric="median_s"):
    a, b = seconds(row.get(num), metric), seconds(row.get(den), metric)
    if a is None or b is None or b <= 0:
        return None
    return a / b


def ratio_band(num, den):
    """[low, high] of time(num) / time(den) from the two records' quartiles of
    per-call times (q1/q3 .. q3/q1), or None where they are not recorded."""
    try:
        lo, hi = num["q1_s"] / den["q3_s"], num["q3_s"] / den["q1_s"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return [lo, hi] if 0 < lo <= hi and math.isfinite(hi) else None


def _geo_band(bands):
    """The geometric means of the bands' low and high ends (None if any is missing)."""
    if not bands or any(b is None for b in bands):
        return None
    return [geomean([b[0] for b in bands]), geomean([b[1] for b in bands])]


def _row_band(row, num, den):
    a, b = row.get(num), row.get(den)
    return ratio_band(a, b) if a and b else None


def summarize(records):
    """Per (device, suite, mode): geomean speedups over layers and model totals."""
    idx = index(records)
    groups = {}
    for (dev, suite, layer, mode), row in idx.items():
        groups.setdefault((dev, suite, mode), []).append(row)
    summary, models = [], []
    for (dev, suite, mode), rows in groups.items():
        s = {"device": dev, "suite": suite, "mode": mode, "layers": len(rows)}
        for key, num, den, _ in COMPARISONS:
            s[key] = geomean([ratio(r, num, den) for r in rows])
        key, num, den, _ = BSN_RATIO
        eff = [r for r in rows if bsn_effective(tuple(next(iter(r.values()))["shape"]))]
        s[key] = geomean([ratio(r, num, den) for r in eff])
        s["bsn_sn_layers"] = len(eff)
        s["band"] = {k: _geo_band([_row_band(r, n, d_) for r in rows]) for k, n, d_, _ in COMPARISONS}
        s["band"][key] = _geo_band([_row_band(r, num, den) for r in eff])
        s["contended"] = sum(1 for r in rows for rec in r.values() if rec.get("contended"))
        if dev.startswith("cuda"):
            # the same from host wall-clock throughput (launch overhead included, warm L2)
            s["wall"] = {k: geomean([ratio(r, n, d_, "wall_s") for r in rows]) for k, n, d_, _ in COMPARISONS}
            s["wall"][key] = geomean([ratio(r, num, den, "wall_s") for r in eff])
        # model totals: sum over layers with multiplicity
        totals = {}
        for impl in IMPLS:
            ts = [(seconds(r.get(impl)), next(iter(r.values()))["count"]) for r in rows]
            if any(t is None for t, _ in ts):
                continue
            totals[impl] = sum(t * c for t, c in ts)
        m = {"device": dev, "suite": suite, "mode": mode, "total_s": totals}
        for key, num, den, _ in COMPARISONS + [BSN_RATIO]:
            m[key] = totals[num] / totals[den] if num in totals and den in totals else None
        s["model_total"] = {k: m[k] for k, *_ in COMPARISONS + [BSN_RATIO]}
        summary.append(s)
        models.append(m)
    order = {n: i for i, n in enumerate(ALL_SUITES)}
    # modes this version does not know (a newer or older JSON) sort last
    key = lambda d: (d["device"], order.get(d["suite"], 99),  # noqa: E731
                     MODES.index(d["mode"]) if d["mode"] in MODES else len(MODES))
    return sorted(summary, key=key), sorted(models, key=key)


def verdict(value, op, threshold, band=None, threshold_band=None):
    """{"status", "margin", "spread"} of one goal.

    margin: how far the value clears the threshold (negative: misses it).
    spread: how far the value's band and the threshold's band (a threshold that
    is itself a measured ratio has one) reach toward each other on that side.
    "met" needs margin > spread, "NOT met" -margin > spread; in between the
    result is "within noise". Without a band the status is the value's side
    alone, labelled "(no spread recorded)"."""
    up = op == ">="
    margin = (value - threshold) if up else (threshold - value)
    if band is None:
        status = "met" if margin >= 0 else "NOT met"
        return {"status": f"{status} (no spread recorded)", "margin": margin, "spread": None}
    t_lo, t_hi = threshold_band or (threshold, threshold)
    # the ends of the value's and the threshold's bands that reach toward each other
    if value >= threshold:
        spread = (value - band[0]) + (t_hi - threshold)
    else:
        spread = (band[1] - value) + (threshold - t_lo)
    status = "met" if margin > spread else "NOT met" if -margin > spread else "within noise"
    return {"status": status, "margin": margin, "spread": spread}


def judge_goals(summary, native_by_device, dtype_name, threads):
    goals = []
    for gid, text, suite, mode, key, op, thr in GOALS:
        for s in summary:
            if s["suite"] != suite or s["mode"] != mode:
                continue
            dev = s["device"]
            val = s.get(key)
            bands = s.get("band") or {}
            thr_band = None
            if isinstance(thr, str):  # a threshold that is another metric of the same summary row
                thr_band = bands.get(thr)
                thr = s.get(thr)
            g = {"id": gid, "goal": text, "device": dev, "value": val, "op": op, "threshold": thr,
                 "band": bands.get(key), "threshold_band": thr_band}
            if not native_by_device.get(dev, False):
                g["status"] = "not judged (reference fallback, no fused ops)"
            elif val is None or thr is None:
                g["status"] = "not measured"
            else:
                g.update(verdict(val, op, thr, g["band"], thr_band))
            caveats = []
            if not dev.startswith("cpu"):
                caveats.append("the goal is set for the 2-core CPU")
            elif threads != 2:
                caveats.append(f"the goal is set for 2 threads, ran with {threads}")
            if dtype_name != "float32":
                caveats.append(f"the goal is set for float32, ran {dtype_name}")
            informative = bool(caveats)
            if s.get("contended"):
                caveats.append(f"{s['contended']} of its measurements were disturbed by other processes")
            g["caveat"] = "; ".join(caveats)
            if informative and "margin" in g:
                g["status"] = f"informative ({g['status']})"
            goals.append(g)
    return goals
