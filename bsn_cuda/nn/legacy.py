"""The legacy flavour, fused: ``torch.nn.utils.spectral_norm`` on bsn_cuda's ops.

torch's hook-based SN keeps ``<name>_orig`` (the Parameter), ``<name>_u`` and
``<name>_v`` (buffers) and recomputes ``module.<name>`` in a forward pre-hook.
Its power iteration runs ``v`` first: ``v = normalize(W^T u)``,
``u = normalize(W v)``, ``sigma = u^T W v``.

That is the u-first iteration of the fused op applied to ``W^T``: with the
roles of the vectors swapped, ``sn_forward(W_mat, u=v, v=u, dim=1)`` computes
exactly torch's legacy update, sigma and output (``W_mat = W.movedim(dim, 0)``
reshaped to 2-D, a view for ``dim=0``). Registration
(:meth:`FusedLegacySpectralNorm.apply`) does what torch's does (same checks,
RNG draws, buffers, state-dict hooks, which are torch's own classes, and
version metadata, same loading of torch < 1.0 checkpoints that lack
``<name>_v``); the hook is a subclass of torch's, so torch's
``remove_spectral_norm`` and isinstance checks keep working on it, and
converting a torch legacy layer is a class swap that keeps every key and
vector. :mod:`bsn_cuda.nn.utils.spectral_norm` mirrors torch's module with
these names.

Differences from torch, as everywhere in bsn_cuda: sigma == 0 gives ``W``
(torch: NaN), and a non-finite weight leaves ``u``/``v`` as they were.
Complex weights run torch's own computation. A training forward re-run by
activation checkpointing inside the backward pass does not iterate again
(torch's does), as in the parametrization.

torch's classes are bound here at import and torch's functions are never
called, so assigning ours over torch's names
(``torch.nn.utils.spectral_norm = bsn_cuda.nn.utils.spectral_norm``, or
:func:`bsn_cuda.patch_torch`) cannot make them call themselves.
"""

import sys

import torch
import torch.nn.utils.spectral_norm  # noqa: F401  (loads the module; the attribute is the function)
from torch import nn

from .. import _checks, _context, _onnx_export, _ops
from ..functional import draw_unit_vectors
from . import eval_cache

__all__ = [
    "FusedLegacySpectralNorm", "SpectralNormStateDictHook", "SpectralNormLoadStateDictPreHook", "spectral_norm",
    "remove_spectral_norm", "legacy_hook", "drop_state_dict_hooks", "unwrap_hook",
]

_TORCH_LEGACY = sys.modules["torch.nn.utils.spectral_norm"]
TorchLegacySpectralNorm = _TORCH_LEGACY.SpectralNorm
SpectralNormStateDictHook = _TORCH_LEGACY.SpectralNormStateDictHook
SpectralNormLoadStateDictPreHook = _TORCH_LEGACY.SpectralNormLoadStateDictPreHook

# Layers whose default SN dim is 1 (torch's rule, both flavours).
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def legacy_forward(weight, u, v, dim, n_power_iterations, eps, update, transposed=None, coeff=None):
    """``(W / sigma, state)`` with torch's legacy (v-first) power iteration on ``u``, ``v`` in place.

    ``transposed`` (default: ``update``) runs the op on ``W_mat^T``, the
    training forward's orientation; its state is ``[sigma, v, u]``. Otherwise
    the op runs along ``dim`` (state ``[sigma, u, v]``). A training forward
    re-run by activation checkpointing passes ``update=False,
    transposed=True``: no iteration, and an autograd graph that saves the same
    tensors, in the same order, as the forward it replays.
    ``coeff``: the soft bound ``W / max(1, sigma / coeff)`` (docs/design.md, Variants).
    The v-first order itself is :func:`bsn_cuda._ops.sn_forward_transposed`'s.
    """
    if transposed is None:
        transposed = update
    variant = () if coeff is None else (float(coeff), None, False)
    if not transposed:
        # No iteration: sigma = u^T W_mat v is the same in either orientation,
        # and the op along `dim` reads W row by row in one pass. (A 1-D weight
        # is the matrix [n, 1], as in torch.)
        if weight.ndim == 1:
            out, state = _ops.sn_forward(weight.reshape(-1, 1), u, v, 0, n_power_iterations, eps, 1.0, False, None,
                                         *variant)
            return out.view(weight.shape), state
        return _ops.sn_forward(weight, u, v, dim, n_power_iterations, eps, 1.0, False, None, *variant)
    if dim == 0:
        return _ops.sn_forward_transposed(weight, u, v, n_power_iterations, eps, 1.0, update, *variant)
    moved = weight.movedim(dim, 0)
    out, state = _ops.sn_forward_transposed(moved, u, v, n_power_iterations, eps, 1.0, update, *variant)
    return out.movedim(0, dim), state


