"""The compiled library: loading it and what is registered on top of it, once, at import.

* loads ``bsn_cuda._C`` (which registers ``torch.ops.bsn_cuda.*``); without it
  everything runs :mod:`bsn_cuda.reference` and a RuntimeWarning says so once;
* registers the fake kernels (:mod:`bsn_cuda._fakes`), so the ops work under
  torch.compile, export and FakeTensor tracing;
* registers the autograd of the (functional) backward ops, so double backward
  works (:mod:`bsn_cuda._double_backward`);
* registers the reference behind ``torch.ops.bsn_cuda.*`` on devices without
  kernels (:mod:`bsn_cuda._fallback`);
* finds the device types each family of ops has kernels for.

Nothing here runs per call: routing is :mod:`bsn_cuda._ops`, the only module
that calls ``_C`` or ``torch.ops.bsn_cuda``.
"""

import warnings

import torch

from . import _double_backward, _fakes, _fallback
from ._contract import GROUP_OP_NAMES, OP_NAMES

try:
    from . import _C  # loading it registers torch.ops.bsn_cuda.*

    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    HAS_EXTENSION = False
    EXTENSION_ERROR = exc
    warnings.warn(
        f"bsn_cuda: the compiled ops (bsn_cuda._C) could not be loaded ({exc}); "
        "falling back to the pure-PyTorch reference, which is correct but slower. "
        "Build them with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=3,  # the import of bsn_cuda (through _ops) that triggered it
    )

__all__ = ["HAS_EXTENSION", "EXTENSION_ERROR", "OP_DEVICES", "GROUP_DEVICES", "NAMESPACE"]

NAMESPACE = "bsn_cuda"


def _has_kernels(names, key):
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key) for name in names)


def _devices_with_kernels(names):
    """Device types for which every op in ``names`` has a backend kernel (checked once, at import).

    A frozenset of plain strings, so that the routing test is a constant for
    torch.compile rather than a call into the dispatcher.
    """
    if not HAS_EXTENSION:
        return frozenset()
    return frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_kernels(names, key))


def _register():
    lib = torch.library.Library(NAMESPACE, "IMPL")
    for name, fake in {**_fakes.PER_LAYER, **_fakes.GROUPED}.items():
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=lib)
    for name, backward, setup in (
        ("sn_backward", _double_backward.sn_backward_backward, _double_backward.setup_sn_backward),
        ("bsn_backward", _double_backward.bsn_backward_backward, _double_backward.setup_bsn_backward),
        ("group_backward", _double_backward.group_backward_backward, _double_backward.setup_group_backward),
    ):
        torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup, lib=lib)
    return lib


# Kept alive for the life of the process: dropping a Library deregisters its kernels.
_LIBRARY = _register() if HAS_EXTENSION else None

_KERNEL_DEVICES = _devices_with_kernels(OP_NAMES)
#: Device types the per-layer ops serve: those with kernels, and ``meta`` (the fake kernels).
OP_DEVICES = _KERNEL_DEVICES | {"meta"} if _KERNEL_DEVICES else frozenset()
#: Device types with a grouped kernel (and per-layer ones); weights elsewhere run per layer.
GROUP_DEVICES = _KERNEL_DEVICES & _devices_with_kernels(GROUP_OP_NAMES)
# Other devices (MPS, XPU, ...): the reference, also behind torch.ops.bsn_cuda.*.
_FALLBACK_LIBRARY = _fallback.register() if HAS_EXTENSION else None
