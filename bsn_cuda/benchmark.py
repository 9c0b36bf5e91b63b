"""Speed benchmark of bsn_cuda's fused spectral normalization against PyTorch.

Run ``python -m bsn_cuda.benchmark --help`` for the options. What it measures:

* Suites of real models' layer shapes (PyTorch layout ``[c_out, c_in, kh, kw]``;
  linear ``[out, in]``; embedding ``[num, dim]``), see ``SUITES``.
* Implementations, all applied to a copy of the same module:
  ``torch_sn`` (torch.nn.utils.parametrizations.spectral_norm, read
  ``module.weight``), ``torch_legacy`` (torch.nn.utils.spectral_norm: the
  weight is computed the way its forward pre-hook does it, ``hook(module, None)``,
  then ``module.weight`` is read), ``torch_compiled`` (a ``torch.compile``d
  function returning the parametrized ``module.weight``), ``torch_bsn`` (a
  plain-PyTorch BSN parametrization), ``fused_sn`` (bsn_cuda.spectral_norm) and
  ``fused_bsn`` (bsn_cuda.bidirectional_spectral_norm; for 2-D weights and
  1x1 kernels BSN is SN).
* Modes: ``train`` (module.train(), grad enabled, read the weight), ``eval``
  (module.eval() under torch.no_grad()), ``fwd_bwd`` (train forward, then
  ``W_sn.backward(G)`` with a fixed random G; grads are set to None outside
  the timed region).
* CPU: one ``time.perf_counter`` interval per call, after warm-up, with the
  garbage collector off; median, IQR and min of the calls. The
  implementations of one layer and mode run interleaved, in ``CPU_ROUNDS``
  rounds of rotating order, so that drifts in the speed of a shared machine
  affect them alike; slices during which other processes used the CPU are
  measured again after a pause.
  CUDA: CUDA events around each call with the L2 cache flushed before it
  (cold weights, as in a training step), plus a host wall-clock throughput
  over back-to-back calls (``wall_s``, includes launch overhead), achieved
  GB/s for the bytes that must move and peak extra memory.
* End-to-end: one discriminator training step (hinge loss, Adam) of the SNGAN
  ResNet CIFAR-10 discriminator (ch=128) without SN, with torch SN, plain torch
  BSN, fused SN and fused BSN.

Fused numbers are only called "fused" when the compiled ops serve the device;
when bsn_cuda runs on its pure-PyTorch reference (``HAS_EXTENSION`` False) they
are labelled "reference fallback" everywhere and the goals are not judged.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SUITES", "IMPLS", "MODES", "main", "make_layer", "make_impl", "make_case", "run"]

# --------------------------------------------------------------------------
# Suites: (name, kind, shape, count). Identical (kind, shape) entries of a
# suite are measured once and weighted by the sum of their counts.
# --------------------------------------------------------------------------

SUITES = {
    "sngan_cnn": {
        "title": "SNGAN CNN discriminator, CIFAR-10",
        "layers": [
            ("c0", "conv", (64, 3, 3, 3), 1),
            ("c1", "conv", (64, 64, 4, 4), 1),
            ("c2", "conv", (128, 64, 3, 3), 1),
            ("c3", "conv", (128, 128, 4, 4), 1),
            ("c4", "conv", (256, 128, 3, 3), 1),
            ("c5", "conv", (256, 256, 4, 4), 1),
            ("c6", "conv", (512, 256, 3, 3), 1),
            ("l7", "linear", (1, 8192), 1),
        ],
    },
    "sngan_resnet": {
        "title": "SNGAN ResNet discriminator, CIFAR-10, ch=128",
        "layers": [
            ("b1.c1", "conv", (128, 3, 3, 3), 1),
            ("b1.c2", "conv", (128, 128, 3, 3), 1),
            ("b1.sc", "conv", (128, 3, 1, 1), 1),
            ("b2.c1-2", "conv", (128, 128, 3, 3), 2),
            ("b2.sc", "conv", (128, 128, 1, 1), 1),
            ("b3-4.c1-2", "conv", (128, 128, 3, 3), 4),
            ("l5", "linear", (1, 128), 1),
            ("embed", "embedding", (10, 128), 1),
        ],
    },
    "biggan_d": {
        "title": "BigGAN 128x128 discriminator, ch=96",
        "layers": [
            ("b1.c1", "conv", (96, 3, 3, 3), 1),
            ("b1.c2", "conv", (96, 96, 3, 3), 1),
            ("b1.sc", "conv", (96, 3, 1, 1), 1),
            ("attn.theta/phi", "conv", (12, 96, 1, 1), 2),
            ("attn.g", "conv", (48, 96, 1, 1), 1),
            ("attn.o", "conv", (96, 48, 1, 1), 1),
            ("b2.c1", "conv", (192, 96, 3, 3), 1),
            ("b2.c2", "conv", (192, 192, 3, 3), 1),
            ("b2.sc", "conv", (192, 96, 1, 1), 1),
            ("b3.c1", "conv", (384, 192, 3, 3), 1),
            ("b3.c2", "conv", (384, 384, 3, 3), 1),
            ("b3.sc", "conv", (384, 192, 1, 1), 1),
            ("b4.c1", "conv", (768, 384, 3, 3), 1),
            ("b4.c2", "conv", (768, 768, 3, 3), 1),
            ("b4.sc", "conv", (768, 384, 1, 1), 1),
            ("b5.c1", "conv", (1536, 768, 3, 3), 1),
            ("b5.c2", "conv", (1536, 1536, 3, 3), 1),
            ("b5.sc", "conv", (1536, 768, 1, 1), 1),
            ("b6.c1-2", "conv", (1536, 1536, 3, 3), 2),
            ("linear", "linear", (1, 1536), 1),
            ("embed", "embedding", (1000, 1536), 1),
        ],
    },
    "biggan_g_linear": {
        "title": "BigGAN 128 generator, SN linears (ch=96)",
        "layers": [
            ("linear0", "linear", (24576, 20), 1),
            ("bn1536", "linear", (1536, 148), 4),
            ("bn768", "linear", (768, 148), 4),
            ("bn384", "linear", (384, 148), 4),
            ("bn192", "linear", (192, 148), 4),
            ("bn96", "linear", (96, 148), 2),
        ],
    },
}
E2E = "e2e"
ALL_SUITES = list(SUITES) + [E2E]
QUICK_SUITES = ["sngan_cnn", E2E]

IMPLS = ["torch_sn", "torch_legacy", "torch_compiled", "torch_bsn", "ref_bsn", "fused_sn", "fused_legacy", "fused_bsn"]
IMPL_TITLES = {
    "torch_sn": "torch SN",
    "torch_legacy": "legacy SN",
    "torch_compiled": "compiled SN",
    "torch_bsn": "torch BSN",
    "ref_bsn": "reference BSN",
    "fused_sn": "fused SN",
    "fused_legacy": "fused legacy SN",
    "fused_bsn": "fused BSN",
}
FUSED = ("fused_sn", "fused_legacy", "fused_bsn")
MODES = ["train", "eval", "fwd_bwd"]
# ref_bsn (bsn_cuda.reference as a parametrization, with the ops' bookkeeping:
# checks, state snapshot, accept rule) only on request; torch_bsn is the lean
# plain-PyTorch BSN a user would write and the baseline of the BSN speedup.
DEFAULT_IMPLS = [i for i in IMPLS if i != "ref_bsn"]
# Compile cases are slow to set up (seconds each on a small CPU): not in --quick.
QUICK_IMPLS = [i for i in DEFAULT_IMPLS if i != "torch_compiled"]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Speedup columns: (key, numerator impl, denominator impl, title).
# speedup = time(numerator) / time(denominator); for "bsn_sn" it is a cost ratio.
COMPARISONS = [
    ("vs_torch_sn", "torch_sn", "fused_sn", "fused SN vs torch SN"),
    ("vs_legacy", "torch_legacy", "fused_sn", "fused SN vs legacy SN"),
    ("vs_compiled", "torch_compiled", "fused_sn", "fused SN vs compiled SN"),
    ("bsn_vs_torch_bsn", "torch_bsn", "fused_bsn", "fused BSN vs torch BSN"),
    ("legacy_vs_legacy", "torch_legacy", "fused_legacy", "fused legacy SN vs legacy SN"),
]
BSN_RATIO = ("bsn_sn", "fused_bsn", "fused_sn", "fused BSN / fused SN cost")

# Goals of the issue, judged on the 2-core CPU, sngan_cnn, float32.
GOALS = [
    # (id, text, suite, mode, metric key, op, threshold)
    ("fwd_bwd_3x", "SNGAN CNN training fwd+bwd: fused SN >= 3x torch parametrized SN",
     "sngan_cnn", "fwd_bwd", "vs_torch_sn", ">=", 3.0),
    ("fwd_bwd_5x", "SNGAN CNN training fwd+bwd: fused SN >= 5x torch parametrized SN (real goal)",
     "sngan_cnn", "fwd_bwd", "vs_torch_sn", ">=", 5.0),
    ("train_fwd_2x", "SNGAN CNN training forward: fused SN >= 2x torch parametrized SN",
     "sngan_cnn", "train", "vs_torch_sn", ">=", 2.0),
    ("bsn_train_1.3", "SNGAN CNN training forward: fused BSN <= 1.3x fused SN",
     "sngan_cnn", "train", "bsn_sn", "<=", 1.3),
    ("bsn_fwd_bwd_1.3", "SNGAN CNN training fwd+bwd: fused BSN <= 1.3x fused SN",
     "sngan_cnn", "fwd_bwd", "bsn_sn", "<=", 1.3),
    ("train_fwd_4x", "SNGAN CNN training forward: fused SN >= 4x torch parametrized SN",
     "sngan_cnn", "train", "vs_torch_sn", ">=", 4.0),
    ("bsn_train_1.2", "SNGAN CNN training forward: fused BSN <= 1.2x fused SN",
     "sngan_cnn", "train", "bsn_sn", "<=", 1.2),
    # The legacy flavour must gain at least what the parametrized one gains:
    # metric legacy_vs_legacy, threshold the same suite and mode's vs_torch_sn.
    ("legacy_train", "SNGAN CNN training forward: fused legacy SN vs legacy SN >= fused SN vs torch SN",
     "sngan_cnn", "train", "legacy_vs_legacy", ">=", "vs_torch_sn"),
    ("legacy_fwd_bwd", "SNGAN CNN training fwd+bwd: fused legacy SN vs legacy SN >= fused SN vs torch SN",
     "sngan_cnn", "fwd_bwd", "legacy_vs_legacy", ">=", "vs_torch_sn"),
]

# Peak DRAM bandwidth in bytes/s by device-name fragment (first match wins).
_PEAK_BW = [
    ("gh200", None),  # decided by memory size below
    ("h200", 4.8e12),
    ("h100 nvl", 3.9e12),
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),
    ("h800 pcie", 2.0e12),
    ("h800", 3.35e12),
    ("b200", 8.0e12),
    ("a100-pcie", None),
    ("a100 pcie", None),
    ("a100", None),
    ("a800", 2.039e12),
    ("l40s", 0.864e12),
    ("l40", 0.864e12),
    ("l4", 0.3e12),
    ("a10g", 0.6e12),
    ("a10", 0.6e12),
    ("a6000", 0.768e12),
    ("t4", 0.32e12),
    ("v100", 0.9e12),
    ("4090", 1.008e12),
    ("3090", 0.936e12),
    ("mi300x", 5.3e12),
    ("mi250", 3.2e12),
]


def peak_bandwidth(name, total_memory):
    """Peak DRAM bandwidth (bytes/s) of a GPU from its name, or None."""
    low = name.lower()
    gib = total_memory / 2**30
    for frag, bw in _PEAK_BW:
        if frag in low:
            if bw is not None:
                return bw
            if frag == "gh200":
                return 4.9e12 if gib > 100 else 4.0e12
            # A100: 80 GB SXM 2.039, 80 GB PCIe 1.935, 40 GB 1.555 TB/s
            if gib < 50:
                return 1.555e12
            return 1.935e12 if "pcie" in low else 2.039e12
    return None


# --------------------------------------------------------------------------
# bsn_cuda access (the package may be half-written while this runs)
# --------------------------------------------------------------------------

def _bsn():
    import bsn_cuda  # noqa: WPS433

    return bsn_cuda


def has_extension():
    try:
        return bool(getattr(_bsn(), "HAS_EXTENSION", False))
    except Exception:  # noqa: BLE001
        return False


def fused_native(device_type):
    """True when the compiled bsn_cuda ops serve tensors of this device type."""
    if not has_extension():
        return False
    ops = getattr(_bsn(), "_ops", None)
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

def bsn_effective(shape):
    """BSN differs from SN only for >= 3-D weights whose trailing dims are not all 1."""
    return len(shape) >= 3 and any(k != 1 for k in shape[2:])


def make_layer(kind, shape, dtype=torch.float32, device="cpu", seed=0):
    """A bias-free module holding a weight of `shape` (PyTorch layout)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "conv":
            if len(shape) != 4:
                raise ValueError(f"conv shape must be 4-D, got {shape}")
            m = nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False)
        elif kind == "linear":
            m = nn.Linear(shape[1], shape[0], bias=False)
        elif kind == "embedding":
            m = nn.Embedding(shape[0], shape[1])
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
    return m.to(device=device, dtype=dtype)


