"""Module-level SN / BSN: parametrizations and helpers.

:func:`spectral_norm` is a drop-in replacement for
``torch.nn.utils.parametrizations.spectral_norm``: same arguments (plus
``scale``), same RNG use at registration, same buffers and ``state_dict``
keys, same training/eval behaviour; one fused op per forward instead of
several kernels. :func:`bidirectional_spectral_norm` adds BSN/BSSN (Lin,
Sekar, Fanti, NeurIPS 2021).

Differences from torch: a weight whose estimated sigma is exactly 0 (e.g. all
zeros) is returned as ``scale * W`` instead of NaN; a non-finite weight leaves
the power-iteration vectors unchanged instead of filling them with NaN.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as TorchSpectralNorm
from torch.nn.utils.spectral_norm import (
    SpectralNorm as LegacySpectralNorm,
    SpectralNormLoadStateDictPreHook as LegacyLoadHook,
    SpectralNormStateDictHook as LegacyStateDictHook,
)

from . import _ops, onnx_export, reference
from .functional import _check_int, _check_tensor, check_hyperparameters, uses_single_matricization

__all__ = [
    "SpectralNorm",
    "BidirectionalSpectralNorm",
    "spectral_norm",
    "bidirectional_spectral_norm",
    "remove_spectral_norm",
    "convert_spectral_norm",
    "apply_spectral_norm",
    "get_sigma",
    "spectral_norm_checkpoint_context",
    "SPECTRAL_NORM_LAYERS",
]

_WARM_UP_ITERATIONS = 15  # torch's _SpectralNorm warm-up at registration

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

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

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_weight_dtype(weight):
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"expected a weight of dtype float32, float64, float16 or bfloat16, got {weight.dtype}")


def _check_weight(weight):
    """Type, rank, size and dtype of a weight to normalize (ValueError/TypeError naming it)."""
    _check_tensor("weight", weight)
    if weight.ndim == 0:
        raise ValueError("expected a weight with at least 1 dimension, got a 0-D tensor")
    if weight.ndim > 1 and weight.numel() == 0:
        raise ValueError(f"expected a non-empty weight, got shape {list(weight.shape)}")
    _check_weight_dtype(weight)


def _check_n_power_iterations(n_power_iterations):
    _check_int("n_power_iterations", n_power_iterations)
    if n_power_iterations <= 0:  # torch's wording
        raise ValueError(
            f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}"
        )


# ---------------------------------------------------------------------------
# Activation checkpointing: torch.utils.checkpoint runs the forward again
# inside the backward pass. That recomputation must neither iterate the
# vectors a second time nor overwrite the logged sigma; it evaluates sigma
# from the stored vectors, which are the ones the real forward left there
# (its state snapshot is exactly those vectors).

_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
if _is_compiling is None:  # pragma: no cover - torch < 2.3

    def _is_compiling():
        return torch._dynamo.is_compiling()


def _in_backward_pass():
    """True while the autograd engine runs a backward pass (e.g. a checkpoint recomputation).

    Constant False while dynamo traces (torch.compile): no graph break, and a
    compiled graph recomputes functionally, applying the buffer update once.
    """
    if _is_compiling() or _current_graph_task_id is None:
        return False
    return _current_graph_task_id() != -1


class _AccSigmaMixin:
    """Keeps the sigma log (``_sigma`` of SN, ``_sigmas`` of BSN) in the accumulation dtype
    (float32, float64 for float64 weights) across ``module.to(dtype)``/``.half()``."""

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        for name in ("_sigma", "_sigmas"):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = buf.float()
        return result


class SpectralNorm(_AccSigmaMixin, nn.Module):
    """The SN parametrization: ``scale * W / sigma(W_mat(dim))``.

    Mirrors ``torch.nn.utils.parametrizations._SpectralNorm``: buffers ``_u``,
    ``_v`` (drawn with the same RNG calls, then 15 power iterations), one
    update of ``n_power_iterations`` per forward in training mode, none in
    eval. ``_sigma`` (not saved in the ``state_dict``) holds the last sigma.
    A weight with sigma 0 gives ``scale * W`` (torch: NaN). 1-D weights:
    ``W / max(||W||, eps) * scale``, no buffers.

    ``vectors=(u, v)`` starts from copies of given vectors instead (no RNG
    use, no warm-up); :func:`convert_spectral_norm` uses it.

    A forward run inside a backward pass (the recomputation of activation
    checkpointing) does not iterate: it evaluates sigma from the stored
    vectors, so they are updated once per real forward (see
    :func:`spectral_norm_checkpoint_context` for bitwise-equal gradients).
    """

    def __init__(self, weight, n_power_iterations=1, dim=0, eps=1e-12, scale=1.0, *, vectors=None):
        super().__init__()
        _check_weight(weight)
        ndim = weight.ndim
        _check_int("dim", dim)
        if dim >= ndim or dim < -ndim:  # torch's wording
            raise IndexError(f"Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] but got {dim})")
        _check_n_power_iterations(n_power_iterations)
        check_hyperparameters(n_power_iterations, eps, scale)
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        self.scale = float(scale)
        self.n_power_iterations = n_power_iterations
        acc = reference.acc_dtype(weight.dtype)
        # [sigma] of the last forward, for get_sigma (a 1-element tensor, so that
        # one out= copy from the op's state fills it).
        self.register_buffer("_sigma", torch.full((1,), math.nan, dtype=acc, device=weight.device), persistent=False)
        if ndim > 1:
            rows = weight.shape[self.dim]
            cols = weight.numel() // rows
            with torch.no_grad():
                if vectors is None:
                    # torch's order: draw u, draw v, then normalize both.
                    u = weight.new_empty(rows).normal_(0, 1)
                    v = weight.new_empty(cols).normal_(0, 1)
                    self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
                    self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
                    _ops.sn_forward(
                        weight.detach(), self._u, self._v, self.dim, _WARM_UP_ITERATIONS, eps, self.scale, True
                    )
                else:
                    u, v = vectors
                    self.register_buffer("_u", u.detach().clone(memory_format=torch.contiguous_format))
                    self.register_buffer("_v", v.detach().clone(memory_format=torch.contiguous_format))

    def normalize(self, weight, update):
        """``(W_sn, state)``; ``update`` runs the power iteration (training).
        ``state[0]`` is sigma (see docs/design.md for the rest)."""
        if weight.ndim == 1:
            out = reference.normalize_vector(weight, self.eps, self.scale)
            return out, torch.linalg.vector_norm(weight.detach().to(self._sigma.dtype)).reshape(1)
        return _ops.sn_forward(
            weight, self._u, self._v, self.dim, self.n_power_iterations, self.eps, self.scale, update
        )

    def _record_sigma(self, state):
        # One out= copy, no grad-mode switch: state is never differentiable, and
        # this runs on every forward (torch.compile turns it into a buffer update).
        torch.narrow_copy(state, 0, 0, 1, out=self._sigma)

    def forward(self, weight):
        if onnx_export.is_exporting():  # ONNX: the eval formula in plain ops (no fused op, no u/v update)
            onnx_export.check_eval(self.training, type(self).__name__)
            return onnx_export.eval_graph(self, weight)
        if _in_backward_pass():  # a checkpoint recomputation: no second update
            return self.normalize(weight, False)[0]
        out, state = self.normalize(weight, self.training)
        self._record_sigma(state)
        return out

    @torch.no_grad()
    def power_iterate(self, weight, n_power_iterations):
        """Run ``n_power_iterations`` power iterations on ``_u``/``_v`` for ``weight``
        (in place, no gradient) and record the resulting sigma (see :mod:`bsn_cuda.ema`)."""
        if weight.ndim == 1:
            self._record_sigma(torch.linalg.vector_norm(weight.to(self._sigma.dtype)).reshape(1))
            return
        _, state = _ops.sn_forward(
            weight.detach(), self._u, self._v, self.dim, n_power_iterations, self.eps, self.scale, True
        )
        self._record_sigma(state)

    def right_inverse(self, value):
        return value

    def extra_repr(self):
        return f"dim={self.dim}, n_power_iterations={self.n_power_iterations}, eps={self.eps}, scale={self.scale}"


class BidirectionalSpectralNorm(_AccSigmaMixin, nn.Module):
    """The BSN/BSSN parametrization: ``scale * W / ((sigma_0 + sigma_1) / 2)``.

    ``sigma_0`` is estimated on ``W_mat(0)`` (``[c_out, c_in * k]``, buffers
    ``_u0``, ``_v0``), ``sigma_1`` on ``W_mat(1)`` (``[c_in, c_out * k]``,
    buffers ``_u1``, ``_v1``). Weights whose two matricizations are transposes
    of each other (2-D, 1x1 kernels) use SN along dim 0 with ``_u0``/``_v0``
    only. Buffers are drawn (pair 0, then pair 1, ``u`` before ``v``) and
    warmed up (15 iterations) like torch's SN. ``_sigmas`` holds
    ``[sigma, sigma_0, sigma_1]`` of the last forward (not in the ``state_dict``).
    A weight with sigma 0 gives ``scale * W``; 1-D weights:
    ``W / max(||W||, eps) * scale``. Activation checkpointing: as
    :class:`SpectralNorm`.
    """

    def __init__(self, weight, n_power_iterations=1, eps=1e-12, scale=1.0):
        super().__init__()
        _check_weight(weight)
        _check_n_power_iterations(n_power_iterations)
        check_hyperparameters(n_power_iterations, eps, scale)
        self.eps = eps
        self.scale = float(scale)
        self.n_power_iterations = n_power_iterations
        self.single = weight.ndim >= 2 and uses_single_matricization(weight.shape)
        # The op state's header [sigma, sigma_0, sigma_1] (two matricizations) or
        # [sigma] (one); see _record_sigmas.
        self._header = 3 if weight.ndim >= 2 and not self.single else 1
        acc = reference.acc_dtype(weight.dtype)
        self.register_buffer("_sigmas", torch.full((3,), math.nan, dtype=acc, device=weight.device), persistent=False)
        if weight.ndim < 2:
            return
        with torch.no_grad():
            dims = (0,) if self.single else (0, 1)
            for k in dims:
                rows = weight.shape[k]
                u = weight.new_empty(rows).normal_(0, 1)
                v = weight.new_empty(weight.numel() // rows).normal_(0, 1)
                self.register_buffer(f"_u{k}", F.normalize(u, dim=0, eps=eps))
                self.register_buffer(f"_v{k}", F.normalize(v, dim=0, eps=eps))
            self._run(weight.detach(), _WARM_UP_ITERATIONS, True)

    def _run(self, weight, n_power_iterations, update):
        if self.single:
            return _ops.sn_forward(weight, self._u0, self._v0, 0, n_power_iterations, self.eps, self.scale, update)
        return _ops.bsn_forward(
            weight, self._u0, self._v0, self._u1, self._v1, n_power_iterations, self.eps, self.scale, update
        )

    def normalize(self, weight, update):
        """``(W_bsn, state)``: the op's state, whose header is ``[sigma, sigma_0,
        sigma_1]`` with two matricizations and ``[sigma]`` with one."""
        if weight.ndim == 1:
            out = reference.normalize_vector(weight, self.eps, self.scale)
            return out, torch.linalg.vector_norm(weight.detach().to(self._sigmas.dtype)).reshape(1)
        return self._run(weight, self.n_power_iterations, update)

    def _record_sigmas(self, state):
        # As SpectralNorm._record_sigma; with one matricization sigma_0 == sigma_1 == sigma.
        if self._header == 3:
            torch.narrow_copy(state, 0, 0, 3, out=self._sigmas)
        else:
            self._sigmas.copy_(state[:1])

    def forward(self, weight):
        if onnx_export.is_exporting():  # ONNX: the eval formula in plain ops (no fused op, no u/v update)
            onnx_export.check_eval(self.training, type(self).__name__)
            return onnx_export.eval_graph(self, weight)
        if _in_backward_pass():  # a checkpoint recomputation: no second update
            return self.normalize(weight, False)[0]
        out, state = self.normalize(weight, self.training)
        self._record_sigmas(state)
        return out

    @torch.no_grad()
    def power_iterate(self, weight, n_power_iterations):
        """Run ``n_power_iterations`` power iterations on the vectors for ``weight``
        (in place, no gradient) and record the resulting sigmas (see :mod:`bsn_cuda.ema`)."""
        if weight.ndim == 1:
            self._record_sigmas(torch.linalg.vector_norm(weight.to(self._sigmas.dtype)).reshape(1))
            return
        _, state = self._run(weight.detach(), n_power_iterations, True)
        self._record_sigmas(state)

    def right_inverse(self, value):
        return value

    def extra_repr(self):
        mode = "single matricization (SN, dim 0)" if self.single else "two matricizations"
        return f"{mode}, n_power_iterations={self.n_power_iterations}, eps={self.eps}, scale={self.scale}"


_OURS = (SpectralNorm, BidirectionalSpectralNorm)


# ---------------------------------------------------------------------------
# Checkpoints of the legacy torch.nn.utils.spectral_norm (weight_orig,
# weight_u, weight_v) load into our SN: a pre-hook renames the keys.


class _LegacyCheckpointPreHook:
    """Renames ``{name}_orig``/``_u``/``_v`` to the parametrization's keys (with_module hook)."""

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
        target = f"{prefix}parametrizations.{self.name}."
        state_dict[target + "original"] = state_dict.pop(base + "_orig")
        for suffix in ("_u", "_v"):
            if base + suffix in state_dict:
                state_dict[f"{target}{index}.{suffix}"] = state_dict.pop(base + suffix)
        # Checkpoints from torch < 1.0 also stored the normalized weight; it is derived.
        state_dict.pop(base, None)


