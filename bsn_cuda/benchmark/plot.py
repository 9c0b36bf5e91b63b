"""Figures drawn from a result (the dict ``--json`` writes), each answering one question.

* ``speedup``: how much faster is a training step's SN? Per layer of each suite,
  the fwd+bwd speedup over torch's parametrized SN of fused SN, fused BSN and
  compiled torch SN, with the geometric mean as the last group.
* ``bsn_cost``: does BSN cost more than SN? fused BSN / fused SN per layer,
  training forward, against the 1.3x and 1.2x goals.
* ``host``: the fixed cost of one call on tiny weights (the host section).
* ``gpu_bandwidth``: CUDA only: achieved bandwidth of fused SN as a percentage of
  the HBM peak per layer, beside the bandwidth model's prediction
  (tools/gpu/model_predictions.md).
* ``all_points``: every comparison against the weight size, one panel per mode.

``plot(result, prefix)`` writes ``<prefix>_<figure>.png`` for each figure the
result has data for; with records of several devices, one file per device,
``<prefix>_<figure>_<device>.png``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

from .environment import REPO_ROOT
from .impls import comparison_title
from .suites import BSN_RATIO, COMPARISONS, MODES, SUITES, bsn_effective
from .summary import geomean, index, ratio

__all__ = ["FIGURES", "plot", "figures", "figure_paths", "load_model_predictions", "MODEL_PREDICTIONS"]

# Okabe-Ito: distinguishable with every common colour-vision deficiency.
BLUE, VERMILION, ORANGE, SKY, GREEN, PURPLE, GREY, BLACK = (
    "#0072B2", "#D55E00", "#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#999999", "#000000")
FIGURES = ["speedup", "bsn_cost", "host", "gpu_bandwidth", "all_points"]
WIDTH_IN, DPI = 8.5, 110  # ~935 px: stays legible scaled to a README's ~800 px
MODEL_PREDICTIONS = os.path.join(REPO_ROOT, "tools", "gpu", "model_predictions.md")  # in a checkout, not installed
MODE_TITLES = {"train": "training forward", "fwd_bwd": "training fwd+bwd", "eval": "eval forward (no_grad)",
               "eval_nograd": "eval, no_grad", "eval_grad": "eval, grad enabled"}


def _new_figure(height, ncols=1, nrows=1, **kw):
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend to choose

    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _machine(result, dev):
    """'<device name>, <dtype>[, N threads]' for a title."""
    info = result["env"]["devices"][dev]
    text = f"{info['name']}, {result['config']['dtype']}"
    if dev.startswith("cpu"):
        text += f", {result['env']['torch_num_threads']} threads"
    if result["config"].get("quick"):
        text += " (--quick)"
    if not info["fused_native"]:
        text += "\nREFERENCE FALLBACK: the 'fused' bars are bsn_cuda's pure-PyTorch fallback"
    return text


def _suites_of(result, dev):
    present = {r["suite"] for r in result["measurements"] if r["device"] == dev}
    return [s for s in SUITES if s in present]


def _layers(result, dev, suite, mode):
    """[(label, row {impl: record})] in suite order."""
    idx = index([r for r in result["measurements"] if r["device"] == dev and r["suite"] == suite])
    out = []
    for r in result["measurements"]:
        key = (dev, suite, r["layer"], mode)
        if r["device"] == dev and r["suite"] == suite and r["mode"] == mode and key in idx:
            row = idx.pop(key)
            out.append((r["layer"].split(",")[0] + (f" x{r['count']}" if r["count"] > 1 else ""), row))
    return out


def _pick_mode(result, dev, wanted):
    have = {r["mode"] for r in result["measurements"] if r["device"] == dev}
    return next((m for m in wanted if m in have), None)


def _grouped_bars(ax, labels, series, width=0.8):
    """series: [(name, colour, [value or None per label])]; draws side-by-side bars."""
    n = max(len(series), 1)
    w = width / n
    for k, (name, colour, values) in enumerate(series):
        xs = [i - width / 2 + w * (k + 0.5) for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], w, color=colour, label=name)
    ax.set_xticks(range(len(labels)))
    rotate = len(labels) > 9
    ax.set_xticklabels(labels, rotation=40 if rotate else 0, ha="right" if rotate else "center", fontsize=8.5)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _finish(fig, axes, title, ncol=3):
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.suptitle(title, fontsize=11)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=9, frameon=False)
    return fig


def speedup_figure(result, dev):
    """Training fwd+bwd speedup over torch SN per layer, one panel per suite."""
    mode = _pick_mode(result, dev, ["fwd_bwd", "train", "eval"])
    suites = _suites_of(result, dev)
    if mode is None or not suites:
        return None
    native = result["env"]["devices"][dev]["fused_native"]
    fig, axes = _new_figure(0.8 + 2.3 * len(suites), nrows=len(suites))
    ours = [("fused_sn", "fused SN", BLUE), ("fused_bsn", "fused BSN", VERMILION), ("torch_compiled", "compiled torch SN", GREY)]
    for ax, suite in zip(axes[:, 0], suites):
        rows = _layers(result, dev, suite, mode)
        labels = [lab for lab, _ in rows] + ["geomean"]
        series = []
        for impl, name, colour in ours:
            values = [ratio(row, "torch_sn", impl) for _, row in rows]
            if all(v is None for v in values):
                continue
            values.append(geomean(values))
            series.append((comparison_title(name, native) if impl != "torch_compiled" else name, colour, values))
        _grouped_bars(ax, labels, series)
        ax.axhline(1.0, color=BLACK, lw=1.0, ls="--", label="1x: as fast as torch SN")
        ax.axvline(len(labels) - 1.5, color=GREY, lw=0.8)
        dense = len(labels) > 12  # narrow bars: vertical value labels
        for k, (_, _, values) in enumerate(series):
            for i, v in enumerate(values):
                # the geomean's value, and a bar so short that it reads as missing
                if v is not None and (i == len(values) - 1 or v < 0.5):
                    ax.annotate(f"{v:.1f}x" if v >= 0.5 else f"{v:.2f}x", (i - 0.4 + 0.8 / len(series) * (k + 0.5), v),
                                ha="center", va="bottom", fontsize=8 if i == len(values) - 1 else 7,
                                fontweight="bold" if i == len(values) - 1 else "normal", rotation=90 if dense else 0)
        ax.set_ylim(0, 1.25 * max([v for _, _, vs in series for v in vs if v is not None] + [1.0]))
        ax.set_title(SUITES[suite]["title"], fontsize=9.5, loc="left")
        ax.set_ylabel("x torch SN", fontsize=9)
    title = f"Speedup of SN's {MODE_TITLES[mode]} over torch's parametrized SN (higher is better)\n{_machine(result, dev)}"
    return _finish(fig, axes[:, 0], title, ncol=4)


def bsn_cost_figure(result, dev):
    """fused BSN / fused SN per layer, training forward, one panel per suite."""
    mode = _pick_mode(result, dev, ["train", "fwd_bwd", "eval"])
    # a suite of 2-D and 1x1 weights only (BSN is SN throughout) has nothing to show
    suites = [s for s in _suites_of(result, dev) if any(
        bsn_effective(tuple(r["shape"])) for r in result["measurements"] if r["device"] == dev and r["suite"] == s)]
    if mode is None or not suites:
        return None
    fig, axes = _new_figure(0.8 + 2.1 * len(suites), nrows=len(suites))
    top = 1.4
    for ax, suite in zip(axes[:, 0], suites):
        rows = _layers(result, dev, suite, mode)
        values = [ratio(row, BSN_RATIO[1], BSN_RATIO[2]) for _, row in rows]
        bsn = [bsn_effective(tuple(next(iter(row.values()))["shape"])) for _, row in rows]
        labels = [lab for lab, _ in rows] + ["geomean"]
        values.append(geomean([v for v, b in zip(values, bsn) if b]))
        bsn.append(True)
        real = [v if b else None for v, b in zip(values, bsn)]
        same = [v if not b else None for v, b in zip(values, bsn)]
        _grouped_bars(ax, labels, [("fused BSN / fused SN", VERMILION, real)])
        if any(v is not None for v in same):
            ax.bar([i for i, v in enumerate(same) if v is not None], [v for v in same if v is not None], 0.8,
                   color="white", edgecolor=GREY, hatch="//", label="BSN is SN here (2-D or 1x1 kernel)")
        ax.axhline(1.3, color=BLACK, lw=1.2, ls="--", label="goal 1.3x")
        ax.axhline(1.2, color=GREEN, lw=1.5, ls="-.", label="goal 1.2x")
        ax.axhline(1.0, color=GREY, lw=0.8)
        ax.axvline(len(labels) - 1.5, color=GREY, lw=0.8)
        if values[-1] is not None:
            ax.annotate(f"{values[-1]:.2f}", (len(labels) - 1, values[-1]), ha="center", va="bottom", fontsize=8,
                        fontweight="bold")
        top = max([top] + [1.12 * v for v in values if v is not None])
        ax.set_title(SUITES[suite]["title"], fontsize=9.5, loc="left")
        ax.set_ylabel("BSN / SN time", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylim(0, top)
    title = f"Cost of BSN over SN, {MODE_TITLES[mode]}, fused ops (lower is better)\n{_machine(result, dev)}"
    return _finish(fig, axes[:, 0], title, ncol=4)


HOST_SERIES = [("identity", "identity parametrization", GREY), ("torch_sn", "torch SN", ORANGE),
               ("fused", "bsn_cuda", BLUE)]
HOST_MODES = ["train", "fwd_bwd", "eval_nograd"]


def host_figure(result):
    """µs per call on tiny weights: one panel per mode, groups per weight."""
    records = result.get("host") or []
    modes = [m for m in HOST_MODES if any(r["mode"] == m for r in records)]
    if not modes:
        return None
    fig, axes = _new_figure(3.8, ncols=len(modes), sharey=True)
    by = {(r["kind"], r["mode"], r["impl"]): r for r in records}
    kinds = list(dict.fromkeys(r["kind"] for r in records))
    titles = {r["kind"]: r.get("title", r["kind"]).replace("(", "\n(", 1)
              for r in records}
    for ax, mode in zip(axes[0], modes):
        series = []
        for impl, name, colour in HOST_SERIES:
            series.append((name, colour, [by[(k, mode, impl)]["median_s"] * 1e6 if (k, mode, impl) in by else None
                                          for k in kinds]))
        _grouped_bars(ax, [titles[k] for k in kinds], series)
        for k, (_, _, values) in enumerate(series):
            for i, v in enumerate(values):
                if v is not None:
                    ax.annotate(f"{v:.0f}", (i - 0.4 + 0.8 / len(series) * (k + 0.5), v), ha="center", va="bottom",
                                fontsize=7.5)
        ax.set_title(MODE_TITLES[mode], fontsize=9.5)
    axes[0][0].set_ylabel("µs per call (median)", fontsize=9)
    top = max(r["median_s"] * 1e6 for r in records if r["mode"] in modes and r["impl"] in dict(
        (i, 1) for i, _, _ in HOST_SERIES))
    axes[0][0].set_ylim(0, 1.15 * top)
    env = result["env"]
    cpu = env["devices"].get("cpu", {}).get("name") or env.get("cpu_model")
    title = (f"Host overhead of one call on tiny weights (lower is better)\n{cpu}, float32, "
             f"{env['torch_num_threads']} threads")
    return _finish(fig, axes[0], title)


def load_model_predictions(path=MODEL_PREDICTIONS):
    """{"gpu": name, (suite, shape): {column: seconds}} from tools/gpu/model.py's table, or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    gpu = re.search(r"on one (.+?) \(", text)
    out = {"gpu": gpu.group(1) if gpu else "model"}
    header = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "suite" in cells and "shape" in cells:
            header = cells
        elif header and len(cells) == len(header) and cells[0] in SUITES:
            shape = tuple(int(x) for x in re.findall(r"\d+", cells[header.index("shape")]))
            times = {}
            for name, cell in zip(header, cells):
                m = re.match(r"([\d.]+)(\s*\(|$)", cell)
                if m and name not in ("suite", "layer", "shape", "numel") and "/" not in name and "%" not in cell:
                    times[name] = float(m.group(1)) * 1e-6
            out[(cells[0], shape)] = times
    return out if len(out) > 1 else None


