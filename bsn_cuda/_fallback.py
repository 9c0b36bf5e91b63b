"""Devices without fused kernels: MPS, XPU, HPU, PrivateUse1 backends, ...

The compiled kernels cover the CPU and CUDA (and ``meta``, through the fake
kernels). On any other device the same math runs as torch ops, from
:mod:`bsn_cuda.reference`, by two routes:

* the package's entry points (``_ops.sn_forward`` / ``_ops.bsn_forward``, used
  by the modules and :mod:`bsn_cuda.functional`) call the reference directly;
  its output is differentiable through plain autograd;
* direct calls of ``torch.ops.bsn_cuda.*`` reach the reference through the
  backend kernels that :func:`register` installs for the dispatch keys in
  ``FALLBACK_KEYS``. The C++ kernel at the ``Autograd`` key
  (csrc/autograd.cpp) redispatches to them and its backward calls the backward
  op, which lands here too, so autograd (and double backward, registered in
  ``_double_backward.py``) works as on the CPU.

The reference has the ops' exact semantics (in-place ``u``/``v`` update with
the accept rule, state layout, accumulation dtype); results agree with the
fused kernels up to floating-point rounding. Either route warns once per device
type, naming the device.
"""

import os
import sys
import warnings

import torch

from . import reference
from ._contract import OP_NAMES
from ._context import is_compiling

__all__ = ["FALLBACK_KEYS", "REGISTERED_KEYS", "register", "register_kernels", "warn_once"]

# Backend dispatch keys of devices torch supports and we have no compiled
# kernels for. Keys this torch does not define are skipped.
FALLBACK_KEYS = (
    "MPS",
    "XPU",
    "HPU",
    "MTIA",
    "MAIA",
    "IPU",
    "VE",
    "XLA",
    "Lazy",
    "PrivateUse1",
    "PrivateUse2",
    "PrivateUse3",
)

# Keys that got the reference kernels (set by register()).
REGISTERED_KEYS = ()

# Device types already warned about; warnings stay off until register() runs,
# since without the extension `import bsn_cuda` has warned already.
_WARNED = set()
_ACTIVE = False


def warn_once(device_type):
    """Warn, once per device type, that ``device_type`` runs the reference."""
    # Not while torch.compile traces: the traced graph is the reference's torch
    # ops, and a Python side effect here would break the graph.
    if not _ACTIVE or device_type in _WARNED or is_compiling():
        return
    _WARNED.add(device_type)
    warnings.warn(
        f"bsn_cuda: no fused kernels for device '{device_type}'; using the pure-PyTorch reference "
        "(bsn_cuda.reference), which computes the same spectral norm with torch ops: same results up "
        "to rounding, same u/v updates and state, slower.",
        RuntimeWarning,
        stacklevel=_caller_stacklevel(),
    )


# Frames inside these folders are skipped, so that the warning points at the
# user's line whichever route (module, functional, op) led here.
_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _caller_stacklevel():
    """The ``stacklevel`` of the first frame outside bsn_cuda and torch, seen from warn_once."""
    level, frame = 1, sys._getframe(1)  # level 1: warn_once itself
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame = frame.f_back
        level += 1
    return level


# ---------------------------------------------------------------------------
# Backend kernels. They run below the Autograd key, where nothing records a
# graph: the weight is detached so that the reference skips building its
# differentiable sigma (its value is the same bit for bit).


def _detach(gamma):
    return None if gamma is None else gamma.detach()


def _sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, coeff=0.0, gamma=None, track_only=False):
    warn_once(weight.device.type)
    return reference.sn_forward(
        weight.detach(), u, v, dim, n_power_iterations, eps, scale, update, coeff, _detach(gamma), track_only
    )


def _bsn_forward(
    weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, coeff=0.0, gamma=None, track_only=False
):
    warn_once(weight.device.type)
    return reference.bsn_forward(
        weight.detach(), u0, v0, u1, v1, n_power_iterations, eps, scale, update, coeff, _detach(gamma), track_only
    )


def _sn_backward(grad_out, weight, state, dim, scale, coeff=0.0, gamma=None):
    return reference.sn_backward(
        grad_out.detach(), weight.detach(), state.detach(), dim, scale, coeff, _detach(gamma)
    )


def _bsn_backward(grad_out, weight, state, scale, coeff=0.0, gamma=None):
    return reference.bsn_backward(grad_out.detach(), weight.detach(), state.detach(), scale, coeff, _detach(gamma))


_KERNELS = (
    ("sn_forward", _sn_forward),
    ("sn_backward", _sn_backward),
    ("bsn_forward", _bsn_forward),
    ("bsn_backward", _bsn_backward),
)


def register_kernels(lib, keys):
    """Register the reference kernels on ``lib`` (a ``bsn_cuda`` IMPL library) for ``keys``."""
    for key in keys:
        for name, fn in _KERNELS:
            lib.impl(name, fn, key)


def register():
    """Install the reference kernels for every key of ``FALLBACK_KEYS`` that has none.

    Returns the Library, which must be kept alive (dropping it deregisters the
    kernels). Called once by ``_library`` after the extension has loaded.
    """
    global REGISTERED_KEYS, _ACTIVE
    keys = []
    for key in FALLBACK_KEYS:
        if not hasattr(torch._C.DispatchKey, key):
            continue
        # A kernel someone else registered (e.g. a device plugin) wins.
        if any(torch._C._dispatch_has_kernel_for_dispatch_key(f"bsn_cuda::{n}", key) for n in OP_NAMES):
            continue
        keys.append(key)
    lib = torch.library.Library("bsn_cuda", "IMPL")
    register_kernels(lib, keys)
    REGISTERED_KEYS = tuple(keys)
    _ACTIVE = True
    return lib