def _unwrap_hook(hook):
    return getattr(hook, "hook", hook)  # torch wraps hooks in _WrappedHook


def _add_legacy_hook(module, name):
    for hook in module._load_state_dict_pre_hooks.values():
        inner = _unwrap_hook(hook)
        if isinstance(inner, _LegacyCheckpointPreHook) and inner.name == name:
            return
    module._register_load_state_dict_pre_hook(_LegacyCheckpointPreHook(name), with_module=True)


def _remove_legacy_hook(module, name):
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        inner = _unwrap_hook(hook)
        if isinstance(inner, _LegacyCheckpointPreHook) and inner.name == name:
            del module._load_state_dict_pre_hooks[key]


# ---------------------------------------------------------------------------
# Whole-model pickling (torch.save(model), copy.copy). torch.nn.utils.parametrize
# swaps the module's class for a generated subclass that cannot be pickled by
# reference and refuses to pickle (its __getstate__ raises). For modules we
# parametrize, pickle the plain class plus the module's __dict__ instead and
# regenerate the subclass and its properties on load.


def _rebuild_parametrized(base_cls, tensor_names):
    module = base_cls.__new__(base_cls)
    parametrize._inject_new_class(module)
    for tensor_name in tensor_names:
        parametrize._inject_property(module, tensor_name)
    _make_picklable(module)
    return module  # pickle then restores __dict__ through nn.Module.__setstate__