def gpu_bandwidth_figure(result, dev, predictions=None):
    """Fused SN training forward: achieved % of the peak bandwidth per layer, beside the model's."""
    suites = [s for s in _suites_of(result, dev) if _layers(result, dev, s, "train")]
    if not dev.startswith("cuda") or not suites:
        return None
    fig, axes = _new_figure(0.6 + 2.3 * len(suites), nrows=len(suites))
    model_name = f"model prediction ({predictions['gpu']})" if predictions else None
    for ax, suite in zip(axes[:, 0], suites):
        rows = _layers(result, dev, suite, "train")
        measured, model = [], []
        for _, row in rows:
            rec = row.get("fused_sn") or {}
            measured.append(rec.get("pct_peak_bw"))
            pred = (predictions or {}).get((suite, tuple(rec.get("shape", ()))), {}).get("SN train fwd")
            peak = rec.get("peak_bw_gbps")
            model.append(100 * rec["bytes_model"] / pred / (peak * 1e9) if pred and peak else None)
        series = [("measured, fused SN", BLUE, measured)]
        if model_name:
            series.append((model_name, SKY, model))
        _grouped_bars(ax, [lab for lab, _ in rows], series)
        top = max([v for _, _, vs in series for v in vs if v is not None] + [5.0])
        ax.set_ylim(0, min(100.0, 1.2 * top))  # small layers reach a few percent: zoom in
        ax.set_title(SUITES[suite]["title"], fontsize=9.5, loc="left")
        ax.set_ylabel("% of peak HBM", fontsize=9)
    info = result["env"]["devices"][dev]
    peak = f"peak {info['peak_bw_gbps']:.0f} GB/s" if info.get("peak_bw_gbps") else "peak bandwidth unknown"
    note = "" if predictions else " (no model predictions found)"
    title = (f"Fused SN training forward: bytes that must move / GPU time, as % of the HBM peak{note}\n"
             f"{_machine(result, dev)}, {peak}")
    return _finish(fig, axes[:, 0], title)


