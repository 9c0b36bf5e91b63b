"""``torch.nn.utils``, with its spectral norms fused: one import line changes.

``spectral_norm`` / ``remove_spectral_norm`` are the legacy (hook-based)
flavour, like ``torch.nn.utils.spectral_norm``; the module
``bsn_cuda.nn.utils.spectral_norm`` mirrors torch's (``SpectralNorm``,
``SpectralNorm.apply``, the state-dict hooks); ``parametrizations.spectral_norm``
is the parametrization flavour. Every other name and submodule
(``weight_norm``, ``clip_grad_norm_``, ``parametrize``, ``rnn``, ``prune``, ...)
is torch's own object, so any ``from torch.nn.utils[.submodule] import ...``
line can be swapped whole.
"""

import torch.nn.utils as _torch_utils

from . import _mirror, parametrizations
# The function, not the module, as in torch (the module stays importable by its full name).
from .spectral_norm import remove_spectral_norm, spectral_norm

_mirror.install(__name__, _torch_utils, replaced=("spectral_norm", "parametrizations"))

__all__ = list(dict.fromkeys([*getattr(_torch_utils, "__all__", ()), "spectral_norm", "remove_spectral_norm",
                              "parametrizations"]))


def __getattr__(name):
    return getattr(_torch_utils, name)


def __dir__():
    return sorted(set(dir(_torch_utils)) | set(__all__))