def _normalize(x, eps):
    return F.normalize(x, dim=0, eps=eps)


class TorchBSN(nn.Module):
    """Plain-PyTorch bidirectional SN parametrization, written like torch's
    parametrized SN: power iteration on both matricizations under no_grad,
    sigma = (u0^T W0 v0 + u1^T W1 v1) / 2 with autograd, W / sigma.
    Weights where BSN equals SN (2-D, 1x1 kernels) use one matricization."""

    def __init__(self, weight, n_power_iterations=1, eps=1e-12):
        super().__init__()
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.bidirectional = bsn_effective(tuple(weight.shape))
        with torch.no_grad():
            mats = self._mats(weight)
            for i, w in enumerate(mats):
                u = _normalize(w.new_empty(w.shape[0]).normal_(0, 1), eps)
                v = _normalize(w.new_empty(w.shape[1]).normal_(0, 1), eps)
                self.register_buffer(f"_u{i}", u)
                self.register_buffer(f"_v{i}", v)
            self._power_method(mats, 15)

    def _mats(self, weight):
        w0 = weight.flatten(1) if weight.ndim > 1 else weight.reshape(1, -1)
        if not self.bidirectional:
            return [w0]
        return [w0, weight.transpose(0, 1).reshape(weight.shape[1], -1)]

    @torch.no_grad()
    def _power_method(self, mats, n):
        for i, w in enumerate(mats):
            u, v = getattr(self, f"_u{i}"), getattr(self, f"_v{i}")
            for _ in range(n):
                u = _normalize(torch.mv(w, v), self.eps)
                v = _normalize(torch.mv(w.t(), u), self.eps)
            getattr(self, f"_u{i}").copy_(u)
            getattr(self, f"_v{i}").copy_(v)

    def forward(self, weight):
        mats = self._mats(weight)
        if self.training:
            self._power_method([m.detach() for m in mats], self.n_power_iterations)
        sigmas = []
        for i, w in enumerate(mats):
            u = getattr(self, f"_u{i}").clone(memory_format=torch.contiguous_format)
            v = getattr(self, f"_v{i}").clone(memory_format=torch.contiguous_format)
            sigmas.append(torch.vdot(u, torch.mv(w, v)))
        sigma = sigmas[0] if len(sigmas) == 1 else (sigmas[0] + sigmas[1]) / 2
        return weight / sigma


