"""Pure-PyTorch reference of the fused ops (no compiled code).

Every function here is equivalent to the op of the same name in
``torch.ops.bsn_cuda`` (see docs/design.md): same signature, same in-place
update of the power-iteration buffers (including the accept rule), same state
layout, the same accumulation dtype (float64 for float64 weights, float32
otherwise). Results agree up to floating-point rounding, since the order of the
reductions differs.

It serves as the test oracle and as the fallback when ``bsn_cuda._C`` is not
available. Unlike the ops, the ``out`` returned by the forwards is
differentiable with respect to ``weight`` through plain autograd, with ``u``
and ``v`` held constant: ``sigma = u^T W_mat v`` (zero rule: ``sigma == 0`` is
replaced by 1), which is exactly the gradient the fused backward computes.
"""

import torch
import torch.nn.functional as F

from ._context import transforms_active

# The state layout's sizes and dtype and the ops' input checks come from the
# contract (shared with the fake kernels; mirrors csrc/host.cpp).
from ._contract import acc_dtype, bsn_state_size, matrix_sizes, sn_state_size
from ._contract import check_bsn_backward, check_bsn_forward, check_sn_backward, check_sn_forward

__all__ = [
    "acc_dtype",
    "matricize",
    "fold",
    "normalize_vector",
    "sn_state_size",
    "bsn_state_size",
    "sn_direction",
    "bsn_direction",
    "sn_forward",
    "sn_backward",
    "bsn_forward",
    "bsn_backward",
    "variant_factor",
    "gamma_grad",
]

def matricize(weight, dim):
    """``W_mat(dim)``: the ``size(dim) x (numel / size(dim))`` matrix of ``weight``.

    Column ``p * R + r`` holds ``weight[p, m, r]`` with ``weight`` viewed as
    ``[prod(size[:dim]), size(dim), prod(size[dim+1:])]``; this is torch's
    spectral-norm matricization (``permute(dim, rest).flatten(1)``).
    """
    dim = dim + weight.ndim if dim < 0 else dim
    return weight.movedim(dim, 0).reshape(weight.shape[dim], -1)


def fold(mat, shape, dim):
    """The inverse of :func:`matricize`: an ``M x N`` matrix back to ``shape``."""
    dim = dim + len(shape) if dim < 0 else dim
    rest = tuple(shape[:dim]) + tuple(shape[dim + 1 :])
    return mat.reshape((shape[dim],) + rest).movedim(0, dim)


def normalize_vector(weight, eps=1e-12, scale=1.0):
    """The 1-D case of SN and BSN: ``W / max(||W||, eps) * scale`` (no buffers).

    Identical to ``torch.nn.functional.normalize(weight, dim=0, eps=eps)`` times
    ``scale``; a zero vector stays zero.
    """
    out = F.normalize(weight, dim=0, eps=eps)
    return out if scale == 1.0 else out * scale


def _split_pairs(state, shape, dims):
    """The ``(u, v)`` vectors of each pair inside a state snapshot."""
    offset = 1 if len(dims) == 1 else 3
    pairs = []
    for d in dims:
        m, n = matrix_sizes(shape, d)
        pairs.append((state[offset : offset + m], state[offset + m : offset + m + n]))
        offset += m + n
    return pairs


def sn_direction(state, shape, dim):
    """``d sigma / d W`` with u, v constant: ``u v^T`` folded back to ``shape``."""
    dim = dim + len(shape) if dim < 0 else dim
    ((u, v),) = _split_pairs(state, shape, (dim,))
    return fold(torch.outer(u, v), shape, dim)


def bsn_direction(state, shape):
    """``d sigma / d W`` of BSN: ``(fold_0(u0 v0^T) + fold_1(u1 v1^T)) / 2``."""
    (u0, v0), (u1, v1) = _split_pairs(state, shape, (0, 1))
    return (fold(torch.outer(u0, v0), shape, 0) + fold(torch.outer(u1, v1), shape, 1)) / 2


# ---------------------------------------------------------------------------
# The math.


