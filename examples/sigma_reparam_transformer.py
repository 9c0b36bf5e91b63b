"""A small transformer with the learnable scale (``learnable_scale=True``) on every Linear.

The task: sort a sequence of 12 digits (token-wise classification of the
sorted sequence), a toy task that needs attention. Two copies of the same
model (same seed) train side by side with Adam: ``plain`` Linears, and
``sigma_reparam``: ``bsn_cuda.spectral_norm(linear, learnable_scale=True)`` on
every Linear (q, k, v, out projections, both MLP layers, the head), i.e.
``W_hat = gamma / sigma(W) * W`` with ``gamma`` starting at sigma (the layer
starts as ``W``). Logged every few steps: training loss, token accuracy on a
fixed test batch and the mean attention entropy (nats, over heads, queries
and layers); sigmaReparam's motivation is attention entropy collapse.

    python examples/sigma_reparam_transformer.py --steps 300 --out examples/results/sigma_reparam
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bsn_cuda  # noqa: E402

VOCAB, LENGTH = 10, 12


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.entropy = None

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads
        q, k, v = (t(x).view(b, n, h, d // h).transpose(1, 2) for t in (self.q, self.k, self.v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d // h)).softmax(-1)
        self.entropy = -(att * att.clamp_min(1e-12).log()).sum(-1).mean().detach()
        return self.o((att @ v).transpose(1, 2).reshape(b, n, d))


class Layer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.att = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.att(self.n1(x))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class Transformer(nn.Module):
    def __init__(self, dim=64, heads=4, depth=2):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(LENGTH, dim) * 0.02)
        self.layers = nn.ModuleList(Layer(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def attention_entropy(self):
        return torch.stack([layer.att.entropy for layer in self.layers]).mean().item()


def batch(n, gen):
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)
    return x, x.sort(dim=1).values


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = {}
    for name in ("plain", "sigma_reparam"):
        torch.manual_seed(args.seed)
        model = Transformer()
        if name == "sigma_reparam":
            for m in list(model.modules()):
                if isinstance(m, nn.Linear):
                    bsn_cuda.spectral_norm(m, learnable_scale=True)
        runs[name] = {"model": model, "opt": torch.optim.Adam(model.parameters(), lr=args.lr), "log": [],
                      "seconds": 0.0}
    gen = torch.Generator().manual_seed(args.seed + 1)
    test_x, test_y = batch(512, torch.Generator().manual_seed(999))
    for step in range(1, args.steps + 1):
        x, y = batch(64, gen)
        for name, r in runs.items():  # the same batch for both, interleaved
            model, opt = r["model"], r["opt"]
            model.train()
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            r["seconds"] += time.perf_counter() - t0
            if step % args.log_every == 0 or step == 1:
                model.eval()
                with torch.no_grad():
                    acc = (model(test_x).argmax(-1) == test_y).float().mean().item()
                r["log"].append({"step": step, "loss": loss.item(), "test_token_accuracy": acc,
                                 "attention_entropy": model.attention_entropy()})
    lines = [f"Sorting 12 digits, 2-layer transformer (dim 64, 4 heads), {args.steps} steps of 64, Adam lr {args.lr}, "
             f"torch threads {args.threads}", "",
             "| step | plain: loss | acc | attn entropy | sigmaReparam: loss | acc | attn entropy |",
             "|---|---|---|---|---|---|---|"]
    for a, b in zip(runs["plain"]["log"], runs["sigma_reparam"]["log"]):
        lines.append(f"| {a['step']} | {a['loss']:.3f} | {a['test_token_accuracy']:.3f} | {a['attention_entropy']:.3f} "
                     f"| {b['loss']:.3f} | {b['test_token_accuracy']:.3f} | {b['attention_entropy']:.3f} |")
    lines.append("")
    lines.append(f"training time: plain {runs['plain']['seconds']:.1f} s, "
                 f"sigmaReparam {runs['sigma_reparam']['seconds']:.1f} s "
                 f"(uniform entropy: {math.log(LENGTH):.3f} nats)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"args": vars(args), "runs": {k: {"log": v["log"], "seconds": v["seconds"]}
                                                    for k, v in runs.items()}}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
