"""What the four ops accept, stated once on the Python side.

The contract of ``bsn_cuda::sn_forward``, ``sn_backward``, ``bsn_forward`` and
``bsn_backward``: the same rules, in the same order and with the same words as
``csrc/host.cpp`` (tests/ops/test_contract.py holds the three to that). Two
callers:

* the fake kernels (``_fakes.py``), under tracing, where shapes may be symbolic:
  every rule goes through ``torch._check``, so a symbolic condition becomes a
  guard or a deferred runtime assert instead of a data-dependent error;
* the reference (``reference.py``), on real tensors (and, behind the
  fallback kernels, while torch.compile traces them).

A broken rule raises RuntimeError ``"<op>: expected X, got Y"``. Values print
as the C++ side prints them: floats as ``%g``, sizes and strides as ``[a, b]``,
dtypes as ``torch.float32``.

It also holds the two facts of the state layout the checks need (the
matricization sizes and the accumulation dtype), which the reference re-exports,
the ops' names, and the grouped ops' layer kinds.
"""

import math

import torch

__all__ = [
    "OP_NAMES",
    "GROUP_OP_NAMES",
    "KIND_SN",
    "KIND_BSN",
    "KIND_SN_TRANSPOSED",
    "KIND_NAMES",
    "FLOATING_DTYPES",
    "acc_dtype",
    "matrix_sizes",
    "sn_state_size",
    "bsn_state_size",
    "check_sn_forward",
    "check_bsn_forward",
    "check_sn_backward",
    "check_bsn_backward",
]

#: The per-layer ops of the ``bsn_cuda`` namespace (schemas in csrc/ops.cpp).
OP_NAMES = ("sn_forward", "sn_backward", "bsn_forward", "bsn_backward")
#: The grouped ops (docs/design.md "Grouped ops").
GROUP_OP_NAMES = ("group_forward", "group_backward")

#: ``kinds[i]`` of the grouped ops: layer ``i`` runs ``sn_forward`` (two vectors), ``bsn_forward``
#: (four), or ``sn_forward`` on ``weight.reshape(size(0), -1)`` with dim 1 (torch's legacy v-first
#: order; two vectors, torch's ``v`` then ``u``), output in the weight's shape.
KIND_SN, KIND_BSN, KIND_SN_TRANSPOSED = 0, 1, 2
KIND_NAMES = {KIND_SN: "sn", KIND_BSN: "bsn", KIND_SN_TRANSPOSED: "sn_transposed"}

#: Weight dtypes the ops take.
FLOATING_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# n_power_iterations is stored as a C int by the kernels.
_MAX_POWER_ITERATIONS = 2**30


