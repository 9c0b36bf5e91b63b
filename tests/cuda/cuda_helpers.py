"""Building blocks of the CUDA tests (tests/cuda/test_cuda.py): launch modes,
vectors, op and reference calls with one signature for SN and BSN, seeds."""

import contextlib
import os
import zlib

import torch

import bsn_cuda
from bsn_cuda import reference


_OP_NAMES = ("sn_forward", "sn_backward", "bsn_forward", "bsn_backward")


def cuda_kernels_registered():
    return bsn_cuda.HAS_EXTENSION and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"bsn_cuda::{name}", "CUDA") for name in _OP_NAMES
    )


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def environment(name, value):
    """Set an environment variable for the block (the host code reads them at every call)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def cuda_mode(mode):
    """Force a launch mode: single, coop, multi (or auto)."""
    return environment("BSN_CUDA_MODE", mode)


def assert_equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), f"{what}: not bitwise equal"


def unit(n, dtype, device, gen):
    x = torch.randn(n, dtype=torch.float64, generator=gen)
    return (x / x.norm()).to(device, dtype)


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def make_vectors(shape, dims, dtype, device, gen, warm=0, weight=None):
    """Unit vectors per matricization, optionally `warm` reference power
    iterations on `weight` (in float64 on the CPU), as in training."""
    vectors = []
    w = weight.detach().double().cpu() if weight is not None else None
    for d in dims:
        m = shape[d]
        u = unit(m, torch.float64, "cpu", gen)
        v = unit(numel(shape) // m, torch.float64, "cpu", gen)
        if warm:
            reference.sn_forward(w, u, v, d, warm, 1e-12, 1.0, True)
        vectors += [u.to(device, dtype), v.to(device, dtype)]
    return vectors


def dims_of(kind, shape, dim):
    return (dim % len(shape),) if kind == "sn" else (0, 1)


def forward(kind, fn_sn, fn_bsn, weight, vectors, dim, n, scale, update):
    vecs = [t.clone() for t in vectors]
    if kind == "sn":
        out, state = fn_sn(weight, *vecs, dim, n, 1e-12, scale, update)
    else:
        out, state = fn_bsn(weight, *vecs, n, 1e-12, scale, update)
    return out, state, vecs


def op_forward(kind, weight, vectors, dim=0, n=1, scale=1.0, update=True):
    return forward(kind, torch.ops.bsn_cuda.sn_forward, torch.ops.bsn_cuda.bsn_forward, weight, vectors, dim, n, scale, update)


def ref_forward(kind, weight, vectors, dim=0, n=1, scale=1.0, update=True):
    return forward(kind, reference.sn_forward, reference.bsn_forward, weight, vectors, dim, n, scale, update)


def op_backward(kind, grad, weight, state, dim=0, scale=1.0):
    if kind == "sn":
        return torch.ops.bsn_cuda.sn_backward(grad, weight, state, dim, scale)
    return torch.ops.bsn_cuda.bsn_backward(grad, weight, state, scale)


def ref_backward(kind, grad, weight, state, dim=0, scale=1.0):
    if kind == "sn":
        return reference.sn_backward(grad, weight, state, dim, scale)
    return reference.bsn_backward(grad, weight, state, scale)


def seed_of(*key):
    # crc32 of the case's repr: the same seed in every process (hash() of
    # strings is salted per process), so a failure reproduces.
    return zlib.crc32(repr(key).encode())
