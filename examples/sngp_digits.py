"""SNGP-style residual classifier with the soft bound (``coeff``) on the digits set.

A residual CNN (stem, residual blocks of two 3x3 convolutions, pooled linear
head) trained three ways on scikit-learn's 8x8 digits (offline, examples/data.py):

* ``plain``: unnormalized convolutions;
* ``fused``: ``bsn_cuda.spectral_norm(conv, coeff=c)`` on every convolution;
* ``due``: DUE's formula ``W / max(1, sigma / c)`` written in plain torch (a
  parametrization with torch's power iteration), on the same convolutions.

Reported: test accuracy, training time, and for the normalized runs each
layer's sigma after training and a converged power iteration
(``bsn_cuda.refresh_spectral_norm``): the exact spectral norm of ``W_mat(0)``
of the weight the layer computes with, which the bound keeps at most ``c``. The bound is on the
matricization's spectral norm, as in SNGP/DUE, not on the convolution's
operator norm.

    python examples/sngp_digits.py --epochs 15 --out examples/results/sngp_digits
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bsn_cuda  # noqa: E402
from data import load_digits  # noqa: E402


class DueSoftBound(nn.Module):
    """DUE's soft bound in plain torch: u-first power iteration under no_grad, W / max(1, sigma / c)."""

    def __init__(self, weight, coeff, eps=1e-12):
        super().__init__()
        self.coeff, self.eps = coeff, eps
        w = weight.detach().reshape(weight.shape[0], -1)
        self.register_buffer("u", F.normalize(torch.randn(w.shape[0]), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(w.shape[1]), dim=0))
        for _ in range(15):
            self._iterate(w)

    @torch.no_grad()
    def _iterate(self, w):
        self.u.copy_(F.normalize(w @ self.v, dim=0, eps=self.eps))
        self.v.copy_(F.normalize(w.t() @ self.u, dim=0, eps=self.eps))

    def forward(self, weight):
        w = weight.reshape(weight.shape[0], -1)
        if self.training:
            self._iterate(w.detach())
        sigma = torch.dot(self.u.clone(), w @ self.v.clone())
        return weight / torch.max(torch.ones_like(sigma), sigma / self.coeff)


class Block(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.c2(F.relu(self.c1(F.relu(x))))


def make_model(ch=64, blocks=3):
    return nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), *[Block(ch) for _ in range(blocks)],
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 10))


def convs(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def normalize(model, how, coeff):
    for conv in convs(model):
        if how == "fused":
            bsn_cuda.spectral_norm(conv, coeff=coeff)
        elif how == "due":
            parametrize.register_parametrization(conv, "weight", DueSoftBound(conv.weight, coeff))
    return model


def run(how, coeff, epochs, x_train, y_train, x_test, y_test, seed):
    torch.manual_seed(seed)
    model = normalize(make_model(), how, coeff)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t0
    # Converged sigma before evaluating (one power iteration per step lags the
    # weight): bsn_cuda.refresh_spectral_norm; the plain-torch peer iterates by hand.
    if how == "fused":
        bsn_cuda.refresh_spectral_norm(model, tol=1e-6)
    elif how == "due":
        with torch.no_grad():
            for conv in convs(model):
                p = conv.parametrizations.weight[0]
                w = conv.parametrizations.weight.original.reshape(conv.weight.shape[0], -1)
                for _ in range(1000):
                    p._iterate(w)
    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        sigmas = []
        for conv in convs(model):
            w = conv.weight.detach()
            sigmas.append(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), 2).item())
    return {"how": how, "test_accuracy": acc, "train_seconds": train_s, "layer_sigmas": sigmas,
            "max_sigma": max(sigmas)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--coeff", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="path prefix for .json and .md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x, y = load_digits(size=8)
    g = torch.Generator().manual_seed(123)
    perm = torch.randperm(len(x), generator=g)
    test, train = perm[:360], perm[360:]
    results = [run(how, args.coeff, args.epochs, x[train], y[train], x[test], y[test], args.seed)
               for how in ("plain", "fused", "due")]
    lines = [f"SNGP-style residual CNN on digits, {args.epochs} epochs, coeff={args.coeff}, "
             f"torch threads {args.threads}, torch {torch.__version__}", "",
             "| layers | test accuracy | training time (s) | max sigma(W_mat) of the layers |",
             "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['how']} | {r['test_accuracy']:.3f} | {r['train_seconds']:.1f} | {r['max_sigma']:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
