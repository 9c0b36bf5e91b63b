"""HiFi-GAN-style: one import line for weight norm and spectral norm, chosen per layer."""

import torch.nn as nn
from torch.nn.utils import remove_weight_norm, spectral_norm, weight_norm  # noqa: F401


def build(use_spectral_norm=True):
    norm = spectral_norm if use_spectral_norm else weight_norm
    return nn.Sequential(norm(nn.Conv1d(1, 4, 5, padding=2)), nn.LeakyReLU(0.1), norm(nn.Conv1d(4, 1, 3, padding=1)))
