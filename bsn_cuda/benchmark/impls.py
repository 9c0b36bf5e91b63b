"""The implementations under test, each applied to a copy of the same module.

``torch_sn`` (torch.nn.utils.parametrizations.spectral_norm, read
``module.weight``), ``torch_legacy`` (torch.nn.utils.spectral_norm: the weight is
computed the way its forward pre-hook does it, ``hook(module, None)``, then
``module.weight`` is read), ``torch_compiled`` (a ``torch.compile``d function
returning the parametrized ``module.weight``), ``torch_bsn`` (a lean plain-PyTorch
BSN parametrization built from :mod:`bsn_cuda.reference`), ``ref_bsn`` (the
reference ops themselves as a parametrization), ``fused_sn``
(bsn_cuda.spectral_norm), ``fused_legacy`` (bsn_cuda.nn.utils.spectral_norm) and
``fused_bsn`` (bsn_cuda.bidirectional_spectral_norm; for 2-D weights and 1x1
kernels BSN is SN).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from .. import reference
from .suites import FUSED, IMPL_TITLES, bsn_effective

__all__ = ["Unsupported", "ReferenceBSN", "bsn_package", "has_extension", "fused_native", "impl_title",
           "comparison_title", "make_layer", "make_impl", "make_case", "record_failure"]


# --------------------------------------------------------------------------
# bsn_cuda access (the package may be half-written while this runs)
# --------------------------------------------------------------------------

def bsn_package():
    import bsn_cuda  # noqa: WPS433

    return bsn_cuda


def has_extension():
    try:
        return bool(getattr(bsn_package(), "HAS_EXTENSION", False))
    except Exception:  # noqa: BLE001
        return False


def fused_native(device_type):
    """True when the compiled bsn_cuda ops serve tensors of this device type."""
    if not has_extension():
        return False
    ops = getattr(bsn_package(), "_ops", None)
    if ops is not None and getattr(ops, "OP_DEVICES", None) is not None:
        return device_type in ops.OP_DEVICES
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type, device_type.upper())
    try:
        return all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"bsn_cuda::{op}", key)
            for op in ("sn_forward", "sn_backward", "bsn_forward", "bsn_backward")
        )
    except Exception:  # noqa: BLE001 - private API; assume the extension covers it
        return True


def impl_title(impl, native):
    t = IMPL_TITLES[impl]
    if impl in FUSED and not native:
        t = t.replace("fused", "ref-fallback")
    return t


def comparison_title(title, native):
    return title if native else title.replace("fused", "ref-fallback")


# --------------------------------------------------------------------------
# Modules and implementations
# --------------------------------------------------------------------------

def make_layer(kind, shape, dtype=torch.float32, device="cpu", seed=0):
    """A bias-free module holding a weight of `shape` (PyTorch layout)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "conv":
            if len(shape) != 4:
                raise ValueError(f"make_layer: expected a 4-D conv shape, got {shape}")
            m = nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False)
        elif kind == "linear":
            m = nn.Linear(shape[1], shape[0], bias=False)
        elif kind == "embedding":
            m = nn.Embedding(shape[0], shape[1])
        else:
            raise ValueError(f"make_layer: expected kind conv, linear or embedding, got {kind!r}")
    return m.to(device=device, dtype=dtype)


