"""The one place that knows about the compiled ops.

* loads ``bsn_cuda._C`` (which registers ``torch.ops.bsn_cuda.*``); without it
  everything runs :mod:`bsn_cuda.reference` and a RuntimeWarning says so once;
* registers the fake (meta) kernels, so the ops work under torch.compile,
  export and FakeTensor tracing;
* registers autograd for the two (functional) backward ops, so double
  backward works. (The autograd of the two forwards, which update ``u``/``v``
  in place, is a C++ kernel at the ``Autograd`` key in ``csrc/autograd.cpp``:
  ``register_autograd`` refuses ops that mutate inputs, and a Python kernel
  there costs more per call than the fused kernel itself on small layers.)
* provides :func:`sn_forward` / :func:`bsn_forward`, the entry points the rest
  of the package calls: the op where a kernel is registered for the weight's
  device, else the reference (differentiable by itself).
"""

import warnings

import torch

from . import _contract, _fallback, reference
from ._context import is_compiling as _is_compiling
from ._context import eager_transforms_active as _transforms_active

try:
    from . import _C  # loading it registers torch.ops.bsn_cuda.*

    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    HAS_EXTENSION = False
    EXTENSION_ERROR = exc
    warnings.warn(
        f"bsn_cuda: the compiled ops (bsn_cuda._C) could not be loaded ({exc}); "
        "falling back to the pure-PyTorch reference, which is correct but slower. "
        "Build them with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "HAS_EXTENSION", "EXTENSION_ERROR", "OP_DEVICES", "sn_forward", "sn_forward_transposed", "bsn_forward",
    "log_writable",
]

_NAMESPACE = "bsn_cuda"
_OP_NAMES = ("sn_forward", "sn_backward", "bsn_forward", "bsn_backward")


def _devices_with_kernels():
    """Device types for which every op has a backend kernel (checked once, at import).

    A frozenset of plain strings, so that the test in the entry points is a
    constant for torch.compile rather than a call into the dispatcher.
    """
    if not HAS_EXTENSION:
        return frozenset()
    devices = set()
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if all(torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NAMESPACE}::{name}", key) for name in _OP_NAMES):
            devices.add(device)
    if devices:
        devices.add("meta")  # served by the fake kernels registered below
    return frozenset(devices)


# ---------------------------------------------------------------------------
# Fake kernels: output metadata only, after the ops' checks (bsn_cuda._contract,
# the same rules and words as csrc/host.cpp), so that mistakes surface while
# tracing rather than deep inside a compiled graph. The checks also guard calls
# that mix a meta tensor with real ones, which dispatch here.


def _fake_sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, coeff=0.0, gamma=None,
                     track_only=False):
    dim, _, _ = _contract.check_sn_forward(
        "bsn_cuda::sn_forward", weight, u, v, dim, n_power_iterations, eps, scale, coeff, gamma, track_only
    )
    out = weight.new_empty(0 if track_only else weight.shape)
    state = weight.new_empty(_contract.sn_state_size(weight.shape, dim), dtype=_contract.acc_dtype(weight.dtype))
    return out, state


def _fake_bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, coeff=0.0, gamma=None,
                      track_only=False):
    _contract.check_bsn_forward(
        "bsn_cuda::bsn_forward", weight, u0, v0, u1, v1, n_power_iterations, eps, scale, coeff, gamma, track_only
    )
    out = weight.new_empty(0 if track_only else weight.shape)
    state = weight.new_empty(_contract.bsn_state_size(weight.shape), dtype=_contract.acc_dtype(weight.dtype))
    return out, state


def _fake_sn_backward(grad_out, weight, state, dim, scale, coeff=0.0, gamma=None):
    _contract.check_sn_backward("bsn_cuda::sn_backward", grad_out, weight, state, dim, scale, coeff, gamma)
    return weight.new_empty(weight.shape)


def _fake_bsn_backward(grad_out, weight, state, scale, coeff=0.0, gamma=None):
    _contract.check_bsn_backward("bsn_cuda::bsn_backward", grad_out, weight, state, scale, coeff, gamma)
    return weight.new_empty(weight.shape)


# ---------------------------------------------------------------------------
# Autograd of the backward ops (double backward). With u, v constant and
# sigma = <D, W> (D = d sigma / d W from the state), the backward is
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


