"""DUE-style (uncertainty nets): a subclass of the legacy ``SpectralNorm`` that
overrides ``compute_weight`` with a soft bound ``W / max(1, sigma / coeff)``,
and registers itself through its own ``apply``."""

import torch
from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormStateDictHook


class SoftBoundSpectralNorm(SpectralNorm):
    coeff = 1.0

    def compute_weight(self, module, do_power_iteration):
        super().compute_weight(module, do_power_iteration)  # the power iteration (u, v in place)
        weight = getattr(module, self.name + "_orig")
        u, v = getattr(module, self.name + "_u"), getattr(module, self.name + "_v")
        sigma = torch.dot(u, torch.mv(self.reshape_weight_to_matrix(weight), v))
        return weight / torch.clamp(sigma / self.coeff, min=1.0)

    @staticmethod
    def apply(module, coeff, name="weight", n_power_iterations=1, dim=0, eps=1e-12):
        fn = SpectralNorm.apply(module, name, n_power_iterations, dim, eps)
        fn.__class__ = SoftBoundSpectralNorm
        fn.coeff = coeff
        return fn


class VersionedStateDictHook(SpectralNormStateDictHook):
    """A subclass of the state-dict hook, as such code defines them."""


def soft_bound(module, coeff):
    SoftBoundSpectralNorm.apply(module, coeff)
    return module