class FusedLegacySpectralNorm(TorchLegacySpectralNorm):
    """torch's legacy SN hook (``torch.nn.utils.spectral_norm.SpectralNorm``) with the weight computed by the fused op.

    ``bsn_cuda.nn.utils.spectral_norm.SpectralNorm`` is this class: code that
    calls ``SpectralNorm.apply(module, name, n_power_iterations, dim, eps)``
    or subclasses it runs fused. It is a subclass of torch's, so isinstance
    checks and torch's ``remove_spectral_norm`` keep working on it.

    In eval mode with no autograd graph recorded, inside ``bsn_cuda.cached()``,
    an unchanged weight is not recomputed (:mod:`bsn_cuda.nn.eval_cache`), as
    in the parametrization.
    """

    _cache = None
    coeff = None  # the soft bound (bsn_cuda.nn.utils.spectral_norm(..., coeff=c)); None: SN
    # Set per instance by bsn_cuda.nn.grouping (a group's hand-off, update modes): returns the
    # weight, or None for the path below.
    _intercept = None

    @staticmethod
    def apply(module, name, n_power_iterations, dim, eps):
        """Register the fused legacy SN on ``module.<name>``, as torch's ``SpectralNorm.apply`` does.

        Same checks and exception types, the same RNG draws (``u`` then ``v``,
        normal, then normalized), the same Parameter, buffers, plain
        ``module.<name>`` attribute and state-dict hooks. Returns the hook.
        """
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, TorchLegacySpectralNorm) and hook.name == name:
                raise RuntimeError(f"Cannot register two spectral_norm hooks on the same parameter {name}")
        fn = FusedLegacySpectralNorm(name, n_power_iterations, dim, eps)
        if name not in module._parameters:
            raise KeyError(f"spectral_norm: expected '{name}' to be a parameter of {type(module).__name__}, "
                           f"got none of that name (parameters: {sorted(module._parameters)})")
        weight = module._parameters[name]
        if weight is None:
            raise ValueError(f"spectral_norm: expected parameter '{name}' to be a tensor, got None")
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"spectral_norm: expected '{name}' to be initialized, got an uninitialized parameter; "
                "run a dummy forward through the lazy module first")
        with torch.no_grad():
            fn.reshape_weight_to_matrix(weight)  # torch's checks of the weight's shape, with its errors
            u, v = draw_unit_vectors(weight, fn.dim, fn.eps)
        delattr(module, name)
        module.register_parameter(name + "_orig", weight)
        setattr(module, name, weight.data)  # a plain tensor until the first forward, as torch's
        module.register_buffer(name + "_u", u)
        module.register_buffer(name + "_v", v)
        module.register_forward_pre_hook(fn)
        module._register_state_dict_hook(SpectralNormStateDictHook(fn))
        module._register_load_state_dict_pre_hook(SpectralNormLoadStateDictPreHook(fn))
        return fn

    def __call__(self, module, inputs):
        name = self.name
        d = module.__dict__
        params, buffers = d["_parameters"], d["_buffers"]
        training = module.training
        # A group's hand-off or an update mode (bsn_cuda.nn.grouping) answers first, when set.
        weight = self._intercept(self, module) if self._intercept is not None else None
        if weight is None and type(self).compute_weight is not _FUSED_COMPUTE_WEIGHT:
            # A subclass (DUE-style) computes the weight its own way: call it, as torch's hook does.
            weight = self.compute_weight(module, training)
        elif weight is None:
            # A training forward re-run by activation checkpointing (inside
            # backward) does not iterate again, but builds the same graph.
            update = training and not _context.in_backward_pass()
            if training and self.dim == 0 and self.coeff is None:
                # The training forward of a dim-0 layer (nearly every one) is the
                # legacy-order op on the weight as it is: called here directly, as
                # _compute -> legacy_forward would, without their layers of calls
                # (about 2 us of a 8 us forward on a tiny weight).
                w, u, v = params.get(name + "_orig"), buffers.get(name + "_u"), buffers.get(name + "_v")
                if (w is not None and u is not None and v is not None and w.dtype in _checks.REAL_DTYPES
                        and not _onnx_export.is_exporting()):
                    if self._cache is not None:
                        self._cache = None
                    weight = _ops.sn_forward_transposed(w, u, v, self.n_power_iterations, self.eps, 1.0, update)[0]
            if weight is None:
                weight = self._compute(module, update, training)
        if _context.is_compiling() or name in params or name in buffers:
            setattr(module, name, weight)
        else:  # what Module.__setattr__ ends in for a plain tensor attribute, minus its checks
            d[name] = weight

    def compute_weight(self, module, do_power_iteration):
        return self._compute(module, do_power_iteration, do_power_iteration)

    def _compute(self, module, update, transposed):
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
        if _onnx_export.is_exporting():  # ONNX: the eval formula in plain ops, no u/v update
            _onnx_export.check_eval(update, "nn.utils.spectral_norm")
            return _onnx_export.sn_eval_graph(weight, u, v, self.dim)
        if weight.dtype not in _checks.REAL_DTYPES:  # complex: torch's own computation
            return TorchLegacySpectralNorm.compute_weight(self, module, update)
        if transposed or not eval_cache.applies(weight):
            if self._cache is not None:
                self._cache = None
            return legacy_forward(weight, u, v, self.dim, self.n_power_iterations, self.eps, update, transposed,
                                  self.coeff)[0]
        out = eval_cache.lookup(self._cache, weight, (u, v))
        if out is None:
            out = eval_cache.store(
                self, lambda: legacy_forward(weight, u, v, self.dim, self.n_power_iterations, self.eps, False,
                                             coeff=self.coeff)[0],
                weight, (u, v))
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_cache", None)  # never pickle or deep-copy the cached output
        return state


