"""Sigma access: the sigma of a layer's last forward, for logging."""

from .parametrizations import BidirectionalSpectralNorm, find_parametrization

__all__ = ["get_sigma"]


def get_sigma(module, name="weight", per_matricization=False):
    """The sigma of the last forward of ``module.<name>``'s SN/BSN, for logging.

    A detached 0-d copy (float32, or float64 for float64 weights; it follows
    later dtype casts of the module). It is the raw estimate: 0 for an
    all-zero weight (the output then is ``scale * W``), NaN for a non-finite
    one, NaN before the first forward. For 1-D weights it is ``||W||``; for
    complex weights the real part of ``u^H W v``. It lives in a non-persistent
    buffer (``_sigma`` for SN, ``_sigmas`` for BSN) written in place by the
    forward, so it is not in the ``state_dict`` and works under torch.compile
    and CUDA graphs. With ``per_matricization=True`` (BSN only) returns
    ``[sigma_0, sigma_1]``, the estimates for ``W_mat(0)`` and ``W_mat(1)``.
    With stacked spectral norms, the first one's. Legacy (hook-based) layers
    keep no sigma log: ValueError.
    """
    norm = find_parametrization(module, name)
    if isinstance(norm, BidirectionalSpectralNorm):
        sigmas = norm._sigmas.detach()
        return (sigmas[1:3] if per_matricization else sigmas[0]).clone()
    if per_matricization:
        raise ValueError("per_matricization=True needs bidirectional_spectral_norm; this module uses spectral_norm")
    return norm._sigma.detach()[0].clone()