@torch.no_grad()
def _power_iteration(w_acc, dim, u, v, n_power_iterations, eps, update):
    """Iterate one (u, v) pair of ``W_mat(dim)``; returns sigma (0-dim, acc dtype).

    ``w_acc`` is the weight in the acc dtype; ``u``, ``v`` are the buffers
    (weight dtype), overwritten only when the last iteration is valid. (The
    detach happens here, under no_grad, so that under torch.func.grad the
    iteration runs below the transform and may update buffers it captured.)
    """
    w_mat = matricize(w_acc.detach(), dim)
    acc = w_mat.dtype
    v_acc = v.to(acc)
    if not update:
        return torch.dot(u.to(acc), torch.mv(w_mat, v_acc))
    for _ in range(n_power_iterations):
        s = torch.mv(w_mat, v_acc)
        norm_s = torch.linalg.vector_norm(s)
        inv_s = 1.0 / norm_s.clamp_min(eps)
        u_acc = s * inv_s
        v_raw = torch.mv(w_mat.t(), s) * inv_s  # = W_mat^T u
        norm_v_raw = torch.linalg.vector_norm(v_raw)
        v_acc = v_raw * (1.0 / norm_v_raw.clamp_min(eps))
    sigma = torch.dot(v_raw, v_acc)
    # The accept rule, without a host sync: a non-finite or zero norm keeps the buffers.
    valid = torch.isfinite(norm_s) & (norm_s > 0) & torch.isfinite(norm_v_raw) & (norm_v_raw > 0)
    # out= rather than copy_: as torch's SN does, so that under torch.func.grad
    # (buffers passed to functional_call) the update of a captured buffer works.
    torch.where(valid, u_acc.to(u.dtype), u.clone(), out=u)
    torch.where(valid, v_acc.to(v.dtype), v.clone(), out=v)
    return sigma


def _live_sigma(sigma_state, sigma_live):
    """``sigma_state``'s value with ``sigma_live``'s gradient.

    ``x - x.detach()`` is exactly 0 for finite x, so the forward value is the
    op's sigma bit for bit while autograd sees ``u^T W_mat v``.
    """
    return sigma_state + (sigma_live - sigma_live.detach())


def variant_factor(sigma, scale, coeff=0.0, gamma=None):
    """The output factor of every variant (docs/design.md, Variants): ``(a, a1, proj)``.

    ``proj``: whether the factor depends on sigma (SN: ``sigma != 0``; soft
    bound ``coeff > 0``: ``not sigma <= coeff``, the tie taking the identity
    branch). ``a1 = scale * k / sigma`` if ``proj`` else ``scale`` (``k`` =
    ``coeff`` or 1), ``a = a1 * gamma``. Differentiable in sigma and gamma.
    """
    if coeff > 0:
        proj = ~(sigma <= coeff)
        k = float(coeff)
    else:
        proj = sigma != 0
        k = 1.0
    sigma_p = torch.where(proj, sigma, torch.ones_like(sigma))
    a1 = torch.where(proj, (scale * k) / sigma_p, torch.full_like(sigma, scale))
    a = a1 if gamma is None else a1 * gamma.reshape(()).to(sigma.dtype)
    return a, a1, proj


def gamma_grad(grad_out, weight, sigma, scale, coeff=0.0):
    """``d loss / d gamma = a1 * <G, W>`` (acc dtype, 0-dim): what the ops' autograd computes."""
    acc = sigma.dtype
    _, a1, _ = variant_factor(sigma, scale, coeff)
    return a1 * torch.sum(grad_out.to(acc) * weight.to(acc))


def _scaled_output(weight, w_acc, sigma, scale, coeff=0.0, gamma=None):
    """``W * a`` (:func:`variant_factor`) in the acc dtype, rounded to the weight dtype."""
    factor, _, _ = variant_factor(sigma, scale, coeff, gamma)
    return (w_acc * factor).to(weight.dtype).contiguous()


def sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, coeff=0.0, gamma=None, track_only=False):
    """Reference of ``torch.ops.bsn_cuda.sn_forward``; returns ``(out, state)``.

    Training (``update=True``): ``n_power_iterations`` power iterations from the
    stored ``v``; ``u``/``v`` are overwritten in place only if the norms of the
    last iteration are finite and non-zero. Eval: ``sigma = u^T W_mat v``.
    ``out = W * scale / sigma`` (``sigma == 0`` counts as 1, so a zero weight
    gives ``scale * W``). ``state = [sigma, u, v]`` (acc dtype, a snapshot).
    Variants (docs/design.md): ``coeff`` (soft bound), ``gamma`` (learnable
    scale, differentiable), ``track_only`` (``out`` is empty, no output pass).
    """
    dim, m, n = check_sn_forward(
        "bsn_cuda.reference.sn_forward", weight, u, v, dim, n_power_iterations, eps, scale, coeff, gamma, track_only
    )

    acc = acc_dtype(weight.dtype)
    w_acc = weight.to(acc)
    sigma = _power_iteration(w_acc, dim, u, v, n_power_iterations, eps, update)
    state = torch.cat([sigma.reshape(1), u.to(acc), v.to(acc)])
    if track_only:
        return weight.new_empty(0), state.detach()

    if w_acc.requires_grad or transforms_active():  # (forward-mode AD: tangents without requires_grad)
        u_c, v_c = state[1 : 1 + m], state[1 + m :]
        sigma = _live_sigma(sigma, torch.dot(u_c, torch.mv(matricize(w_acc, dim), v_c)))
    return _scaled_output(weight, w_acc, sigma, scale, coeff, gamma), state


def bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, coeff=0.0, gamma=None,
                track_only=False):
    """Reference of ``torch.ops.bsn_cuda.bsn_forward``; returns ``(out, state)``.

    Pair 0 is the matricization along dim 0, pair 1 along dim 1, each iterated
    (and accepted) on its own as in :func:`sn_forward`;
    ``sigma = (sigma_0 + sigma_1) / 2`` and
    ``state = [sigma, sigma_0, sigma_1, u0, v0, u1, v1]``.
    """
    check_bsn_forward(
        "bsn_cuda.reference.bsn_forward", weight, u0, v0, u1, v1, n_power_iterations, eps, scale, coeff, gamma,
        track_only,
    )

    acc = acc_dtype(weight.dtype)
    w_acc = weight.to(acc)
    sigma_0 = _power_iteration(w_acc, 0, u0, v0, n_power_iterations, eps, update)
    sigma_1 = _power_iteration(w_acc, 1, u1, v1, n_power_iterations, eps, update)
    sigma = (sigma_0 + sigma_1) / 2
    state = torch.cat(
        [sigma.reshape(1), sigma_0.reshape(1), sigma_1.reshape(1), u0.to(acc), v0.to(acc), u1.to(acc), v1.to(acc)]
    )
    if track_only:
        return weight.new_empty(0), state.detach()

    if w_acc.requires_grad or transforms_active():  # (forward-mode AD: tangents without requires_grad)
        (cu0, cv0), (cu1, cv1) = _split_pairs(state, weight.shape, (0, 1))
        live = (
            torch.dot(cu0, torch.mv(matricize(w_acc, 0), cv0)) + torch.dot(cu1, torch.mv(matricize(w_acc, 1), cv1))
        ) / 2
        sigma = _live_sigma(sigma, live)
    return _scaled_output(weight, w_acc, sigma, scale, coeff, gamma), state


def _backward(grad_out, weight, sigma, direction, scale, coeff=0.0, gamma=None):
    """``dW = a G - (a <G, W> / sigma) D`` with ``a`` of :func:`variant_factor`;
    ``a G`` where the factor does not project (sigma == 0; soft bound: sigma <= coeff)."""
    acc = sigma.dtype
    g = grad_out.to(acc)
    a, _, proj = variant_factor(sigma, scale, coeff, gamma)
    sigma_p = torch.where(proj, sigma, torch.ones_like(sigma))
    c = torch.sum(g * weight.to(acc))
    coef = torch.where(proj, a * c / sigma_p, torch.zeros_like(sigma))
    return (a * g - coef * direction).to(weight.dtype).contiguous()


def sn_backward(grad_out, weight, state, dim, scale, coeff=0.0, gamma=None):
    """Reference of ``torch.ops.bsn_cuda.sn_backward``: the weight gradient, u and v constant."""
    dim = check_sn_backward("bsn_cuda.reference.sn_backward", grad_out, weight, state, dim, scale, coeff, gamma)
    return _backward(grad_out, weight, state[0], sn_direction(state, weight.shape, dim), scale, coeff, gamma)


def bsn_backward(grad_out, weight, state, scale, coeff=0.0, gamma=None):
    """Reference of ``torch.ops.bsn_cuda.bsn_backward``: the weight gradient, u*, v* constant."""
    check_bsn_backward("bsn_cuda.reference.bsn_backward", grad_out, weight, state, scale, coeff, gamma)
    return _backward(grad_out, weight, state[0], bsn_direction(state, weight.shape), scale, coeff, gamma)