def _reduce_parametrized(self, protocol=2):
    base_cls = type(self).__bases__[0]
    names = tuple(self.__dict__["_modules"]["parametrizations"].keys())
    return _rebuild_parametrized, (base_cls, names), self.__dict__.copy()


def _make_picklable(module):
    cls = type(module)
    if not hasattr(parametrize, "_inject_new_class") or not hasattr(parametrize, "_inject_property"):
        return  # pragma: no cover - keep torch's behaviour if its internals change
    if cls.__dict__.get("__reduce_ex__") is not _reduce_parametrized:
        cls.__reduce_ex__ = _reduce_parametrized


# ---------------------------------------------------------------------------
# Public API.


def _check_module(module, what="module"):
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected {what} to be a torch.nn.Module, got {type(module).__name__}")


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"expected name to be a str, got {type(name).__name__}")


def _get_weight(module, name):
    _check_module(module)
    _check_name(name)
    if _has_spectral_norm(module, name):
        raise ValueError(
            f"'{name}' of {type(module).__name__} already has a spectral norm; remove it first "
            "(bsn_cuda.remove_spectral_norm), or use bsn_cuda.convert_spectral_norm for torch's"
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


def spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None, scale=1.0):
    """Apply spectral normalization to ``module.<name>`` (fused, drop-in for torch's).

    Same as ``torch.nn.utils.parametrizations.spectral_norm`` (``dim=None``
    means 1 for ConvTranspose1d/2d/3d, else 0; buffers
    ``parametrizations.<name>.0._u`` and ``._v``; 15 warm-up iterations; one
    update per training forward, none in eval), so ``state_dict``s load both
    ways. Also loads checkpoints of the legacy ``torch.nn.utils.spectral_norm``
    (``<name>_orig``, ``<name>_u``, ``<name>_v``).

    ``scale`` multiplies the result (target spectral norm). A weight with
    sigma 0 (all zeros) gives ``scale * W`` where torch gives NaN.
    """
    weight = _get_weight(module, name)
    if dim is None:
        dim = 1 if isinstance(module, _CONV_TRANSPOSE) else 0
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps, scale))
    _add_legacy_hook(module, name)
    _make_picklable(module)
    return module


