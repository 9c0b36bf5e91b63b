"""Registration: adding SN/BSN to a layer or a whole model, and removing it."""

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as TorchSpectralNorm

from .._checks import check_hyperparameters, check_module, check_name
from . import legacy
from .conversion import add_legacy_checkpoint_hook, remove_legacy_checkpoint_hook
from .legacy import CONV_TRANSPOSE
from .parametrizations import PARAMETRIZATIONS, BidirectionalSpectralNorm, SpectralNorm, find_parametrization
from .pickling import make_picklable

__all__ = [
    "spectral_norm",
    "bidirectional_spectral_norm",
    "remove_spectral_norm",
    "apply_spectral_norm",
    "SPECTRAL_NORM_LAYERS",
]

#: The layer types :func:`apply_spectral_norm` normalizes.
SPECTRAL_NORM_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.Embedding,
)


def _get_weight(module, name, stacking):
    """``module.<name>`` to parametrize. ``stacking``: a parametrization of
    torch's kind may go on top of another spectral norm (torch allows it); a
    BSN may not."""
    check_module(module)
    check_name(name)
    if not stacking and _has_spectral_norm(module, name):
        raise ValueError(
            f"'{name}' of {type(module).__name__} already has a spectral norm; remove it first "
            "(bsn_cuda.remove_spectral_norm), or use bsn_cuda.convert_spectral_norm for torch's"
        )
    if legacy.legacy_hook(module, name) is not None:
        raise ValueError(
            f"'{name}' of {type(module).__name__} has a legacy (hook-based) spectral norm; "
            "remove it first (bsn_cuda.nn.utils.remove_spectral_norm)"
        )
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"Module '{module}' has an uninitialized parameter '{name}'; "
            "run a dummy forward before applying spectral normalization"
        )
    return weight


def spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None, scale=1.0, **variant):
    """Apply spectral normalization to ``module.<name>`` (fused, drop-in for torch's).

    Same as ``torch.nn.utils.parametrizations.spectral_norm`` (``dim=None``
    means 1 for ConvTranspose1d/2d/3d, else 0; buffers
    ``parametrizations.<name>.0._u`` and ``._v``; 15 warm-up iterations; one
    update per training forward, none in eval), so ``state_dict``s load both
    ways. As in torch, a second spectral norm may be stacked on the same
    weight. Complex weights run a non-fused path with torch's math. Also loads
    checkpoints of the legacy ``torch.nn.utils.spectral_norm`` (``<name>_orig``,
    ``<name>_u``, ``<name>_v``; without ``<name>_v``, as torch < 1.0 wrote
    them, ``v`` is solved for).

    ``scale`` multiplies the result (target spectral norm). A weight with
    sigma 0 (all zeros) gives ``scale * W`` where torch gives NaN.

    Variants (keywords, docs/design.md; real weights with ``ndim >= 2``):

    * ``coeff=c``: the soft bound ``W / max(1, sigma / c)`` (SNGP/DUE); at
      ``sigma == c`` the gradient is that of the constant factor 1.
    * ``learnable_scale=True``: ``gamma * W / sigma`` (sigmaReparam), ``gamma``
      a Parameter (``parametrizations.<name>.0.gamma``, 0-d, float32 or
      float64 for float64 weights) set at registration to sigma of a
      converged power iteration, so the layer starts as ``W``.
    * ``track_only=True``: ``W`` passes through unchanged (values and
      gradient); u/v and the sigma log (:func:`get_sigma`) update as in SN.
    * ``n_power_iterations_eval=n``: eval forwards run ``n`` power iterations
      on copies of the vectors (the stored ones stay); 0 (default) as torch.
    """
    weight = _get_weight(module, name, stacking=True)
    if dim is None:
        dim = 1 if isinstance(module, CONV_TRANSPOSE) else 0
    parametrize.register_parametrization(
        module, name, SpectralNorm(weight, n_power_iterations, dim, eps, scale, **variant)
    )
    add_legacy_checkpoint_hook(module, name)
    make_picklable(module)
    return module


