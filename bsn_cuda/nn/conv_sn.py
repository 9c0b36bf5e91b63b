"""Strict spectral normalization of a convolution (its operator norm).

:func:`bsn_cuda.spectral_norm` divides a kernel by the spectral norm of its
reshaped matrix ``W_mat(0) = [c_out, c_in * k]``, which is not the norm of the
convolution as a linear map. :func:`conv_spectral_norm` divides by the operator
norm of the map ``x -> conv(x, W)`` for one fixed input size, estimated by a
power iteration that applies the convolution and its adjoint (a transposed
convolution with the same stride, padding, dilation and groups) to a persistent
input-shaped vector, as in i-ResNet's ``spectral_norm_conv`` (Behrmann et al.,
2019). Plain torch ops; no fused kernel.

For zero padding, ``groups=1`` and ``dilation=1`` (Lin, Sekar and Fanti,
NeurIPS 2021, and docs/why_bsn.md)::

    sigma(W_mat(0)) <= sigma_strict <= sqrt(prod_i ceil(k_i / s_i)) * sigma(W_mat(0))

The upper bound holds for every input size; the lower bound needs an output
position whose whole receptive field lies inside the input (not in padding).
"""


import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .. import _checks
from ..functional import WARM_UP_ITERATIONS
from .pickling import make_picklable as _make_picklable

