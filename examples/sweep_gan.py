"""Short sweep of examples/train_gan.py: norms x learning rates x seeds, one run at a time.

Offline (scikit-learn digits, 16x16), CPU, single thread. Each run is scored
by the Fréchet distance (FD) in the features of a small classifier trained on
the digits, and by class coverage; a run is "diverged" when a loss goes
non-finite, "collapsed" when its samples cover at most 3 of the 10 classes.
Results are appended to examples/results/sweep.json as runs finish (rerunning
skips finished runs), then summarized in sweep.md and sweep.png.
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data as datasets  # noqa: E402
import metrics  # noqa: E402
import train_gan  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NORMS = [("none", 1.0), ("sn", 1.0), ("strict", 1.0), ("bsn", 1.0), ("bssn", 1.4)]
COLLAPSE_COVERAGE = 0.3


def label(norm, scale):
    return {"none": "none (LeCun)", "sn": "SN", "strict": "strict SN", "bsn": "BSN"}.get(norm, f"BSSN c={scale}")


def outcome(run):
    if run["diverged_at"] is not None:
        return "diverged"
    return "collapsed" if run["final"]["coverage"] <= COLLAPSE_COVERAGE else "ok"


def summarize(runs, lrs):
    lines = []
    lines.append("| norm | lr | runs | diverged | collapsed | FD (mean) | FD per seed | coverage per seed |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for norm, scale in NORMS:
        for lr in lrs:
            rs = [r for r in runs if r["norm"] == norm and r["lr"] == lr]
            if not rs:
                continue
            fds = [r["final"].get("fd", float("nan")) for r in rs]
            ok = [f for f in fds if f == f]
            mean = sum(ok) / len(ok) if ok else float("nan")
            lines.append(
                f"| {label(norm, scale)} | {lr:g} | {len(rs)} | {sum(outcome(r) == 'diverged' for r in rs)} | "
                f"{sum(outcome(r) == 'collapsed' for r in rs)} | {mean:.0f} | "
                + ", ".join(f"{f:.0f}" for f in fds) + " | "
                + ", ".join(f"{r['final'].get('coverage', 0):.1f}" for r in rs) + " |"
            )
    return "\n".join(lines)


def plot(runs, lrs, settings, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = ["#0072B2", "#D55E00", "#009E73", "#CC79A7"]
    markers = ["o", "s", "^", "D"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for j, lr in enumerate(lrs):
        for i, (norm, scale) in enumerate(NORMS):
            rs = [r for r in runs if r["norm"] == norm and r["lr"] == lr]
            for k, r in enumerate(rs):
                x = i + (j - (len(lrs) - 1) / 2) * 0.25 + (k - (len(rs) - 1) / 2) * 0.06
                fd = r["final"].get("fd")
                first = i == 0 and k == 0
                if outcome(r) == "diverged" or fd is None or fd != fd:
                    axes[0].plot(x, 3000, marker="x", color=colors[j], ms=9, ls="none")
                else:
                    axes[0].plot(x, fd, marker=markers[j], color=colors[j], ls="none",
                                 label=f"lr {lr:g}" if first else None, mfc="none" if outcome(r) == "collapsed" else colors[j])
                axes[1].plot(x, r["final"].get("coverage", 0), marker=markers[j], color=colors[j], ls="none",
                             label=f"lr {lr:g}" if first else None)
    for ax in axes:
        ax.set_xticks(range(len(NORMS)))
        ax.set_xticklabels([label(n, s) for n, s in NORMS])
        ax.grid(True, alpha=0.3)
    axes[0].set(yscale="log", ylabel="FD to real digits (lower is better)", title="sample quality")
    axes[1].set(ylabel="class coverage (of 10 digits)", ylim=(-0.05, 1.05), title="class coverage")
    # the marker fills and the cross say the run's outcome: entries of their own, in black
    handles, labels = axes[1].get_legend_handles_labels()
    for marker, fill, text in (("o", "black", "finished (filled)"),
                               ("o", "none", f"collapsed: coverage <= {COLLAPSE_COVERAGE} (hollow)"),
                               ("x", "black", "diverged (x, at the top)")):
        handles.append(Line2D([], [], marker=marker, color="black", mfc=fill, ls="none"))
        labels.append(text)
    axes[1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(
        f"{settings['machine']}: digits 16x16, width {settings['width']}, batch {settings['batch_size']}, "
        f"{settings['steps']} steps, Adam(0.5, 0.999), seeds {settings['seeds']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def plot_samples(samples, lrs, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(lrs), len(NORMS), figsize=(2.2 * len(NORMS), 2.8 * len(lrs)), squeeze=False)
    for j, lr in enumerate(lrs):
        for i, (norm, scale) in enumerate(NORMS):
            ax = axes[j][i]
            ax.axis("off")
            x = samples.get(f"{norm}|{lr}")
            ax.set_title(f"{label(norm, scale)}, lr {lr:g}", fontsize=8)
            if x is None:
                continue
            x = torch.tensor(x, dtype=torch.float32) / 255
            grid = x.view(4, 4, x.shape[-2], x.shape[-1]).permute(0, 2, 1, 3).reshape(4 * x.shape[-2], 4 * x.shape[-1])
            ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=70, bbox_inches="tight")
    plt.close(fig)


def draw(state, out):
    """Both figures of a sweep, from its saved state (the .json)."""
    s = state["settings"]
    plot(state["runs"], s["lrs"], s, out + ".png")
    plot_samples(state["samples"], s["lrs"], out + "_samples.png",
                 f"samples after {s['steps']} steps, seed {s['seeds'][0]} ({s['machine']})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 2e-3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--machine", default=platform.node() or "unknown machine")
    p.add_argument("--out", default=os.path.join(HERE, "results", "sweep"))
    p.add_argument("--replot", action="store_true",
                   help="only redraw the .png figures from the saved .json (no training, no classifier)")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.out + ".json") as f:
            state = json.load(f)
        draw(state, args.out)
        return
    torch.set_num_threads(1)
    images, labels = datasets.load_digits(16, 1)
    evaluator = metrics.Evaluator(images, labels)
    settings = {"machine": args.machine, "torch": torch.__version__, "width": args.width, "batch_size": args.batch_size,
                "steps": args.steps, "lrs": args.lrs, "seeds": args.seeds, "classifier_accuracy": evaluator.accuracy}
    path = args.out + ".json"
    state = {"settings": settings, "runs": [], "samples": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        state["runs"], state["samples"] = old["runs"], old.get("samples", {})
    done = {(r["norm"], r["lr"], r["seed"]) for r in state["runs"]}
    for lr in args.lrs:
        for seed in args.seeds:
            for norm, scale in NORMS:
                if (norm, lr, seed) in done:
                    continue
                targs = train_gan.parse_args([
                    "--norm", norm, "--scale", str(scale), "--lr", str(lr), "--seed", str(seed),
                    "--steps", str(args.steps), "--width", str(args.width), "--batch-size", str(args.batch_size),
                    "--log-every", "100", "--quiet"])
                res = train_gan.train(targs, images, evaluator, log=print)
                G = res.pop("G")
                res.pop("D")
                run = {"norm": norm, "scale": scale, "lr": lr, "seed": seed, "diverged_at": res["diverged_at"],
                       "final": res["final"], "time_s": res["time_s"],
                       "sigmas_last": res["history"][-1]["sigmas"] if res["history"] else None}
                state["runs"].append(run)
                if seed == args.seeds[0] and res["diverged_at"] is None:
                    x = train_gan.sample(G, 16, targs.z_dim, 16, torch.Generator().manual_seed(7))
                    # 8-bit grey levels keep the JSON small.
                    state["samples"][f"{norm}|{lr}"] = ((x.clamp(-1, 1) * 0.5 + 0.5) * 255).round().to(torch.uint8).squeeze(1).tolist()
                print(f"{label(norm, scale):12s} lr {lr:g} seed {seed}: {outcome(run)}, FD {run['final'].get('fd', float('nan')):.1f}, "
                      f"coverage {run['final'].get('coverage', 0):.1f} ({res['time_s']:.0f} s)", flush=True)
                with open(path, "w") as f:
                    json.dump(state, f)
    runs = state["runs"]
    table = summarize(runs, args.lrs)
    with open(args.out + ".md", "w") as f:
        f.write(f"# GAN sweep ({args.machine})\n\nSettings: {json.dumps({k: v for k, v in settings.items() if k != 'machine'})}\n\n"
                f"Outcome: diverged = non-finite loss; collapsed = coverage <= {COLLAPSE_COVERAGE} (at most 3 of 10 classes; "
                f"in short runs this also counts runs that have not learned yet).\n\n"
                + table + "\n")
    draw(state, args.out)
    print(table)


if __name__ == "__main__":
    main()