def bidirectional_spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, scale=1.0):
    """Apply bidirectional (scaled) spectral normalization to ``module.<name>``.

    ``W / ((sigma_0 + sigma_1) / 2) * scale`` with ``sigma_0`` the spectral norm
    of ``W_mat(0)`` (``[c_out, c_in * k]``) and ``sigma_1`` that of ``W_mat(1)``
    (``[c_in, c_out * k]``); the same for Conv and ConvTranspose since both
    directions are used. A parametrization: the weight is kept in
    ``parametrizations.<name>.original``, the buffers are
    ``parametrizations.<name>.0._u0``, ``._v0``, ``._u1``, ``._v1``. Weights
    whose two matricizations are transposes of each other (2-D, 1x1 kernels)
    use SN along dim 0 and only ``_u0``/``_v0``. A weight with sigma 0 gives
    ``scale * W``.
    """
    weight = _get_weight(module, name)
    parametrize.register_parametrization(
        module, name, BidirectionalSpectralNorm(weight, n_power_iterations, eps, scale)
    )
    _make_picklable(module)
    return module


def _find_ours(module, name, kinds=_OURS):
    _check_module(module)
    _check_name(name)
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:
            if isinstance(p, kinds):
                return p
    raise ValueError(f"spectral_norm of '{name}' not found in {module}")


