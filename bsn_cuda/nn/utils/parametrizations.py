"""Like ``torch.nn.utils.parametrizations``, with spectral norm fused.

``spectral_norm`` is bsn_cuda's (drop-in for torch's, plus ``scale``);
``bidirectional_spectral_norm`` is BSN/BSSN. Every other name
(``orthogonal``, ``weight_norm``, ...) is torch's own object.
"""

import torch.nn.utils.parametrizations as _torch_parametrizations

from ..registration import bidirectional_spectral_norm, spectral_norm

__all__ = list(dict.fromkeys([*getattr(_torch_parametrizations, "__all__", ()), "spectral_norm",
                              "bidirectional_spectral_norm"]))


def __getattr__(name):
    return getattr(_torch_parametrizations, name)


def __dir__():
    return sorted(set(dir(_torch_parametrizations)) | set(__all__))
