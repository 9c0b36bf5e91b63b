"""Text and markdown output: per-suite tables, the summary, the goals, the
end-to-end step, the host-overhead section and the environment."""

from __future__ import annotations

from .host_overhead import host_goals_text, host_table
from .impls import comparison_title, impl_title
from .suites import BSN_RATIO, COMPARISONS, E2E, FUSED, SUITES, bsn_effective
from .summary import index, ratio
from .tables import goal_numbers, md_table, status_text, text_table

__all__ = ["FALLBACK_WARNING", "suite_tables", "summary_table", "goals_text", "e2e_table", "env_text",
           "host_table", "host_goals_text", "status_text", "goal_numbers", "load_note", "disturbed", "to_markdown",
           "print_goals_and_summary"]


def _fmt_t(s):
    if s is None:
        return "-"
    us = s * 1e6
    if us < 100:
        return f"{us:.1f}"
    if us < 1e5:
        return f"{us:.0f}"
    return f"{us / 1e3:.0f}ms"


def _fmt_x(x, ratio=False):
    if x is None:
        return "-"
    return f"{x:.2f}" if ratio else f"{x:.2f}x"


def _cell(rec):
    if rec is None:
        return "-"
    if "median_s" in rec:
        return _fmt_t(rec["median_s"]) + ("!" if rec.get("contended") else "")
    if "skipped" in rec:
        return "skip"
    return "ERR"


def _layer_rows(records, device, suite, mode, impls, native, gpu=False):
    idx = index([r for r in records if r["device"] == device and r["suite"] == suite and r["mode"] == mode])
    rows = []
    seen = []
    for r in records:
        if r["device"] == device and r["suite"] == suite and r["mode"] == mode and r["layer"] not in seen:
            seen.append(r["layer"])
    comps = [c for c in COMPARISONS if c[1] in impls and c[2] in impls]
    has_ratio = BSN_RATIO[1] in impls and BSN_RATIO[2] in impls
    for layer in seen:
        row = idx[(device, suite, layer, mode)]
        any_rec = next(iter(row.values()))
        shape = "x".join(str(s) for s in any_rec["shape"])
        cells = [layer + (f" x{any_rec['count']}" if any_rec["count"] > 1 else ""), shape]
        cells += [_cell(row.get(i)) for i in impls]
        cells += [_fmt_x(ratio(row, num, den)) for _, num, den, _ in comps]
        if has_ratio:
            v = ratio(row, BSN_RATIO[1], BSN_RATIO[2])
            cells.append(_fmt_x(v, ratio=True) + ("" if bsn_effective(tuple(any_rec["shape"])) else "*"))
        if gpu:
            f = row.get("fused_sn")
            cells.append(f"{f['gbps']:.0f}" if f and f.get("gbps") else "-")
            cells.append(f"{f['pct_peak_bw']:.0f}%" if f and f.get("pct_peak_bw") else "-")
        rows.append(cells)
    headers = ["layer", "shape"] + [impl_title(i, native) for i in impls]
    short = {"vs_torch_sn": "x torchSN", "vs_legacy": "x legacy", "vs_compiled": "x compiled",
             "bsn_vs_torch_bsn": "BSN x torchBSN", "legacy_vs_legacy": "legacy x legacy"}
    headers += [short[c[0]] for c in comps]
    if has_ratio:
        headers.append("BSN/SN")
    if gpu:
        headers += ["SN GB/s", "% peak"]
    return headers, rows


def _find(entries, device, suite, mode):
    return next((x for x in entries if x["device"] == device and x["suite"] == suite and x["mode"] == mode), None)


def _ratio_cells(entry, impls):
    """The comparison cells (and BSN/SN) of a summary or model-total entry."""
    cells = [_fmt_x(entry.get(c[0])) for c in COMPARISONS if c[1] in impls and c[2] in impls]
    if BSN_RATIO[1] in impls and BSN_RATIO[2] in impls:
        cells.append(_fmt_x(entry.get(BSN_RATIO[0]), ratio=True))
    return cells


def _model_row(models, device, suite, mode, impls, n_extra):
    m = _find(models, device, suite, mode)
    if m is None:
        return None
    return (["model total", ""] + [_fmt_t(m["total_s"].get(i)) for i in impls] + _ratio_cells(m, impls)
            + [""] * n_extra)


def _geo_row(summary, device, suite, mode, impls, n_extra):
    s = _find(summary, device, suite, mode)
    if s is None:
        return None
    return ["geomean", ""] + [""] * len(impls) + _ratio_cells(s, impls) + [""] * n_extra


