"""torch.nn.utils' spectral norms, fused: ``from bsn_cuda.nn.utils import spectral_norm``.

``spectral_norm`` / ``remove_spectral_norm`` are the legacy (hook-based)
flavour, like ``torch.nn.utils.spectral_norm``; ``parametrizations.spectral_norm``
is the parametrization flavour, like
``torch.nn.utils.parametrizations.spectral_norm``.
"""

from . import parametrizations
from ..legacy import remove_spectral_norm, spectral_norm

__all__ = ["spectral_norm", "remove_spectral_norm", "parametrizations"]