def remove_spectral_norm(module, name="weight"):
    """Remove our SN or BSN from ``module.<name>``, leaving ``W_sn`` as a plain tensor.

    ``module.<name>`` becomes the same Parameter object as before (its values
    replaced by the normalized weight), so optimizers holding it stay valid.
    The weight is computed as in eval mode (no power iteration).
    """
    norm = _find_ours(module, name)
    plist = module.parametrizations[name]
    if len(plist) != 1:
        raise ValueError(
            f"cannot remove the spectral norm of '{name}': it is one of {len(plist)} parametrizations; "
            "remove the others first (torch.nn.utils.parametrize.remove_parametrizations)"
        )
    original = plist.original
    with torch.no_grad():
        normalized, _ = norm.normalize(original, False)
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    with torch.no_grad():
        original.copy_(normalized)
    _remove_legacy_hook(module, name)
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
            vectors = (p._u, p._v) if weight.ndim > 1 else None
            ours = SpectralNorm(
                weight, getattr(p, "n_power_iterations", 1), p.dim, p.eps, vectors=vectors
            )
            ours.train(p.training)
            plist[index] = ours
            _add_legacy_hook(module, name)
            _make_picklable(module)


def _convert_legacy(module):
    for key, fn in list(module._forward_pre_hooks.items()):
        if not isinstance(fn, LegacySpectralNorm):
            continue
        name = fn.name
        weight = module._parameters[name + "_orig"]
        u = module._buffers[name + "_u"]
        v = module._buffers[name + "_v"]
        del module._forward_pre_hooks[key]
        for hooks, kind in (
            (module._state_dict_hooks, LegacyStateDictHook),
            (module._load_state_dict_pre_hooks, LegacyLoadHook),
        ):
            for hook_key, hook in list(hooks.items()):
                inner = _unwrap_hook(hook)
                if isinstance(inner, kind) and inner.fn.name == name:
                    del hooks[hook_key]
        delattr(module, name)  # the plain tensor the hook assigned
        delattr(module, name + "_orig")
        delattr(module, name + "_u")
        delattr(module, name + "_v")
        module.register_parameter(name, weight)
        ours = SpectralNorm(weight.detach(), fn.n_power_iterations, fn.dim, fn.eps, vectors=(u, v))
        # Registration evaluates the parametrization once, in the module's mode
        # (it calls parametrization.train(module.training)); in eval mode that
        # does not iterate, so u/v stay exactly as copied.
        was_training = module.training
        module.training = False
        ours.eval()  # for torch versions that do not set the parametrization's mode
        try:
            parametrize.register_parametrization(module, name, ours)
        finally:
            module.training = was_training
        ours.train(was_training)
        _add_legacy_hook(module, name)
        _make_picklable(module)


def convert_spectral_norm(model):
    """Replace every torch spectral norm in ``model`` by the fused one, in place.

    Handles both ``torch.nn.utils.parametrizations.spectral_norm`` (swapped
    inside the parametrization list) and the legacy hook-based
    ``torch.nn.utils.spectral_norm`` (hooks and state-dict hooks removed,
    ``<name>_orig`` registered back as ``<name>`` and parametrized). The weight
    Parameter objects are kept (optimizers stay valid) and ``u``/``v`` are
    copied without warm-up, so outputs agree with torch's: exactly in eval
    mode; in training mode up to rounding for the parametrized flavour, while
    the legacy flavour iterates in the opposite order (``v`` first), so its
    next training outputs differ slightly (both converge to the same sigma).
    """
    _check_module(model, "model")
    for module in list(model.modules()):
        _convert_parametrized(module)
        _convert_legacy(module)
    return model