class RefBSN(nn.Module):
    """bsn_cuda.reference.{sn,bsn}_forward as a parametrization (the pure-PyTorch
    oracle of the fused ops, differentiable through autograd)."""

    def __init__(self, weight, n_power_iterations=1, eps=1e-12):
        super().__init__()
        from bsn_cuda import reference  # noqa: F401 - fail early if missing

        self.n_power_iterations, self.eps = n_power_iterations, eps
        self.bidirectional = bsn_effective(tuple(weight.shape))
        with torch.no_grad():
            w = weight.detach()
            for i in range(2 if self.bidirectional else 1):
                rows = w.shape[i]
                self.register_buffer(f"_u{i}", _normalize(w.new_empty(rows).normal_(0, 1), eps))
                self.register_buffer(f"_v{i}", _normalize(w.new_empty(w.numel() // rows).normal_(0, 1), eps))
            self._forward(w, True, 15)

    def _forward(self, weight, update, n):
        from bsn_cuda import reference

        if self.bidirectional:
            return reference.bsn_forward(weight, self._u0, self._v0, self._u1, self._v1, n, self.eps, 1.0, update)[0]
        return reference.sn_forward(weight, self._u0, self._v0, 0, n, self.eps, 1.0, update)[0]

    def forward(self, weight):
        return self._forward(weight, self.training, self.n_power_iterations)


class _Unsupported(Exception):
    """A case that cannot run here (not an error of the implementation)."""


def _legacy_hook(module):
    from torch.nn.utils.spectral_norm import SpectralNorm

    for h in module._forward_pre_hooks.values():
        if isinstance(h, SpectralNorm):
            return h
    raise RuntimeError("legacy spectral_norm hook not found")


_COMPILE_BROKEN = None  # reason string once torch.compile failed


def make_impl(impl, base):
    """Copy `base`, apply the implementation, return (module, weight_fn, note).

    weight_fn() returns the normalized weight exactly the way a forward of the
    module would obtain it (grad mode and module.training decide the rest)."""
    m = copy.deepcopy(base)
    shape = tuple(m.weight.shape)
    note = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if impl == "torch_sn":
            torch.nn.utils.parametrizations.spectral_norm(m)

            def fn():
                return m.weight
        elif impl == "torch_compiled":
            if _COMPILE_BROKEN:
                raise _Unsupported(f"torch.compile unavailable: {_COMPILE_BROKEN}")
            if not hasattr(torch, "compile"):
                raise _Unsupported("torch.compile unavailable in this torch")
            torch.nn.utils.parametrizations.spectral_norm(m)
            torch._dynamo.reset()

            def get_weight():
                return m.weight

            fn = torch.compile(get_weight, dynamic=False)
            note = "inductor, dynamic=False"
        elif impl == "torch_legacy":
            torch.nn.utils.spectral_norm(m)
            hook = _legacy_hook(m)

            def fn():
                hook(m, None)
                return m.weight
        elif impl in ("torch_bsn", "ref_bsn"):
            cls = TorchBSN if impl == "torch_bsn" else RefBSN
            torch.nn.utils.parametrize.register_parametrization(m, "weight", cls(m.weight.detach()))
            if not bsn_effective(shape):
                note = "BSN == SN for this shape"

            def fn():
                return m.weight
        elif impl == "fused_sn":
            _bsn().spectral_norm(m)

            def fn():
                return m.weight
        elif impl == "fused_legacy":
            _bsn().nn.utils.spectral_norm(m)
            hook = _legacy_hook(m)

            def fn():
                hook(m, None)
                return m.weight
        elif impl == "fused_bsn":
            bsn = _bsn()
            try:
                bsn.bidirectional_spectral_norm(m)
            except Exception:  # noqa: BLE001
                if bsn_effective(shape):
                    raise
                bsn.spectral_norm(m)  # 2-D / 1x1: BSN is SN
            if not bsn_effective(shape):
                note = "BSN == SN for this shape"

            def fn():
                return m.weight
        else:
            raise ValueError(f"unknown implementation {impl!r}")
    return m, fn, note


def make_case(impl, base, mode, grad_seed=1):
    """(call, reset, module, note) for timing one implementation in one mode.

    call() runs the timed work; reset() runs between calls, outside the timed
    region (sets grads to None for fwd_bwd)."""
    m, fn, note = make_impl(impl, base)
    if mode == "eval":
        m.eval()

        def call():
            with torch.no_grad():
                return fn()

        def reset():
            pass
    elif mode == "train":
        m.train()
        call = fn

        def reset():
            pass
    elif mode == "fwd_bwd":
        m.train()
        g = torch.Generator(device="cpu").manual_seed(grad_seed)
        w = base.weight
        grad = torch.randn(tuple(w.shape), generator=g, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
        params = [p for p in m.parameters() if p.requires_grad]

        def call():
            fn().backward(grad)

        def reset():
            for p in params:
                p.grad = None
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return call, reset, m, note


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

@contextlib.contextmanager
def _gc_off():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _quantile(sorted_xs, q):
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _stats(times):
    xs = sorted(times)
    return {
        "median_s": _quantile(xs, 0.5),
        "q1_s": _quantile(xs, 0.25),
        "q3_s": _quantile(xs, 0.75),
        "iqr_s": _quantile(xs, 0.75) - _quantile(xs, 0.25),
        "min_s": xs[0],
        "mean_s": sum(xs) / len(xs),
        "reps": len(xs),
    }


class Budget:
    """Repetition policy: warm-up calls, then at least min_reps and min_time
    of timed calls, at most max_reps (and max_time once min_reps are done)."""

    def __init__(self, warmup=3, min_reps=10, max_reps=200, min_time=0.2, max_time=2.0):
        self.warmup, self.min_reps, self.max_reps = warmup, min_reps, max_reps
        self.min_time, self.max_time = min_time, max_time

    def as_dict(self):
        return dict(vars(self))


def _cpu_ticks():
    """(busy ticks of the whole machine, ticks of this process) or None (no /proc)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle, iowait
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime, stime (all threads)
        return busy, own
    except (OSError, ValueError, IndexError):
        return None


def contention(before, after, wall_s):
    """Share of the machine's CPU capacity used by other processes in an interval,
    from /proc tick counters (None if unknown or the interval is too short)."""
    if before is None or after is None:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    capacity = wall_s * hz * (os.cpu_count() or 1)
    if capacity < 10:  # under 10 ticks: too coarse to say
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, min(1.0, other / capacity))


def _warm_up_cpu(call, reset, budget):
    """Run the warm-up calls; returns the time of the first call."""
    first = time.perf_counter()
    call()
    first = time.perf_counter() - first
    reset()
    for _ in range(max(budget.warmup - 1, 0)):
        call()
        reset()
    return first


def _timed_calls_cpu(call, reset, budget):
    """(per-call times, contention during them) for one slice of `budget`."""
    times = []
    total = 0.0
    perf = time.perf_counter
    ticks0, wall0 = _cpu_ticks(), time.perf_counter()
    with _gc_off():
        while True:
            t0 = perf()
            call()
            t1 = perf()
            reset()
            times.append(t1 - t0)
            total += t1 - t0
            n = len(times)
            if n >= budget.max_reps:
                break
            if n >= budget.min_reps and (total >= budget.min_time or total >= budget.max_time):
                break
    return times, contention(ticks0, _cpu_ticks(), time.perf_counter() - wall0)


CONTENTION_LIMIT = 0.15  # share of the CPU used by other processes that makes a CPU case suspect
CONTENTION_RETRIES = 3

# CPU cases of one layer and mode run in rounds, each implementation a slice of
# its budget per round, in rotating order: the speed of a shared VM drifts by
# tens of percent within seconds, and interleaving lets every implementation
# see the same drift, so the ratios are steadier than the absolute times.
CPU_ROUNDS = 4


def time_cpu_interleaved(cases, budget, rounds=CPU_ROUNDS, retries=CONTENTION_RETRIES):
    """{impl: stats} for warmed-up cases {impl: (call, reset)} timed in interleaved rounds.

    A slice during which other processes used more than CONTENTION_LIMIT of
    the machine is measured again after a pause (at most `retries` times per
    implementation); the statistics are over all kept slices."""
    impls = list(cases)
    slice_budget = Budget(
        warmup=0,
        min_reps=max(1, -(-budget.min_reps // rounds)),
        max_reps=max(1, budget.max_reps // rounds),
        min_time=budget.min_time / rounds,
        max_time=budget.max_time / rounds,
    )
    times = {impl: [] for impl in impls}
    worst = {impl: None for impl in impls}
    tries = {impl: 1 for impl in impls}
    for r in range(rounds):
        for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
            got, cont = _timed_calls_cpu(*cases[impl], slice_budget)
            while (cont or 0) > CONTENTION_LIMIT and tries[impl] <= retries:
                wait_for_quiet(20.0)
                got, cont = _timed_calls_cpu(*cases[impl], slice_budget)
                tries[impl] += 1
            times[impl] += got
            if cont is not None:
                worst[impl] = max(worst[impl] or 0.0, cont)
    out = {}
    for impl in impls:
        st = _stats(times[impl])
        st.update(contention=worst[impl], tries=tries[impl], rounds=rounds)
        st["contended"] = _suspect(st)
        out[impl] = st
    return out


_FLUSH = {}


def _l2_flush_buffer(device):
    key = str(device)
    if key not in _FLUSH:
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
        nbytes = max(256 * 2**20, 4 * l2)
        _FLUSH[key] = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


def time_cuda(call, reset, budget, device, flush=True):
    sync = torch.cuda.synchronize
    sync(device)
    t = time.perf_counter()
    call()
    sync(device)
    first = time.perf_counter() - t
    reset()
    for _ in range(max(budget.warmup - 1, 0)):
        call()
        reset()
    sync(device)
    # estimate one call to size the runs
    t = time.perf_counter()
    for _ in range(3):
        call()
        reset()
    sync(device)
    est = max((time.perf_counter() - t) / 3, 1e-6)
    reps = int(min(max(budget.min_reps, budget.min_time / est), budget.max_reps))
    reps = max(reps, 1)
    buf = _l2_flush_buffer(device) if flush else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    with _gc_off():
        for i in range(reps):
            if buf is not None:
                buf.zero_()
            starts[i].record()
            call()
            ends[i].record()
            reset()
        sync(device)
    out = _stats([s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)])
    out["first_call_s"] = first
    out["l2_flushed"] = bool(flush)
    # host wall-clock throughput of back-to-back calls (warm L2, launch overhead included)
    n = max(reps, 10)
    with _gc_off():
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            call()
            reset()
        sync(device)
        out["wall_s"] = (time.perf_counter() - t) / n
    # peak memory of one call above what is allocated before it
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base_mem = torch.cuda.memory_allocated(device)
    call()
    sync(device)
    out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    out["peak_extra_mem_bytes"] = out["peak_mem_bytes"] - base_mem
    reset()
    return out


def bytes_moved(mode, bidirectional, numel, elem_size):
    """Bytes that must move (the model of the issue).

    train: W read for the power iteration (BSN: twice) + W read + W_sn written;
    eval: W read twice + write; fwd_bwd: train + G and W read for <G, W> +
    G read and dW written."""
    it = 2 if bidirectional else 1
    passes = {"train": it + 2, "eval": 3, "fwd_bwd": it + 2 + 4}[mode]
    return passes * numel * elem_size


# --------------------------------------------------------------------------
# Running the suites
# --------------------------------------------------------------------------

def _merge_layers(layers):
    """Merge identical (kind, shape) entries: measured once, counted k times."""
    merged = {}
    for name, kind, shape, count in layers:
        key = (kind, tuple(shape))
        if key in merged:
            merged[key]["name"] += "," + name
            merged[key]["count"] += count
        else:
            merged[key] = {"name": name, "kind": kind, "shape": tuple(shape), "count": count}
    return list(merged.values())


class Progress:
    """tqdm if installed and stderr is a terminal, else a plain bar (terminal)
    or a line now and then (log file), on stderr."""

    def __init__(self, total, enabled=True):
        self.total, self.n, self.enabled = total, 0, enabled
        self.bar = None
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self._last = 0.0
        self._last_frac = 0.0
        if enabled and self.tty:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False,
                                desc="bsn_cuda.benchmark")
            except ImportError:
                self.bar = None

    def update(self, desc, k=1):
        self.n += k
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(desc[:60], refresh=False)
            self.bar.update(k)
            return
        now = time.time()
        frac = self.n / max(self.total, 1)
        if not self.tty:
            if frac - self._last_frac >= 0.1 or now - self._last >= 60 or self.n == self.total:
                self._last, self._last_frac = now, frac
                sys.stderr.write(f"[progress] {self.n}/{self.total} ({100 * frac:.0f}%) {now - self.t0:.0f}s {desc}\n")
                sys.stderr.flush()
            return
        if now - self._last < 0.2 and self.n < self.total:
            return
        self._last = now
        width = 30
        fill = int(width * frac)
        line = f"\r[{'#' * fill}{'.' * (width - fill)}] {self.n}/{self.total} {now - self.t0:5.0f}s {desc[:50]:<50}"
        sys.stderr.write(line)
        sys.stderr.flush()

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
            return
        if self.enabled and self.tty:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()
        print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()




class _WaitBudget:
    """Total seconds the run may spend waiting for other processes to go quiet."""

    left = 0.0


def wait_for_quiet(max_wait, sample_s=0.5):
    """Sleep until other processes use under CONTENTION_LIMIT of the CPU (sampled
    over `sample_s`), at most `max_wait` seconds from the run's wait budget, at
    least one sample. Returns the seconds waited."""
    t0 = time.perf_counter()
    limit = min(max_wait, _WaitBudget.left)
    while True:
        a, w = _cpu_ticks(), time.perf_counter()
        time.sleep(sample_s)
        c = contention(a, _cpu_ticks(), time.perf_counter() - w)
        waited = time.perf_counter() - t0
        if c is None or c <= CONTENTION_LIMIT or waited >= limit:
            break
    _WaitBudget.left = max(0.0, _WaitBudget.left - max(0.0, waited - sample_s))
    return waited


def _suspect(st):
    """A CPU measurement disturbed by other processes: they used a noticeable
    share of the CPU, or the calls split into fast ones and ones that waited
    for a scheduler time slice (milliseconds) while the median went with the slow."""
    if (st.get("contention") or 0) > CONTENTION_LIMIT:
        return True
    return st["median_s"] > 3 * st["min_s"] and st["median_s"] - st["min_s"] > 3e-3


def _record_failure(rec, impl, exc):
    """Mark a record skipped (unsupported here) or failed, from the exception."""
    global _COMPILE_BROKEN
    if isinstance(exc, _Unsupported):
        rec["skipped"] = str(exc)
        return
    msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if impl == "torch_compiled" and _COMPILE_BROKEN is None:
        _COMPILE_BROKEN = msg[:200]
        rec["skipped"] = f"torch.compile unavailable: {msg[:200]}"
    else:
        rec["error"] = msg[:300]


def measure_case(impl, base, mode, device, budget, flush=True):
    """One CUDA measurement record (without the layer fields)."""
    rec = {"impl": impl, "mode": mode}
    try:
        call, reset, module, note = make_case(impl, base, mode)
        rec["note"] = note
        rec.update(time_cuda(call, reset, budget, device, flush=flush))
        del call, reset, module
    except Exception as e:  # noqa: BLE001 - record and carry on
        _record_failure(rec, impl, e)
    return rec


def measure_cases_cpu(impls, base, mode, budget, retries=CONTENTION_RETRIES):
    """{impl: record} for the implementations of one layer and mode on the CPU,
    timed interleaved (see time_cpu_interleaved). An implementation that cannot
    be set up or fails on its warm-up calls gets a skipped/error record."""
    recs, cases, first, modules = {}, {}, {}, []
    for impl in impls:
        rec = recs[impl] = {"impl": impl, "mode": mode}
        try:
            call, reset, module, note = make_case(impl, base, mode)
            rec["note"] = note
            first[impl] = _warm_up_cpu(call, reset, budget)
            cases[impl] = (call, reset)
            modules.append(module)
        except Exception as e:  # noqa: BLE001 - record and carry on
            _record_failure(rec, impl, e)
    if cases:
        for impl, st in time_cpu_interleaved(cases, budget, retries=retries).items():
            recs[impl].update(st, first_call_s=first[impl])
    del cases, modules
    return recs


def run_suite(suite, device, dtype, modes, impls, budget, progress, memo, native, flush=True,
              retries=CONTENTION_RETRIES):
    """Measure every unique layer of a suite. Returns the records."""
    records = []
    elem = torch.empty((), dtype=dtype).element_size()
    peak = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak = peak_bandwidth(props.name, props.total_memory)
    for layer in _merge_layers(SUITES[suite]["layers"]):
        kind, shape = layer["kind"], layer["shape"]
        numel = math.prod(shape)
        base = None
        for mode in [m for m in ("train", "fwd_bwd", "eval") if m in modes]:
            keys = {impl: (str(device), str(dtype), kind, shape, impl, mode) for impl in impls}
            todo = [impl for impl in impls if keys[impl] not in memo]
            if todo:
                if base is None:
                    base = make_layer(kind, shape, dtype, device)
                if device.type == "cuda":
                    for impl in todo:
                        memo[keys[impl]] = measure_case(impl, base, mode, device, budget, flush=flush)
                else:
                    measured = measure_cases_cpu(todo, base, mode, budget, retries)
                    memo.update({keys[impl]: rec for impl, rec in measured.items()})
            for impl in impls:
                desc = f"{suite} {layer['name']} {impl} {mode}"
                rec = dict(memo[keys[impl]], reused=True) if impl not in todo else memo[keys[impl]]
                rec = dict(rec)
                bidir = impl in ("torch_bsn", "fused_bsn") and bsn_effective(shape)
                rec.update({
                    "suite": suite, "layer": layer["name"], "kind": kind, "shape": list(shape),
                    "count": layer["count"], "numel": numel, "device": str(device),
                    "dtype": str(dtype).replace("torch.", ""),
                    "label": impl_title(impl, native),
                    "fused_native": native if impl in FUSED else None,
                    "bytes_model": bytes_moved(mode, bidir, numel, elem),
                })
                if device.type == "cuda" and "median_s" in rec:
                    rec["gbps"] = rec["bytes_model"] / rec["median_s"] / 1e9
                    rec["peak_bw_gbps"] = peak / 1e9 if peak else None
                    rec["pct_peak_bw"] = 100 * rec["gbps"] * 1e9 / peak if peak else None
                records.append(rec)
                progress.update(desc)
        del base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def _geomean(xs):
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    if not xs:
        return None
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _index(records):
    """{(device, suite, layer, mode): {impl: record}}"""
    idx = {}
    for r in records:
        if "suite" not in r:
            continue
        idx.setdefault((r["device"], r["suite"], r["layer"], r["mode"]), {})[r["impl"]] = r
    return idx


def _t(rec, metric="median_s"):
    return rec.get(metric) if rec else None


def _ratio(row, num, den, metric="median_s"):
    a, b = _t(row.get(num), metric), _t(row.get(den), metric)
    if a is None or b is None or b <= 0:
        return None
    return a / b


def summarize(records):
    """Per (device, suite, mode): geomean speedups over layers and model totals."""
    idx = _index(records)
    groups = {}
    for (dev, suite, layer, mode), row in idx.items():
        groups.setdefault((dev, suite, mode), []).append(row)
    summary, models = [], []
    for (dev, suite, mode), rows in groups.items():
        s = {"device": dev, "suite": suite, "mode": mode, "layers": len(rows)}
        for key, num, den, _ in COMPARISONS:
            s[key] = _geomean([_ratio(r, num, den) for r in rows])
        key, num, den, _ = BSN_RATIO
        eff = [r for r in rows if bsn_effective(tuple(next(iter(r.values()))["shape"]))]
        s[key] = _geomean([_ratio(r, num, den) for r in eff])
        s["bsn_sn_layers"] = len(eff)
        s["contended"] = sum(1 for r in rows for rec in r.values() if rec.get("contended"))
        if dev.startswith("cuda"):
            # the same from host wall-clock throughput (launch overhead included, warm L2)
            s["wall"] = {k: _geomean([_ratio(r, n, d_, "wall_s") for r in rows]) for k, n, d_, _ in COMPARISONS}
            s["wall"][key] = _geomean([_ratio(r, num, den, "wall_s") for r in eff])
        # model totals: sum over layers with multiplicity
        totals = {}
        for impl in IMPLS:
            ts = [(_t(r.get(impl)), next(iter(r.values()))["count"]) for r in rows]
            if any(t is None for t, _ in ts):
                continue
            totals[impl] = sum(t * c for t, c in ts)
        m = {"device": dev, "suite": suite, "mode": mode, "total_s": totals}
        for key, num, den, _ in COMPARISONS + [BSN_RATIO]:
            m[key] = totals[num] / totals[den] if num in totals and den in totals else None
        s["model_total"] = {k: m[k] for k, *_ in COMPARISONS + [BSN_RATIO]}
        summary.append(s)
        models.append(m)
    order = {n: i for i, n in enumerate(ALL_SUITES)}
    key = lambda d: (d["device"], order.get(d["suite"], 99), MODES.index(d["mode"]))  # noqa: E731
    return sorted(summary, key=key), sorted(models, key=key)


def judge_goals(summary, native_by_device, dtype_name, threads):
    goals = []
    for gid, text, suite, mode, key, op, thr in GOALS:
        for s in summary:
            if s["suite"] != suite or s["mode"] != mode:
                continue
            dev = s["device"]
            val = s.get(key)
            if isinstance(thr, str):  # a threshold that is another metric of the same summary row
                thr = s.get(thr)
                thr = None if thr is None else round(thr, 2)
            g = {"id": gid, "goal": text, "device": dev, "value": val, "op": op, "threshold": thr}
            if not native_by_device.get(dev, False):
                g["status"] = "not judged (reference fallback, no fused ops)"
            elif val is None or thr is None:
                g["status"] = "not measured"
            else:
                ok = val >= thr if op == ">=" else val <= thr
                g["status"] = "met" if ok else "NOT met"
            caveats = []
            if not dev.startswith("cpu"):
                caveats.append("the goal is set for the 2-core CPU")
            elif threads != 2:
                caveats.append(f"the goal is set for 2 threads, ran with {threads}")
            if dtype_name != "float32":
                caveats.append(f"the goal is set for float32, ran {dtype_name}")
            informative = bool(caveats)
            if s.get("contended"):
                caveats.append(f"{s['contended']} of its measurements were disturbed by other processes")
            g["caveat"] = "; ".join(caveats)
            if informative and g["status"] in ("met", "NOT met"):
                g["status"] = f"informative ({g['status']})"
            goals.append(g)
    return goals


# --------------------------------------------------------------------------
# End-to-end: SNGAN ResNet CIFAR-10 discriminator training step
# --------------------------------------------------------------------------

class _OptimizedDisBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.sc = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.sc(F.avg_pool2d(x, 2))


class _DisBlock(nn.Module):
    def __init__(self, cin, cout, down):
        super().__init__()
        self.down = down
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.sc = nn.Conv2d(cin, cout, 1) if (down or cin != cout) else None

    def forward(self, x):
        h = self.c2(F.relu(self.c1(F.relu(x))))
        s = x if self.sc is None else self.sc(x)
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class SNGANResNetD(nn.Module):
    """SNGAN ResNet discriminator for 32x32 (Miyato et al. 2018), ch=128:
    optimized block (down), block (down), block, block, ReLU, global sum
    pooling, linear to 1. Its SN weights are the sngan_resnet suite minus the
    projection embedding."""

    def __init__(self, ch=128):
        super().__init__()
        self.blocks = nn.Sequential(
            _OptimizedDisBlock(3, ch), _DisBlock(ch, ch, True), _DisBlock(ch, ch, False), _DisBlock(ch, ch, False)
        )
        self.l5 = nn.Linear(ch, 1)

    def forward(self, x):
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        return self.l5(h)


def _sn_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]


def apply_variant(model, variant):
    """Apply an SN variant to every conv/linear of a copy of the model."""
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "none":
            pass
        elif variant == "torch_sn":
            for m in _sn_layers(model):
                torch.nn.utils.parametrizations.spectral_norm(m)
        elif variant == "torch_bsn":
            for m in _sn_layers(model):
                torch.nn.utils.parametrize.register_parametrization(m, "weight", TorchBSN(m.weight.detach()))
        elif variant in ("fused_sn", "fused_bsn"):
            bsn = _bsn()
            for m in _sn_layers(model):
                if variant == "fused_sn" or not bsn_effective(tuple(m.weight.shape)):
                    bsn.spectral_norm(m)
                else:
                    bsn.bidirectional_spectral_norm(m)
        else:
            raise ValueError(variant)
    return model


E2E_VARIANTS = ["none", "torch_sn", "torch_bsn", "fused_sn", "fused_bsn"]


def run_e2e(device, dtype, batch, warmup, reps, progress, native, retries=CONTENTION_RETRIES):
    """Time one D training step per variant. Returns a list of records."""
    torch.manual_seed(0)
    base = SNGANResNetD(128).to(device=device, dtype=dtype)
    real = torch.randn(batch, 3, 32, 32, device=device, dtype=dtype)
    fake = torch.randn(batch, 3, 32, 32, device=device, dtype=dtype)
    x = torch.cat([real, fake])
    out = []
    for variant in E2E_VARIANTS:
        rec = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "variant": variant,
               "batch": batch, "label": impl_title(variant, native) if variant in IMPL_TITLES else "no SN",
               "fused_native": native if variant in FUSED else None}
        try:
            model = apply_variant(base, variant).train()
            opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.0, 0.9))

            def step():
                opt.zero_grad(set_to_none=True)
                d = model(x)
                loss = F.relu(1.0 - d[:batch]).mean() + F.relu(1.0 + d[batch:]).mean()
                loss.backward()
                opt.step()

            sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
            for _ in range(warmup):
                step()
            sync()
            for attempt in range(1 + (retries if device.type == "cpu" else 0)):
                times = []
                ticks0, wall0 = _cpu_ticks(), time.perf_counter()
                with _gc_off():
                    for _ in range(reps):
                        t = time.perf_counter()
                        step()
                        sync()
                        times.append(time.perf_counter() - t)
                st = _stats(times)
                st["tries"] = attempt + 1
                if device.type == "cpu":
                    st["contention"] = contention(ticks0, _cpu_ticks(), time.perf_counter() - wall0)
                    st["contended"] = (st["contention"] or 0) > CONTENTION_LIMIT
                if attempt == 0 or (not st.get("contended"), -st["median_s"]) > (not rec.get("contended"), -rec["median_s"]):
                    rec.update(st)
                if not st.get("contended"):
                    break
                wait_for_quiet(30.0)
            del model, opt
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        out.append(rec)
        progress.update(f"e2e {variant}")
    none = next((r for r in out if r["variant"] == "none" and "median_s" in r), None)
    tsn = next((r for r in out if r["variant"] == "torch_sn" and "median_s" in r), None)
    for r in out:
        if "median_s" not in r:
            continue
        if none is not None and r["variant"] != "none":
            r["sn_overhead_s"] = r["median_s"] - none["median_s"]
            r["sn_share"] = r["sn_overhead_s"] / r["median_s"]
        if tsn is not None:
            r["step_speedup_vs_torch_sn"] = tsn["median_s"] / r["median_s"]
    return out


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(devices):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "git_commit": _git_commit(),
        "argv": ["python -m bsn_cuda.benchmark" if a.endswith(os.path.join("bsn_cuda", "benchmark.py")) else a
                 for a in sys.argv],
    }
    try:
        env["loadavg"] = os.getloadavg()
    except OSError:
        env["loadavg"] = None
    try:
        bsn = _bsn()
        env["bsn_cuda_version"] = getattr(bsn, "__version__", None)
        env["bsn_cuda_file"] = getattr(bsn, "__file__", None)
        env["has_extension"] = bool(getattr(bsn, "HAS_EXTENSION", False))
    except Exception as e:  # noqa: BLE001
        env["has_extension"] = False
        env["bsn_cuda_import_error"] = f"{type(e).__name__}: {e}"
    env["devices"] = {}
    for d in devices:
        info = {"fused_native": fused_native(d.type)}
        if d.type == "cuda":
            p = torch.cuda.get_device_properties(d)
            info.update({
                "name": p.name,
                "total_memory_bytes": p.total_memory,
                "capability": f"{p.major}.{p.minor}",
                "multi_processor_count": p.multi_processor_count,
                "l2_cache_bytes": getattr(p, "L2_cache_size", None),
                "peak_bw_gbps": (peak_bandwidth(p.name, p.total_memory) or 0) / 1e9 or None,
            })
        else:
            info["name"] = _cpu_model()
        env["devices"][str(d)] = info
    return env


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def _fmt_t(s):
    if s is None:
        return "-"
    us = s * 1e6
    if us < 100:
        return f"{us:.1f}"
    if us < 1e5:
        return f"{us:.0f}"
    return f"{us / 1e3:.0f}ms"


def _fmt_x(x, ratio=False):
    if x is None:
        return "-"
    return f"{x:.2f}" if ratio else f"{x:.2f}x"


def _cell(rec):
    if rec is None:
        return "-"
    if "median_s" in rec:
        return _fmt_t(rec["median_s"]) + ("!" if rec.get("contended") else "")
    if "skipped" in rec:
        return "skip"
    return "ERR"


def _table(headers, rows, aligns=None):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    aligns = aligns or ["<"] + [">"] * (len(headers) - 1)
    def line(cells):
        return "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(cells, aligns, widths))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _md_table(headers, rows, n_left=2):
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join(["---"] * n_left + ["---:"] * (len(headers) - n_left)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _layer_rows(records, device, suite, mode, impls, native, gpu=False):
    idx = _index([r for r in records if r["device"] == device and r["suite"] == suite and r["mode"] == mode])
    rows = []
    seen = []
    for r in records:
        if r["device"] == device and r["suite"] == suite and r["mode"] == mode and r["layer"] not in seen:
            seen.append(r["layer"])
    comps = [c for c in COMPARISONS if c[1] in impls and c[2] in impls]
    has_ratio = BSN_RATIO[1] in impls and BSN_RATIO[2] in impls
    for layer in seen:
        row = idx[(device, suite, layer, mode)]
        any_rec = next(iter(row.values()))
        shape = "x".join(str(s) for s in any_rec["shape"])
        cells = [layer + (f" x{any_rec['count']}" if any_rec["count"] > 1 else ""), shape]
        cells += [_cell(row.get(i)) for i in impls]
        cells += [_fmt_x(_ratio(row, num, den)) for _, num, den, _ in comps]
        if has_ratio:
            v = _ratio(row, BSN_RATIO[1], BSN_RATIO[2])
            cells.append(_fmt_x(v, ratio=True) + ("" if bsn_effective(tuple(any_rec["shape"])) else "*"))
        if gpu:
            f = row.get("fused_sn")
            cells.append(f"{f['gbps']:.0f}" if f and f.get("gbps") else "-")
            cells.append(f"{f['pct_peak_bw']:.0f}%" if f and f.get("pct_peak_bw") else "-")
        rows.append(cells)
    headers = ["layer", "shape"] + [impl_title(i, native) for i in impls]
    short = {"vs_torch_sn": "x torchSN", "vs_legacy": "x legacy", "vs_compiled": "x compiled",
             "bsn_vs_torch_bsn": "BSN x torchBSN", "legacy_vs_legacy": "legacy x legacy"}
    headers += [short[c[0]] for c in comps]
    if has_ratio:
        headers.append("BSN/SN")
    if gpu:
        headers += ["SN GB/s", "% peak"]
    return headers, rows


def _model_row(models, device, suite, mode, impls, n_extra):
    m = next((x for x in models if x["device"] == device and x["suite"] == suite and x["mode"] == mode), None)
    if m is None:
        return None
    cells = ["model total", ""] + [_fmt_t(m["total_s"].get(i)) for i in impls]
    comps = [c for c in COMPARISONS if c[1] in impls and c[2] in impls]
    cells += [_fmt_x(m.get(c[0])) for c in comps]
    if BSN_RATIO[1] in impls and BSN_RATIO[2] in impls:
        cells.append(_fmt_x(m.get(BSN_RATIO[0]), ratio=True))
    cells += [""] * n_extra
    return cells


def _geo_row(summary, device, suite, mode, impls, n_extra):
    s = next((x for x in summary if x["device"] == device and x["suite"] == suite and x["mode"] == mode), None)
    if s is None:
        return None
    cells = ["geomean", ""] + [""] * len(impls)
    comps = [c for c in COMPARISONS if c[1] in impls and c[2] in impls]
    cells += [_fmt_x(s.get(c[0])) for c in comps]
    if BSN_RATIO[1] in impls and BSN_RATIO[2] in impls:
        cells.append(_fmt_x(s.get(BSN_RATIO[0]), ratio=True))
    cells += [""] * n_extra
    return cells


def suite_tables(result, device, suite, markdown=False):
    """Per-mode tables of one suite on one device (text or markdown)."""
    records, summary, models = result["measurements"], result["summary"], result["models"]
    impls = result["config"]["impls"]
    native = result["env"]["devices"][device]["fused_native"]
    gpu = device.startswith("cuda")
    out = []
    for mode in result["config"]["modes"]:
        if not any(r["device"] == device and r["suite"] == suite and r["mode"] == mode for r in records):
            continue
        headers, rows = _layer_rows(records, device, suite, mode, impls, native, gpu=gpu)
        n_extra = 2 if gpu else 0
        for extra in (_model_row(models, device, suite, mode, impls, n_extra),
                      _geo_row(summary, device, suite, mode, impls, n_extra)):
            if extra:
                rows.append(extra)
        unit = "median µs per call" + (" (GPU time, cold L2)" if gpu else "")
        title = f"{suite} | {mode} | {device} {result['config']['dtype']} | {unit}"
        if markdown:
            out.append(f"#### {title}\n\n" + _md_table(headers, rows))
        else:
            out.append(f"== {title} ==\n" + _table(headers, rows))
    return "\n\n".join(out)


def summary_table(result, markdown=False, wall=False):
    headers = ["device", "suite", "mode"] + [comparison_title(c[3], True) for c in COMPARISONS] + ["BSN/SN cost"]
    rows = []
    if wall:
        for s in result["summary"]:
            if "wall" not in s:
                continue
            w = s["wall"]
            rows.append([s["device"], s["suite"], s["mode"]] + [_fmt_x(w.get(k)) for k, *_ in COMPARISONS]
                        + [_fmt_x(w.get("bsn_sn"), True)])
        return (_md_table(headers, rows, 3) if markdown else _table(headers, rows)) if rows else ""
    for s in result["summary"]:
        native = result["env"]["devices"][s["device"]]["fused_native"]
        mt = s["model_total"]
        cells = [s["device"] + ("" if native else " (REF-FALLBACK)"), s["suite"], s["mode"]]
        for key, *_ in COMPARISONS:
            cells.append(f"{_fmt_x(s.get(key))} ({_fmt_x(mt.get(key))})" if s.get(key) else "-")
        cells.append(f"{_fmt_x(s.get('bsn_sn'), True)} ({_fmt_x(mt.get('bsn_sn'), True)})" if s.get("bsn_sn") else "-")
        rows.append(cells)
    if markdown:
        return _md_table(headers, rows, 3)
    return _table(headers, rows)


def goals_text(result, markdown=False):
    lines = []
    for g in result["goals"]:
        val = "-" if g["value"] is None else f"{g['value']:.2f}"
        cav = f" [{g['caveat']}]" if g.get("caveat") else ""
        lines.append(f"{'- ' if markdown else '  '}{g['status'].upper() if g['status'] in ('met', 'NOT met') else g['status']}: "
                     f"{g['goal']} on {g['device']}: {val} ({g['op']} {g['threshold']}){cav}")
    return "\n".join(lines) if lines else "  (no goal applies to the suites/modes run)"


def e2e_layer_estimates(result):
    """SN cost per D step predicted from the sngan_resnet suite (fwd_bwd, the
    conv and linear layers with their counts; the embedding is not in this D)."""
    for r in result["e2e"]:
        if r["variant"] == "none":
            continue
        recs = [m for m in result["measurements"] if m["suite"] == "sngan_resnet" and m["mode"] == "fwd_bwd"
                and m["device"] == r["device"] and m["impl"] == r["variant"] and m["kind"] != "embedding"]
        if recs and all("median_s" in m for m in recs):
            r["sn_cost_from_layers_s"] = sum(m["median_s"] * m["count"] for m in recs)
            if "median_s" in r:
                r["sn_share_from_layers"] = r["sn_cost_from_layers_s"] / r["median_s"]


def e2e_table(result, markdown=False):
    rows = []
    base = {r["device"]: r for r in result["e2e"] if r["variant"] == "none" and "median_s" in r}
    for r in result["e2e"]:
        if "median_s" not in r:
            rows.append([r["device"], r["label"], f"2x{r['batch']}", "ERR", "", r.get("error", "-")[:80], "", ""])
            continue
        share = r.get("sn_share")
        over = "-"
        if r.get("sn_overhead_s") is not None:
            b = base.get(r["device"])
            noise = max(r["iqr_s"], b["iqr_s"] if b else 0.0)
            over = f"{r['sn_overhead_s'] * 1e3:.1f} ({100 * share:.0f}%)"
            if abs(r["sn_overhead_s"]) < noise:
                over += " ~noise"
        est = "-"
        if r.get("sn_cost_from_layers_s") is not None:
            est = f"{r['sn_cost_from_layers_s'] * 1e3:.2f} ({100 * r['sn_share_from_layers']:.1f}%)"
        rows.append([
            r["device"], r["label"], f"2x{r['batch']}",
            f"{r['median_s'] * 1e3:.1f}" + ("!" if r.get("contended") else ""),
            f"{r['iqr_s'] * 1e3:.1f}", over, est,
            _fmt_x(r.get("step_speedup_vs_torch_sn")),
        ])
    headers = ["device", "variant", "batch (real+fake)", "step ms (median)", "IQR ms", "SN overhead ms (share)",
               "SN fwd+bwd from layers ms (share)", "step x torchSN"]
    return _md_table(headers, rows) if markdown else _table(headers, rows)


def env_text(result):
    e = result["env"]
    lines = [
        f"torch {e['torch']} (cuda {e['torch_cuda']}), python {e['python']}, {e['platform']}",
        f"CPU: {e['cpu_model']} ({e['cpu_count']} cores), torch threads {e['torch_num_threads']}, "
        f"load avg {tuple(round(x, 2) for x in e['loadavg']) if e.get('loadavg') else '-'}",
        f"bsn_cuda: HAS_EXTENSION={e.get('has_extension')}, git {e.get('git_commit') or '-'}, {e['date']}",
        f"malloc: {e.get('malloc', 'default')}",
    ]
    for d, info in e["devices"].items():
        extra = ""
        if d.startswith("cuda"):
            extra = f", peak {info['peak_bw_gbps']:.0f} GB/s" if info.get("peak_bw_gbps") else ", peak bandwidth unknown"
        lines.append(f"device {d}: {info['name']}{extra}, fused ops native: {info['fused_native']}")
    return "\n".join(lines)


FALLBACK_WARNING = (
    "!!! WARNING: the compiled bsn_cuda ops do not serve {dev} (HAS_EXTENSION={has}). The 'fused' columns are\n"
    "!!! the pure-PyTorch REFERENCE FALLBACK, labelled 'ref-fallback'; they are not fused-op numbers and no\n"
    "!!! goal is judged. Build the extension (pip install --no-build-isolation .) and rerun."
)


def to_markdown(result):
    cfg = result["config"]
    parts = [
        "## bsn_cuda benchmark",
        "",
        "```",
        env_text(result),
        f"command: {' '.join(result['env']['argv'])}",
        "```",
        "",
    ]
    for d, info in result["env"]["devices"].items():
        if not info["fused_native"] and any(i in FUSED for i in cfg["impls"]):
            parts += ["> **" + FALLBACK_WARNING.format(dev=d, has=result["env"].get("has_extension"))
                      .replace("!!! ", "").replace("\n", " ") + "**", ""]
    if result["summary"]:
        parts += [
            "### Summary",
            "",
            "Geometric mean over a suite's unique layers of time(other) / time(fused); "
            "in parentheses the same for the whole model (sum over layers with multiplicity). "
            "BSN/SN: fused BSN time / fused SN time over the layers where BSN differs from SN "
            "(kernels larger than 1x1).",
            "",
            summary_table(result, markdown=True),
            "",
        ]
        wall = summary_table(result, markdown=True, wall=True)
        if wall:
            parts += ["CUDA, from host wall-clock throughput of back-to-back calls (launch overhead included, "
                      "warm L2; the table above uses GPU time per call with L2 flushed):", "", wall, ""]
        parts += [
            "### Goals",
            "",
            goals_text(result, markdown=True),
            "",
        ]
    if result.get("host"):
        from .host_overhead import host_goals_text, host_table

        parts += [
            "### Host overhead (tiny weights)",
            "",
            "µs per call (median), interleaved; see bsn_cuda/host_overhead.py. `fused vs torch`: torch SN's time "
            "over bsn_cuda's module API; `fused / identity`: bsn_cuda's over an identity parametrization.",
            "",
            host_table(result["host"], markdown=True),
            "",
            "```",
            host_goals_text(result["host_goals"]),
            "```",
            "",
        ]
    if result["e2e"]:
        parts += [
            "### End-to-end: SNGAN ResNet D (ch=128) training step",
            "",
            "Hinge loss, Adam, one forward of real and fake images together (32x32). "
            "SN overhead = step time minus the step without SN (`~noise`: smaller than the IQR); "
            "'from layers' = the sngan_resnet suite's fwd+bwd times of the same layers, summed with "
            "their counts (a steadier estimate of the SN cost per step).",
            "",
            e2e_table(result, markdown=True),
            "",
        ]
    devices = list(result["env"]["devices"])
    for d in devices:
        for suite in cfg["suites"]:
            if suite == E2E:
                continue
            t = suite_tables(result, d, suite, markdown=True)
            if t:
                parts += [f"### {suite}: {SUITES[suite]['title']} ({d})", "", t, ""]
    parts += [
        "Times are medians per call in µs (ms where marked). `skip`: not available here, "
        "`ERR`: failed (see the JSON). `*`: BSN equals SN for this shape (2-D or 1x1). "
        "`!`: other processes disturbed this CPU measurement even after retries.",
        "",
    ]
    return "\n".join(parts)


def plot(result, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return False
    devices = [d for d in result["env"]["devices"] if any(r["device"] == d for r in result["measurements"])]
    if not devices:
        print("nothing to plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(devices), figsize=(7.5 * len(devices), 5.5), squeeze=False)
    colors = {"train": "tab:blue", "eval": "tab:green", "fwd_bwd": "tab:red"}
    markers = {"vs_torch_sn": "o", "vs_legacy": "s", "vs_compiled": "^", "bsn_vs_torch_bsn": "D"}
    idx = _index(result["measurements"])
    for ax, dev in zip(axes[0], devices):
        native = result["env"]["devices"][dev]["fused_native"]
        for key, num, den, title in COMPARISONS:
            for mode in MODES:
                xs, ys = [], []
                seen = set()
                for (d, suite, layer, m), row in idx.items():
                    if d != dev or m != mode:
                        continue
                    v = _ratio(row, num, den)
                    rec = next(iter(row.values()))
                    k = (tuple(rec["shape"]), rec["kind"])
                    if v is None or k in seen:
                        continue
                    seen.add(k)
                    xs.append(rec["numel"])
                    ys.append(v)
                if xs:
                    ax.scatter(xs, ys, marker=markers[key], color=colors[mode], alpha=0.75, s=28,
                               label=f"{comparison_title(title, native)}, {mode}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        fmt = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("weight numel")
        ax.set_ylabel("speedup (time other / time fused)")
        info = result["env"]["devices"][dev]
        ttl = f"{dev}: {info['name'][:40]}, {result['config']['dtype']}"
        if dev.startswith("cpu"):
            ttl += f", {result['env']['torch_num_threads']} threads"
        if not native:
            ttl += "\nREFERENCE FALLBACK (no fused ops)"
        ax.set_title(ttl, fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=6.5, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _print_goals_and_summary(result, write):
    write("")
    write("== summary: geomean speedup over layers (model total) ==")
    write(summary_table(result))
    wall = summary_table(result, wall=True)
    if wall:
        write("")
        write("== CUDA summary from host wall-clock throughput (back-to-back calls, launch overhead included) ==")
        write(wall)
    write("")
    write("== goals (2-core CPU, sngan_cnn, float32; reported, never asserted) ==")
    write(goals_text(result))
    if result.get("host_goals"):
        from .host_overhead import host_goals_text

        write("")
        write("== host-overhead goals (tiny weights, module API; reported, never asserted) ==")
        write(host_goals_text(result["host_goals"]))


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

def tune_malloc():
    """glibc: keep freed memory in the process (no heap trimming, allocations up
    to 32 MiB from the heap) so that repeated calls do not page-fault fresh
    memory in. Returns a description, or None where it does not apply."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1 and mallopt(M_TRIM_THRESHOLD, 2**30) == 1
    return "glibc mallopt: M_MMAP_THRESHOLD=32MiB, M_TRIM_THRESHOLD=1GiB" if ok else None


def _parse_list(value, allowed, what):
    if value in (None, "all"):
        return list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)} or all)")
    return items


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bsn_cuda.benchmark",
        description="Speed of bsn_cuda's fused SN/BSN against torch's spectral norm on real models' layer shapes.",
    )
    p.add_argument("--device", default="all", help="cpu, cuda or all (cpu, plus cuda when present) [all]")
    p.add_argument("--suite", default=None,
                   help=f"comma list of {', '.join(ALL_SUITES)}, or all [all; --quick: {','.join(QUICK_SUITES)}]")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--mode", default="all", help="comma list of train, eval, fwd_bwd, or all [all]")
    p.add_argument("--impls", default=None,
                   help=f"comma list of {', '.join(IMPLS)} or all "
                        f"[{','.join(DEFAULT_IMPLS)}; --quick: without torch_compiled]")
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions, sngan_cnn suite and a small end-to-end step only (< 1 min on 2 CPU cores)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before measuring")
    p.add_argument("--e2e-batch", type=int, default=None,
                   help="real (and fake) batch of the end-to-end step [64; --quick: 8]")
    p.add_argument("--e2e-reps", type=int, default=None,
                   help="timed steps per end-to-end variant [CPU 5, CUDA 20; --quick: CPU 3]")
    p.add_argument("--json", metavar="PATH", help="write every measurement and the environment")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speedup vs weight numel")
    p.add_argument("--markdown", metavar="PATH", help="write markdown tables for the README")
    p.add_argument("--retries", type=int, default=None,
                   help=f"CPU: measure a case again up to N times when other processes disturbed it "
                        f"[{CONTENTION_RETRIES}; --quick: 1]")
    p.add_argument("--max-wait", type=float, default=None,
                   help="CPU: seconds the whole run may spend waiting for other processes to go quiet "
                        "before a retry [900; --quick: 5]")
    p.add_argument("--malloc-tune", action="store_true",
                   help="CPU (glibc): stop malloc from returning freed memory to the OS between calls "
                        "(no heap trimming, mmap threshold 32 MiB), as in a long-running training process; "
                        "where page faults are expensive (VMs) the default allocator adds them to every call")
    p.add_argument("--no-flush", action="store_true", help="CUDA: do not flush L2 before each timed call")
    p.add_argument("--no-host", action="store_true",
                   help="skip the host-overhead section (tiny weights, see bsn_cuda.host_overhead)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _devices(arg):
    cuda = torch.cuda.is_available()
    if arg == "all":
        return [torch.device("cpu")] + ([torch.device("cuda", torch.cuda.current_device())] if cuda else [])
    if arg == "cpu":
        return [torch.device("cpu")]
    if arg.startswith("cuda"):
        if not cuda:
            raise SystemExit("--device cuda: CUDA is not available on this machine")
        d = torch.device(arg)
        return [torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())]
    raise SystemExit(f"unknown device {arg!r} (cpu, cuda or all)")


