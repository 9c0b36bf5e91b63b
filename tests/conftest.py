"""Shared test setup: fixtures, tolerances and helpers of more than one test folder.

The suite tests the compiled ops: if ``bsn_cuda._C`` did not load, every test
fails (not skips) unless ``BSN_ALLOW_REFERENCE=1``, which runs the suite
against the pure-PyTorch fallback (tests that need the compiled ops then skip).

The tests are grouped by what they test: ops/ (the fused ops against the
reference, their contract, autograd, special values, determinism), module/
(the public API, drop-in parity with torch, serialization), training/ (AMP,
checkpointing, compile, distributed, memory, EMA), cuda/ (CUDA-only). The
folders have no __init__.py: pytest imports each test file by its basename
(so basenames are unique across tests/) with its folder and tests/ on sys.path,
which is how the helper modules (discriminator.py, ops/op_inputs.py,
module/parity_helpers.py, ...) are imported.
"""

import os

import pytest
import torch

import bsn_cuda
from bsn_cuda import _ops
from discriminator import build_discriminator, images  # noqa: F401  (for the tests: one discriminator)

# The repository (tests/ is one level down): for paths to examples/, csrc/ and the tests themselves.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALLOW_REFERENCE = os.environ.get("BSN_ALLOW_REFERENCE", "") == "1"

# float32 results are compared at ~1e-5; TF32 convolutions/matmuls on Ampere+
# GPUs would add ~1e-3 differences between two otherwise equal computations.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# With the extension, CUDA tests need its CUDA kernels; the reference fallback runs anywhere.
CUDA_USABLE = torch.cuda.is_available() and (
    "cuda" in _ops.OP_DEVICES or (not bsn_cuda.HAS_EXTENSION and ALLOW_REFERENCE)
)

requires_ops = pytest.mark.skipif(
    not bsn_cuda.HAS_EXTENSION, reason="needs the compiled ops (running with BSN_ALLOW_REFERENCE=1)"
)

# Device parametrization: "cuda" skips without a GPU or without registered CUDA kernels.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not CUDA_USABLE, reason="CUDA unavailable or bsn_cuda CUDA kernels not registered"),
    ),
]


@pytest.fixture(scope="session", autouse=True)
def _require_extension():
    if not bsn_cuda.HAS_EXTENSION and not ALLOW_REFERENCE:
        pytest.fail(
            f"bsn_cuda._C did not load ({_ops.EXTENSION_ERROR}); build it with "
            "`pip install --no-build-isolation -e .`, or set BSN_ALLOW_REFERENCE=1 to test the "
            "pure-PyTorch fallback",
            pytrace=False,
        )


@pytest.fixture
def reference_only(monkeypatch):
    """Route the package's entry points to the reference for the duration of a test."""
    monkeypatch.setattr(_ops, "OP_DEVICES", frozenset())


# Op results against the reference: max error relative to the largest expected value.
OP_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual, expected, dtype, what="", magnitude=0.0, factor=1.0):
    """|actual - expected| <= factor * OP_TOL[dtype] * max(max|expected|, magnitude); NaN positions must match.

    ``magnitude`` is the size of the terms that cancel in ``expected`` (for a
    gradient ``a G - k D``: ``max|a G|``), where ``expected`` itself can be ~0.
    """
    assert actual.shape == expected.shape, what
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ"
    finite = ~torch.isnan(e)
    scale = e[finite].abs().max().item() if finite.any() else 1.0
    scale = max(scale, magnitude, 1e-30)
    err = (a[finite] - e[finite]).abs().max().item() if finite.any() else 0.0
    tol = factor * OP_TOL[dtype]
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def random_unit(n, dtype, device, generator=None):
    x = torch.randn(n, dtype=torch.float64, generator=generator).to(device)
    return (x / x.norm()).to(dtype)


# Whole-model comparisons (outputs, buffers, gradients after training steps).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}

# The power-iteration vectors of SN (_u, _v) and BSN (one pair per matricization).
VECTOR_NAMES = ("_u", "_v", "_u0", "_v0", "_u1", "_v1", "weight_u", "weight_v")  # (the last: legacy flavour)


def power_vectors(model):
    """Detached copies of the model's u/v buffers, by name."""
    return {k: b.detach().clone() for k, b in model.named_buffers() if k.rsplit(".", 1)[-1] in VECTOR_NAMES}


def snapshot(model):
    """Every parameter, buffer and gradient (detached copies)."""
    out = {k: t.detach().clone() for k, t in model.state_dict(keep_vars=True).items()}
    out.update({k + ".grad": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    out.update({k: b.detach().clone() for k, b in model.named_buffers() if k.endswith(("_sigma", "_sigmas"))})
    return out


def assert_equal_dicts(a, b, what=""):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def sgd_step(model, out, lr=0.05):
    """Plain SGD on the loss mean(out^2), gradients set to None first."""
    model.zero_grad(set_to_none=True)
    out.square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def spectral_norms(model):
    """The SN/BSN parametrization objects of a Sequential's layers."""
    return [m.parametrizations.weight[0] for m in model if hasattr(m, "parametrizations")]


@pytest.fixture
def restore_global_state():
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture
def single_thread(restore_global_state):
    """Tiny models gain nothing from threads; one keeps long loops fast on a busy machine."""
    torch.set_num_threads(1)
