"""The BSN evidence of README.md and docs/why_bsn.md, generated from the saved
results (examples/results/probe*.json, sweep.json), so that what those pages
say about SN and BSN is what the runs show, with their seed counts.

    python examples/evidence.py                     # rewrite the regions of README.md and docs/why_bsn.md
    python examples/evidence.py --markdown-into FILE ...

Blocks (regions ``<!-- bsn_cuda:generated NAME -->``, see
bsn_cuda/benchmark/markers.py): ``bsn-init`` and ``bsn-init-sigmas`` (part A
of probe.json), ``bsn-<stem>`` for each probe run (part B), ``bsn-probe-compare``
(the growth of D's Lipschitz bound, run by run) and ``bsn-sweep``.
Orderings are stated only as computed here, per run and per seed.
"""

import argparse
import glob
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from probe_gradients import lipschitz_bound  # noqa: E402
from sweep_gan import NORMS, label  # noqa: E402

from bsn_cuda.benchmark import markers  # noqa: E402

RESULTS = os.path.join(HERE, "results")
REPO = os.path.dirname(HERE)
PAGES = [os.path.join(REPO, "README.md"), os.path.join(REPO, "docs", "why_bsn.md")]


def _load(path):
    with open(path) as f:
        return json.load(f)


def _g(x, digits=3):
    """x to `digits` significant digits (at least), in plain decimals: 1680, 1.0, 0.000533."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def _span(xs, digits=2):
    lo, hi = _g(min(xs), digits), _g(max(xs), digits)
    return lo if lo == hi else f"{lo}-{hi}"


def _ordered(named):
    """'a 1.2x, b 3.4x, ...' from {name: value}, smallest first."""
    return ", ".join(f"{k} {_g(v, 2)}x" for k, v in sorted(named.items(), key=lambda kv: kv[1]))


def _seeds(seeds):
    return f"a single seed ({seeds[0]})" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"


def _rel(path):
    return os.path.relpath(path, REPO)


# --------------------------------------------------------------------------
# Part A: at initialization
# --------------------------------------------------------------------------

def init_block(path, probe):
    a, s = probe["init"], probe["settings"]
    base = a["none+LeCun"]["grad_norm"]
    lines = [f"`{_rel(path)}`, part A ({s['machine']}): one probe batch of {s['batch']} images, one draw of the "
             f"weights (seed {s['seed']}), c = {s['c']}. Gradient norm of each layer's raw weight:", "",
             "| variant | layer 1 | layer 7 | linear | over none+LeCun's, all layers | std of D(x) | "
             "product of the layers' gains |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k, v in a.items():
        g = v["grad_norm"]
        lines.append(f"| {k} | {_g(g[0])} | {_g(g[-2])} | {_g(g[-1])} | {_span([x / y for x, y in zip(g, base)])} "
                     f"| {_g(v['d_out_std'])} | {_g(lipschitz_bound(v))} |")
    first = sorted(a, key=lambda k: a[k]["grad_norm"][0])
    spreads = {_g(v["spread"]) for v in a.values()}
    bsn_sn = [x / y for x, y in zip(a["BSN"]["grad_norm"], a["SN"]["grad_norm"])]
    sn = a["SN"]
    convs = [(m0, m1) for m0, m1 in zip(sn["sigma_mat0"], sn["sigma_mat1"]) if not math.isnan(m1)]
    lines += ["", f"Layer-1 gradient, smallest first: {', '.join(first)}. Max/min of a variant's gradient norms "
              f"over the layers: {' / '.join(sorted(spreads))}"
              + (" for every variant." if len(spreads) == 1 else " (per variant)."),
              f"BSN's gradients over SN's: {_span(bsn_sn)} over the layers; the raw kernels have "
              f"sigma(W_mat(1)) >= sigma(W_mat(0)) on {sum(m1 >= m0 for m0, m1 in convs)} of {len(convs)} "
              "convolutions."]
    return "\n".join(lines)


def init_sigmas_block(path, probe):
    sn = probe["init"]["SN"]
    m0, m1, st = sn["sigma_mat0"], sn["sigma_mat1"], sn["sigma_strict"]
    convs = [i for i, x in enumerate(m1) if not math.isnan(x)]
    return (f"Raw kernels at init (`{_rel(path)}`, the SN variant's weights): sigma(W_mat(0)) per layer "
            f"{', '.join(_g(x) for x in m0)} (product {_g(math.prod(m0))}); sigma(W_mat(1)) per convolution "
            f"{', '.join(_g(m1[i]) for i in convs)}; sigma_strict / sigma(W_mat(0)) per convolution "
            f"{', '.join(f'{st[i] / m0[i]:.2f}' for i in convs)}.")


# --------------------------------------------------------------------------
# Part B: during training, one block per probe run
# --------------------------------------------------------------------------

def probe_block(path, probe):
    s, b = probe["settings"], probe["train"]
    lines = [f"`{_rel(path)}` ({s['machine']}): GAN on the digits at 32x32x3, width {s['train_width']}, "
             f"lr {s['lr']:g}, batch {s['train_batch']}, {s['steps']} steps, probed every {s['probe_every']}; "
             f"{_seeds([s['seed']])}, one run per variant.", "",
             "| variant | D's Lipschitz bound: first probe | last probe | growth | all probes | "
             "layer-1 gradient: first probe | last probe | after the first probe |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    moved = []
    for k, v in b.items():
        tr = v["trace"]
        bound = [lipschitz_bound(t) for t in tr]
        g1 = [t["grad_norm"][0] for t in tr]
        name = k + (f" (diverged at step {v['diverged_at']})" if v["diverged_at"] is not None else "")
        lines.append(f"| {name} | {_g(bound[0])} | {_g(bound[-1])} | {_g(bound[-1] / bound[0], 2)}x | "
                     f"{_span(bound, 3)} | {_g(g1[0], 2)} | {_g(g1[-1], 2)} | {_span(g1[1:])} |")
        moved += [abs(y / x - 1) for x, y in zip(tr[0]["sigma_mat0"], tr[-1]["sigma_mat0"])]
    moved.sort()
    lines += ["", f"The raw weights' sigma(W_mat(0)) moved between the first and the last probe by "
              f"{100 * moved[len(moved) // 2]:.1f}% (median over variants and layers), at most "
              f"{100 * moved[-1]:.0f}%."]
    return "\n".join(lines)


def _growth(probe):
    return {k: lipschitz_bound(v["trace"][-1]) / lipschitz_bound(v["trace"][0]) for k, v in probe["train"].items()}


# (variant, against): the comparisons of the bound's growth that the pages discuss
PAIRS = [("SN", "none+LeCun"), ("BSN", "SN")]


def compare_block(probes):
    lines, less = [], {pair: 0 for pair in PAIRS}
    for path, probe in probes:
        s, grow = probe["settings"], _growth(probe)
        line = (f"- `{os.path.basename(path)}` (lr {s['lr']:g}, {s['steps']} steps, {_seeds([s['seed']])}): "
                f"growth of D's Lipschitz bound, smallest first: {_ordered(grow)}.")
        for a, b in PAIRS:
            verb = "less than" if grow[a] < grow[b] else "more than" if grow[a] > grow[b] else "as much as"
            less[(a, b)] += grow[a] < grow[b]
            line += f" {a}'s grew {verb} {b}'s ({_g(grow[a], 3)}x against {_g(grow[b], 3)}x)."
        lines.append(line)
    lines.append("- " + "; ".join(f"{a}'s bound grew less than {b}'s in {n} of {len(probes)} runs"
                                  for (a, b), n in less.items()) + "; each run is a single seed.")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The sweep: stability and samples
# --------------------------------------------------------------------------

def sweep_block(path, sweep):
    s, runs = sweep["settings"], sweep["runs"]
    names = [label(n, c) for n, c in NORMS]
    by = {}
    for r in runs:
        by.setdefault((label(r["norm"], r["scale"]), r["lr"]), {})[r["seed"]] = r
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"`{_rel(path)}` ({s['machine']}): width {s['width']}, batch {s['batch_size']}, {s['steps']} steps; "
             f"{len(names)} norms x {len(s['lrs'])} learning rates x {_seeds(seeds)}, {len(runs)} runs, "
             f"{sum(r['time_s'] for r in runs) / 60:.1f} CPU-minutes in all. FD: Fréchet distance in the features "
             f"of a small classifier (held-out accuracy {s['classifier_accuracy']:.3f}), lower is better.", "",
             "| norm | lr | diverged | FD per seed | coverage per seed |", "|---|---|---:|---|---|"]
    for name in names:
        for lr in s["lrs"]:
            rs = by.get((name, lr), {})
            if not rs:
                continue
            ordered = [rs[k] for k in sorted(rs)]
            lines.append(f"| {name} | {lr:g} | {sum(r['diverged_at'] is not None for r in ordered)} of {len(rs)} | "
                         + ", ".join(f"{r['final']['fd']:.0f}" for r in ordered) + " | "
                         + ", ".join(f"{r['final']['coverage']:.1f}" for r in ordered) + " |")
    lines.append("")
    for lr in s["lrs"]:
        ref = by.get(("SN", lr), {})
        verdicts = {"lower on every seed": [], "higher on every seed": [], "lower on some seeds only": []}
        for name in names:
            rs = by.get((name, lr), {})
            if name == "SN" or not rs or set(rs) != set(ref):
                continue
            lower = [rs[k]["final"]["fd"] < ref[k]["final"]["fd"] for k in rs]
            key = "lower on every seed" if all(lower) else "higher on every seed" if not any(lower) else \
                "lower on some seeds only"
            verdicts[key].append(name)
        best = [min((n for n in names if seed in by.get((n, lr), {})),
                    key=lambda n: by[(n, lr)][seed]["final"]["fd"]) for seed in seeds]
        lines.append(f"- lr {lr:g}, FD against SN's on the same seed: "
                     + "; ".join(f"{k}: {', '.join(v)}" for k, v in verdicts.items() if v)
                     + ". Lowest FD: " + ", ".join(f"seed {sd}: {b}" for sd, b in zip(seeds, best)) + ".")
    diverged = sum(r["diverged_at"] is not None for r in runs)
    lines.append(f"- Diverged (a non-finite loss): {diverged} of {len(runs)} runs.")
    return "\n".join(lines)


def evidence_blocks(results=RESULTS):
    """{block name: markdown} from the saved results in `results`."""
    probes = [(p, _load(p)) for p in sorted(glob.glob(os.path.join(results, "probe*.json")))]
    init_path = os.path.join(results, "probe.json")  # part A: the run the others reuse (--init-from)
    init = _load(init_path)
    blocks = {"bsn-init": init_block(init_path, init), "bsn-init-sigmas": init_sigmas_block(init_path, init)}
    for path, probe in probes:
        blocks["bsn-" + os.path.splitext(os.path.basename(path))[0]] = probe_block(path, probe)
    blocks["bsn-probe-compare"] = compare_block(probes)
    sweep_path = os.path.join(results, "sweep.json")
    blocks["bsn-sweep"] = sweep_block(sweep_path, _load(sweep_path))
    return blocks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown-into", nargs="+", default=PAGES, metavar="FILE",
                   help="markdown files whose bsn-... regions to rewrite [README.md docs/why_bsn.md]")
    p.add_argument("--results", default=RESULTS, help="folder of probe*.json and sweep.json [examples/results]")
    args = p.parse_args(argv)
    blocks = evidence_blocks(args.results)
    for path in args.markdown_into:
        with open(path) as f:
            text = f.read()
        new, _ = markers.fill(text, blocks)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
        print(f"{path}: regions {', '.join(n for n in markers.regions(new) if n in blocks) or 'none'}")


if __name__ == "__main__":
    main()