def suite_tables(result, device, suite, markdown=False):
    """Per-mode tables of one suite on one device (text or markdown)."""
    records, summary, models = result["measurements"], result["summary"], result["models"]
    impls = result["config"]["impls"]
    native = result["env"]["devices"][device]["fused_native"]
    gpu = device.startswith("cuda")
    out = []
    for mode in result["config"]["modes"]:
        if not any(r["device"] == device and r["suite"] == suite and r["mode"] == mode for r in records):
            continue
        headers, rows = _layer_rows(records, device, suite, mode, impls, native, gpu=gpu)
        n_extra = 2 if gpu else 0
        for extra in (_model_row(models, device, suite, mode, impls, n_extra),
                      _geo_row(summary, device, suite, mode, impls, n_extra)):
            if extra:
                rows.append(extra)
        unit = "median µs per call" + (" (GPU time, cold L2)" if gpu else "")
        title = f"{suite} | {mode} | {device} {result['config']['dtype']} | {unit}"
        if markdown:
            out.append(f"#### {title}\n\n" + md_table(headers, rows))
        else:
            out.append(f"== {title} ==\n" + text_table(headers, rows))
    return "\n\n".join(out)


def summary_table(result, markdown=False, wall=False):
    headers = ["device", "suite", "mode"] + [comparison_title(c[3], True) for c in COMPARISONS] + ["BSN/SN cost"]
    rows = []
    if wall:
        for s in result["summary"]:
            if "wall" not in s:
                continue
            w = s["wall"]
            rows.append([s["device"], s["suite"], s["mode"]] + [_fmt_x(w.get(k)) for k, *_ in COMPARISONS]
                        + [_fmt_x(w.get("bsn_sn"), True)])
        return (md_table(headers, rows, 3) if markdown else text_table(headers, rows)) if rows else ""
    for s in result["summary"]:
        native = result["env"]["devices"][s["device"]]["fused_native"]
        mt = s["model_total"]
        cells = [s["device"] + ("" if native else " (REF-FALLBACK)"), s["suite"], s["mode"]]
        for key, *_ in COMPARISONS:
            cells.append(f"{_fmt_x(s.get(key))} ({_fmt_x(mt.get(key))})" if s.get(key) else "-")
        cells.append(f"{_fmt_x(s.get('bsn_sn'), True)} ({_fmt_x(mt.get('bsn_sn'), True)})" if s.get("bsn_sn") else "-")
        rows.append(cells)
    if markdown:
        return md_table(headers, rows, 3)
    return text_table(headers, rows)


def goals_text(result, markdown=False):
    lines = []
    for g in result["goals"]:
        cav = f" [{g['caveat']}]" if g.get("caveat") else ""
        lines.append(f"{'- ' if markdown else '  '}{status_text(g)}: {g['goal']} on {g['device']}: "
                     f"{goal_numbers(g)}{cav}")
    return "\n".join(lines) if lines else "  (no goal applies to the suites/modes run)"


def e2e_table(result, markdown=False):
    rows = []
    base = {r["device"]: r for r in result["e2e"] if r["variant"] == "none" and "median_s" in r}
    for r in result["e2e"]:
        if "median_s" not in r:
            rows.append([r["device"], r["label"], f"2x{r['batch']}", "ERR", "", r.get("error", "-")[:80], "", ""])
            continue
        share = r.get("sn_share")
        over = "-"
        if r.get("sn_overhead_s") is not None:
            b = base.get(r["device"])
            noise = max(r["iqr_s"], b["iqr_s"] if b else 0.0)
            over = f"{r['sn_overhead_s'] * 1e3:.1f} ({100 * share:.0f}%)"
            if abs(r["sn_overhead_s"]) < noise:
                over += " ~noise"
        est = "-"
        if r.get("sn_cost_from_layers_s") is not None:
            est = f"{r['sn_cost_from_layers_s'] * 1e3:.2f} ({100 * r['sn_share_from_layers']:.1f}%)"
        rows.append([
            r["device"], r["label"], f"2x{r['batch']}",
            f"{r['median_s'] * 1e3:.1f}" + ("!" if r.get("contended") else ""),
            f"{r['iqr_s'] * 1e3:.1f}", over, est,
            _fmt_x(r.get("step_speedup_vs_torch_sn")),
        ])
    headers = ["device", "variant", "batch (real+fake)", "step ms (median)", "IQR ms", "SN overhead ms (share)",
               "SN fwd+bwd from layers ms (share)", "step x torchSN"]
    return md_table(headers, rows) if markdown else text_table(headers, rows)


def env_text(result):
    e = result["env"]
    lines = [
        f"torch {e['torch']} (cuda {e['torch_cuda']}), python {e['python']}, {e['platform']}",
        f"CPU: {e['cpu_model']} ({e['cpu_count']} cores), torch threads {e['torch_num_threads']}, "
        f"load avg {tuple(round(x, 2) for x in e['loadavg']) if e.get('loadavg') else '-'}",
        f"bsn_cuda: HAS_EXTENSION={e.get('has_extension')}, git {e.get('git_commit') or '-'}, {e['date']}",
        f"malloc: {e.get('malloc', 'default')}",
    ]
    for d, info in e["devices"].items():
        extra = ""
        if d.startswith("cuda"):
            extra = f", peak {info['peak_bw_gbps']:.0f} GB/s" if info.get("peak_bw_gbps") else ", peak bandwidth unknown"
        lines.append(f"device {d}: {info['name']}{extra}, fused ops native: {info['fused_native']}")
    return "\n".join(lines)


