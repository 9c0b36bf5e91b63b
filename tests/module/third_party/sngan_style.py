"""A third-party-style discriminator (SNGAN / CIFAR GAN repositories): binds
``spectral_norm`` from ``torch.nn.utils`` at import."""

import torch.nn as nn
from torch.nn.utils import spectral_norm


def build():
    return nn.Sequential(spectral_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.LeakyReLU(0.1), nn.Flatten(),
                         spectral_norm(nn.Linear(8 * 8 * 8, 1)))
