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

import math

import torch
import torch.nn.functional as F

from ._context import transforms_active

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
]

_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype):
    """The accumulation dtype of a weight dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _sizes(shape, dim):
    m = shape[dim]
    return m, math.prod(shape) // m


def sn_state_size(shape, dim):
    """Length of the SN state ``[sigma, u (M), v (N)]``."""
    dim = dim + len(shape) if dim < 0 else dim
    m, n = _sizes(shape, dim)
    return 1 + m + n


def bsn_state_size(shape):
    """Length of the BSN state ``[sigma, sigma_0, sigma_1, u0, v0, u1, v1]``."""
    m0, n0 = _sizes(shape, 0)
    m1, n1 = _sizes(shape, 1)
    return 3 + m0 + n0 + m1 + n1


def _split_pairs(state, shape, dims):
    """The ``(u, v)`` vectors of each pair inside a state snapshot."""
    offset = 1 if len(dims) == 1 else 3
    pairs = []
    for d in dims:
        m, n = _sizes(shape, d)
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
# Input checks: the same conditions and wording as csrc/host.cpp, RuntimeError.


def _check(cond, op, msg):
    if not cond:
        raise RuntimeError(f"{op}: {msg}")


def _check_weight(op, weight, min_dim):
    _check(isinstance(weight, torch.Tensor), op, f"expected weight to be a tensor, got {type(weight).__name__}")
    _check(
        weight.dtype in _FLOATING,
        op,
        f"expected weight of dtype float32, float64, float16 or bfloat16, got {weight.dtype}",
    )
    _check(
        weight.ndim >= min_dim,
        op,
        f"expected weight with at least {min_dim} dimensions, got {weight.ndim} (shape {list(weight.shape)})",
    )
    _check(weight.numel() > 0, op, f"expected a non-empty weight, got shape {list(weight.shape)}")


def _check_dim(op, dim, ndim):
    _check(
        -ndim <= dim < ndim,
        op,
        f"expected dim in [{-ndim}, {ndim - 1}] for a weight with {ndim} dimensions, got {dim}",
    )
    return dim + ndim if dim < 0 else dim


def _check_hyper(op, n_power_iterations, eps, scale):
    _check(n_power_iterations >= 1, op, f"expected n_power_iterations >= 1, got {n_power_iterations}")
    _check(n_power_iterations <= 2**30, op, f"expected n_power_iterations <= 2^30, got {n_power_iterations}")
    _check(math.isfinite(eps) and eps > 0, op, f"expected eps > 0 and finite, got {eps}")
    _check_scale(op, scale)


def _check_scale(op, scale):
    _check(math.isfinite(scale) and scale > 0, op, f"expected scale > 0 and finite, got {scale}")


def _check_vector(op, name, vec, weight, expected_size, what):
    _check(isinstance(vec, torch.Tensor), op, f"expected {name} to be a tensor, got {type(vec).__name__}")
    _check(vec.ndim == 1, op, f"expected {name} to be 1-D, got {vec.ndim}-D (shape {list(vec.shape)})")
    _check(
        vec.shape[0] == expected_size,
        op,
        f"expected {name} to have {expected_size} elements ({what} of weight of shape "
        f"{list(weight.shape)}), got {vec.shape[0]}",
    )
    _check(
        vec.dtype == weight.dtype,
        op,
        f"expected {name} to have the weight's dtype {weight.dtype}, got {vec.dtype}",
    )
    _check(
        vec.device == weight.device,
        op,
        f"expected {name} on the weight's device {weight.device}, got {vec.device}",
    )
    _check(vec.is_contiguous(), op, f"expected {name} to be contiguous, got strides {vec.stride()}")


def _check_grad(op, grad_out, weight):
    _check(isinstance(grad_out, torch.Tensor), op, f"expected grad_out to be a tensor, got {type(grad_out).__name__}")
    _check(
        grad_out.shape == weight.shape,
        op,
        f"expected grad_out of the weight's shape {list(weight.shape)}, got {list(grad_out.shape)}",
    )
    _check(
        grad_out.dtype == weight.dtype,
        op,
        f"expected grad_out of the weight's dtype {weight.dtype}, got {grad_out.dtype}",
    )
    _check(
        grad_out.device == weight.device,
        op,
        f"expected grad_out on the weight's device {weight.device}, got {grad_out.device}",
    )


def _check_state(op, state, weight, expected_size):
    _check(isinstance(state, torch.Tensor), op, f"expected state to be a tensor, got {type(state).__name__}")
    _check(
        state.ndim == 1 and state.shape[0] == expected_size,
        op,
        f"expected state to be 1-D with {expected_size} elements (as returned by the forward), "
        f"got shape {list(state.shape)}",
    )
    expected_dtype = acc_dtype(weight.dtype)
    _check(state.dtype == expected_dtype, op, f"expected state of dtype {expected_dtype}, got {state.dtype}")
    _check(
        state.device == weight.device,
        op,
        f"expected state on the weight's device {weight.device}, got {state.device}",
    )


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


def _scaled_output(weight, w_acc, sigma, scale):
    """``W * (scale / sigma_eff)`` in the acc dtype, rounded to the weight dtype."""
    sigma_eff = torch.where(sigma == 0, torch.ones_like(sigma), sigma)
    factor = scale / sigma_eff
    return (w_acc * factor).to(weight.dtype).contiguous()


def sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update):
    """Reference of ``torch.ops.bsn_cuda.sn_forward``; returns ``(out, state)``.

    Training (``update=True``): ``n_power_iterations`` power iterations from the
    stored ``v``; ``u``/``v`` are overwritten in place only if the norms of the
    last iteration are finite and non-zero. Eval: ``sigma = u^T W_mat v``.
    ``out = W * scale / sigma`` (``sigma == 0`` counts as 1, so a zero weight
    gives ``scale * W``). ``state = [sigma, u, v]`` (acc dtype, a snapshot).
    """
    op = "bsn_cuda.reference.sn_forward"
    _check_weight(op, weight, 2)
    dim = _check_dim(op, dim, weight.ndim)
    _check_hyper(op, n_power_iterations, eps, scale)
    m, n = _sizes(weight.shape, dim)
    _check_vector(op, "u", u, weight, m, "size(dim)")
    _check_vector(op, "v", v, weight, n, "numel / size(dim)")

    acc = acc_dtype(weight.dtype)
    w_acc = weight.to(acc)
    sigma = _power_iteration(w_acc, dim, u, v, n_power_iterations, eps, update)
    state = torch.cat([sigma.reshape(1), u.to(acc), v.to(acc)])

    if w_acc.requires_grad or transforms_active():  # (forward-mode AD: tangents without requires_grad)
        u_c, v_c = state[1 : 1 + m], state[1 + m :]
        sigma = _live_sigma(sigma, torch.dot(u_c, torch.mv(matricize(w_acc, dim), v_c)))
    return _scaled_output(weight, w_acc, sigma, scale), state


def bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update):
    """Reference of ``torch.ops.bsn_cuda.bsn_forward``; returns ``(out, state)``.

    Pair 0 is the matricization along dim 0, pair 1 along dim 1, each iterated
    (and accepted) on its own as in :func:`sn_forward`;
    ``sigma = (sigma_0 + sigma_1) / 2`` and
    ``state = [sigma, sigma_0, sigma_1, u0, v0, u1, v1]``.
    """
    op = "bsn_cuda.reference.bsn_forward"
    _check_weight(op, weight, 3)
    _check_hyper(op, n_power_iterations, eps, scale)
    m0, n0 = _sizes(weight.shape, 0)
    m1, n1 = _sizes(weight.shape, 1)
    _check_vector(op, "u0", u0, weight, m0, "size(0)")
    _check_vector(op, "v0", v0, weight, n0, "numel / size(0)")
    _check_vector(op, "u1", u1, weight, m1, "size(1)")
    _check_vector(op, "v1", v1, weight, n1, "numel / size(1)")

    acc = acc_dtype(weight.dtype)
    w_acc = weight.to(acc)
    sigma_0 = _power_iteration(w_acc, 0, u0, v0, n_power_iterations, eps, update)
    sigma_1 = _power_iteration(w_acc, 1, u1, v1, n_power_iterations, eps, update)
    sigma = (sigma_0 + sigma_1) / 2
    state = torch.cat(
        [sigma.reshape(1), sigma_0.reshape(1), sigma_1.reshape(1), u0.to(acc), v0.to(acc), u1.to(acc), v1.to(acc)]
    )

    if w_acc.requires_grad or transforms_active():  # (forward-mode AD: tangents without requires_grad)
        (cu0, cv0), (cu1, cv1) = _split_pairs(state, weight.shape, (0, 1))
        live = (
            torch.dot(cu0, torch.mv(matricize(w_acc, 0), cv0)) + torch.dot(cu1, torch.mv(matricize(w_acc, 1), cv1))
        ) / 2
        sigma = _live_sigma(sigma, live)
    return _scaled_output(weight, w_acc, sigma, scale), state


def _backward(grad_out, weight, sigma, direction, scale):
    """``dW = a G - (a <G, W> / sigma) D`` with ``a = scale / sigma_eff``; ``a G`` if sigma == 0."""
    acc = sigma.dtype
    g = grad_out.to(acc)
    zero = sigma == 0
    sigma_eff = torch.where(zero, torch.ones_like(sigma), sigma)
    a = scale / sigma_eff
    c = torch.sum(g * weight.to(acc))
    coef = torch.where(zero, torch.zeros_like(sigma), a * c / sigma_eff)
    return (a * g - coef * direction).to(weight.dtype).contiguous()


def sn_backward(grad_out, weight, state, dim, scale):
    """Reference of ``torch.ops.bsn_cuda.sn_backward``: the weight gradient, u and v constant."""
    op = "bsn_cuda.reference.sn_backward"
    _check_weight(op, weight, 2)
    dim = _check_dim(op, dim, weight.ndim)
    _check_scale(op, scale)
    _check_grad(op, grad_out, weight)
    _check_state(op, state, weight, sn_state_size(weight.shape, dim))
    return _backward(grad_out, weight, state[0], sn_direction(state, weight.shape, dim), scale)


def bsn_backward(grad_out, weight, state, scale):
    """Reference of ``torch.ops.bsn_cuda.bsn_backward``: the weight gradient, u*, v* constant."""
    op = "bsn_cuda.reference.bsn_backward"
    _check_weight(op, weight, 3)
    _check_scale(op, scale)
    _check_grad(op, grad_out, weight)
    _check_state(op, state, weight, bsn_state_size(weight.shape))
    return _backward(grad_out, weight, state[0], bsn_direction(state, weight.shape), scale)
