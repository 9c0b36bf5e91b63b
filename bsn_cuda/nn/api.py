"""The public module API: register, remove, convert, apply, get_sigma."""

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as TorchSpectralNorm

from .._checks import check_hyperparameters, check_module, check_name
from .compat import add_legacy_checkpoint_hook, remove_legacy_checkpoint_hook
from . import legacy
from .legacy import CONV_TRANSPOSE, FusedLegacySpectralNorm, TorchLegacySpectralNorm, fuse_legacy_hook
from .parametrizations import PARAMETRIZATIONS, BidirectionalSpectralNorm, SpectralNorm
from .pickling import make_picklable

__all__ = [
    "spectral_norm",
    "bidirectional_spectral_norm",
    "remove_spectral_norm",
    "convert_spectral_norm",
    "apply_spectral_norm",
    "get_sigma",
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


def _find_ours(module, name, kinds=PARAMETRIZATIONS):
    check_module(module)
    check_name(name)
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:
            if isinstance(p, kinds):
                return p
    raise ValueError(f"spectral_norm of '{name}' not found in {module}")


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
    norm = _find_ours(module, name)
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


def _convert_parametrized(module):
    if not parametrize.is_parametrized(module):
        return
    for name, plist in module.parametrizations.items():
        for index, p in enumerate(plist):
            if not isinstance(p, TorchSpectralNorm):
                continue
            if not plist.is_tensor:
                raise ValueError(
                    f"cannot convert the spectral norm of '{name}': its parametrization has several originals"
                )
            weight = plist.original.detach()
            for earlier in list(plist)[:index]:  # a stacked SN sees the output of the ones before it
                weight = earlier(weight).detach()
            vectors = (p._u, p._v) if weight.ndim > 1 else None
            ours = SpectralNorm(weight, getattr(p, "n_power_iterations", 1), p.dim, p.eps, vectors=vectors)
            ours.train(p.training)
            plist[index] = ours
            add_legacy_checkpoint_hook(module, name)
            make_picklable(module)


def _legacy_to_parametrized(module):
    for key, fn in list(module._forward_pre_hooks.items()):
        if not isinstance(fn, TorchLegacySpectralNorm):
            continue
        name = fn.name
        weight = module._parameters[name + "_orig"]
        u = module._buffers[name + "_u"]
        v = module._buffers[name + "_v"]
        del module._forward_pre_hooks[key]
        legacy.drop_state_dict_hooks(module, name)
        delattr(module, name)  # the plain tensor the hook assigned
        delattr(module, name + "_orig")
        delattr(module, name + "_u")
        delattr(module, name + "_v")
        module.register_parameter(name, weight)
        ours = SpectralNorm(weight.detach(), fn.n_power_iterations, fn.dim, fn.eps, vectors=(u, v))
        # Registration evaluates the parametrization once, in the module's mode;
        # in eval mode that does not iterate, so u/v stay exactly as copied.
        was_training = module.training
        module.training = False
        ours.eval()
        try:
            parametrize.register_parametrization(module, name, ours)
        finally:
            module.training = was_training
        ours.train(was_training)
        add_legacy_checkpoint_hook(module, name)
        make_picklable(module)


def convert_spectral_norm(model, flavour="same"):
    """Replace every torch spectral norm in ``model`` by the fused one, in place.

    ``flavour="same"`` (default) keeps each layer's flavour, so checkpoint
    keys never change: a ``torch.nn.utils.parametrizations.spectral_norm`` is
    swapped for :class:`SpectralNorm` inside its parametrization list, and a
    legacy ``torch.nn.utils.spectral_norm`` hook becomes the fused legacy hook
    (same object, same ``<name>_orig``/``_u``/``_v``). ``flavour="parametrization"``
    turns legacy layers into parametrized ones (keys become
    ``parametrizations.<name>.original``/``.0._u``/``.0._v``; the legacy keys
    still load). Parameter objects (optimizers stay valid) and vectors are
    kept, so outputs equal torch's (to rounding in training mode).
    """
    check_module(model, "model")
    if flavour not in ("same", "parametrization"):
        raise ValueError(f"expected flavour 'same' or 'parametrization', got {flavour!r}")
    for module in list(model.modules()):
        _convert_parametrized(module)
        if flavour == "parametrization":
            _legacy_to_parametrized(module)
        else:
            for hook in module._forward_pre_hooks.values():
                if type(hook) is TorchLegacySpectralNorm:
                    fuse_legacy_hook(hook)
    return model


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
    norm = _find_ours(module, name)
    if isinstance(norm, BidirectionalSpectralNorm):
        sigmas = norm._sigmas.detach()
        return (sigmas[1:3] if per_matricization else sigmas[0]).clone()
    if per_matricization:
        raise ValueError("per_matricization=True needs bidirectional_spectral_norm; this module uses spectral_norm")
    return norm._sigma.detach()[0].clone()


__all__ += ["FusedLegacySpectralNorm"]