def bidirectional_spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, scale=1.0, **variant):
    """Apply bidirectional (scaled) spectral normalization to ``module.<name>``.

    ``W / ((sigma_0 + sigma_1) / 2) * scale`` with ``sigma_0`` the spectral norm
    of ``W_mat(0)`` (``[c_out, c_in * k]``) and ``sigma_1`` that of ``W_mat(1)``
    (``[c_in, c_out * k]``); the same for Conv and ConvTranspose since both
    directions are used. A parametrization: the weight is kept in
    ``parametrizations.<name>.original``, the buffers are
    ``parametrizations.<name>.0._u0``, ``._v0``, ``._u1``, ``._v1``. Weights
    whose two matricizations are transposes of each other (2-D, 1x1 kernels)
    use SN along dim 0 and only ``_u0``/``_v0``. A weight with sigma 0 gives
    ``scale * W``. Real weights only (TypeError for complex ones). The
    variant keywords of :func:`spectral_norm` apply, with BSN's sigma.
    """
    weight = _get_weight(module, name, stacking=False)
    parametrize.register_parametrization(
        module, name, BidirectionalSpectralNorm(weight, n_power_iterations, eps, scale, **variant)
    )
    make_picklable(module)
    return module


def remove_spectral_norm(module, name="weight"):
    """Remove our SN or BSN from ``module.<name>``, leaving ``W_sn`` as a plain tensor.

    ``module.<name>`` becomes the same Parameter object as before (its values
    replaced by the normalized weight), so optimizers holding it stay valid.
    The weight is computed as in eval mode (no power iteration). A legacy
    (hook-based) spectral norm, fused or torch's, is removed as
    ``torch.nn.utils.remove_spectral_norm`` does.
    """
    check_module(module)
    check_name(name)
    if not parametrize.is_parametrized(module, name) and legacy.legacy_hook(module, name) is not None:
        return legacy.remove_spectral_norm(module, name)
    norm = find_parametrization(module, name)
    plist = module.parametrizations[name]
    if len(plist) != 1:
        raise ValueError(
            f"cannot remove the spectral norm of '{name}': it is one of {len(plist)} parametrizations; "
            "remove them all with torch.nn.utils.parametrize.remove_parametrizations"
        )
    original = plist.original
    with torch.no_grad():
        normalized, _ = norm.normalize(original, False)
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    with torch.no_grad():
        original.copy_(normalized)
    remove_legacy_checkpoint_hook(module, name)
    return module


def _has_spectral_norm(module, name):
    if parametrize.is_parametrized(module, name):
        if any(isinstance(p, PARAMETRIZATIONS + (TorchSpectralNorm,)) for p in module.parametrizations[name]):
            return True
    return legacy.legacy_hook(module, name) is not None


def apply_spectral_norm(model, kind="sn", n_power_iterations=1, eps=1e-12, scale=1.0, **variant):
    """Add SN (``kind="sn"``) or BSN (``kind="bsn"``) to the weight of every
    Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and Embedding in ``model``
    (variant keywords as in :func:`spectral_norm`).

    Raises ValueError for a layer that already has a spectral norm (ours or
    torch's; use :func:`convert_spectral_norm` for torch's) or an
    uninitialized lazy weight. Returns ``model``.
    """
    check_module(model, "model")
    if kind not in ("sn", "bsn"):
        raise ValueError(f"expected kind 'sn' or 'bsn', got {kind!r}")
    check_hyperparameters(n_power_iterations, eps, scale)
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, SPECTRAL_NORM_LAYERS):
            continue
        if _has_spectral_norm(module, "weight"):
            raise ValueError(
                f"module '{module_name}' ({type(module).__name__}) already has a spectral norm on 'weight'"
            )
        if kind == "sn":
            spectral_norm(module, "weight", n_power_iterations, eps, scale=scale, **variant)
        else:
            bidirectional_spectral_norm(module, "weight", n_power_iterations, eps, scale, **variant)
    return model
