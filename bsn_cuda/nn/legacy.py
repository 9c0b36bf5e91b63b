"""The legacy flavour, fused: ``torch.nn.utils.spectral_norm`` on bsn_cuda's ops.

torch's hook-based SN keeps ``<name>_orig`` (the Parameter), ``<name>_u`` and
``<name>_v`` (buffers) and recomputes ``module.<name>`` in a forward pre-hook.
Its power iteration runs ``v`` first: ``v = normalize(W^T u)``,
``u = normalize(W v)``, ``sigma = u^T W v``.

That is the u-first iteration of the fused op applied to ``W^T``: with the
roles of the vectors swapped, ``sn_forward(W_mat, u=v, v=u, dim=1)`` computes
exactly torch's legacy update, sigma and output (``W_mat = W.movedim(dim, 0)``
reshaped to 2-D, a view for ``dim=0``). So registration is torch's own (same
checks, RNG draws, buffers, state-dict hooks and version metadata, same
loading of torch < 1.0 checkpoints that lack ``<name>_v``), and only the hook
object's class is ours: :class:`FusedLegacySpectralNorm` overrides
``compute_weight``. torch's ``remove_spectral_norm`` and isinstance checks
keep working on it, and converting a torch legacy layer is a class swap that
keeps every key and vector.

Differences from torch, as everywhere in bsn_cuda: sigma == 0 gives ``W``
(torch: NaN), and a non-finite weight leaves ``u``/``v`` as they were.
Complex weights run torch's own computation.
"""

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm as TorchLegacySpectralNorm
from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook

from .. import _checks, _context, _ops, onnx_export
from . import eval_cache

__all__ = ["FusedLegacySpectralNorm", "spectral_norm", "remove_spectral_norm", "fuse_legacy_hook"]

# The eager entry point of the legacy order (csrc/python_api.cpp), or None without the extension.
_FAST_TRANSPOSED = _ops.FAST_SN_FORWARD_TRANSPOSED

# Layers whose default SN dim is 1 (torch's rule, both flavours).
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def legacy_forward(weight, u, v, dim, n_power_iterations, eps, update):
    """``(W / sigma, state)`` with torch's legacy (v-first) power iteration on ``u``, ``v`` in place.

    ``state`` is the op's state for ``W_mat^T`` (``[sigma, v, u]``) when
    ``update``, else for ``W_mat`` along ``dim`` (``[sigma, u, v]``).
    """
    if not update:
        # No iteration: sigma = u^T W_mat v is the same in either orientation,
        # and the op along `dim` reads W row by row in one pass. (A 1-D weight
        # is the matrix [n, 1], as in torch.)
        if weight.ndim == 1:
            out, state = _ops.sn_forward(weight.reshape(-1, 1), u, v, 0, n_power_iterations, eps, 1.0, False)
            return out.view(weight.shape), state
        return _ops.sn_forward(weight, u, v, dim, n_power_iterations, eps, 1.0, False)
    if dim == 0:
        return _ops.sn_forward_transposed(weight, u, v, n_power_iterations, eps, 1.0, update)
    moved = weight.movedim(dim, 0)
    out, state = _ops.sn_forward_transposed(moved, u, v, n_power_iterations, eps, 1.0, update)
    return out.movedim(0, dim), state