def run(args):
    """Run the benchmark for parsed arguments; returns the result dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = tune_malloc() if args.malloc_tune else None
    if args.malloc_tune and malloc is None:
        print("--malloc-tune: not a glibc system, allocator left as it is", flush=True)
    devices = _devices(args.device)
    suites = _parse_list(args.suite, ALL_SUITES, "suite") if args.suite else (
        QUICK_SUITES if args.quick else list(ALL_SUITES))
    modes = _parse_list(args.mode, MODES, "mode")
    impls = _parse_list(args.impls, IMPLS, "implementation") if args.impls else (
        QUICK_IMPLS if args.quick else list(DEFAULT_IMPLS))
    dtype = DTYPES[args.dtype]
    retries = args.retries if args.retries is not None else (1 if args.quick else CONTENTION_RETRIES)
    _WaitBudget.left = float(args.max_wait if args.max_wait is not None else (5 if args.quick else 900))
    if args.quick:
        budget = Budget(warmup=3, min_reps=10, max_reps=100, min_time=0.05, max_time=0.3)
        e2e_batch, e2e_warmup, e2e_reps = args.e2e_batch or 8, 1, args.e2e_reps or 3
    else:
        budget = Budget(warmup=3, min_reps=10, max_reps=300, min_time=0.25, max_time=3.0)
        e2e_batch, e2e_warmup, e2e_reps = args.e2e_batch or 64, 2, args.e2e_reps or 5
    cuda_budget = Budget(warmup=5, min_reps=20 if args.quick else 50, max_reps=200 if args.quick else 1000,
                         min_time=0.02 if args.quick else 0.1, max_time=1.0)

    env = environment(devices)
    env["malloc"] = malloc or "default"
    result = {
        "schema": "bsn_cuda.benchmark/1",
        "env": env,
        "config": {
            "suites": suites, "modes": modes, "impls": impls, "dtype": args.dtype, "quick": bool(args.quick),
            "devices": [str(d) for d in devices], "budget_cpu": budget.as_dict(), "budget_cuda": cuda_budget.as_dict(),
            "e2e": {"batch": e2e_batch, "warmup_cpu": e2e_warmup, "reps_cpu": e2e_reps,
                    "warmup_cuda": 3, "reps_cuda": args.e2e_reps or 20},
            "cuda_l2_flush": not args.no_flush, "contention_retries": retries,
            "contention_limit": CONTENTION_LIMIT, "max_wait_s": _WaitBudget.left,
        },
        "measurements": [], "summary": [], "models": [], "goals": [], "e2e": [],
    }
    bar_total = 0
    for _ in devices:
        for s in suites:
            if s == E2E:
                bar_total += len(E2E_VARIANTS)
            else:
                bar_total += len(_merge_layers(SUITES[s]["layers"])) * len(impls) * len(modes)
    print(env_text(result), flush=True)
    if env.get("loadavg") and env["loadavg"][0] > 0.5 and any(d.type == "cpu" for d in devices):
        print(f"note: the 1-minute load average is {env['loadavg'][0]:.2f} before starting; other processes "
              "compete for the CPU and inflate (mostly the spread of) the CPU timings", flush=True)
    for d in devices:
        native = env["devices"][str(d)]["fused_native"]
        if not native and any(i in FUSED for i in impls):
            print(FALLBACK_WARNING.format(dev=d, has=env.get("has_extension")), flush=True)
    if E2E in suites:
        print(f"end-to-end step: batch {e2e_batch} real + {e2e_batch} fake, {e2e_reps} reps"
              + (" (--quick: small batch)" if args.quick and not args.e2e_batch else ""), flush=True)
    wait_budget0 = _WaitBudget.left
    if any(d.type == "cpu" for d in devices) and not args.quick and _WaitBudget.left > 0:
        a, w = _cpu_ticks(), time.perf_counter()
        time.sleep(0.5)
        c = contention(a, _cpu_ticks(), time.perf_counter() - w)
        if c is not None and c > CONTENTION_LIMIT:
            print(f"other processes use {100 * c:.0f}% of the CPU: waiting up to 60 s for them to go quiet", flush=True)
            wait_for_quiet(60.0)
    progress = Progress(bar_total, enabled=not args.no_progress)
    memo = {}
    t_start = time.time()
    try:
        for d in devices:
            native = env["devices"][str(d)]["fused_native"]
            for suite in suites:
                if suite == E2E:
                    b = e2e_batch
                    result["e2e"] += run_e2e(d, dtype, b, e2e_warmup if d.type == "cpu" else 3,
                                             e2e_reps if d.type == "cpu" else (args.e2e_reps or 20), progress, native,
                                             retries=retries)
                    continue
                result["measurements"] += run_suite(
                    suite, d, dtype, modes, impls, cuda_budget if d.type == "cuda" else budget,
                    progress, memo, native, flush=not args.no_flush, retries=retries)
                result["summary"], result["models"] = summarize(result["measurements"])
                progress.write("\n" + suite_tables(result, str(d), suite))
    finally:
        progress.close()
    result["summary"], result["models"] = summarize(result["measurements"])
    native_by_device = {k: v["fused_native"] for k, v in env["devices"].items()}
    if not args.no_host and any(d.type == "cpu" for d in devices):
        from . import host_overhead

        print("\n== host overhead: µs per call (median) on tiny weights, module and functional API ==", flush=True)
        result["host"] = host_overhead.run_host_overhead(
            None if not args.quick else Budget(warmup=20, min_reps=100, max_reps=2000, min_time=0.03, max_time=0.2))
        result["host_goals"] = host_overhead.judge_host_goals(result["host"], native_by_device.get("cpu", False))
        print(host_overhead.host_table(result["host"]), flush=True)
    result["goals"] = judge_goals(result["summary"], native_by_device, args.dtype, torch.get_num_threads())
    result["elapsed_s"] = time.time() - t_start
    result["waited_for_quiet_s"] = wait_budget0 - _WaitBudget.left
    try:
        env["loadavg_end"] = os.getloadavg()
    except OSError:
        env["loadavg_end"] = None
    if result["e2e"]:
        e2e_layer_estimates(result)
        print("\n== end-to-end: SNGAN ResNet D (ch=128) training step (hinge, Adam) ==")
        print(e2e_table(result))
    if result["summary"]:
        _print_goals_and_summary(result, print)
    for d in devices:
        if not env["devices"][str(d)]["fused_native"] and any(i in FUSED for i in impls):
            print("\n" + FALLBACK_WARNING.format(dev=d, has=env.get("has_extension")))
    cpu_recs = [r for r in result["measurements"] if r["device"] == "cpu" and "median_s" in r and not r.get("reused")]
    bad = [r for r in cpu_recs if r.get("contended")]
    retried = [r for r in cpu_recs if r.get("tries", 1) > 1]
    result["contended_cases"] = len(bad)
    if retried:
        print(f"\n{len(retried)} of {len(cpu_recs)} CPU cases were disturbed by other processes and measured again; "
              f"{len(bad)} stayed disturbed (marked '!' in the tables: treat them with suspicion).")
    print(f"\nelapsed {result['elapsed_s']:.1f} s", flush=True)
    return result


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = run(args)
    for path in (args.json, args.plot, args.markdown):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=_json_default, allow_nan=True)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(result))
        print(f"wrote {args.markdown}")
    if args.plot and plot(result, args.plot):
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
