"""Conversion from torch's spectral norms, both flavours, and of their checkpoints.

* :func:`convert_spectral_norm`: torch's parametrized SN becomes ours in its
  parametrization list; torch's legacy hook becomes the fused legacy hook
  (:func:`fuse_legacy_hook`, a class swap) or, on request, a parametrization.
* Checkpoints of the legacy ``torch.nn.utils.spectral_norm`` load into the
  parametrization: a load-state-dict pre-hook renames ``<name>_orig``,
  ``<name>_u`` and ``<name>_v`` to the parametrization's keys. Checkpoints
  written by torch < 1.0 have no ``<name>_v`` but store the normalized weight
  ``<name>``: ``v`` is then solved for as torch's legacy loader does (the
  least-squares ``v`` with ``W v`` parallel to ``u``, rescaled so that
  ``u^T W v`` is the checkpoint's sigma, ``mean(W_orig / W_sn)``), so the
  loaded layer gives the checkpoint's outputs.
"""

import torch
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as TorchSpectralNorm

from .._checks import check_module
from . import legacy
from .legacy import FusedLegacySpectralNorm, TorchLegacySpectralNorm, unwrap_hook
from .parametrizations import SpectralNorm
from .pickling import make_picklable

__all__ = ["convert_spectral_norm", "fuse_legacy_hook", "add_legacy_checkpoint_hook", "remove_legacy_checkpoint_hook",
           "solve_v"]


def fuse_legacy_hook(hook):
    """Make a torch legacy SN hook (``torch.nn.utils.spectral_norm``) compute with the fused op, in place.

    The hook object stays the same (its state-dict hooks refer to it), so the
    module's keys, buffers and vectors are untouched.
    """
    if not isinstance(hook, TorchLegacySpectralNorm):
        raise TypeError(f"expected a torch.nn.utils.spectral_norm hook, got {type(hook).__name__}")
    hook.__class__ = FusedLegacySpectralNorm
    return hook


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


# ---------------------------------------------------------------------------
# Legacy checkpoints into the parametrization.


@torch.no_grad()
def solve_v(weight_mat, u, sigma):
    """``v`` minimizing ``||W v - sigma u||``, rescaled so that ``u^T W v == sigma``."""
    acc = torch.float64 if weight_mat.dtype == torch.float64 else torch.float32
    w = weight_mat.to(acc)
    u_acc = u.to(acc)
    v = torch.linalg.pinv(w.t() @ w) @ (w.t() @ u_acc)
    v = v * (sigma.to(acc) / torch.dot(u_acc, w @ v))
    return v.to(weight_mat.dtype)


class _LegacyCheckpointPreHook:
    """Maps legacy keys to the parametrization's (a with_module load_state_dict pre-hook)."""

    def __init__(self, name):
        self.name = name

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        base = prefix + self.name
        if base + "_orig" not in state_dict or not parametrize.is_parametrized(module, self.name):
            return
        plist = module.parametrizations[self.name]
        index = next((i for i, p in enumerate(plist) if isinstance(p, SpectralNorm)), None)
        if index is None:
            return
        norm = plist[index]
        target = f"{prefix}parametrizations.{self.name}."
        original = state_dict.pop(base + "_orig")
        state_dict[target + "original"] = original
        if base + "_u" in state_dict:
            state_dict[f"{target}{index}._u"] = state_dict.pop(base + "_u")
        if base + "_v" in state_dict:
            state_dict[f"{target}{index}._v"] = state_dict.pop(base + "_v")
        normalized = state_dict.pop(base, None)  # torch < 1.0 also stored W_sn, and no v
        u_key, v_key = f"{target}{index}._u", f"{target}{index}._v"
        if v_key not in state_dict and u_key in state_dict and normalized is not None and original.ndim > 1:
            sigma = (original / normalized).mean()
            w_mat = original.movedim(norm.dim, 0).reshape(original.shape[norm.dim], -1)
            state_dict[v_key] = solve_v(w_mat, state_dict[u_key], sigma)


def add_legacy_checkpoint_hook(module, name):
    for hook in module._load_state_dict_pre_hooks.values():
        inner = unwrap_hook(hook)
        if isinstance(inner, _LegacyCheckpointPreHook) and inner.name == name:
            return
    module._register_load_state_dict_pre_hook(_LegacyCheckpointPreHook(name), with_module=True)


def remove_legacy_checkpoint_hook(module, name):
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        inner = unwrap_hook(hook)
        if isinstance(inner, _LegacyCheckpointPreHook) and inner.name == name:
            del module._load_state_dict_pre_hooks[key]
