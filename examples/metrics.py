"""Sample-quality metrics that need no download.

A small CNN classifier is trained on the real images (with their labels);
its penultimate features define a Fréchet distance (FD, as FID does with
Inception features), and its predictions give the class coverage of a set of
samples (mode collapse shows up as missing classes). Numbers are comparable
only between runs that use the same classifier (same data, size and seed).
"""

import torch
import torch.nn.functional as F
from torch import nn


class SmallClassifier(nn.Module):
    def __init__(self, channels, size, n_classes, features=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, features), nn.ReLU(),
        )
        self.head = nn.Linear(features, n_classes)

    def features(self, x):
        return self.net(x)

    def forward(self, x):
        return self.head(self.net(x))


def train_classifier(images, labels, epochs=8, seed=0, batch_size=128):
    """Train on (images, labels) with a fixed seed; returns the model (eval mode) and its accuracy
    on a held-out 20 % split (a sanity check that its features mean something)."""
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    perm = torch.randperm(n, generator=g)
    split = int(n * 0.8)
    tr, te = perm[:split], perm[split:]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SmallClassifier(images.shape[1], images.shape[-1], int(labels.max()) + 1)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs):
            order = tr[torch.randperm(len(tr), generator=g)]
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(images[te]).argmax(1) == labels[te]).float().mean().item()
    return model, acc


@torch.no_grad()
def features_and_probs(model, images, batch_size=256):
    feats, probs = [], []
    for i in range(0, images.shape[0], batch_size):
        f = model.features(images[i : i + batch_size])
        feats.append(f)
        probs.append(model.head(f).softmax(1))
    return torch.cat(feats).double(), torch.cat(probs)


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    e, q = torch.linalg.eigh(s1)
    root1 = (q * e.clamp_min(0).sqrt()) @ q.T
    middle = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * middle).item()


def class_coverage(probs, n_classes, min_share=0.25):
    """Fraction of classes predicted for at least min_share / n_classes of the samples."""
    counts = torch.bincount(probs.argmax(1), minlength=n_classes).double()
    return (counts / counts.sum() >= min_share / n_classes).double().mean().item()


class Evaluator:
    """FD and class coverage of samples against the real data, with one classifier."""

    def __init__(self, images, labels, seed=0, epochs=8):
        self.model, self.accuracy = train_classifier(images, labels, epochs=epochs, seed=seed)
        self.n_classes = int(labels.max()) + 1
        self.real_features, _ = features_and_probs(self.model, images)

    def __call__(self, samples):
        if not torch.isfinite(samples).all():
            return {"fd": float("nan"), "coverage": 0.0, "confidence": 0.0}
        f, p = features_and_probs(self.model, samples)
        return {
            "fd": frechet_distance(f, self.real_features),
            "coverage": class_coverage(p, self.n_classes),
            "confidence": p.max(1).values.mean().item(),
        }
