"""``bsn_cuda.patch_torch()``: swap torch's spectral norms for the fused ones, process-wide.

For code one does not own (a third-party repository, a training framework):
call it before that code is imported, so that what it binds at import
(``from torch.nn.utils import spectral_norm``,
``from torch.nn.utils.spectral_norm import SpectralNorm``, ...) is bsn_cuda's,
and what it looks up at call time (``nn.utils.spectral_norm(...)``) too.

Swapped (torch's originals are bound when bsn_cuda is imported, and restored
by the undo):

* ``torch.nn.utils.spectral_norm`` / ``remove_spectral_norm`` (the legacy flavour);
* in the module ``torch.nn.utils.spectral_norm``: ``spectral_norm``,
  ``remove_spectral_norm`` and the class ``SpectralNorm`` (ours, a subclass
  of torch's: ``SpectralNorm.apply`` and subclasses defined after the patch
  run fused, and isinstance checks against torch's class still hold);
* ``torch.nn.utils.parametrizations.spectral_norm`` (the parametrization flavour).

Code that bound torch's names before the patch keeps them; a subclass
defined before the patch keeps torch's base class.
"""

import sys

import torch.nn.utils
import torch.nn.utils.parametrizations
import torch.nn.utils.spectral_norm  # noqa: F401  (the module; the attribute is the function)

from .nn import legacy, registration

__all__ = ["patch_torch", "unpatch_torch", "is_torch_patched", "TorchPatch"]

_LEGACY_MODULE = sys.modules["torch.nn.utils.spectral_norm"]

# (namespace, attribute, ours)
_SWAPS = (
    (torch.nn.utils, "spectral_norm", legacy.spectral_norm),
    (torch.nn.utils, "remove_spectral_norm", legacy.remove_spectral_norm),
    (_LEGACY_MODULE, "spectral_norm", legacy.spectral_norm),
    (_LEGACY_MODULE, "remove_spectral_norm", legacy.remove_spectral_norm),
    (_LEGACY_MODULE, "SpectralNorm", legacy.FusedLegacySpectralNorm),
    (torch.nn.utils.parametrizations, "spectral_norm", registration.spectral_norm),
)
# torch's objects, bound at import.
_ORIGINALS = tuple(getattr(namespace, attr) for namespace, attr, _ in _SWAPS)

_active = 0  # open patches: patch_torch() calls and contexts not undone yet
_generation = 0  # bumped by unpatch_torch(), which closes every open patch


def _apply():
    for namespace, attr, ours in _SWAPS:
        setattr(namespace, attr, ours)


def _restore():
    for (namespace, attr, _), original in zip(_SWAPS, _ORIGINALS):
        setattr(namespace, attr, original)


class TorchPatch:
    """What :func:`patch_torch` returns: ``undo()`` it, or use it as a context manager."""

    def __init__(self):
        self._open = True
        self._generation = _generation

    def undo(self):
        """Close this patch; torch's originals come back when no other patch is open. Idempotent."""
        global _active
        if not self._open or self._generation != _generation:  # undone, or closed by unpatch_torch()
            self._open = False
            return
        self._open = False
        _active -= 1
        if _active == 0:
            _restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.undo()
        return False

    def __repr__(self):
        return f"<bsn_cuda.TorchPatch {'open' if self._open else 'undone'}>"


def patch_torch():
    """Make torch's spectral norms (both flavours, and the class path
    ``torch.nn.utils.spectral_norm.SpectralNorm``) bsn_cuda's fused ones.

    Effective at once; returns a :class:`TorchPatch`. Either undo it
    (``patch.undo()`` or :func:`unpatch_torch`) or use it as a context manager::

        bsn_cuda.patch_torch()                 # for the rest of the process
        import third_party.models              # binds the fused spectral_norm

        with bsn_cuda.patch_torch():           # only for what happens inside
            model = third_party.build_discriminator()

    Patches nest: torch's originals come back when the last open one is undone.
    """
    global _active
    _active += 1
    _apply()
    return TorchPatch()


def unpatch_torch():
    """Restore torch's originals now, whatever patches are open (they become no-ops)."""
    global _active, _generation
    _active = 0
    _generation += 1
    _restore()


def is_torch_patched():
    """True while torch's spectral-norm names are bsn_cuda's."""
    return all(getattr(namespace, attr) is ours for namespace, attr, ours in _SWAPS)
