"""Autograd of the backward ops (double backward), registered by :mod:`bsn_cuda._library`.

The autograd of the two forwards, which update ``u``/``v`` in place, is a C++
kernel at the ``Autograd`` key (csrc/autograd.cpp): ``register_autograd``
refuses ops that mutate inputs, and a Python kernel there costs more per call
than the fused kernel itself on small layers. The backward ops are
functional, so their derivative is registered here, in torch ops.
"""

import torch

from . import reference
from ._contract import KIND_BSN, KIND_SN
from ._fakes import rows

__all__ = ["backward_of_backward", "setup_sn_backward", "sn_backward_backward", "setup_bsn_backward",
           "bsn_backward_backward", "setup_group_backward", "group_backward_backward"]

# With u, v constant and sigma = <D, W> (D = d sigma / d W from the state), the backward is
#     B(G, W) = a G - (a c / sigma) D,   a = scale / sigma, c = <G, W>
# (B = scale * G when sigma == 0). For an upstream H and d = <D, H>:
#     dB/dG^T H = a H - (scale d / sigma^2) W
#     dB/dW^T H = -(scale <H, G> / sigma^2) D - (scale d / sigma^2) G + (2 scale c d / sigma^3) D
# Computed in torch ops (so a third derivative still works), in the acc dtype.
#
# Variants (docs/design.md): where the factor projects, the same formulas with
# scale -> gamma * scale * k (k = coeff or 1); elsewhere B = gamma * scale * G
# (sigma_eff = 1, no D terms), which is also the zero rule. With B1 = B / gamma,
# the gradient of gamma is <H, B1> = a1 <H, G> - (a1 c / sigma) d (projecting).


def backward_of_backward(grad_grad, grad_out, weight, state, direction, scale, needs_input_grad, coeff=0.0,
                         gamma=None, gamma_index=None):
    acc = state.dtype
    h = grad_grad.to(acc)
    g = grad_out.to(acc)
    w = weight.to(acc)
    # sigma's value from the state, its dependence on W through <D, W>.
    sigma = reference._live_sigma(state[0], torch.sum(direction * w))
    _, _, proj = reference.variant_factor(state[0], scale, coeff)
    flat = ~proj
    k_scale = scale * coeff if coeff > 0 else scale
    scale1 = torch.where(proj, torch.full_like(sigma, k_scale), torch.full_like(sigma, scale))  # a1 * sigma_eff
    scale_t = scale1 if gamma is None else scale1 * gamma.reshape(()).to(acc)
    sigma_eff = torch.where(flat, torch.ones_like(sigma), sigma)
    d = torch.sum(direction * h)
    k = torch.where(flat, torch.zeros_like(sigma), scale_t * d / (sigma_eff * sigma_eff))
    grad_g = grad_w = grad_gamma = None
    if needs_input_grad[0]:
        grad_g = (scale_t / sigma_eff * h - k * w).to(grad_out.dtype)
    want_gamma = gamma is not None and needs_input_grad[gamma_index]
    if needs_input_grad[1] or want_gamma:  # two reductions over W that only these gradients need
        hg = torch.sum(h * g)
        c = torch.sum(g * w)
    if needs_input_grad[1]:
        coef_d = (-scale_t * hg / sigma_eff + 2 * scale_t * c * d / (sigma_eff * sigma_eff)) / sigma_eff
        coef_d = torch.where(flat, torch.zeros_like(sigma), coef_d)
        grad_w = (coef_d * direction - k * g).to(weight.dtype)
    if want_gamma:
        a1 = scale1 / sigma_eff
        grad_gamma = a1 * hg - torch.where(flat, torch.zeros_like(sigma), a1 * c * d / sigma_eff)
        grad_gamma = grad_gamma.reshape(gamma.shape).to(gamma.dtype)
    return grad_g, grad_w, grad_gamma


def setup_sn_backward(ctx, inputs, output):
    grad_out, weight, state, dim, scale = inputs[:5]
    coeff = inputs[5] if len(inputs) > 5 else 0.0
    gamma = inputs[6] if len(inputs) > 6 else None
    ctx.save_for_backward(grad_out, weight, state, gamma)
    ctx.dim = dim
    ctx.scale = scale
    ctx.coeff = coeff


def sn_backward_backward(ctx, grad_grad):
    grad_out, weight, state, gamma = ctx.saved_tensors
    direction = reference.sn_direction(state, weight.shape, ctx.dim)
    grad_g, grad_w, grad_gamma = backward_of_backward(
        grad_grad, grad_out, weight, state, direction, ctx.scale, ctx.needs_input_grad, ctx.coeff, gamma, 6
    )
    return grad_g, grad_w, None, None, None, None, grad_gamma


def setup_bsn_backward(ctx, inputs, output):
    grad_out, weight, state, scale = inputs[:4]
    coeff = inputs[4] if len(inputs) > 4 else 0.0
    gamma = inputs[5] if len(inputs) > 5 else None
    ctx.save_for_backward(grad_out, weight, state, gamma)
    ctx.scale = scale
    ctx.coeff = coeff


def bsn_backward_backward(ctx, grad_grad):
    grad_out, weight, state, gamma = ctx.saved_tensors
    direction = reference.bsn_direction(state, weight.shape)
    grad_g, grad_w, grad_gamma = backward_of_backward(
        grad_grad, grad_out, weight, state, direction, ctx.scale, ctx.needs_input_grad, ctx.coeff, gamma, 5
    )
    return grad_g, grad_w, None, None, None, grad_gamma


# The grouped backward: each layer's as its per-layer backward op's.


def setup_group_backward(ctx, inputs, output):
    grad_outs, weights, states, kinds, dims, scales = inputs
    ctx.save_for_backward(*grad_outs, *weights, *states)
    ctx.layout = (len(weights), list(kinds), list(dims), list(scales))


def group_backward_backward(ctx, grad_grads):
    n, kinds, dims, scales = ctx.layout
    saved = ctx.saved_tensors
    grad_outs, weights, states = saved[:n], saved[n:2 * n], saved[2 * n:]
    grad_g, grad_w = [], []
    needs = (True, True)
    for i in range(n):
        g, w, s, h = grad_outs[i], weights[i], states[i], grad_grads[i]
        if h is None:
            grad_g.append(None)
            grad_w.append(None)
            continue
        if kinds[i] == KIND_BSN:
            direction = reference.bsn_direction(s, w.shape)
            gg, gw, _ = backward_of_backward(h, g, w, s, direction, scales[i], needs)
        elif kinds[i] == KIND_SN:
            direction = reference.sn_direction(s, w.shape, dims[i])
            gg, gw, _ = backward_of_backward(h, g, w, s, direction, scales[i], needs)
        else:
            w2 = rows(w)
            direction = reference.sn_direction(s, w2.shape, 1)
            gg, gw, _ = backward_of_backward(rows(h), rows(g), w2, s, direction, scales[i], needs)
            gg, gw = gg.view(g.shape), gw.view(w.shape)
        grad_g.append(gg)
        grad_w.append(gw)
    return grad_g, grad_w, [None] * n, None, None, None
