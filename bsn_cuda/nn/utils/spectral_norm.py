"""Like the module ``torch.nn.utils.spectral_norm``, fused.

``from torch.nn.utils.spectral_norm import SpectralNorm, spectral_norm`` becomes
``from bsn_cuda.nn.utils.spectral_norm import SpectralNorm, spectral_norm``.
``SpectralNorm`` is the fused legacy hook (a subclass of torch's):
``SpectralNorm.apply(module, name, n_power_iterations, dim, eps)``,
``compute_weight`` and ``remove`` run the fused op, and subclasses of it (and
of the state-dict hooks, which are torch's classes) keep working. Every other
name of torch's module resolves to torch's object.
"""

import sys

from ..legacy import FusedLegacySpectralNorm as SpectralNorm
from ..legacy import SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook, remove_spectral_norm, spectral_norm

__all__ = ["spectral_norm", "remove_spectral_norm"]

_TORCH_MODULE = sys.modules["torch.nn.utils.spectral_norm"]
_OURS = ("SpectralNorm", "SpectralNormLoadStateDictPreHook", "SpectralNormStateDictHook", "spectral_norm",
         "remove_spectral_norm")


def __getattr__(name):
    return getattr(_TORCH_MODULE, name)


def __dir__():
    return sorted(set(dir(_TORCH_MODULE)) | set(_OURS))
