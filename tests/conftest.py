"""Shared test setup.

The suite tests the compiled ops: if ``bsn_cuda._C`` did not load, every test
fails (not skips) unless ``BSN_ALLOW_REFERENCE=1``, which runs the suite
against the pure-PyTorch fallback (tests that need the compiled ops then skip).
"""

import os

import pytest
import torch

import bsn_cuda
from bsn_cuda import _ops

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