class FusedLegacySpectralNorm(TorchLegacySpectralNorm):
    """torch's legacy SN hook with the weight computed by the fused op.

    In eval mode with no autograd graph recorded, an unchanged weight is not
    recomputed (bsn_cuda.nn.eval_cache), as in the parametrization.
    """

    _cache = None

    def __call__(self, module, inputs):
        name = self.name
        d = module.__dict__
        params, buffers = d["_parameters"], d["_buffers"]
        result = None
        if (module.training and self.dim == 0 and _FAST_TRANSPOSED is not None and not _context.is_compiling()
                and not _context.eager_transforms_active() and not onnx_export.is_exporting()):
            # The eager training forward of a dim-0 layer (nearly every one):
            # the C++ entry point directly, without compute_weight's layers of
            # calls. It returns None where the general path is needed.
            weight, u, v = params.get(name + "_orig"), buffers.get(name + "_u"), buffers.get(name + "_v")
            if weight is not None and u is not None and v is not None:
                result = _FAST_TRANSPOSED(weight, u, v, self.n_power_iterations, self.eps, 1.0, True)
        if result is not None:
            if self._cache is not None:
                self._cache = None
            weight = result[0]
        else:
            weight = self.compute_weight(module, module.training)
        if _context.is_compiling() or name in params or name in buffers:
            setattr(module, name, weight)
        else:  # what Module.__setattr__ ends in for a plain tensor attribute, minus its checks
            d[name] = weight

    def compute_weight(self, module, do_power_iteration):
        # The dicts first (Module.__getattr__ costs a microsecond per lookup), then
        # getattr for modules that keep them elsewhere.
        name = self.name
        weight = module._parameters.get(name + "_orig")
        if weight is None:
            weight = getattr(module, name + "_orig")
        buffers = module._buffers
        u = buffers.get(name + "_u")
        v = buffers.get(name + "_v")
        if u is None or v is None:
            u, v = getattr(module, name + "_u"), getattr(module, name + "_v")
        if onnx_export.is_exporting():  # ONNX: the eval formula in plain ops, no u/v update
            onnx_export.check_eval(do_power_iteration, "nn.utils.spectral_norm")
            return onnx_export.sn_eval_graph(weight, u, v, self.dim)
        if weight.dtype not in _checks.REAL_DTYPES:  # complex: torch's own computation
            return super().compute_weight(module, do_power_iteration)
        if (do_power_iteration or (torch.is_grad_enabled() and weight.requires_grad) or weight.is_inference()
                or not _context.is_plain_eager()):
            if self._cache is not None:
                self._cache = None
            return legacy_forward(weight, u, v, self.dim, self.n_power_iterations, self.eps, do_power_iteration)[0]
        out = eval_cache.lookup(self._cache, weight, (u, v))
        if out is None:
            out, self._cache = eval_cache.store(
                lambda: legacy_forward(weight, u, v, self.dim, self.n_power_iterations, self.eps, False)[0],
                weight, (u, v))
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_cache", None)  # never pickle or deep-copy the cached output
        return state


def fuse_legacy_hook(hook):
    """Make a torch legacy SN hook (``torch.nn.utils.spectral_norm``) compute with the fused op, in place.

    The hook object stays the same (its state-dict hooks refer to it), so the
    module's keys, buffers and vectors are untouched.
    """
    if not isinstance(hook, TorchLegacySpectralNorm):
        raise TypeError(f"expected a torch.nn.utils.spectral_norm hook, got {type(hook).__name__}")
    hook.__class__ = FusedLegacySpectralNorm
    return hook


def spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None):
    """Fused drop-in for ``torch.nn.utils.spectral_norm`` (the hook-based, legacy SN).

    Same arguments, registration, buffers (``<name>_orig``, ``<name>_u``,
    ``<name>_v``), state-dict keys and version metadata, train/eval behaviour
    and v-first power iteration as torch's; ``module.<name>`` is recomputed by
    a forward pre-hook with one fused op. ``dim=None`` means 1 for
    ConvTranspose1d/2d/3d, else 0. Returns ``module``.

    ``from torch.nn.utils import spectral_norm`` becomes
    ``from bsn_cuda.nn.utils import spectral_norm``.
    """
    _checks.check_module(module)
    _checks.check_name(name)
    if dim is None:
        dim = 1 if isinstance(module, CONV_TRANSPOSE) else 0
    torch.nn.utils.spectral_norm(module, name, n_power_iterations, eps, dim)
    for hook in module._forward_pre_hooks.values():
        if type(hook) is TorchLegacySpectralNorm and hook.name == name:
            fuse_legacy_hook(hook)
    return module


def remove_spectral_norm(module, name="weight"):
    """Remove the legacy spectral norm (fused or torch's) of ``module.<name>``: as
    ``torch.nn.utils.remove_spectral_norm``, whose behaviour this is
    (``module.<name>`` becomes a Parameter holding the normalized weight,
    computed without a power iteration), except that loading a plain
    checkpoint into the module afterwards works (torch's leaves its load hook
    behind). Returns ``module``."""
    _checks.check_module(module)
    _checks.check_name(name)
    torch.nn.utils.remove_spectral_norm(module, name)
    # torch's remove misses its load pre-hook when torch stored it wrapped
    # (_WrappedHook), which then breaks loading a plain checkpoint: drop it.
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        inner = getattr(hook, "hook", hook)
        if isinstance(inner, SpectralNormLoadStateDictPreHook) and inner.fn.name == name:
            del module._load_state_dict_pre_hooks[key]
    return module