def all_points_figure(result, dev):
    """Every comparison against the weight's element count (log-log), one panel
    per mode (so that no mode's range squashes another's) and one colour per
    comparison."""
    import matplotlib.ticker

    idx = index([r for r in result["measurements"] if r["device"] == dev])
    modes = [m for m in MODES if any(key[3] == m for key in idx)]
    if not modes:
        return None
    native = result["env"]["devices"][dev]["fused_native"]
    style = {"vs_torch_sn": (BLUE, "o"), "vs_legacy": (SKY, "s"), "vs_compiled": (GREY, "^"),
             "bsn_vs_torch_bsn": (VERMILION, "D"), "legacy_vs_legacy": (GREEN, "v")}
    fig, axes = _new_figure(0.9 + 2.4 * len(modes), nrows=len(modes), sharex=True)
    fmt = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x")
    for ax, mode in zip(axes[:, 0], modes):
        for key, num, den, title in COMPARISONS:
            points = {}
            for (_, _, _, m), row in idx.items():
                v = ratio(row, num, den)
                rec = next(iter(row.values()))
                if m == mode and v is not None:
                    points[(rec["kind"], tuple(rec["shape"]))] = (rec["numel"], v)
            if points:
                xs, ys = zip(*points.values())
                colour, marker = style[key]
                ax.scatter(xs, ys, marker=marker, color=colour, alpha=0.8, s=24, label=comparison_title(title, native))
        ax.axhline(1.0, color=BLACK, lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(MODE_TITLES.get(mode, mode), fontsize=9.5, loc="left")
        ax.set_ylabel("time other / time fused", fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
    axes[-1][0].set_xlabel("weight numel")
    title = f"Speedup against weight size, every layer (higher is better; dashed: parity)\n{_machine(result, dev)}"
    return _finish(fig, axes[:, 0], title, ncol=3)


def figure_paths(prefix, devices):
    """{(figure, device or None): path}: '<prefix>_<figure>[_<device>].png' (a trailing .png is dropped)."""
    prefix = prefix[:-4] if prefix.lower().endswith(".png") else prefix
    tag = len(devices) > 1
    out = {("host", None): f"{prefix}_host.png"}
    for dev in devices:
        for fig in FIGURES:
            if fig != "host":
                out[(fig, dev)] = f"{prefix}_{fig}" + (f"_{dev.replace(':', '')}" if tag else "") + ".png"
    return out


def figures(result, prefix, predictions=None):
    """{path: matplotlib Figure} for every figure the result has data for (nothing is written)."""
    devices = [d for d in result["env"]["devices"] if any(r["device"] == d for r in result["measurements"])]
    if predictions is None and any(d.startswith("cuda") for d in devices):
        predictions = load_model_predictions()
    paths = figure_paths(prefix, devices)
    out = {paths[("host", None)]: host_figure(result)}
    for dev in devices:
        out[paths[("speedup", dev)]] = speedup_figure(result, dev)
        out[paths[("bsn_cost", dev)]] = bsn_cost_figure(result, dev)
        out[paths[("gpu_bandwidth", dev)]] = gpu_bandwidth_figure(result, dev, predictions)
        out[paths[("all_points", dev)]] = all_points_figure(result, dev)
    return {path: fig for path, fig in out.items() if fig is not None}


def plot(result, prefix, predictions=None):
    """Write every figure the result has data for; returns the paths written ([] without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no figures written", file=sys.stderr)
        return []
    written = []
    for path, fig in figures(result, prefix, predictions).items():
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fig.savefig(path)
        written.append(path)
    return written
