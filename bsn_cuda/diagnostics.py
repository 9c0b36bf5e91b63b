"""Gradient probe: per-layer gradient norms, sigmas and effective scales of a network.

Lin, Sekar and Fanti (NeurIPS 2021) explain SN through the size of each
layer's weight gradient: without normalization the gradient norms of a
discriminator's layers grow or shrink geometrically with depth (exploding /
vanishing), and SN keeps them in a narrow band. :func:`probe` measures, for
one batch, what their analysis talks about:

* ``grad_norm``: ``||dL/dW||_F`` for the weight the optimizer updates (the raw
  weight of a normalized layer);
* ``grad_norm_eff``: ``||dL/dW_eff||_F`` for the weight the layer computes with;
* the sigmas of the raw weight: ``sigma_mat0`` (``W_mat(0) = [c_out, c_in*k]``,
  what SN divides by), ``sigma_mat1`` (``[c_in, c_out*k]``, BSN uses the mean
  of the two) and ``sigma_strict`` (the operator norm of the convolution for
  the input size seen in the probe);
* the effective scale: ``factor`` with ``W_eff = factor * W`` (``scale /
  sigma`` for a normalized layer, 1 without), and the spectral norms of
  ``W_eff`` (``eff_sigma_mat0``, ``eff_sigma_strict``: the layer's actual gain
  bound).

The probe has no side effects: by default it runs the model in eval mode (so
no power-iteration update) and uses ``torch.autograd.grad`` (no ``.grad`` is
written); the mode is restored. Only the non-persistent sigma logs read by
``get_sigma`` change: they record the probe's forward.
"""

import dataclasses
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .nn.conv_sn import ConvSpectralNorm, conv_operator_norm
from .nn import BidirectionalSpectralNorm, SpectralNorm

__all__ = ["LayerReport", "probe", "layer_kind", "to_markdown", "exact_sigma", "top_singular_values",
           "TopSingularValues"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_CONVS = _LAYERS[:-1]


@dataclasses.dataclass
class LayerReport:
    name: str
    kind: str  # "none", "sn", "bsn", "strict" or "other" (another parametrization)
    shape: tuple
    input_shape: tuple  # one input as seen in the probe (no batch dimension)
    grad_norm: float
    grad_norm_eff: float
    weight_norm: float
    sigma_mat0: float
    sigma_mat1: float  # nan for 2-D weights
    sigma_strict: float  # nan for Linear (equal to sigma_mat0 there)
    sigma_used: float  # what the normalization divided by in this forward (nan for "none")
    scale: float  # the normalization's constant c (1 for "none")
    factor: float  # W_eff = factor * W
    eff_sigma_mat0: float
    eff_sigma_strict: float

    def as_dict(self):
        return dataclasses.asdict(self)


def _norm_of(module):
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, (SpectralNorm, BidirectionalSpectralNorm, ConvSpectralNorm)):
            return p
    return module.parametrizations.weight[0]


def layer_kind(module):
    """``"none"``, ``"sn"``, ``"bsn"``, ``"strict"`` or ``"other"`` for ``module``'s weight."""
    norm = _norm_of(module)
    if norm is None:
        return "none"
    if isinstance(norm, SpectralNorm):
        return "sn"
    if isinstance(norm, BidirectionalSpectralNorm):
        return "bsn"
    if isinstance(norm, ConvSpectralNorm):
        return "strict"
    return "other"


def exact_sigma(weight, dim=0):
    """Exact spectral norm of ``W_mat(dim) = W.movedim(dim, 0).reshape(W.size(dim), -1)``."""
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    return torch.linalg.matrix_norm(w.movedim(dim, 0).reshape(w.size(dim), -1), ord=2).item()


def _raw_weight(module):
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _sigma_used(norm):
    if isinstance(norm, SpectralNorm):
        return norm._sigma[0].item()
    if isinstance(norm, BidirectionalSpectralNorm):
        return norm._sigmas[0].item()
    if isinstance(norm, ConvSpectralNorm):
        return norm._sigma.item()
    return math.nan