class ReferenceBSN(nn.Module):
    """Bidirectional SN as a plain-PyTorch parametrization, from bsn_cuda.reference.

    ``ops=False`` (``torch_bsn``): the lean form a user would write, modelled on
    torch's parametrized SN: power iteration on both matricizations
    (``reference.matricize``, ``reference.normalize_vector``) under no_grad, then
    sigma = (u0^T W0 v0 + u1^T W1 v1) / 2 with autograd, W / sigma.
    ``ops=True`` (``ref_bsn``): ``reference.bsn_forward`` / ``sn_forward``, the
    oracle of the fused ops with their bookkeeping (checks, state snapshot,
    accept rule). Weights where BSN equals SN (2-D, 1x1 kernels) use one
    matricization."""

    def __init__(self, weight, n_power_iterations=1, eps=1e-12, ops=False):
        super().__init__()
        self.n_power_iterations, self.eps, self.ops = n_power_iterations, eps, ops
        self.dims = (0, 1) if bsn_effective(tuple(weight.shape)) else (0,)
        with torch.no_grad():
            mats = self._mats(weight.detach())
            for i, w in enumerate(mats):
                self.register_buffer(f"_u{i}", self._random_unit(w, w.shape[0]))
                self.register_buffer(f"_v{i}", self._random_unit(w, w.shape[1]))
            self._power_method(mats, 15)

    def _random_unit(self, w, n):
        return reference.normalize_vector(w.new_empty(n).normal_(0, 1), self.eps)

    def _mats(self, weight):
        return [reference.matricize(weight, d) for d in self.dims]

    def _pairs(self):
        return [(getattr(self, f"_u{i}"), getattr(self, f"_v{i}")) for i in range(len(self.dims))]

    @torch.no_grad()
    def _power_method(self, mats, n):
        for w, (u_buf, v_buf) in zip(mats, self._pairs()):
            u, v = u_buf, v_buf
            for _ in range(n):
                u = reference.normalize_vector(torch.mv(w, v), self.eps)
                v = reference.normalize_vector(torch.mv(w.t(), u), self.eps)
            u_buf.copy_(u)
            v_buf.copy_(v)

    def forward(self, weight):
        if self.ops:
            args = (weight, *[t for pair in self._pairs() for t in pair])
            if len(self.dims) == 2:
                return reference.bsn_forward(*args, self.n_power_iterations, self.eps, 1.0, self.training)[0]
            return reference.sn_forward(*args, 0, self.n_power_iterations, self.eps, 1.0, self.training)[0]
        mats = self._mats(weight)
        if self.training:
            self._power_method([m.detach() for m in mats], self.n_power_iterations)
        sigmas = []
        for w, (u, v) in zip(mats, self._pairs()):
            u = u.clone(memory_format=torch.contiguous_format)
            v = v.clone(memory_format=torch.contiguous_format)
            sigmas.append(torch.vdot(u, torch.mv(w, v)))
        sigma = sigmas[0] if len(sigmas) == 1 else (sigmas[0] + sigmas[1]) / 2
        return weight / sigma


def register_reference_bsn(module, ops=False):
    """Parametrize `module.weight` with a ReferenceBSN; returns the module."""
    bsn = ReferenceBSN(module.weight.detach(), ops=ops)
    torch.nn.utils.parametrize.register_parametrization(module, "weight", bsn)
    return module


# --------------------------------------------------------------------------
# The variants' peers: each published formula in plain torch, as its authors'
# code computes it (torch's power iteration under no_grad, then the formula).
# --------------------------------------------------------------------------

class _PeerBase(nn.Module):
    def __init__(self, weight, eps=1e-12):
        super().__init__()
        self.eps = eps
        w = weight.detach().reshape(weight.shape[0], -1)
        with torch.no_grad():
            self.register_buffer("_u", nn.functional.normalize(w.new_empty(w.shape[0]).normal_(0, 1), dim=0, eps=eps))
            self.register_buffer("_v", nn.functional.normalize(w.new_empty(w.shape[1]).normal_(0, 1), dim=0, eps=eps))
            for _ in range(15):
                self._iterate(w)

    @torch.no_grad()
    def _iterate(self, w):
        self._u.copy_(nn.functional.normalize(torch.mv(w, self._v), dim=0, eps=self.eps))
        self._v.copy_(nn.functional.normalize(torch.mv(w.t(), self._u), dim=0, eps=self.eps))

    def _sigma(self, weight):
        w = weight.reshape(weight.shape[0], -1)
        if self.training:
            self._iterate(w.detach())
        return torch.dot(self._u.clone(), torch.mv(w, self._v.clone()))


class PeerSoftBound(_PeerBase):
    """DUE / SNGP: ``W / max(1, sigma / coeff)``."""

    def __init__(self, weight, coeff):
        super().__init__(weight)
        self.coeff = coeff

    def forward(self, weight):
        sigma = self._sigma(weight)
        return weight / torch.max(torch.ones_like(sigma), sigma / self.coeff)


class PeerLearnableScale(_PeerBase):
    """sigmaReparam: ``gamma / sigma * W``, sigma in float32, gamma initialized to sigma."""

    def __init__(self, weight):
        super().__init__(weight.float())
        self.gamma = nn.Parameter(self._sigma(weight.detach().float()).detach().clone())

    def forward(self, weight):
        sigma = self._sigma(weight.float())
        return (self.gamma / sigma * weight.float()).to(weight.dtype)


class PeerTrackOnly(_PeerBase):
    """A logging power iteration (BigGAN's ``sv`` buffers): sigma stored, W unchanged."""

    def __init__(self, weight):
        super().__init__(weight)
        self.register_buffer("sigma", torch.zeros((), dtype=weight.dtype, device=weight.device))

    def forward(self, weight):
        with torch.no_grad():
            self.sigma.copy_(self._sigma(weight.detach()))
        return weight


SOFT_COEFF = 1.0  # the benchmark's soft bound (SNGP's range is about 0.95 to 3)


