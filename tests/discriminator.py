"""The small SN/BSN discriminator shared by the tests and tests/training/memory_soak.py.

    Conv(3 -> c1, 3x3, stride 2) - LeakyReLU - Conv(c1 -> c2, 3x3, stride 2) - LeakyReLU
    [- Conv(c2 -> c2, 1x1)] - Flatten - Linear(-> 1 logit)

on ``size`` x ``size`` RGB images. Plain torch and bsn_cuda only (no pytest), so
that scripts and the distributed tests' worker processes can import it.
"""

import torch
from torch import nn

import bsn_cuda


def build_discriminator(
    norm="mixed",
    *,
    channels=(6, 8),
    pointwise=False,
    size=8,
    n_power_iterations=1,
    dtype=torch.float32,
    device="cpu",
    seed=0,
):
    """The discriminator with spectral norms, built after ``torch.manual_seed(seed)``.

    ``norm``: "sn" or "bsn" puts that norm on every layer (``n_power_iterations``
    each); "mixed" puts BSN on the convs (the second one with 2 power iterations;
    the 1x1 conv of ``pointwise`` takes BSN's SN path) and SN with scale 1.5 on
    the linear; a function ``norm(model)`` registers other norms itself.
    """
    torch.manual_seed(seed)
    c1, c2 = channels
    layers = [
        nn.Conv2d(3, c1, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
    ]
    if pointwise:
        layers.append(nn.Conv2d(c2, c2, 1))
    layers += [nn.Flatten(), nn.Linear(c2 * (size // 4) ** 2, 1)]
    model = nn.Sequential(*layers).to(device, dtype)
    if callable(norm):
        norm(model)
    elif norm == "mixed":
        convs = [m for m in model if isinstance(m, nn.Conv2d)]
        for index, conv in enumerate(convs):
            bsn_cuda.bidirectional_spectral_norm(conv, n_power_iterations=2 if index == 1 else n_power_iterations)
        bsn_cuda.spectral_norm(model[-1], n_power_iterations=n_power_iterations, scale=1.5)
    else:
        bsn_cuda.apply_spectral_norm(model, kind=norm, n_power_iterations=n_power_iterations)
    return model


def images(seed, dtype=torch.float32, device="cpu", n=4, size=8):
    """A batch of ``n`` random images for the discriminator, drawn from their own generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64).to(device, dtype)