def _backward_of_backward(grad_grad, grad_out, weight, state, direction, scale, needs_input_grad, coeff=0.0,
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


def _setup_sn_backward(ctx, inputs, output):
    grad_out, weight, state, dim, scale = inputs[:5]
    coeff = inputs[5] if len(inputs) > 5 else 0.0
    gamma = inputs[6] if len(inputs) > 6 else None
    ctx.save_for_backward(grad_out, weight, state, gamma)
    ctx.dim = dim
    ctx.scale = scale
    ctx.coeff = coeff


def _sn_backward_backward(ctx, grad_grad):
    grad_out, weight, state, gamma = ctx.saved_tensors
    direction = reference.sn_direction(state, weight.shape, ctx.dim)
    grad_g, grad_w, grad_gamma = _backward_of_backward(
        grad_grad, grad_out, weight, state, direction, ctx.scale, ctx.needs_input_grad, ctx.coeff, gamma, 6
    )
    return grad_g, grad_w, None, None, None, None, grad_gamma


def _setup_bsn_backward(ctx, inputs, output):
    grad_out, weight, state, scale = inputs[:4]
    coeff = inputs[4] if len(inputs) > 4 else 0.0
    gamma = inputs[5] if len(inputs) > 5 else None
    ctx.save_for_backward(grad_out, weight, state, gamma)
    ctx.scale = scale
    ctx.coeff = coeff


def _bsn_backward_backward(ctx, grad_grad):
    grad_out, weight, state, gamma = ctx.saved_tensors
    direction = reference.bsn_direction(state, weight.shape)
    grad_g, grad_w, grad_gamma = _backward_of_backward(
        grad_grad, grad_out, weight, state, direction, ctx.scale, ctx.needs_input_grad, ctx.coeff, gamma, 5
    )
    return grad_g, grad_w, None, None, None, grad_gamma


def _register():
    lib = torch.library.Library(_NAMESPACE, "IMPL")
    for name, fake in (
        ("sn_forward", _fake_sn_forward),
        ("bsn_forward", _fake_bsn_forward),
        ("sn_backward", _fake_sn_backward),
        ("bsn_backward", _fake_bsn_backward),
    ):
        torch.library.register_fake(f"{_NAMESPACE}::{name}", fake, lib=lib)
    torch.library.register_autograd(
        f"{_NAMESPACE}::sn_backward", _sn_backward_backward, setup_context=_setup_sn_backward, lib=lib
    )
    torch.library.register_autograd(
        f"{_NAMESPACE}::bsn_backward", _bsn_backward_backward, setup_context=_setup_bsn_backward, lib=lib
    )
    return lib


# Kept alive for the life of the process: dropping a Library deregisters its kernels.
_LIBRARY = _register() if HAS_EXTENSION else None

OP_DEVICES = _devices_with_kernels()
# Other devices (MPS, XPU, ...): the reference, also behind torch.ops.bsn_cuda.*.
_FALLBACK_LIBRARY = _fallback.register() if HAS_EXTENSION else None


# ---------------------------------------------------------------------------
# Entry points.
#
# Eager calls go through bsn_cuda._C's fast entry points (the same op, called
# from C++ with fixed argument types; see csrc/python_api.cpp), which return
# None when a call needs the general path below. torch.compile traces the
# torch.ops call. Under torch.func transforms and forward-mode AD, which the
# fused ops do not support (no batching rule, no forward derivative), the
# differentiable reference runs instead, so derivatives are never missing.

_FAST = _C if HAS_EXTENSION else None
# For callers that checked is_compiling() and the transforms themselves (the
# legacy hook's training forward); None where it needs the general path.
FAST_SN_FORWARD_TRANSPOSED = _C.sn_forward_transposed if HAS_EXTENSION else None


def _write_log(log, state, header):
    # log[:] = state[:header] (a one-sigma header broadcast to a longer log).
    if log.shape[0] == header:
        torch.narrow_copy(state, 0, 0, header, out=log)
    else:
        with torch.no_grad():
            log.copy_(state[:header])


def _has_kernel(weight):
    # weight.device.type in OP_DEVICES, without building a torch.device (a
    # microsecond, on every forward of every layer).
    if weight.is_cpu:
        return "cpu" in OP_DEVICES
    if weight.is_cuda:
        return "cuda" in OP_DEVICES
    return weight.device.type in OP_DEVICES


def sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, log=None, *variant):
    """``bsn_cuda::sn_forward`` (or its reference); returns ``(out, state)``.

    Updates ``u``/``v`` in place when ``update``; ``out`` is differentiable
    with respect to ``weight``. ``log``: an optional 1-D tensor of the state's
    dtype that receives sigma (``state[0]``, broadcast to its length).
    ``variant``: nothing, or ``(coeff, gamma, track_only)`` (docs/design.md, Variants).
    """
    if _has_kernel(weight):
        if not _is_compiling():
            if _transforms_active():
                return _reference_sn(weight, u, v, dim, n_power_iterations, eps, scale, update, log, *variant)
            if _FAST is not None:
                result = _FAST.sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, log, *variant)
                if result is not None:
                    return result
        out, state = torch.ops.bsn_cuda.sn_forward.default(
            weight, u, v, dim, n_power_iterations, eps, scale, update, *variant
        )
        if log is not None:
            _write_log(log, state, 1)
        return out, state
    _fallback.warn_once(weight.device.type)
    return _reference_sn(weight, u, v, dim, n_power_iterations, eps, scale, update, log, *variant)


def bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, log=None, *variant):
    """``bsn_cuda::bsn_forward`` (or its reference); returns ``(out, state)``.
    ``log`` receives ``[sigma, sigma_0, sigma_1]`` (``state[:3]``); ``variant`` as in :func:`sn_forward`."""
    if _has_kernel(weight):
        if not _is_compiling():
            if _transforms_active():
                return _reference_bsn(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, log, *variant)
            if _FAST is not None:
                result = _FAST.bsn_forward(
                    weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, log, *variant
                )
                if result is not None:
                    return result
        out, state = torch.ops.bsn_cuda.bsn_forward.default(
            weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, *variant
        )
        if log is not None:
            _write_log(log, state, 3)
        return out, state
    _fallback.warn_once(weight.device.type)
    return _reference_bsn(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, log, *variant)


def sn_forward_transposed(weight, u, v, n_power_iterations, eps, scale, update, *variant):
    """torch's legacy (v-first) power iteration on ``W_mat = weight.reshape(weight.shape[0], -1)``,
    output in the weight's shape; ``u`` (``shape[0]`` elements) and ``v`` are
    torch's vectors, updated in place when ``update``.

    It is the op on ``W_mat^T``: ``sn_forward(W_mat, u=v, v=u, dim=1)``, whose
    state is ``[sigma, v, u]``. Eager calls without a ``variant`` (see
    :func:`sn_forward`) run as one autograd node (csrc/autograd.h).
    """
    # Not while jit traces: the C++ node reshapes outside the dispatcher, which a trace would not record.
    if (not variant and FAST_SN_FORWARD_TRANSPOSED is not None and _has_kernel(weight) and not _is_compiling()
            and not _transforms_active() and not torch.jit.is_tracing()):
        result = FAST_SN_FORWARD_TRANSPOSED(weight, u, v, n_power_iterations, eps, scale, update)
        if result is not None:
            return result
    if weight.dim() < 1:
        raise RuntimeError(
            f"bsn_cuda::sn_forward: expected weight with at least 1 dimension (torch's legacy order), got {weight.dim()}"
        )
    out, state = sn_forward(weight.reshape(weight.shape[0], -1), v, u, 1, n_power_iterations, eps, scale, update,
                            None, *variant)
    return out.view(weight.shape), state


def log_writable():
    """Whether a forward may write the sigma log (get_sigma's buffer).

    Not under torch.func transforms or forward-mode AD: there the state may be
    batched or wrapped, and a write to a buffer the transformed function
    captured is an error (torch's SN writes nothing in eval mode, so neither
    may we). get_sigma then keeps the last eager forward's value.
    """
    return not _transforms_active()


def _reference_sn(weight, u, v, dim, n_power_iterations, eps, scale, update, log, *variant):
    out, state = reference.sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, *variant)
    if log is not None and log_writable():
        _write_log(log, state.detach(), 1)
    return out, state


def _reference_bsn(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, log, *variant):
    out, state = reference.bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, *variant)
    if log is not None and log_writable():
        _write_log(log, state.detach(), 3)
    return out, state
