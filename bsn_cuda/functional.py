"""Functional SN / BSN for callers that hold their own power-iteration vectors.

``spectral_norm(weight, u, v, ...)`` returns ``scale * W / sigma(W)`` and, when
``training``, updates ``u`` and ``v`` in place (one fused op per call). The
vectors are plain tensors the caller keeps between calls; create them with
:func:`init_sn_vectors` / :func:`init_bsn_vectors`, which draw them exactly as
``torch.nn.utils.parametrizations.spectral_norm`` does (same RNG calls, same
order), and optionally warm them up with :func:`warm_up_sn` / :func:`warm_up_bsn`.

Differences from torch: a weight whose sigma is exactly 0 (e.g. all zeros) is
returned as ``scale * W`` instead of NaN, and a non-finite weight leaves the
vectors unchanged instead of poisoning them.
"""

import torch
import torch.nn.functional as F

from . import _ops, reference
from ._checks import (
    check_bool,
    check_coeff,
    check_functional_weight,
    check_hyperparameters,
    check_int,
    check_op_dim,
    check_positive_float,
    check_tensor,
)

__all__ = [
    "spectral_norm",
    "bidirectional_spectral_norm",
    "init_sn_vectors",
    "init_bsn_vectors",
    "warm_up_sn",
    "warm_up_bsn",
    "uses_single_matricization",
]


# Argument checks (bsn_cuda._checks): Python-level values get ValueError/TypeError
# naming the argument; tensor shapes, dtypes and devices are checked by the ops
# (RuntimeError).


def uses_single_matricization(shape):
    """Whether BSN falls back to SN along dim 0 for a weight of this shape.

    True for 2-D weights and for kernels whose dims after dim 1 are all 1
    (e.g. 1x1 convolutions): their two matricizations are transposes of each
    other, so both have the same spectral norm.
    """
    return len(shape) == 2 or (len(shape) >= 3 and all(s == 1 for s in shape[2:]))


# ---------------------------------------------------------------------------
# The normalizations.


def _variant(weight, training, coeff, gamma, track_only, n_power_iterations_eval):
    """The ops' trailing ``(coeff, gamma, track_only)`` (empty for plain SN), and
    whether the call iterates on copies of the vectors (eval iterations)."""
    coeff = check_coeff(coeff)
    check_tensor("gamma", gamma, allow_none=True)
    check_bool("track_only", track_only)
    check_int("n_power_iterations_eval", n_power_iterations_eval, minimum=0)
    if track_only and (coeff is not None or gamma is not None):
        raise ValueError(
            f"expected track_only=True alone, got coeff={coeff}, gamma={'None' if gamma is None else 'a tensor'}"
        )
    copies = not training and n_power_iterations_eval > 0
    if coeff is None and gamma is None and not track_only and not copies:
        return (), False
    if weight.ndim < 2:
        raise ValueError(f"expected a weight with at least 2 dimensions for the variants, got {weight.ndim}-D")
    return (float(coeff or 0.0), gamma, track_only), copies


def spectral_norm(weight, u, v, dim=0, n_power_iterations=1, eps=1e-12, scale=1.0, training=True, *, coeff=None,
                  gamma=None, track_only=False, n_power_iterations_eval=0):
    """``scale * W / sigma(W_mat(dim))`` with sigma estimated by power iteration.

    Args:
        weight: the weight (any floating dtype torch supports for the device; the
            fused op handles float32/float64/float16/bfloat16, any strides).
            Differentiable; ``u``/``v`` are held constant in the gradient.
        u, v: the vectors of ``W_mat(dim)`` (sizes ``size(dim)`` and
            ``numel / size(dim)``, contiguous, weight dtype and device),
            updated in place when ``training``. Ignored (may be None) for 1-D weights.
        dim: the output dimension (0 for Linear/Conv, 1 for ConvTranspose).
        n_power_iterations: power iterations per training call (>= 1).
        eps: lower bound for the norms in the power iteration (> 0).
        scale: the target spectral norm (> 0); 1.0 is plain SN.
        training: iterate and update ``u``/``v``; if False only
            ``sigma = u^T W_mat v`` with the stored vectors.

    A 1-D weight is normalized exactly: ``W / max(||W||, eps) * scale``. A
    weight with ``sigma == 0`` (all zeros) gives ``scale * W`` (torch: NaN).

    Variants (docs/design.md; weights with ``ndim >= 2``): ``coeff=c`` the soft
    bound ``W / max(1, sigma / c)``; ``gamma`` (a one-element tensor of the
    accumulation dtype, differentiable) the learnable scale ``gamma * W / sigma``;
    ``track_only=True`` returns ``weight`` itself after updating ``u``/``v``;
    ``n_power_iterations_eval=n`` makes ``training=False`` calls iterate ``n``
    times on copies of ``u``/``v``.
    """
    check_functional_weight(weight)
    dim = check_op_dim(dim, weight.ndim)
    check_hyperparameters(n_power_iterations, eps, scale)
    check_bool("training", training)
    variant, copies = _variant(weight, training, coeff, gamma, track_only, n_power_iterations_eval)
    if weight.ndim == 1:
        return reference.normalize_vector(weight, eps, scale)
    check_tensor("u", u)
    check_tensor("v", v)
    if not variant:
        out, _ = _ops.sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, training)
        return out
    if copies:
        u, v, training, n_power_iterations = u.clone(), v.clone(), True, n_power_iterations_eval
    out, _ = _ops.sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, training, None, *variant)
    return weight if track_only else out


