"""A small SNGAN-style GAN with a choice of discriminator normalization.

    python examples/train_gan.py --norm bsn                 # offline: sklearn digits, 16x16, CPU minutes
    python examples/train_gan.py --norm bssn --scale 1.4 --lr 2e-4 --steps 3000
    python examples/train_gan.py --dataset cifar10 --data-root ~/data/cifar-10-batches-py --size 32 --width 64 --batch-size 64 --lr 2e-4
    python examples/train_gan.py --dataset folder --data-root ~/images --size 32

Hinge loss, Adam, the SNGAN CNN discriminator and generator of
examples/sngan.py (width ``--width``; 64 is the paper's CIFAR-10 model).
Logs the losses and each discriminator layer's sigma (what its normalization
divided by) every ``--log-every`` steps; evaluates the Fréchet distance in the
feature space of a small classifier trained on the same data and the class
coverage of the samples (examples/metrics.py; needs labels). A run "diverges"
when a loss or a sample becomes non-finite. ``--json`` writes the whole log,
``--samples`` a PNG grid (needs matplotlib).
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data as datasets  # noqa: E402
from sngan import NORMS, Discriminator, Generator, layer_sigma  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10", "folder"])
    p.add_argument("--data-root", default=None, help="cifar-10-batches-py folder, or a folder of images")
    p.add_argument("--size", type=int, default=None, help="image size, a multiple of 8 (default 16 for digits, 32 otherwise)")
    p.add_argument("--channels", type=int, default=None, help="1 or 3 (default 1 for digits, 3 otherwise)")
    p.add_argument("--norm", default="sn", choices=NORMS, help="discriminator normalization")
    p.add_argument("--scale", type=float, default=None, help="the constant c of SSN/BSSN (default 1, 1.4 for ssn/bssn)")
    p.add_argument("--init", default="lecun", choices=["lecun", "kaiming"], help="discriminator init")
    # Defaults sized for a CPU demo on the digits (about 2 minutes on one core).
    p.add_argument("--width", type=int, default=8, help="base channel width (SNGAN: 64)")
    p.add_argument("--z-dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=800, help="generator steps")
    p.add_argument("--n-dis", type=int, default=1, help="discriminator steps per generator step")
    p.add_argument("--lr", type=float, default=2e-3, help="SNGAN on CIFAR-10: 2e-4")
    p.add_argument("--beta1", type=float, default=0.5)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate FD every N steps (0: at the end only)")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--no-eval", action="store_true", help="skip the classifier and FD")
    p.add_argument("--classifier-epochs", type=int, default=8, help="epochs of the metric's classifier")
    p.add_argument("--json", default=None, help="write the log and results here")
    p.add_argument("--samples", default=None, help="write a PNG grid of samples here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def build(args, in_channels, size):
    torch.manual_seed(args.seed)
    D = Discriminator(in_channels, size, args.width, args.norm, args.scale, args.init)
    G = Generator(args.z_dim, in_channels, size, args.width)
    return D, G


@torch.no_grad()
def sample(G, n, z_dim, batch_size, generator):
    # Batch statistics in BatchNorm (train mode), as during training.
    out = [G(torch.randn(min(batch_size, n - i), z_dim, generator=generator)) for i in range(0, n, batch_size)]
    return torch.cat(out)


def train(args, images, evaluator=None, hook=None, log=print):
    """Train; returns a dict with the config, the log and the final metrics.
    ``hook(step, D, G, real_batch)`` runs before step 0 and after every log step."""
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    D, G = build(args, channels, size)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    gen = torch.Generator().manual_seed(args.seed + 1)
    eval_gen = torch.Generator()
    history, evals = [], []
    diverged_at = None
    start = time.time()

    def batch():
        return images[torch.randint(0, n, (args.batch_size,), generator=gen)]

    def evaluate(step):
        eval_gen.manual_seed(12345)
        samples = sample(G, args.eval_samples, args.z_dim, 250, eval_gen)
        res = {"step": step, **evaluator(samples)}
        evals.append(res)
        if not args.quiet:
            log(f"eval step {step}: FD {res['fd']:.2f}  coverage {res['coverage']:.2f}  confidence {res['confidence']:.2f}")

    if hook is not None:
        hook(0, D, G, batch())
    for step in range(1, args.steps + 1):
        for _ in range(args.n_dis):
            real = batch()
            fake = G(torch.randn(args.batch_size, args.z_dim, generator=gen)).detach()
            loss_d = F.relu(1 - D(real)).mean() + F.relu(1 + D(fake)).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        fake = G(torch.randn(args.batch_size, args.z_dim, generator=gen))
        loss_g = -D(fake).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if not (math.isfinite(loss_d.item()) and math.isfinite(loss_g.item())):
            diverged_at = step
            log(f"step {step}: non-finite loss (D {loss_d.item()}, G {loss_g.item()}); stopping")
            break
        if step % args.log_every == 0 or step == args.steps:
            sig = [layer_sigma(m) for m in D.layers()]
            history.append({"step": step, "loss_d": loss_d.item(), "loss_g": loss_g.item(), "sigmas": sig,
                            "time_s": time.time() - start})
            if not args.quiet:
                log(f"step {step}: loss_D {loss_d.item():.3f}  loss_G {loss_g.item():.3f}  "
                    f"sigma " + " ".join(f"{s:.3g}" for s in sig) + f"  ({time.time() - start:.0f} s)")
            if hook is not None:
                hook(step, D, G, batch())
        if evaluator is not None and args.eval_every and step % args.eval_every == 0 and step != args.steps:
            evaluate(step)
    if evaluator is not None and diverged_at is None:
        evaluate(step)
    final = evals[-1] if evals else {}
    return {
        "config": vars(args),
        "history": history,
        "evals": evals,
        "diverged_at": diverged_at,
        "final": final,
        "time_s": time.time() - start,
        "G": G,
        "D": D,
    }


def save_grid(G, args, path, channels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(7)
    x = sample(G, 64, args.z_dim, 64, g).clamp(-1, 1) * 0.5 + 0.5
    grid = x.view(8, 8, channels, x.shape[-2], x.shape[-1]).permute(0, 3, 1, 4, 2).reshape(8 * x.shape[-2], 8 * x.shape[-1], channels)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if channels == 1 else None, vmin=0, vmax=1)
    ax.axis("off")
    scale = "" if args.norm == "none" else f" c={args.scale}"
    ax.set_title(f"{args.dataset} {args.norm}{scale} lr={args.lr} step {args.steps}", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    images, labels = datasets.load(args.dataset, args.data_root, args.size, args.channels)
    if args.scale is None:
        from sngan import DEFAULT_SCALE

        args.scale = DEFAULT_SCALE[args.norm]
    if not args.quiet:
        print(f"{args.dataset}: {tuple(images.shape)}; D norm {args.norm} (c={args.scale}), width {args.width}, "
              f"lr {args.lr}, {args.steps} steps of batch {args.batch_size}")
    evaluator = None
    if not args.no_eval:
        if labels is None:
            print("no labels: FD/coverage need a labelled dataset; skipping them")
        else:
            import metrics

            evaluator = metrics.Evaluator(images, labels, epochs=args.classifier_epochs)
            if not args.quiet:
                print(f"metric classifier: held-out accuracy {evaluator.accuracy:.3f}")
    result = train(args, images, evaluator)
    if args.samples and result["diverged_at"] is None:
        save_grid(result["G"], args, args.samples, images.shape[1])
    result.pop("G")
    result.pop("D")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if not args.quiet:
        print(json.dumps({"diverged_at": result["diverged_at"], **result["final"], "time_s": round(result["time_s"], 1)}))
    return result


if __name__ == "__main__":
    main()
