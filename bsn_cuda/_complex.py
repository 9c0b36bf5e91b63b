"""SN of complex weights, in plain torch ops (the fused kernels are real-only).

Same math as torch's parametrized SN on complex weights: ``u = normalize(W v)``,
``v = normalize(W^H u)``, ``sigma = u^H W v`` (complex in general), output
``scale * W / sigma``; with bsn_cuda's two rules (``sigma == 0`` counts as 1,
and the vectors are kept when an iteration's norms are not finite and
positive). Returns ``(out, state)`` like the ops, with ``state = [sigma]``
(``sigma``'s real part, acc dtype) for the sigma log.
"""

import torch
import torch.nn.functional as F

from .reference import matricize

__all__ = ["sn_forward"]


@torch.no_grad()
def _iterate(w_mat, u, v, n_power_iterations, eps):
    new_u, new_v = u, v
    for _ in range(n_power_iterations):
        s = torch.mv(w_mat, new_v)
        new_u = F.normalize(s, dim=0, eps=eps)
        t = torch.mv(w_mat.mH, new_u)
        new_v = F.normalize(t, dim=0, eps=eps)
    norms = torch.stack([torch.linalg.vector_norm(s), torch.linalg.vector_norm(t)])
    valid = (torch.isfinite(norms) & (norms > 0)).all()
    u.copy_(torch.where(valid, new_u, u))
    v.copy_(torch.where(valid, new_v, v))


def sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update):
    w_mat = matricize(weight, dim)
    if update:
        _iterate(w_mat.detach(), u, v, n_power_iterations, eps)
    # Clones: the backward must see the vectors of this call, not later updates.
    u_c = u.clone(memory_format=torch.contiguous_format)
    v_c = v.clone(memory_format=torch.contiguous_format)
    sigma = torch.vdot(u_c, torch.mv(w_mat, v_c))
    sigma_eff = torch.where(sigma == 0, torch.ones_like(sigma), sigma)
    out = weight / sigma_eff
    if scale != 1.0:
        out = out * scale
    acc = torch.float64 if weight.dtype == torch.complex128 else torch.float32
    return out, sigma.detach().real.to(acc).reshape(1)