def bidirectional_spectral_norm(weight, u0, v0, u1, v1, n_power_iterations=1, eps=1e-12, scale=1.0, training=True,
                                *, coeff=None, gamma=None, track_only=False, n_power_iterations_eval=0):
    """Bidirectional (scaled) SN: ``scale * W / ((sigma_0 + sigma_1) / 2)``.

    ``sigma_0`` is the spectral norm of ``W_mat(0)`` (``[c_out, c_in * k]``,
    vectors ``u0``, ``v0``), ``sigma_1`` that of ``W_mat(1)``
    (``[c_in, c_out * k]``, vectors ``u1``, ``v1``); Lin, Sekar and Fanti,
    NeurIPS 2021. ``scale != 1`` is BSSN.

    For weights where both matricizations are transposes of each other
    (:func:`uses_single_matricization`: 2-D weights, 1x1 kernels) this is SN
    along dim 0 and only ``u0``/``v0`` are used (``u1``/``v1`` may be None).
    1-D weights: ``W / max(||W||, eps) * scale``. Other arguments (variants
    included) as in :func:`spectral_norm`; a weight with sigma 0 gives ``scale * W``.
    """
    check_functional_weight(weight)
    check_hyperparameters(n_power_iterations, eps, scale)
    check_bool("training", training)
    variant, copies = _variant(weight, training, coeff, gamma, track_only, n_power_iterations_eval)
    if weight.ndim == 1:
        return reference.normalize_vector(weight, eps, scale)
    check_tensor("u0", u0)
    check_tensor("v0", v0)
    single = uses_single_matricization(weight.shape)
    if not single:
        check_tensor("u1", u1)
        check_tensor("v1", v1)
    if not variant:
        if single:
            out, _ = _ops.sn_forward(weight, u0, v0, 0, n_power_iterations, eps, scale, training)
        else:
            out, _ = _ops.bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, training)
        return out
    if copies:
        u0, v0, training, n_power_iterations = u0.clone(), v0.clone(), True, n_power_iterations_eval
        if not single:
            u1, v1 = u1.clone(), v1.clone()
    if single:
        out, _ = _ops.sn_forward(weight, u0, v0, 0, n_power_iterations, eps, scale, training, None, *variant)
    else:
        out, _ = _ops.bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, training, None, *variant)
    return weight if track_only else out


# ---------------------------------------------------------------------------
# Initial vectors.


#: Power iterations run at registration (torch's SN does 15), by every parametrization.
WARM_UP_ITERATIONS = 15


def draw_unit_vectors(weight, dim, eps):
    """Random unit ``(u, v)`` for ``W_mat(dim)``, drawn as torch's SN draws them (both
    flavours): ``u`` then ``v`` with ``normal_(0, 1)``, then ``F.normalize``. Every
    registration draws its vectors here, so the same seed gives torch's vectors."""
    rows = weight.shape[dim]
    cols = weight.numel() // rows if rows else 0
    u = weight.new_empty(rows).normal_(0, 1)
    v = weight.new_empty(cols).normal_(0, 1)
    return F.normalize(u, dim=0, eps=eps), F.normalize(v, dim=0, eps=eps)


@torch.no_grad()
def init_sn_vectors(weight, dim=0, eps=1e-12):
    """Random unit ``(u, v)`` for :func:`spectral_norm`, drawn like torch's SN.

    Consumes the RNG exactly as ``torch.nn.utils.parametrizations.spectral_norm``
    does for the same weight (``u`` then ``v``, ``normal_(0, 1)``, then
    ``F.normalize``), so the same seed gives the same vectors.
    """
    check_functional_weight(weight, min_ndim=2)
    dim = check_op_dim(dim, weight.ndim)
    check_positive_float("eps", eps)
    return draw_unit_vectors(weight, dim, eps)


@torch.no_grad()
def init_bsn_vectors(weight, eps=1e-12):
    """Random unit vectors for :func:`bidirectional_spectral_norm`.

    Returns ``(u0, v0, u1, v1)``, drawn pair 0 (dim 0) then pair 1 (dim 1), each
    as :func:`init_sn_vectors`; ``(u0, v0, None, None)`` when
    :func:`uses_single_matricization` (then the RNG use equals torch's SN).
    """
    check_functional_weight(weight, min_ndim=2)
    check_positive_float("eps", eps)
    u0, v0 = draw_unit_vectors(weight, 0, eps)
    if uses_single_matricization(weight.shape):
        return u0, v0, None, None
    u1, v1 = draw_unit_vectors(weight, 1, eps)
    return u0, v0, u1, v1


@torch.no_grad()
def warm_up_sn(weight, u, v, dim=0, n_power_iterations=WARM_UP_ITERATIONS, eps=1e-12):
    """Run ``n_power_iterations`` power iterations on ``u``/``v`` in place (torch does 15 at registration)."""
    check_functional_weight(weight)
    dim = check_op_dim(dim, weight.ndim)
    check_hyperparameters(n_power_iterations, eps, 1.0)
    _ops.sn_forward(weight.detach(), u, v, dim, n_power_iterations, eps, 1.0, True)


@torch.no_grad()
def warm_up_bsn(weight, u0, v0, u1, v1, n_power_iterations=WARM_UP_ITERATIONS, eps=1e-12):
    """:func:`warm_up_sn` for both BSN pairs (only pair 0 for single-matricization weights)."""
    check_functional_weight(weight)
    check_hyperparameters(n_power_iterations, eps, 1.0)
    if uses_single_matricization(weight.shape):
        _ops.sn_forward(weight.detach(), u0, v0, 0, n_power_iterations, eps, 1.0, True)
    else:
        _ops.bsn_forward(weight.detach(), u0, v0, u1, v1, n_power_iterations, eps, 1.0, True)