def _has_spectral_norm(module, name):
    if parametrize.is_parametrized(module, name):
        if any(isinstance(p, _OURS + (TorchSpectralNorm,)) for p in module.parametrizations[name]):
            return True
    return any(isinstance(h, LegacySpectralNorm) and h.name == name for h in module._forward_pre_hooks.values())


def apply_spectral_norm(model, kind="sn", n_power_iterations=1, eps=1e-12, scale=1.0):
    """Add SN (``kind="sn"``) or BSN (``kind="bsn"``) to the weight of every
    Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and Embedding in ``model``.

    Raises ValueError for a layer that already has a spectral norm (ours or
    torch's; use :func:`convert_spectral_norm` for torch's) or an
    uninitialized lazy weight. Returns ``model``.
    """
    _check_module(model, "model")
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
            spectral_norm(module, "weight", n_power_iterations, eps, scale=scale)
        else:
            bidirectional_spectral_norm(module, "weight", n_power_iterations, eps, scale)
    return model


def get_sigma(module, name="weight", per_matricization=False):
    """The sigma of the last forward of ``module.<name>``'s SN/BSN, for logging.

    A detached 0-d copy (float32, or float64 for float64 weights; it follows
    later dtype casts of the module). It is the raw estimate: 0 for an
    all-zero weight (the output then is ``scale * W``), NaN for a non-finite
    one, NaN before the first forward. For 1-D weights it is ``||W||``. It
    lives in a non-persistent buffer (``_sigma`` for SN, ``_sigmas`` for BSN)
    written in place by the forward, so it is not in the ``state_dict`` and
    works under torch.compile and CUDA graphs. With
    ``per_matricization=True`` (BSN only) returns ``[sigma_0, sigma_1]``, the
    estimates for ``W_mat(0)`` and ``W_mat(1)``.
    """
    norm = _find_ours(module, name)
    if isinstance(norm, BidirectionalSpectralNorm):
        sigmas = norm._sigmas.detach()
        return (sigmas[1:3] if per_matricization else sigmas[0]).clone()
    if per_matricization:
        raise ValueError("per_matricization=True needs bidirectional_spectral_norm; this module uses spectral_norm")
    return norm._sigma.detach()[0].clone()


def _save_spectral_norm_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if _ops.HAS_EXTENSION and op in (torch.ops.bsn_cuda.sn_forward.default, torch.ops.bsn_cuda.bsn_forward.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def spectral_norm_checkpoint_context():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint`` that keeps the SN/BSN ops out of the recomputation.

    Usage: ``checkpoint(block, x, use_reentrant=False, context_fn=bsn_cuda.nn.spectral_norm_checkpoint_context)``.

    Selective activation checkpointing that saves the outputs of the fused
    SN/BSN ops (the normalized weight and the small state) and recomputes
    everything else. The backward then uses
    exactly the state of the real forward, so gradients equal those of the
    run without checkpointing bit for bit, also when a layer runs several
    training forwards before one backward (GAN: D(real), D(fake)), and under
    ``torch.compile``, whose partitioner would otherwise recompute the op from
    the already-updated buffers (silently wrong gradients, a torch issue).
    Plain checkpointing in eager mode is handled without it (the recomputation
    does not update the vectors again and evaluates sigma from them): gradients
    equal to rounding for one training forward per backward; with several, the
    recomputation of the earlier ones uses the latest vectors. Needs torch >=
    2.5 (for ``create_selective_checkpoint_contexts``; a RuntimeError says so
    on older torch) and the compiled ops (the reference fallback is
    recomputed, which is still correct in eager mode).
    """
    try:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts
    except ImportError as exc:  # torch < 2.5
        raise RuntimeError(
            "spectral_norm_checkpoint_context: expected torch >= 2.5 "
            "(torch.utils.checkpoint.create_selective_checkpoint_contexts), "
            f"got torch {torch.__version__}; plain checkpointing works without it"
        ) from exc
    return create_selective_checkpoint_contexts(_save_spectral_norm_policy)
