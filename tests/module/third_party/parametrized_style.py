"""Code on the parametrization flavour, looked up through ``torch.nn`` at call time."""

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm


def build():
    first = spectral_norm(nn.Linear(6, 5))
    second = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(5, 3))  # looked up when called
    third = nn.utils.spectral_norm(nn.Linear(3, 1))  # the legacy flavour, looked up when called
    return nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), third)