def acc_dtype(dtype):
    """The accumulation dtype of a weight dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matrix_sizes(shape, dim):
    """``(M, N)`` of ``W_mat(dim)``: ``size(dim)`` and the product of the other sizes.

    ``dim`` must be non-negative. A product rather than ``numel // M``, so that
    symbolic sizes stay a plain product under tracing (as csrc's ``outer * inner``).
    """
    return shape[dim], math.prod(shape[:dim]) * math.prod(shape[dim + 1 :])


def sn_state_size(shape, dim):
    """Length of the SN state ``[sigma, u (M), v (N)]``."""
    dim = dim + len(shape) if dim < 0 else dim
    m, n = matrix_sizes(shape, dim)
    return 1 + m + n


def bsn_state_size(shape):
    """Length of the BSN state ``[sigma, sigma_0, sigma_1, u0, v0, u1, v1]``."""
    m0, n0 = matrix_sizes(shape, 0)
    m1, n1 = matrix_sizes(shape, 1)
    return 3 + m0 + n0 + m1 + n1


# ---------------------------------------------------------------------------
# The rules. Messages are built only when a rule fails (a lambda each), so the
# passing path formats nothing.


def _require(cond, op, message):
    if cond is True:  # a plain bool that holds: the common case
        return
    torch._check(cond, lambda: f"{op}: {message()}")


def _got(value):
    # host.cpp can only see an undefined tensor, which it calls None.
    return "None" if value is None else type(value).__name__


def _sizes(tensor):
    return list(tensor.shape)


def _check_defined(op, name, value):
    _require(isinstance(value, torch.Tensor), op, lambda: f"expected {name} to be a tensor, got {_got(value)}")


def _check_weight(op, weight, min_dim):
    _check_defined(op, "weight", weight)
    _require(
        weight.dtype in FLOATING_DTYPES,
        op,
        lambda: f"expected weight of dtype float32, float64, float16 or bfloat16, got {weight.dtype}",
    )
    _require(
        weight.dim() >= min_dim,
        op,
        lambda: f"expected weight with at least {min_dim} dimensions, got {weight.dim()} (shape {_sizes(weight)})",
    )
    _require(weight.numel() > 0, op, lambda: f"expected a non-empty weight, got shape {_sizes(weight)}")


def _normalize_dim(op, dim, ndim):
    _require(
        -ndim <= dim < ndim,
        op,
        lambda: f"expected dim in [{-ndim}, {ndim - 1}] for a weight with {ndim} dimensions, got {dim}",
    )
    return dim + ndim if dim < 0 else dim


def _check_scale(op, scale):
    _require(math.isfinite(scale) and scale > 0, op, lambda: f"expected scale > 0 and finite, got {scale:g}")


def _check_hyper(op, n_power_iterations, eps, scale):
    _require(n_power_iterations >= 1, op, lambda: f"expected n_power_iterations >= 1, got {n_power_iterations}")
    _require(
        n_power_iterations <= _MAX_POWER_ITERATIONS,
        op,
        lambda: f"expected n_power_iterations <= 2^30, got {n_power_iterations}",
    )
    _require(math.isfinite(eps) and eps > 0, op, lambda: f"expected eps > 0 and finite, got {eps:g}")
    _check_scale(op, scale)


def _check_same_device(op, name, tensor, weight):
    # Beyond tracing, this is what keeps a meta tensor mixed with real ones
    # (which dispatches to the fake kernels) from returning garbage.
    _require(
        tensor.device == weight.device,
        op,
        lambda: f"expected {name} on the weight's device {weight.device}, got {tensor.device}",
    )


def _check_vector(op, name, vec, weight, expected_size, what):
    _check_defined(op, name, vec)
    _require(vec.dim() == 1, op, lambda: f"expected {name} to be 1-D, got {vec.dim()}-D (shape {_sizes(vec)})")
    _require(
        vec.shape[0] == expected_size,
        op,
        lambda: f"expected {name} to have {expected_size} elements ({what} of weight of shape {_sizes(weight)}), "
        f"got {vec.shape[0]}",
    )
    _require(
        vec.dtype == weight.dtype,
        op,
        lambda: f"expected {name} to have the weight's dtype {weight.dtype}, got {vec.dtype}",
    )
    _check_same_device(op, name, vec, weight)
    _require(vec.is_contiguous(), op, lambda: f"expected {name} to be contiguous, got strides {list(vec.stride())}")


def _check_grad(op, grad_out, weight):
    _check_defined(op, "grad_out", grad_out)
    _require(
        grad_out.shape == weight.shape,
        op,
        lambda: f"expected grad_out of the weight's shape {_sizes(weight)}, got {_sizes(grad_out)}",
    )
    _require(
        grad_out.dtype == weight.dtype,
        op,
        lambda: f"expected grad_out of the weight's dtype {weight.dtype}, got {grad_out.dtype}",
    )
    _check_same_device(op, "grad_out", grad_out, weight)


def _check_state(op, state, weight, expected_size):
    _check_defined(op, "state", state)
    _require(
        state.dim() == 1 and state.shape[0] == expected_size,
        op,
        lambda: f"expected state to be 1-D with {expected_size} elements (as returned by the forward), "
        f"got shape {_sizes(state)}",
    )
    expected_dtype = acc_dtype(weight.dtype)
    _require(state.dtype == expected_dtype, op, lambda: f"expected state of dtype {expected_dtype}, got {state.dtype}")
    _check_same_device(op, "state", state, weight)
    _require(
        state.is_contiguous(), op, lambda: f"expected state to be contiguous, got strides {list(state.stride())}"
    )


def check_variant(op, weight, coeff, gamma, track_only=False):
    """The variant arguments (docs/design.md, Variants): ``coeff >= 0`` and finite;
    ``gamma`` None or a one-element tensor of the acc dtype on the weight's device;
    ``track_only`` only with the other two at their defaults."""
    _require(
        math.isfinite(coeff) and coeff >= 0, op, lambda: f"expected coeff >= 0 and finite, got {coeff:g}"
    )
    if gamma is not None:
        _require(gamma.numel() == 1, op, lambda: f"expected gamma to have 1 element, got shape {_sizes(gamma)}")
        expected_dtype = acc_dtype(weight.dtype)
        _require(
            gamma.dtype == expected_dtype,
            op,
            lambda: f"expected gamma of dtype {expected_dtype} (the accumulation dtype), got {gamma.dtype}",
        )
        _check_same_device(op, "gamma", gamma, weight)
    _require(
        not track_only or (coeff == 0 and gamma is None),
        op,
        lambda: f"expected coeff=0 and gamma=None with track_only=True, got coeff={coeff:g}, "
        f"gamma={'None' if gamma is None else 'a tensor'}",
    )


# ---------------------------------------------------------------------------
# One function per op, in host.cpp's order (prepare_*). ``op`` names the
# caller in the messages: "bsn_cuda::sn_forward" for the fakes, as in C++.


def check_sn_forward(op, weight, u, v, dim, n_power_iterations, eps, scale, coeff=0.0, gamma=None, track_only=False):
    """The checks of ``sn_forward``; returns ``(dim, M, N)`` with ``dim`` made non-negative."""
    _check_weight(op, weight, 2)
    dim = _normalize_dim(op, dim, weight.dim())
    _check_hyper(op, n_power_iterations, eps, scale)
    m, n = matrix_sizes(weight.shape, dim)
    _check_vector(op, "u", u, weight, m, "size(dim)")
    _check_vector(op, "v", v, weight, n, "numel / size(dim)")
    check_variant(op, weight, coeff, gamma, track_only)
    return dim, m, n


def check_bsn_forward(op, weight, u0, v0, u1, v1, n_power_iterations, eps, scale, coeff=0.0, gamma=None,
                      track_only=False):
    """The checks of ``bsn_forward``."""
    _check_weight(op, weight, 3)
    _check_hyper(op, n_power_iterations, eps, scale)
    m0, n0 = matrix_sizes(weight.shape, 0)
    m1, n1 = matrix_sizes(weight.shape, 1)
    _check_vector(op, "u0", u0, weight, m0, "size(0)")
    _check_vector(op, "v0", v0, weight, n0, "numel / size(0)")
    _check_vector(op, "u1", u1, weight, m1, "size(1)")
    _check_vector(op, "v1", v1, weight, n1, "numel / size(1)")
    check_variant(op, weight, coeff, gamma, track_only)


def check_sn_backward(op, grad_out, weight, state, dim, scale, coeff=0.0, gamma=None):
    """The checks of ``sn_backward``; returns ``dim`` made non-negative."""
    _check_weight(op, weight, 2)
    dim = _normalize_dim(op, dim, weight.dim())
    _check_scale(op, scale)
    _check_grad(op, grad_out, weight)
    _check_state(op, state, weight, sn_state_size(weight.shape, dim))
    check_variant(op, weight, coeff, gamma)
    return dim


def check_bsn_backward(op, grad_out, weight, state, scale, coeff=0.0, gamma=None):
    """The checks of ``bsn_backward``."""
    _check_weight(op, weight, 3)
    _check_scale(op, scale)
    _check_grad(op, grad_out, weight)
    _check_state(op, state, weight, bsn_state_size(weight.shape))
    check_variant(op, weight, coeff, gamma)
