"""Module-level SN / BSN.

:func:`spectral_norm` is a drop-in replacement for
``torch.nn.utils.parametrizations.spectral_norm``, and
:func:`bsn_cuda.nn.utils.spectral_norm` for the legacy, hook-based
``torch.nn.utils.spectral_norm``: same arguments (plus ``scale``), same RNG
use at registration, same buffers and ``state_dict`` keys, same
training/eval behaviour; one fused op per forward instead of several
kernels. :func:`bidirectional_spectral_norm` adds BSN/BSSN (Lin, Sekar,
Fanti, NeurIPS 2021).

The package mirrors torch's namespace, so one import line changes::

    from torch.nn.utils import spectral_norm                   # before
    from bsn_cuda.nn.utils import spectral_norm                # after (legacy flavour)
    from bsn_cuda.nn.utils.parametrizations import spectral_norm   # parametrization flavour

Differences from torch: a weight whose estimated sigma is exactly 0 (e.g. all
zeros) is returned as ``scale * W`` instead of NaN; a non-finite weight leaves
the power-iteration vectors unchanged instead of filling them with NaN.

Layout: ``parametrizations`` (the SN/BSN parametrization classes),
``registration`` (register, remove, apply to a model), ``conversion`` (from
torch's SN, both flavours, and legacy checkpoints), ``sigma`` (get_sigma),
``legacy`` (the fused hook-based flavour), ``conv_sn`` (strict SN of a
convolution's operator), ``grouping`` (one op call for many layers),
``pickling``, ``checkpoint`` (activation checkpointing), ``eval_cache`` (the
opt-in eval cache, :func:`cached`), ``utils`` (torch's namespace, mirrored).
"""

from . import utils
from .checkpoint import spectral_norm_checkpoint_context
from .conversion import convert_spectral_norm
from .eval_cache import cached
from .grouping import (
    group_spectral_norm,
    invalidate_spectral_norm,
    power_iteration_step,
    set_update_mode,
    ungroup_spectral_norm,
)
from .legacy import FusedLegacySpectralNorm
from .parametrizations import PARAMETRIZATIONS, BidirectionalSpectralNorm, SpectralNorm
from .registration import (
    SPECTRAL_NORM_LAYERS,
    apply_spectral_norm,
    bidirectional_spectral_norm,
    remove_spectral_norm,
    spectral_norm,
)
from .sigma import get_sigma


__all__ = [
    "SpectralNorm",
    "BidirectionalSpectralNorm",
    "FusedLegacySpectralNorm",
    "spectral_norm",
    "bidirectional_spectral_norm",
    "remove_spectral_norm",
    "convert_spectral_norm",
    "apply_spectral_norm",
    "get_sigma",
    "spectral_norm_checkpoint_context",
    "cached",
    "group_spectral_norm",
    "ungroup_spectral_norm",
    "set_update_mode",
    "power_iteration_step",
    "invalidate_spectral_norm",
    "SPECTRAL_NORM_LAYERS",
    "utils",
]