__all__ = ["ConvOperator", "ConvSpectralNorm", "conv_spectral_norm", "conv_operator_norm", "get_conv_sigma"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _normalize(x, eps):
    return x / x.norm().clamp_min(eps)


def _conv_output_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_transpose_output_size(size, k, s, p, d, op):
    return (size - 1) * s - 2 * p + d * (k - 1) + op + 1


def _int_padding(module):
    """Symmetric int padding for the adjoint; 'same' may pad one more on the right (cropped later)."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0,) * len(module.kernel_size)
        # 'same' (stride 1): total d*(k-1), torch puts the odd extra element on the right.
        return tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
    return tuple(module.padding)


class ConvOperator:
    """The linear map ``x -> conv(x, W)`` of a Conv/ConvTranspose module for one input size
    (bias excluded), and its adjoint; the weight is passed to each call."""

    def __init__(self, module, input_shape):
        self.nd = len(module.kernel_size)
        self.transposed = bool(module.transposed)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.groups = module.groups
        self.padding = _int_padding(module)
        self.same_padding = module.padding == "same"
        self.output_padding = tuple(module.output_padding)
        self.kernel_size = tuple(module.kernel_size)
        self.input_shape = tuple(input_shape)
        self.output_shape = (module.out_channels,) + self._output_spatial()

    def _output_spatial(self):
        spatial = self.input_shape[1:]
        if self.transposed:
            sizes = [
                _conv_transpose_output_size(n, k, s, p, d, op)
                for n, k, s, p, d, op in zip(
                    spatial, self.kernel_size, self.stride, self.padding, self.dilation, self.output_padding
                )
            ]
        elif self.same_padding:
            sizes = list(spatial)
        else:
            sizes = [
                _conv_output_size(n, k, s, p, d)
                for n, k, s, p, d in zip(spatial, self.kernel_size, self.stride, self.padding, self.dilation)
            ]
        return tuple(sizes)

    @staticmethod
    def _crop(x, sizes):
        # An adjoint may come out a little larger than the space it maps to; the extra
        # entries belong to no element of that space, so cropping gives the exact adjoint.
        index = (Ellipsis,) + tuple(slice(0, n) for n in sizes)
        return x[index]

    def apply(self, x, weight):
        if self.transposed:
            return _CONV_T[self.nd](
                x, weight, None, self.stride, self.padding, self.output_padding, self.groups, self.dilation
            )
        padding = "same" if self.same_padding else self.padding
        return _CONV[self.nd](x, weight, None, self.stride, padding, self.dilation, self.groups)

    def adjoint(self, y, weight):
        spatial = self.input_shape[1:]
        if self.transposed:
            x = _CONV[self.nd](y, weight, None, self.stride, self.padding, self.dilation, self.groups)
            return self._crop(x, spatial)
        out_spatial = y.shape[2:]
        base = [
            _conv_transpose_output_size(m, k, s, p, d, 0)
            for m, k, s, p, d in zip(out_spatial, self.kernel_size, self.stride, self.padding, self.dilation)
        ]
        # The strided conv drops up to s-1 trailing inputs; output_padding (< s) brings them back as zeros.
        output_padding = tuple(max(0, n - b) for n, b in zip(spatial, base))
        x = _CONV_T[self.nd](y, weight, None, self.stride, self.padding, output_padding, self.groups, self.dilation)
        return self._crop(x, spatial)


class ConvSpectralNorm(nn.Module):
    """Parametrization ``W -> scale * W / ||conv(., W)||_2`` for one input size.

    Buffers (in the ``state_dict``): ``_v`` of shape ``(1, *input_shape)`` and
    ``_u`` of shape ``(1, *output_shape)``, the power-iteration vectors; a
    non-persistent ``_sigma`` holds the estimate of the last forward, for
    logging. In training mode each forward runs ``n_power_iterations``
    iterations and updates ``_u``, ``_v`` in place; in eval mode it uses them
    as they are (as torch's spectral_norm). Gradients treat ``u``, ``v`` as
    constants. A sigma of exactly 0 (zero weight) gives ``scale * W``.
    """

    def __init__(self, module, input_shape, n_power_iterations=1, eps=1e-12, scale=1.0):
        super().__init__()
        self.op = ConvOperator(module, input_shape)
        self.input_shape = tuple(input_shape)
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.scale = float(scale)
        weight = module.weight
        with torch.no_grad():
            v = _normalize(torch.randn((1,) + self.input_shape, dtype=weight.dtype, device=weight.device), eps)
            u = _normalize(self.op.apply(v, weight), eps)
            self.register_buffer("_v", v)
            self.register_buffer("_u", u)
            self.register_buffer(
                "_sigma", torch.full((), float("nan"), dtype=weight.dtype, device=weight.device), persistent=False
            )
            self._power_iterate(weight.detach(), WARM_UP_ITERATIONS)

    # -- power iteration --------------------------------------------------------------------------

    @torch.no_grad()
    def _power_iterate(self, weight, n_power_iterations):
        v = self._v
        u = self._u
        for _ in range(n_power_iterations):
            s = self.op.apply(v, weight)
            s_norm = s.norm()
            u = s / s_norm.clamp_min(self.eps)
            t = self.op.adjoint(u, weight)
            t_norm = t.norm()
            v = t / t_norm.clamp_min(self.eps)
        # A non-finite or zero weight must not poison the stored vectors.
        ok = torch.isfinite(s_norm) & torch.isfinite(t_norm) & (s_norm > 0) & (t_norm > 0)
        self._u.copy_(torch.where(ok, u, self._u))
        self._v.copy_(torch.where(ok, v, self._v))

    def forward(self, weight):
        if self.training:
            self._power_iterate(weight.detach(), self.n_power_iterations)
        # Clones: autograd saves u and v, and the next training forward updates the buffers in place.
        u = self._u.clone()
        v = self._v.clone()
        sigma = (u * self.op.apply(v, weight)).sum()
        with torch.no_grad():
            self._sigma.copy_(sigma.detach())
        sigma_eff = torch.where(sigma == 0, torch.ones_like(sigma), sigma)
        return weight * (self.scale / sigma_eff)

    def right_inverse(self, value):
        return value

    def extra_repr(self):
        return (
            f"input_shape={self.input_shape}, n_power_iterations={self.n_power_iterations}, "
            f"eps={self.eps}, scale={self.scale}"
        )


def _check_args(module, input_shape, n_power_iterations, eps, scale, check_parametrized=True):
    name = "conv_spectral_norm" if check_parametrized else "conv_operator_norm"
    if not isinstance(module, _CONV_TYPES):
        raise TypeError(
            f"{name}: expected a Conv1d/2d/3d or ConvTranspose1d/2d/3d module, got {type(module).__name__}"
        )
    if parametrize.is_parametrized(module, "weight"):
        raw = module.parametrizations.weight.original
    else:
        raw = module.weight
    if isinstance(raw, nn.parameter.UninitializedParameter):
        raise ValueError(f"{name}: expected an initialized weight, got a lazy module; run a dummy forward first")
    if check_parametrized and parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"{name}: expected a weight without parametrization, got one that already has one")
    if getattr(module, "padding_mode", "zeros") != "zeros":
        raise ValueError(f"{name}: expected padding_mode='zeros', got '{module.padding_mode}'")
    if not raw.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point weight, got {raw.dtype}")
    nd = len(module.kernel_size)
    names = {1: "(C, L)", 2: "(C, H, W)", 3: "(C, D, H, W)"}[nd]
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (tuple, list)) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in input_shape
    ):
        raise TypeError(f"{name}: expected input_shape to be a tuple of ints {names}, got {input_shape!r}")
    if len(input_shape) != nd + 1:
        raise ValueError(
            f"{name}: expected input_shape of length {nd + 1} {names} for {type(module).__name__} "
            f"(one input, no batch dimension), got {tuple(input_shape)}"
        )
    if any(n <= 0 for n in input_shape):
        raise ValueError(f"{name}: expected positive sizes in input_shape, got {tuple(input_shape)}")
    if input_shape[0] != module.in_channels:
        raise ValueError(
            f"{name}: expected input_shape[0] == in_channels = {module.in_channels}, got {input_shape[0]}"
        )
    _checks.check_hyperparameters(n_power_iterations, eps, scale)
    if not module.transposed and not isinstance(module.padding, str):
        spatial = input_shape[1:]
        padded = [n + 2 * p for n, p in zip(spatial, module.padding)]
        span = [d * (k - 1) + 1 for k, d in zip(module.kernel_size, module.dilation)]
        if any(a < b for a, b in zip(padded, span)):
            raise ValueError(
                f"{name}: expected input_shape whose padded size {tuple(padded)} is at least the dilated "
                f"kernel size {tuple(span)}, got {tuple(input_shape)} (the output would be empty)"
            )
    return tuple(input_shape)


def conv_spectral_norm(module, input_shape, n_power_iterations=1, eps=1e-12, scale=1.0):
    """Normalize ``module.weight`` by the operator norm of the convolution (strict SN).

    ``input_shape``: the shape of one input, ``(C, H, W)`` for Conv2d
    (``(C, L)``, ``(C, D, H, W)`` for 1-d, 3-d), no batch dimension; the norm
    is that of the linear map on inputs of exactly this size, with the
    module's stride, padding (ints, 'valid' or 'same'; padding_mode 'zeros'
    only), dilation and groups (and output_padding for ConvTranspose). The bias
    is not part of the map. ``scale`` multiplies the result (``scale * W /
    sigma``). A parametrization (``torch.nn.utils.parametrize``): the raw
    weight is ``module.parametrizations.weight.original``; remove it with
    ``torch.nn.utils.parametrize.remove_parametrizations(module, "weight")``.
    Runs 15 warm-up iterations at registration, as torch's spectral_norm.
    """
    input_shape = _check_args(module, input_shape, n_power_iterations, eps, scale)
    parametrize.register_parametrization(
        module, "weight", ConvSpectralNorm(module, input_shape, n_power_iterations, eps, scale)
    )
    _make_picklable(module)  # torch.save(model) works, as for bsn_cuda.spectral_norm
    return module


def get_conv_sigma(module):
    """The sigma of the last forward of ``module``'s strict SN (detached 0-d copy; NaN before the first)."""
    if not parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"get_conv_sigma: expected a module with conv_spectral_norm, got {type(module).__name__}")
    for p in module.parametrizations.weight:
        if isinstance(p, ConvSpectralNorm):
            return p._sigma.detach().clone()
    raise ValueError("get_conv_sigma: expected a module with conv_spectral_norm, got another parametrization")