def load_note(env):
    """The warning of a run that started on a busy machine (None if it did not)."""
    load = env.get("loadavg")
    if not load or load[0] <= 0.5 or not any(d.startswith("cpu") for d in env["devices"]):
        return None
    return (f"the 1-minute load average is {load[0]:.2f} before starting; other processes compete for the CPU "
            "and inflate (mostly the spread of) the CPU timings")


def disturbed(result):
    """(CPU cases measured, cases measured again because other processes
    disturbed them, cases that stayed disturbed)."""
    recs = [r for r in result["measurements"] if r["device"] == "cpu" and "median_s" in r and not r.get("reused")]
    return len(recs), sum(1 for r in recs if r.get("tries", 1) > 1), sum(1 for r in recs if r.get("contended"))


FALLBACK_WARNING = (
    "!!! WARNING: the compiled bsn_cuda ops do not serve {dev} (HAS_EXTENSION={has}). The 'fused' columns are\n"
    "!!! the pure-PyTorch REFERENCE FALLBACK, labelled 'ref-fallback'; they are not fused-op numbers and no\n"
    "!!! goal is judged. Build the extension (pip install --no-build-isolation .) and rerun."
)


def to_markdown(result):
    cfg = result["config"]
    parts = [
        "## bsn_cuda benchmark",
        "",
        "```",
        env_text(result),
        f"command: {' '.join(result['env']['argv'])}",
        "```",
        "",
    ]
    for d, info in result["env"]["devices"].items():
        if not info["fused_native"] and any(i in FUSED for i in cfg["impls"]):
            parts += ["> **" + FALLBACK_WARNING.format(dev=d, has=result["env"].get("has_extension"))
                      .replace("!!! ", "").replace("\n", " ") + "**", ""]
    if result["summary"]:
        parts += [
            "### Summary",
            "",
            "Geometric mean over a suite's unique layers of time(other) / time(fused); "
            "in parentheses the same for the whole model (sum over layers with multiplicity). "
            "BSN/SN: fused BSN time / fused SN time over the layers where BSN differs from SN "
            "(kernels larger than 1x1).",
            "",
            summary_table(result, markdown=True),
            "",
        ]
        wall = summary_table(result, markdown=True, wall=True)
        if wall:
            parts += ["CUDA, from host wall-clock throughput of back-to-back calls (launch overhead included, "
                      "warm L2; the table above uses GPU time per call with L2 flushed):", "", wall, ""]
        parts += [
            "### Goals",
            "",
            "Each: value (op threshold; margin: how far the value clears it; spread: how far the ratio's band "
            "from the quartiles of the per-call times, and a measured threshold's band, reach toward the other "
            "side). MET needs a margin larger than the spread; within noise: the run cannot tell.",
            "",
            goals_text(result, markdown=True),
            "",
        ]
    if result.get("host"):
        parts += [
            "### Host overhead (tiny weights)",
            "",
            "µs per call (median), interleaved; see bsn_cuda/benchmark/host_overhead.py. `fused vs torch`: torch SN's time "
            "over bsn_cuda's module API; `fused / identity`: bsn_cuda's over an identity parametrization.",
            "",
            host_table(result["host"], markdown=True),
            "",
            "```",
            host_goals_text(result["host_goals"]),
            "```",
            "",
        ]
    if result["e2e"]:
        parts += [
            "### End-to-end: SNGAN ResNet D (ch=128) training step",
            "",
            "Hinge loss, Adam, one forward of real and fake images together (32x32). "
            "SN overhead = step time minus the step without SN (`~noise`: smaller than the IQR); "
            "'from layers' = the sngan_resnet suite's fwd+bwd times of the same layers, summed with "
            "their counts (a steadier estimate of the SN cost per step).",
            "",
            e2e_table(result, markdown=True),
            "",
        ]
    devices = list(result["env"]["devices"])
    for d in devices:
        for suite in cfg["suites"]:
            if suite == E2E:
                continue
            t = suite_tables(result, d, suite, markdown=True)
            if t:
                parts += [f"### {suite}: {SUITES[suite]['title']} ({d})", "", t, ""]
    parts += [
        "Times are medians per call in µs (ms where marked). `skip`: not available here, "
        "`ERR`: failed (see the JSON). `*`: BSN equals SN for this shape (2-D or 1x1). "
        "`!`: other processes disturbed this CPU measurement even after retries.",
        "",
    ]
    return "\n".join(parts)


def print_goals_and_summary(result, write):
    write("")
    write("== summary: geomean speedup over layers (model total) ==")
    write(summary_table(result))
    wall = summary_table(result, wall=True)
    if wall:
        write("")
        write("== CUDA summary from host wall-clock throughput (back-to-back calls, launch overhead included) ==")
        write(wall)
    write("")
    write("== goals (2-core CPU, sngan_cnn, float32; reported, never asserted) ==")
    write(goals_text(result))
    if result.get("host_goals"):
        write("")
        write("== host-overhead goals (tiny weights, module API; reported, never asserted) ==")
        write(host_goals_text(result["host_goals"]))