_FUSED_COMPUTE_WEIGHT = FusedLegacySpectralNorm.compute_weight


def legacy_hook(module, name):
    """The legacy SN hook (torch's or ours) of ``module.<name>``, or None."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, TorchLegacySpectralNorm) and hook.name == name:
            return hook
    return None


def spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None, coeff=None):
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
    coeff = _checks.check_coeff(coeff)
    hook = FusedLegacySpectralNorm.apply(module, name, n_power_iterations, dim, eps)
    if coeff is not None:
        hook.coeff = coeff
    return module


def unwrap_hook(hook):
    """The hook object itself (torch wraps hooks stored with ``with_module`` in _WrappedHook)."""
    return getattr(hook, "hook", hook)


def drop_state_dict_hooks(module, name):
    """Remove the legacy SN's state-dict and load-state-dict hooks of ``module.<name>``
    (torch's remove misses the load hook when torch stored it wrapped)."""
    for hooks, kind in ((module._state_dict_hooks, SpectralNormStateDictHook),
                        (module._load_state_dict_pre_hooks, SpectralNormLoadStateDictPreHook)):
        for key, hook in list(hooks.items()):
            inner = unwrap_hook(hook)
            if isinstance(inner, kind) and inner.fn.name == name:
                del hooks[key]


def remove_spectral_norm(module, name="weight"):
    """Remove the legacy spectral norm (fused or torch's) of ``module.<name>``, as
    ``torch.nn.utils.remove_spectral_norm`` does: ``module.<name>`` becomes a
    Parameter holding the normalized weight, computed without a power
    iteration. Unlike torch's, its state-dict load hook goes too (torch's
    misses it when stored wrapped), so a plain checkpoint loads afterwards.
    Returns ``module``."""
    _checks.check_module(module)
    _checks.check_name(name)
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, TorchLegacySpectralNorm) and hook.name == name:
            hook.remove(module)
            del module._forward_pre_hooks[key]
            break
    else:
        raise ValueError(f"spectral_norm of '{name}' not found in {module}")
    drop_state_dict_hooks(module, name)
    return module