def probe(model, batch, loss_fn=None, strict_iterations=50, train_mode=False, layers=None):
    """Per-layer report for one batch: a list of :class:`LayerReport`, in module order.

    ``loss_fn(output) -> scalar`` (default: ``output.mean()``, the mean
    discriminator output, as in the paper's analysis of ``dD/dW``).
    ``strict_iterations``: power iterations for ``sigma_strict`` and
    ``eff_sigma_strict`` (0 skips them, nan). ``train_mode=False`` runs the
    model in eval mode (normalizations use their stored vectors and are not
    updated); ``True`` keeps the model's mode as it is. ``layers``: the
    modules to report (default: every Conv/ConvTranspose/Linear).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"probe: expected model to be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is None:
        loss_fn = torch.mean
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    if layers is not None:
        wanted = set(map(id, layers))
        named = [(n, m) for n, m in named if id(m) in wanted]
    if not named:
        raise ValueError("probe: expected a model with Conv/ConvTranspose/Linear layers, got none")

    input_shapes = {}

    def record(module, args):
        input_shapes[id(module)] = tuple(args[0].shape[1:])

    handles = [m.register_forward_pre_hook(record) for _, m in named]
    modes = [(m, m.training) for m in model.modules()]
    if not train_mode:
        model.eval()
    try:
        # cached(): each parametrized weight is computed once, so the tensor read after the
        # forward is the one the layer used, and its gradient is dL/dW_eff.
        with parametrize.cached():
            out = model(batch)
            eff = [m.weight for _, m in named]
            raw = [_raw_weight(m) for _, m in named]
            loss = loss_fn(out)
            if loss.numel() != 1:
                raise ValueError(f"probe: expected loss_fn to return a scalar, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, raw + eff, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode

    n = len(named)
    reports = []
    for i, (name, module) in enumerate(named):
        g_raw, g_eff = grads[i], grads[n + i]
        w_raw, w_eff = raw[i].detach(), eff[i].detach()
        norm = _norm_of(module)
        kind = layer_kind(module)
        in_shape = input_shapes.get(id(module), ())
        is_conv = isinstance(module, _CONVS)
        dim0 = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
        strict = strict_eff = math.nan
        if is_conv and strict_iterations > 0 and in_shape:
            gen = torch.Generator(device=w_raw.device).manual_seed(0)
            strict = conv_operator_norm(module, in_shape, w_raw, strict_iterations, generator=gen).item()
            gen.manual_seed(0)
            strict_eff = conv_operator_norm(module, in_shape, w_eff, strict_iterations, generator=gen).item()
        w_norm = w_raw.norm().item()
        reports.append(
            LayerReport(
                name=name,
                kind=kind,
                shape=tuple(w_raw.shape),
                input_shape=in_shape,
                grad_norm=g_raw.norm().item() if g_raw is not None else 0.0,
                grad_norm_eff=g_eff.norm().item() if g_eff is not None else 0.0,
                weight_norm=w_norm,
                sigma_mat0=exact_sigma(w_raw, dim0),
                sigma_mat1=exact_sigma(w_raw, 1 - dim0) if w_raw.ndim > 2 else math.nan,
                sigma_strict=strict,
                sigma_used=_sigma_used(norm) if norm is not None else math.nan,
                scale=float(getattr(norm, "scale", 1.0)) if norm is not None else 1.0,
                factor=(w_eff.norm().item() / w_norm) if w_norm > 0 else math.nan,
                eff_sigma_mat0=exact_sigma(w_eff, dim0),
                eff_sigma_strict=strict_eff,
            )
        )
    return reports


def to_markdown(reports, columns=("name", "kind", "grad_norm", "sigma_mat0", "sigma_strict", "factor", "eff_sigma_strict")):
    """A markdown table of ``reports`` (floats with 4 significant digits)."""

    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in reports:
        d = r.as_dict()
        lines.append("| " + " | ".join(fmt(d[c]) for c in columns) + " |")
    return "\n".join(lines)


class TopSingularValues(tuple):
    """``(values, right_vectors)`` of :func:`top_singular_values`."""

    __slots__ = ()

    def __new__(cls, values, right_vectors):
        return super().__new__(cls, (values, right_vectors))

    values = property(lambda self: self[0])
    right_vectors = property(lambda self: self[1])


@torch.no_grad()
def top_singular_values(weight, k=3, dim=0, n_iter=10, init=None, generator=None):
    """The ``k`` largest singular values of ``W_mat(dim)``, for logging (BigGAN's ``num_svs``).

    Block (subspace) power iteration: ``V`` (``N x k``) orthonormal, then
    ``n_iter`` times ``U = orth(W_mat V)``, ``V = orth(W_mat^T U)`` (QR), and
    the values are the singular values of the ``k x k`` matrix ``U^T W_mat V``
    (descending). Each iteration is two GEMMs with ``k`` columns, about ``k``
    times one power iteration. ``init``: the ``right_vectors`` of a previous
    call (warm start: a few iterations per training step then track the
    spectrum, as SN's vectors do); else drawn from ``generator``.

    ``weight``: a tensor (``ndim >= 2``, computed in float32, or float64 for
    float64 weights) or a module whose ``weight`` (the raw weight of a
    normalized layer) is used. Returns ``TopSingularValues(values, right_vectors)``:
    ``values`` a 1-D tensor of ``k`` values on the weight's device (no host
    sync), ``right_vectors`` ``N x k``. Not fused (a diagnostic, not on the
    training path).
    """
    if isinstance(weight, nn.Module):
        weight = _raw_weight(weight)
    if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
        raise ValueError(f"expected a weight tensor with at least 2 dimensions or a layer, got {type(weight).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"expected k to be an int >= 1, got {k!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"expected n_iter to be an int >= 1, got {n_iter!r}")
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(acc)
    w = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    m, n = w.shape
    if k > min(m, n):
        raise ValueError(f"expected k <= min(M, N) = {min(m, n)} for W_mat of shape {list(w.shape)}, got {k}")
    if init is None:
        v = torch.randn(n, k, dtype=acc, device=w.device, generator=generator)
    else:
        if init.shape != (n, k):
            raise ValueError(f"expected init of shape {[n, k]} (a previous right_vectors), got {list(init.shape)}")
        v = init.to(device=w.device, dtype=acc)
    v = torch.linalg.qr(v).Q
    for _ in range(n_iter):
        u = torch.linalg.qr(w @ v).Q
        v = torch.linalg.qr(w.t() @ u).Q
    values = torch.linalg.svdvals(u.t() @ w @ v)
    return TopSingularValues(values, v)
