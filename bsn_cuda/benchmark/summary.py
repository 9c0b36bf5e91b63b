"""From records to conclusions: per-layer ratios, geometric means over a suite's
layers, model totals (sum over layers with multiplicity) and the goals judged."""

from __future__ import annotations

import math

from .suites import ALL_SUITES, BSN_RATIO, COMPARISONS, GOALS, IMPLS, MODES, bsn_effective

__all__ = ["geomean", "index", "ratio", "summarize", "judge_goals"]


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
    key = lambda d: (d["device"], order.get(d["suite"], 99), MODES.index(d["mode"]))  # noqa: E731
    return sorted(summary, key=key), sorted(models, key=key)


def judge_goals(summary, native_by_device, dtype_name, threads):
    goals = []
    for gid, text, suite, mode, key, op, thr in GOALS:
        for s in summary:
            if s["suite"] != suite or s["mode"] != mode:
                continue
            dev = s["device"]
            val = s.get(key)
            if isinstance(thr, str):  # a threshold that is another metric of the same summary row
                thr = s.get(thr)
                thr = None if thr is None else round(thr, 2)
            g = {"id": gid, "goal": text, "device": dev, "value": val, "op": op, "threshold": thr}
            if not native_by_device.get(dev, False):
                g["status"] = "not judged (reference fallback, no fused ops)"
            elif val is None or thr is None:
                g["status"] = "not measured"
            else:
                ok = val >= thr if op == ">=" else val <= thr
                g["status"] = "met" if ok else "NOT met"
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
            if informative and g["status"] in ("met", "NOT met"):
                g["status"] = f"informative ({g['status']})"
            goals.append(g)
    return goals

