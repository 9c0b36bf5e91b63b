"""The speed blocks of README.md and docs/performance.md from a benchmark result: the blocks between
``<!-- bsn_cuda:generated speed-... -->`` markers (see :mod:`.markers`), so
that every number there is the committed result's, not typed by hand.

Blocks: ``speed-run`` (the run: command, machine, torch, threads, date,
commit, duration, disturbed cases, the load warning), ``speed-summary``,
``speed-e2e``, ``speed-host`` (the tables), ``speed-goals`` (each goal's
value, band, margin, spread and verdict), ``speed-headline`` (the ranges
the section's prose would otherwise quote) and ``speed-headline-table`` (the
summary's training forward+backward rows: the README's headline table)."""

from __future__ import annotations

import os

from . import markers
from .report import disturbed, e2e_table, host_table, load_note, status_text, summary_table
from .suites import FUSED

__all__ = ["speed_blocks", "markdown_into", "short_commit", "duration"]


def short_commit(commit):
    """A recorded commit as written in the README: 7 hex digits, and "-dirty" if it was."""
    commit = commit or "unknown"
    return commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")


def duration(seconds):
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def run_block(result, source=None):
    env, cfg = result["env"], result["config"]
    commit = short_commit(env.get("git_commit"))
    saved = f"[{source}]({source})" if source else "not saved (no --json)"
    lines = [
        f"The run: `{' '.join(env['argv'])}`, at commit {commit}, {env['date'][:10]}"
        + (", `--quick`" if cfg.get("quick") else "") + f"; result {saved}.",
        f"Machine: {env['cpu_model']}, {env['cpu_count']} cores, {env['torch_num_threads']} torch threads; "
        f"torch {env['torch']}, {cfg['dtype']}, malloc {env.get('malloc', 'default')}"
        + (f"; {duration(result['elapsed_s'])} for the whole run" if result.get("elapsed_s") else "") + ".",
    ]
    n_cpu, retried, bad = disturbed(result)
    if n_cpu:
        lines.append(f"{retried} of {n_cpu} CPU cases were disturbed by other processes and measured again; "
                     f"{bad} stayed disturbed.")
    note = load_note(env)
    if note:
        lines.append(f"**Not a quiet machine:** {note}.")
    return "\n".join(lines)


def _band(value, band):
    return f"{value:.2f}" + (f" ({band[0]:.2f}-{band[1]:.2f})" if band else "")


def goals_block(result):
    rows = []
    for g in result["goals"] + result.get("host_goals", []):
        measured = "-" if g["value"] is None else _band(g["value"], g.get("band"))
        needed = "-" if g["threshold"] is None else f"{g['op']} " + (
            _band(g["threshold"], g.get("threshold_band")) if g.get("threshold_band") else f"{g['threshold']:.3g}")
        margin = "-" if g.get("margin") is None else f"{g['margin']:+.2f}"
        spread = "-" if g.get("spread") is None else f"{g['spread']:.2f}"
        verdict = status_text(g) + (f" ({g['caveat']})" if g.get("caveat") else "")
        rows.append(f"| {g['goal']} | {g['device']} | {measured} | {needed} | {margin} | {spread} | {verdict} |")
    if not rows:
        return "(no goal applies to the suites and modes of this run)"
    head = ["| goal | device | measured (band) | needed | margin | spread | verdict |",
            "|---|---|---:|---:|---:|---:|---|"]
    return "\n".join(head + rows)


def _span(xs, fmt):
    """'a to b' of the formatted extremes ('a' when they read the same)."""
    lo, hi = fmt.format(min(xs)), fmt.format(max(xs))
    return lo if lo == hi else f"{lo} to {hi}"


def headline_block(result):
    """The ranges the section's prose quotes: fwd+bwd speedups over the suites,
    and the end-to-end step with SN's share of it."""
    lines = []
    for dev in result["env"]["devices"]:
        rows = [s for s in result["summary"] if s["device"] == dev and s["mode"] == "fwd_bwd"]
        for key, what in (("vs_torch_sn", "torch's parametrized SN"), ("vs_compiled", "`torch.compile` of it")):
            per_layer = [s[key] for s in rows if s.get(key)]
            whole = [s["model_total"][key] for s in rows if s["model_total"].get(key)]
            if per_layer and whole:
                lines.append(f"- {dev}, training forward+backward, fused SN against {what}: "
                             f"{_span(per_layer, '{:.2f}x')} per layer (geometric mean over each suite's layers, "
                             f"{len(per_layer)} suites), {_span(whole, '{:.2f}x')} on whole models.")
        e2e = [r for r in result["e2e"] if r["device"] == dev and "median_s" in r]
        with_sn = [r for r in e2e if r["variant"] != "none"]
        base = next((r for r in e2e if r["variant"] == "none"), None)
        if not with_sn or base is None:
            continue
        steps = [r["median_s"] for r in e2e]
        # as in the e2e table: a step-time difference smaller than either step's IQR is noise
        noise = sum(1 for r in with_sn if abs(r["sn_overhead_s"]) < max(r["iqr_s"], base["iqr_s"]))
        line = (f"- {dev}, end-to-end SNGAN ResNet D training step (batch 2x{base['batch']}): "
                f"{_span(steps, '{:.2f} s')} per step (medians over the variants, IQR up to "
                f"{max(r['iqr_s'] for r in e2e):.3f} s); the difference to the step without SN is within "
                f"the IQR for {noise} of {len(with_sn)} variants with SN.")
        shares = []
        for group, pick in (("the fused ops", True), ("torch's", False)):
            xs = [100 * r["sn_share_from_layers"] for r in with_sn
                  if r.get("sn_share_from_layers") is not None and (r["variant"] in FUSED) == pick]
            if xs:
                shares.append(f"{_span(xs, '{:.1f}%')} of a step for {group}")
        if shares:
            line += f" SN's forward+backward, summed from the sngan_resnet layers' times: {', '.join(shares)}."
        lines.append(line)
    return "\n".join(lines) or "(no forward+backward or end-to-end results in this run)"


def headline_table(result):
    """The summary table's training forward+backward rows, one per suite."""
    rows = [s for s in result["summary"] if s["mode"] == "fwd_bwd"]
    if not rows:
        return "(no forward+backward results in this run)"
    return summary_table({**result, "summary": rows}, markdown=True)


def speed_blocks(result, source=None):
    """{block name: markdown} for a result (with summary and goals, see cli.conclude)."""
    return {
        "speed-run": run_block(result, source),
        "speed-summary": summary_table(result, markdown=True) if result["summary"] else "(no suite was run)",
        "speed-e2e": e2e_table(result, markdown=True) if result["e2e"] else "(the end-to-end step was not run)",
        "speed-host": host_table(result["host"], markdown=True) if result.get("host") else "(no host overhead run)",
        "speed-goals": goals_block(result),
        "speed-headline": headline_block(result),
        "speed-headline-table": headline_table(result),
    }


def markdown_into(path, result, source=None):
    """Rewrite the speed blocks of the markdown file `path` in place; returns the
    names of blocks it has no region for. `source`: the result's JSON, linked
    relative to the file."""
    if source:
        source = os.path.relpath(os.path.abspath(source), os.path.dirname(os.path.abspath(path)))
    with open(path) as f:
        text = f.read()
    try:
        new, missing = markers.fill(text, speed_blocks(result, source))
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from None
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return missing
