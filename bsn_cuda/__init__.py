"""bsn_cuda: fused spectral normalization (SN) and bidirectional (scaled) SN for PyTorch.

Drop-in module API (see :mod:`bsn_cuda.nn`)::

    import bsn_cuda
    layer = bsn_cuda.spectral_norm(torch.nn.Conv2d(64, 128, 3))          # like torch's
    layer = bsn_cuda.bidirectional_spectral_norm(torch.nn.Conv2d(64, 128, 3))
    bsn_cuda.convert_spectral_norm(model)      # torch SN (both flavours) -> fused
    bsn_cuda.apply_spectral_norm(model, kind="bsn")
    bsn_cuda.patch_torch()                     # torch's own names -> fused, for code you don't own
    with bsn_cuda.cached(): samples = G(z)     # opt-in eval cache for sampling loops
    bsn_cuda.group_spectral_norm(D, update="once")  # one op call per forward of D; u/v step once per step

Functional API with caller-held vectors: :mod:`bsn_cuda.functional`; EMA
copies that keep the power-iteration vectors unit-norm: :mod:`bsn_cuda.ema`. Pure
PyTorch reference of the ops: :mod:`bsn_cuda.reference`. ``HAS_EXTENSION`` is
False when the compiled ops could not be loaded (everything then runs the
reference, with a RuntimeWarning at import).
"""

from . import _ops, diagnostics, ema, functional, reference
from ._version import __version__
from ._ops import HAS_EXTENSION
from ._patch import is_torch_patched, patch_torch, unpatch_torch
from .ema import refresh_spectral_norm
from .nn.conv_sn import conv_spectral_norm
from .nn import (
    apply_spectral_norm,
    cached,
    bidirectional_spectral_norm,
    convert_spectral_norm,
    get_sigma,
    group_spectral_norm,
    invalidate_spectral_norm,
    power_iteration_step,
    remove_spectral_norm,
    set_update_mode,
    spectral_norm,
    spectral_norm_checkpoint_context,
    ungroup_spectral_norm,
)

__all__ = [
    "spectral_norm",
    "bidirectional_spectral_norm",
    "remove_spectral_norm",
    "convert_spectral_norm",
    "apply_spectral_norm",
    "get_sigma",
    "cached",
    "group_spectral_norm",
    "ungroup_spectral_norm",
    "set_update_mode",
    "power_iteration_step",
    "invalidate_spectral_norm",
    "patch_torch",
    "unpatch_torch",
    "is_torch_patched",
    "conv_spectral_norm",
    "refresh_spectral_norm",
    "diagnostics",
    "spectral_norm_checkpoint_context",
    "ema",
    "functional",
    "reference",
    "HAS_EXTENSION",
    "__version__",
]
