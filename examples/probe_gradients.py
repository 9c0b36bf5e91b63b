"""Reproduce the gradient analysis of Lin, Sekar and Fanti (NeurIPS 2021) with bsn_cuda.diagnostics.

Part A (at initialization): the SNGAN CNN discriminator (width 64, CIFAR-shaped
32x32x3 input), one batch of real images; per-layer gradient norm of the mean
D output w.r.t. each layer's weight, the sigmas and the effective gain of
each layer, for: no normalization with LeCun or Kaiming init, SN, strict SN,
BSN, SSN(c), BSSN(c).

Part B (training): the same topology at width ``--train-width`` trained as a
GAN (hinge loss, Adam) on scikit-learn's digits upsampled to 32x32x3, probed
every ``--probe-every`` steps on a fixed real batch.

Writes examples/results/probe.{json,md,png}. CPU only; a few minutes.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data as datasets  # noqa: E402
import train_gan  # noqa: E402
from sngan import Discriminator  # noqa: E402

from bsn_cuda import diagnostics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Okabe-Ito palette (colour-blind safe), one colour and marker per variant.
STYLE = {
    "none+LeCun": ("#000000", "o"),
    "none+Kaiming": ("#999999", "s"),
    "SN": ("#0072B2", "^"),
    "strict SN": ("#D55E00", "v"),
    "BSN": ("#009E73", "D"),
    "SSN": ("#56B4E9", "<"),
    "BSSN": ("#CC79A7", ">"),
}


def variants(c):
    return [
        ("none+LeCun", dict(norm="none", init="lecun")),
        ("none+Kaiming", dict(norm="none", init="kaiming")),
        ("SN", dict(norm="sn", scale=1.0)),
        ("strict SN", dict(norm="strict", scale=1.0)),
        ("BSN", dict(norm="bsn", scale=1.0)),
        ("SSN", dict(norm="sn", scale=c)),
        ("BSSN", dict(norm="bsn", scale=c)),
    ]


def lipschitz_bound(entry):
    """Upper bound on D's Lipschitz constant from a saved probe entry (see summarize)."""
    return math.prod(entry["eff_sigma_strict"][:-1]) * entry["eff_sigma_mat0"][-1]


def summarize(reports):
    g = [r.grad_norm for r in reports]
    return {
        "grad_norm": g,
        "grad_norm_eff": [r.grad_norm_eff for r in reports],
        "eff_sigma_strict": [r.eff_sigma_strict for r in reports],
        "eff_sigma_mat0": [r.eff_sigma_mat0 for r in reports],
        "factor": [r.factor for r in reports],
        "sigma_mat0": [r.sigma_mat0 for r in reports],
        "sigma_mat1": [r.sigma_mat1 for r in reports],
        "sigma_strict": [r.sigma_strict for r in reports],
        "spread": max(g) / min(g) if min(g) > 0 else math.inf,
        # Upper bound on D's Lipschitz constant: product of the layers' operator norms
        # (LeakyReLU is 1-Lipschitz); the linear layer's is its matrix norm.
        "lipschitz_bound": math.prod(r.eff_sigma_strict for r in reports[:-1]) * reports[-1].eff_sigma_mat0,
    }


def part_a(args, images):
    out = {}
    x = images[:args.batch]
    for name, kw in variants(args.c):
        torch.manual_seed(args.seed)
        D = Discriminator(3, 32, 64, kw["norm"], kw.get("scale"), kw.get("init", "lecun"))
        D.train()
        D(x)  # one training forward, as in training (one power-iteration update)
        reports = diagnostics.probe(D, x, strict_iterations=args.strict_iterations)
        with torch.no_grad():
            d_out = D.eval()(x).std().item()
        out[name] = {**summarize(reports), "d_out_std": d_out}
        print(f"[A] {name:13s} grad norms " + " ".join(f"{v:.2e}" for v in out[name]["grad_norm"]))
        out[name]["table"] = diagnostics.to_markdown(reports)
    return out


def part_b(args, images):
    out = {}
    fixed = images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(3))[:args.batch]]
    for name, kw in variants(args.c):
        targs = train_gan.parse_args([
            "--norm", kw["norm"], "--init", kw.get("init", "lecun"), "--width", str(args.train_width),
            "--batch-size", str(args.train_batch), "--steps", str(args.steps), "--lr", str(args.lr),
            "--log-every", str(args.probe_every), "--seed", str(args.seed), "--quiet", "--no-eval",
        ])
        targs.scale = kw.get("scale", 1.0)
        trace = []

        def hook(step, D, G, _batch):
            reports = diagnostics.probe(D, fixed, strict_iterations=args.strict_iterations_train)
            trace.append({"step": step, **summarize(reports)})

        res = train_gan.train(targs, images, hook=hook, log=lambda s: None)
        out[name] = {"trace": trace, "diverged_at": res["diverged_at"], "time_s": res["time_s"]}
        print(f"[B] {name:13s} step {trace[-1]['step']}: spread {trace[-1]['spread']:.3g}, "
              f"layer-1 grad {trace[-1]['grad_norm'][0]:.2e} ({res['time_s']:.0f} s)")
    return out


