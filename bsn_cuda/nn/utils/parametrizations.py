"""Like ``torch.nn.utils.parametrizations``: the parametrization flavour of spectral norm (fused)."""

from ..api import bidirectional_spectral_norm, spectral_norm

__all__ = ["spectral_norm", "bidirectional_spectral_norm"]
