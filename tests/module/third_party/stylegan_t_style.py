"""StyleGAN-T / projected-discriminator style: the private class path and
``SpectralNorm.apply``, plus a subclass defined at import."""

import torch.nn as nn
from torch.nn.utils.spectral_norm import SpectralNorm


class CountingSpectralNorm(SpectralNorm):
    """A subclass that only counts its calls (the weight is its base's)."""

    calls = 0

    def __call__(self, module, inputs):
        CountingSpectralNorm.calls += 1
        return super().__call__(module, inputs)


def build():
    conv = nn.Conv1d(4, 4, 3, padding=1)
    SpectralNorm.apply(conv, "weight", 1, 0, 1e-12)
    return conv


def base_class():
    return SpectralNorm
