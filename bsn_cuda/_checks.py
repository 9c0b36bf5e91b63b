"""Argument checks of the public Python API, in one place.

Python-level values get TypeError/ValueError naming the argument ("expected X,
got Y"); tensor shapes, dtypes and devices are checked by the ops themselves
(csrc/host.cpp, RuntimeError). Where a check mirrors one of torch's spectral
norm, the exception type and wording are torch's, so that code written against
torch catches the same errors.
"""

import math
import numbers

import torch
from torch import nn

from ._contract import FLOATING_DTYPES

__all__ = [
    "check_tensor",
    "check_int",
    "check_positive_float",
    "check_bool",
    "check_hyperparameters",
    "check_n_power_iterations",
    "check_dim",
    "check_op_dim",
    "check_module",
    "check_name",
    "check_weight",
    "check_functional_weight",
    "check_variant_kwargs",
    "check_coeff",
    "REAL_DTYPES",
]

#: Weight dtypes the fused ops take (the ops' contract).
REAL_DTYPES = FLOATING_DTYPES


def check_tensor(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(value).__name__}")


def check_int(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"expected {name} to be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"expected {name} >= {minimum}, got {value}")


def check_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected {name} to be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"expected {name} > 0 and finite, got {value}")


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"expected {name} to be a bool, got {type(value).__name__}")


def check_coeff(coeff):
    """The soft bound's ``coeff``: None (off) or a finite float > 0."""
    if coeff is None:
        return None
    check_positive_float("coeff", coeff)
    return float(coeff)


def check_variant_kwargs(weight, coeff=None, learnable_scale=False, track_only=False, n_power_iterations_eval=0):
    """The variant keywords of the parametrizations (docs/design.md, Variants); returns them as a dict."""
    coeff = check_coeff(coeff)
    check_bool("learnable_scale", learnable_scale)
    check_bool("track_only", track_only)
    check_int("n_power_iterations_eval", n_power_iterations_eval, minimum=0)
    if track_only and (coeff is not None or learnable_scale):
        raise ValueError(
            f"expected track_only=True alone (the weight passes through unchanged), got coeff={coeff}, "
            f"learnable_scale={learnable_scale}"
        )
    used = coeff is not None or learnable_scale or track_only or n_power_iterations_eval > 0
    if used and (weight.ndim < 2 or weight.is_complex()):
        raise ValueError(
            "expected a real weight with at least 2 dimensions for coeff, learnable_scale, track_only or "
            f"n_power_iterations_eval, got {weight.ndim}-D {weight.dtype}"
        )
    return {
        "coeff": coeff,
        "learnable_scale": learnable_scale,
        "track_only": track_only,
        "n_power_iterations_eval": n_power_iterations_eval,
    }


def check_n_power_iterations(n_power_iterations):
    """torch's SN check and wording (ValueError), after the type check."""
    check_int("n_power_iterations", n_power_iterations)
    if n_power_iterations <= 0:
        raise ValueError(
            f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}"
        )


def check_hyperparameters(n_power_iterations, eps, scale):
    """The scalar arguments shared by every entry point."""
    check_int("n_power_iterations", n_power_iterations, minimum=1)
    check_positive_float("eps", eps)
    check_positive_float("scale", scale)


def check_dim(dim, ndim):
    """``dim`` of a weight with ``ndim`` dimensions, made non-negative (torch's IndexError)."""
    check_int("dim", dim)
    if dim >= ndim or dim < -ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] but got {dim})")
    return dim + ndim if dim < 0 else dim


def check_op_dim(dim, ndim):
    """``dim`` for the functional API, made non-negative: the ops' range check and words (ValueError)."""
    check_int("dim", dim)
    if not -ndim <= dim < ndim:
        raise ValueError(f"expected dim in [{-ndim}, {ndim - 1}] for a weight with {ndim} dimensions, got {dim}")
    return dim + ndim if dim < 0 else dim


def check_module(module, what="module"):
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected {what} to be a torch.nn.Module, got {type(module).__name__}")


def check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"expected name to be a str, got {type(name).__name__}")


def check_weight(weight, allow_complex=False, what="a weight"):
    """Type, rank, size and dtype of a weight to normalize."""
    check_tensor("weight", weight)
    if weight.ndim == 0:
        raise ValueError("expected a weight with at least 1 dimension, got a 0-D tensor")
    if weight.ndim > 1 and weight.numel() == 0:
        raise ValueError(f"expected a non-empty weight, got shape {list(weight.shape)}")
    if weight.dtype in REAL_DTYPES or (allow_complex and weight.dtype in (torch.complex64, torch.complex128)):
        return
    if allow_complex:
        hint = " (or complex64/complex128)"
    elif weight.is_complex():
        hint = " (complex weights: use spectral_norm)"
    else:
        hint = ""
    raise TypeError(f"expected {what} of dtype float32, float64, float16 or bfloat16, got {weight.dtype}{hint}")


def check_functional_weight(weight, min_ndim=1):
    """A weight for the functional API: a floating-point tensor of at least ``min_ndim`` dimensions
    (which floating dtypes, shapes and devices the ops take, the ops check)."""
    check_tensor("weight", weight)
    if weight.ndim == 0:
        raise ValueError("expected weight with at least 1 dimension, got a 0-D tensor")
    if weight.ndim < min_ndim:
        raise ValueError(f"expected weight with at least {min_ndim} dimensions, got {weight.ndim}")
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got dtype {weight.dtype}")