def _current_weight(module):
    """``module.weight`` as the module uses it, without a training-mode update of a parametrization."""
    if not parametrize.is_parametrized(module, "weight"):
        return module.weight
    plist = module.parametrizations.weight
    modes = [p.training for p in plist]
    plist.eval()
    try:
        return module.weight
    finally:
        for p, mode in zip(plist, modes):
            p.train(mode)


@torch.no_grad()
def conv_operator_norm(module, input_shape, weight=None, n_power_iterations=100, generator=None):
    """Power-iteration estimate of the operator norm of ``module``'s convolution on inputs of
    ``input_shape`` (no batch dimension), for ``weight`` (default: ``module.weight`` as the
    module uses it, evaluated in eval mode so a parametrization is not updated). Starts from a random vector and leaves the module untouched; the
    estimate approaches the norm from below."""
    input_shape = _check_args(module, input_shape, n_power_iterations, 1e-12, 1.0, check_parametrized=False)
    op = ConvOperator(module, input_shape)
    if weight is None:
        weight = _current_weight(module)
    weight = weight.detach()
    v = _normalize(
        torch.randn((1,) + input_shape, dtype=weight.dtype, device=weight.device, generator=generator), 1e-30
    )
    sigma = torch.zeros((), dtype=weight.dtype, device=weight.device)
    for _ in range(n_power_iterations):
        u = op.apply(v, weight)
        sigma = u.norm()
        if sigma == 0:
            return sigma
        t = op.adjoint(u / sigma, weight)
        v = _normalize(t, 1e-30)
    return op.apply(v, weight).norm()