class Unsupported(Exception):
    """A case that cannot run here (not an error of the implementation)."""


def _legacy_hook(module):
    from torch.nn.utils.spectral_norm import SpectralNorm

    for h in module._forward_pre_hooks.values():
        if isinstance(h, SpectralNorm):
            return h
    raise RuntimeError("legacy spectral_norm hook not found")


class _CompileState:
    """Why torch.compile failed once in this process (None while it works)."""

    broken = None


def make_impl(impl, base):
    """Copy `base`, apply the implementation, return (module, weight_fn, note).

    weight_fn() returns the normalized weight exactly the way a forward of the
    module would obtain it (grad mode and module.training decide the rest)."""
    m = copy.deepcopy(base)
    shape = tuple(m.weight.shape)
    note = ""

    def read_weight():
        return m.weight

    def run_legacy_hook():
        hook(m, None)
        return m.weight

    fn = read_weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if impl == "torch_sn":
            torch.nn.utils.parametrizations.spectral_norm(m)
        elif impl == "torch_compiled":
            if _CompileState.broken:
                raise Unsupported(f"torch.compile unavailable: {_CompileState.broken}")
            if not hasattr(torch, "compile"):
                raise Unsupported("torch.compile unavailable in this torch")
            torch.nn.utils.parametrizations.spectral_norm(m)
            torch._dynamo.reset()
            fn = torch.compile(read_weight, dynamic=False)
            note = "inductor, dynamic=False"
        elif impl == "torch_legacy":
            torch.nn.utils.spectral_norm(m)
            hook = _legacy_hook(m)
            fn = run_legacy_hook
        elif impl in ("torch_bsn", "ref_bsn"):
            register_reference_bsn(m, ops=impl == "ref_bsn")
            if not bsn_effective(shape):
                note = "BSN == SN for this shape"
        elif impl == "fused_sn":
            bsn_package().spectral_norm(m)
        elif impl == "fused_legacy":
            bsn_package().nn.utils.spectral_norm(m)
            hook = _legacy_hook(m)
            fn = run_legacy_hook
        elif impl in ("peer_soft", "peer_scale", "peer_track"):
            w = m.weight.detach()
            peer = {"peer_soft": lambda: PeerSoftBound(w, SOFT_COEFF), "peer_scale": lambda: PeerLearnableScale(w),
                    "peer_track": lambda: PeerTrackOnly(w)}[impl]()
            torch.nn.utils.parametrize.register_parametrization(m, "weight", peer)
        elif impl == "fused_soft":
            bsn_package().spectral_norm(m, coeff=SOFT_COEFF)
        elif impl == "fused_scale":
            bsn_package().spectral_norm(m, learnable_scale=True)
        elif impl == "fused_track":
            bsn_package().spectral_norm(m, track_only=True)
        elif impl == "fused_bsn":
            bsn = bsn_package()
            try:
                bsn.bidirectional_spectral_norm(m)
            except Exception:  # noqa: BLE001
                if bsn_effective(shape):
                    raise
                bsn.spectral_norm(m)  # 2-D / 1x1: BSN is SN
            if not bsn_effective(shape):
                note = "BSN == SN for this shape"
        else:
            raise ValueError(f"make_impl: unknown implementation {impl!r}")
    return m, fn, note


def make_case(impl, base, mode, grad_seed=1):
    """(call, reset, module, note) for timing one implementation in one mode.

    call() runs the timed work; reset() runs between calls, outside the timed
    region (sets grads to None for fwd_bwd)."""
    m, fn, note = make_impl(impl, base)

    def nothing():
        pass

    reset = nothing
    if mode == "eval":
        m.eval()

        def call():
            with torch.no_grad():
                return fn()
    elif mode == "train":
        m.train()
        call = fn
    elif mode == "fwd_bwd":
        m.train()
        g = torch.Generator(device="cpu").manual_seed(grad_seed)
        w = base.weight
        grad = torch.randn(tuple(w.shape), generator=g, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
        params = [p for p in m.parameters() if p.requires_grad]

        def call():
            fn().backward(grad)

        def clear_grads():
            for p in params:
                p.grad = None

        reset = clear_grads
    else:
        raise ValueError(f"make_case: unknown mode {mode!r}")
    return call, reset, m, note


def record_failure(rec, impl, exc):
    """Mark a record skipped (unsupported here) or failed, from the exception."""
    if isinstance(exc, Unsupported):
        rec["skipped"] = str(exc)
        return
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if impl == "torch_compiled" and _CompileState.broken is None:
        _CompileState.broken = msg[:200]
        rec["skipped"] = f"torch.compile unavailable: {msg[:200]}"
    else:
        rec["error"] = msg[:300]
