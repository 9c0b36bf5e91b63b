"""Per-call routing of the ops, and the only Python caller of ``bsn_cuda._C`` and ``torch.ops.bsn_cuda``.

The rest of the package calls the entry points here. Each call takes one of
three routes (:func:`_route`, the one routing guard):

* **fast**: eager calls go through ``bsn_cuda._C``'s fast entry points (the
  same op, called from C++ with fixed argument types, which also write the
  sigma log; see csrc/python_api.cpp). They return None when a call needs the
  general path: then the op route below;
* **op**: ``torch.ops.bsn_cuda.*``, which torch.compile traces;
* **reference**: :mod:`bsn_cuda.reference` (differentiable by itself) on
  devices without kernels, and under torch.func transforms and forward-mode
  AD, which the fused ops do not support (no batching rule, no forward
  derivative), so derivatives are never missing.

Loading the library and registering fakes, double backward and the fallback is
:mod:`bsn_cuda._library`.
"""

import torch

from . import _fallback, reference
from ._context import eager_transforms_active as _transforms_active
from ._context import is_compiling as _is_compiling
from ._context import is_jit_tracing as _is_jit_tracing
from ._contract import KIND_BSN
from ._library import _C, EXTENSION_ERROR, GROUP_DEVICES, HAS_EXTENSION, OP_DEVICES

__all__ = [
    "HAS_EXTENSION", "EXTENSION_ERROR", "OP_DEVICES", "GROUP_DEVICES", "sn_forward", "sn_forward_transposed",
    "bsn_forward", "sn_backward", "group_forward", "group_backward", "log_writable", "FORWARD_OPS",
    "FAST_SN_FORWARD", "FAST_BSN_FORWARD", "SN_FORWARD_OP",
]

if HAS_EXTENSION:
    FAST_SN_FORWARD = _C.sn_forward
    FAST_BSN_FORWARD = _C.bsn_forward
    _FAST_SN_FORWARD_TRANSPOSED = _C.sn_forward_transposed
    _FAST_GROUP_FORWARD = _C.group_forward
    SN_FORWARD_OP = torch.ops.bsn_cuda.sn_forward.default
    _BSN_FORWARD_OP = torch.ops.bsn_cuda.bsn_forward.default
    _SN_BACKWARD_OP = torch.ops.bsn_cuda.sn_backward.default
    _GROUP_FORWARD_OP = torch.ops.bsn_cuda.group_forward.default
    _GROUP_BACKWARD_OP = torch.ops.bsn_cuda.group_backward.default
    #: The forward ops, whose outputs selective activation checkpointing saves (bsn_cuda.nn.checkpoint).
    FORWARD_OPS = (SN_FORWARD_OP, _BSN_FORWARD_OP)
else:
    FAST_SN_FORWARD = FAST_BSN_FORWARD = _FAST_SN_FORWARD_TRANSPOSED = _FAST_GROUP_FORWARD = None
    SN_FORWARD_OP = _BSN_FORWARD_OP = _SN_BACKWARD_OP = _GROUP_FORWARD_OP = _GROUP_BACKWARD_OP = None
    FORWARD_OPS = ()

# The routes of _route (compared by identity).
_FAST, _OP, _REFERENCE = "fast", "op", "reference"


def _route(weight):
    """The route of a per-layer call on ``weight`` (module docstring); warns once per device without kernels."""
    # weight.device.type in OP_DEVICES, without building a torch.device (a
    # microsecond, on every forward of every layer).
    if weight.is_cpu:
        has_kernel = "cpu" in OP_DEVICES
    elif weight.is_cuda:
        has_kernel = "cuda" in OP_DEVICES
    else:
        has_kernel = weight.device.type in OP_DEVICES
    if not has_kernel:
        _fallback.warn_once(weight.device.type)
        return _REFERENCE
    if _is_compiling():
        return _OP
    if _transforms_active():
        return _REFERENCE
    return _FAST


def _write_log(log, state, header):
    # log[:] = state[:header] (a one-sigma header broadcast to a longer log). The C++ fast
    # entry points write it themselves (csrc/python_api.cpp, write_log), on the fast route.
    if log.shape[0] == header:
        torch.narrow_copy(state, 0, 0, header, out=log)
    else:
        with torch.no_grad():
            log.copy_(state[:header])


def log_writable():
    """Whether a forward may write the sigma log (get_sigma's buffer).

    Not under torch.func transforms or forward-mode AD: there the state may be
    batched or wrapped, and a write to a buffer the transformed function
    captured is an error (torch's SN writes nothing in eval mode, so neither
    may we). get_sigma then keeps the last eager forward's value.
    """
    return not _transforms_active()


def sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, log=None, *variant):
    """``bsn_cuda::sn_forward`` (or its reference); returns ``(out, state)``.

    Updates ``u``/``v`` in place when ``update``; ``out`` is differentiable
    with respect to ``weight``. ``log``: an optional 1-D tensor of the state's
    dtype that receives sigma (``state[0]``, broadcast to its length).
    ``variant``: nothing, or ``(coeff, gamma, track_only)`` (docs/design.md, Variants).
    """
    route = _route(weight)
    if route is _FAST:
        result = FAST_SN_FORWARD(weight, u, v, dim, n_power_iterations, eps, scale, update, log, *variant)
        if result is not None:
            return result
    elif route is _REFERENCE:
        out, state = reference.sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, *variant)
        if log is not None and log_writable():
            _write_log(log, state.detach(), 1)
        return out, state
    out, state = SN_FORWARD_OP(weight, u, v, dim, n_power_iterations, eps, scale, update, *variant)
    if log is not None:
        _write_log(log, state, 1)
    return out, state


def bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, log=None, *variant):
    """``bsn_cuda::bsn_forward`` (or its reference); returns ``(out, state)``.
    ``log`` receives ``[sigma, sigma_0, sigma_1]`` (``state[:3]``); ``variant`` as in :func:`sn_forward`."""
    route = _route(weight)
    if route is _FAST:
        result = FAST_BSN_FORWARD(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, log, *variant)
        if result is not None:
            return result
    elif route is _REFERENCE:
        out, state = reference.bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update,
                                           *variant)
        if log is not None and log_writable():
            _write_log(log, state.detach(), 3)
        return out, state
    out, state = _BSN_FORWARD_OP(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, *variant)
    if log is not None:
        _write_log(log, state, 3)
    return out, state


def sn_forward_transposed(weight, u, v, n_power_iterations, eps, scale, update, *variant):
    """torch's legacy (v-first) power iteration on ``W_mat = weight.reshape(weight.shape[0], -1)``,
    output in the weight's shape; ``u`` (``shape[0]`` elements) and ``v`` are
    torch's vectors, updated in place when ``update``.

    The one Python home of the legacy order. It is the op on ``W_mat^T``:
    ``sn_forward(W_mat, u=v, v=u, dim=1)``, whose state is ``[sigma, v, u]``.
    Eager calls without a ``variant`` (see :func:`sn_forward`) run as one
    autograd node (csrc/autograd.cpp; the order's one C++ home is ``call_sn_forward_transposed``).
    """
    # Not while jit traces: the C++ node reshapes outside the dispatcher, which a trace would not record.
    if not variant and _route(weight) is _FAST and not _is_jit_tracing():
        result = _FAST_SN_FORWARD_TRANSPOSED(weight, u, v, n_power_iterations, eps, scale, update)
        if result is not None:
            return result
    if weight.dim() < 1:
        raise RuntimeError(
            f"bsn_cuda::sn_forward: expected weight with at least 1 dimension (torch's legacy order), got {weight.dim()}"
        )
    out, state = sn_forward(weight.reshape(weight.shape[0], -1), v, u, 1, n_power_iterations, eps, scale, update,
                            None, *variant)
    return out.view(weight.shape), state


def sn_backward(grad_out, weight, state, dim, scale, *variant):
    """``bsn_cuda::sn_backward``: the weight gradient of :func:`sn_forward` (compiled ops only)."""
    return _SN_BACKWARD_OP(grad_out, weight, state, dim, scale, *variant)


# ---------------------------------------------------------------------------
# The grouped ops (docs/design.md "Grouped ops"; kinds in bsn_cuda._contract). The caller
# (bsn_cuda.nn.grouping) routes: it groups only eager calls on GROUP_DEVICES.


def group_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update, logs=None):
    """``bsn_cuda::group_forward`` (lists as in the schema; ``eps``/``scales`` floats, ``update`` bools);
    returns ``(outs, states)``. ``logs``: None or one sigma-log tensor (or None) per layer, written
    from the states as the per-layer entry points write them. Eager calls go through
    ``bsn_cuda._C.group_forward``; compiled ones through ``torch.ops``."""
    if _FAST_GROUP_FORWARD is not None and not _is_compiling():
        result = _FAST_GROUP_FORWARD(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update, logs)
        if result is not None:
            return result
    outs, states = _GROUP_FORWARD_OP(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update)
    if logs is not None:
        with torch.no_grad():
            for log, state, kind in zip(logs, states, kinds):
                if log is not None:
                    _write_log(log, state, 3 if kind == KIND_BSN else 1)
    return outs, states


def group_backward(grad_outs, weights, states, kinds, dims, scales):
    """``bsn_cuda::group_backward``: each layer's ``*_backward`` op, in one call."""
    return _GROUP_BACKWARD_OP(grad_outs, weights, states, kinds, dims, scales)