def markdown(result):
    a, b, s = result["init"], result["train"], result["settings"]
    names = list(a)
    n_layers = len(a[names[0]]["grad_norm"])
    lines = [f"# Gradient probe ({s['machine']})", "",
             f"Settings: {json.dumps({k: v for k, v in s.items() if k != 'machine'})}", "",
             "## A. At initialization: SNGAN CNN discriminator (width 64), 32x32x3 input",
             "", "Gradient norm ||d mean(D(x)) / dW_l||_F of each layer's (raw) weight; "
             "layers 1-7 are the convolutions, 8 the linear layer. spread = max/min over layers.", ""]
    lines.append("| variant | " + " | ".join(f"L{i + 1}" for i in range(n_layers)) + " | spread | std of D(x) |")
    lines.append("|---|" + "---|" * (n_layers + 2))
    for k in names:
        lines.append(f"| {k} | " + " | ".join(f"{v:.2e}" for v in a[k]["grad_norm"])
                     + f" | {a[k]['spread']:.3g} | {a[k]['d_out_std']:.3g} |")
    lines += ["", "Effective gain of each layer: the operator norm of the convolution with the weight it uses "
              "(strict spectral norm of W_eff).", ""]
    lines.append("| variant | " + " | ".join(f"L{i + 1}" for i in range(n_layers - 1)) + " | L8 (linear) | product |")
    lines.append("|---|" + "---|" * (n_layers + 1))
    for k in names:
        g = a[k]["eff_sigma_strict"][:-1] + [a[k]["eff_sigma_mat0"][-1]]
        lines.append(f"| {k} | " + " | ".join(f"{v:.3g}" for v in g) + f" | {math.prod(g):.3g} |")
    lines += ["", f"Ratio sigma_strict / sigma(W_mat(0)) of the raw convolution kernels (SN variant): "
              + " ".join(f"{st / sn:.2f}" for st, sn in zip(a["SN"]["sigma_strict"][:-1], a["SN"]["sigma_mat0"][:-1])), ""]
    lines += [f"## B. During training (width {s['train_width']}, digits 32x32x3, lr {s['lr']}, batch {s['train_batch']})", "",
              "Layer-1 gradient norm / product of the layers' operator norms (Lipschitz bound of D) at each probe step.", ""]
    steps = [t["step"] for t in b[names[0]]["trace"]]
    lines.append("| variant | " + " | ".join(f"step {t}" for t in steps) + " |")
    lines.append("|---|" + "---|" * len(steps))
    for k in names:
        cells = [f"{t['grad_norm'][0]:.1e} / {t['lipschitz_bound']:.3g}" for t in b[k]["trace"]]
        extra = f" (diverged at {b[k]['diverged_at']})" if b[k]["diverged_at"] else ""
        lines.append(f"| {k}{extra} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b, s = result["init"], result["train"], result["settings"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for k, (color, marker) in STYLE.items():
        g = a[k]["grad_norm"]
        axes[0].plot(range(1, len(g) + 1), g, color=color, marker=marker, label=k)
        steps = [t["step"] for t in b[k]["trace"]]
        axes[1].plot(steps, [t["grad_norm"][0] for t in b[k]["trace"]], color=color, marker=marker, label=k)
        axes[2].plot(steps, [t["lipschitz_bound"] for t in b[k]["trace"]], color=color, marker=marker, label=k)
    axes[0].set(yscale="log", xlabel="layer (1-7 conv, 8 linear)", ylabel="||dD/dW|| (raw weight)",
                title="(a) part A: at init, SNGAN D width 64, 32x32x3")
    axes[1].set(yscale="log", xlabel="training step", ylabel="||dD/dW_1|| (layer 1)",
                title=f"(b) part B: layer 1 during training (width {s['train_width']})")
    axes[2].set(yscale="log", xlabel="training step", ylabel="product of the layers' operator norms",
                title="(c) part B: Lipschitz bound of D during training")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[2].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), title=f"c = {s['c']}")
    fig.suptitle(f"Gradient probe, {s['machine']}; probe batch {s['batch']}; part B: GAN on digits 32x32x3, "
                 f"lr {s['lr']}, batch {s['train_batch']}, {s['steps']} steps",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--c", type=float, default=1.4, help="scale of SSN/BSSN")
    p.add_argument("--batch", type=int, default=32, help="probe batch")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--probe-every", type=int, default=25)
    p.add_argument("--train-width", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--strict-iterations", type=int, default=30)
    p.add_argument("--strict-iterations-train", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--machine", default=platform.node() or "unknown machine")
    p.add_argument("--out", default=os.path.join(HERE, "results", "probe"))
    p.add_argument("--replot", action="store_true", help="rewrite the .md and .png from the .json")
    p.add_argument("--init-from", default=None, help="reuse part A from this probe .json (part B only)")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.out + ".json") as f:
            result = json.load(f)
        for part in ("init", "train"):
            for v in result[part].values():
                for t in v.get("trace", [v]):
                    t["lipschitz_bound"] = lipschitz_bound(t)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(result))
        plot(result, args.out + ".png")
        return
    torch.set_num_threads(args.threads)
    images, _ = datasets.load_digits(32, 3)
    start = time.time()
    result = {"settings": {**vars(args), "torch": torch.__version__}}
    result["settings"].pop("out")
    if args.init_from:
        with open(args.init_from) as f:
            result["init"] = json.load(f)["init"]
        result["settings"]["init_from"] = os.path.basename(args.init_from)
    else:
        result["init"] = part_a(args, images)
    result["train"] = part_b(args, images)
    result["settings"]["time_s"] = round(time.time() - start)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, separators=(",", ":"))
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    plot(result, args.out + ".png")
    print(f"wrote {args.out}.{{json,md,png}} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
