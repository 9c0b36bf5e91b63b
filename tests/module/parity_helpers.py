"""Shared pieces of the drop-in parity tests (test_parity_*.py).

Every parity test runs once per implementation: ``impl="torch"`` runs torch's
own spectral norm (this checks that the test states torch's behaviour
correctly), ``impl="bsn_cuda"`` runs ours. For ``bsn_cuda`` a test also
replays the same scenario with torch from the same seed and compares every
tensor it returns (same RNG draws, so same vectors, outputs and gradients up
to rounding).

``bsn_cuda.nn.utils`` mirrors ``torch.nn.utils``, so the adapters below are
one attribute lookup each.
"""

import contextlib
import importlib
import types

import pytest
import torch


BSN_UTILS = importlib.import_module("bsn_cuda.nn.utils")

IMPLS = ["torch", "bsn_cuda"]


def _bsn_parametrizations():
    mod = getattr(BSN_UTILS, "parametrizations", None)
    if mod is None:
        mod = importlib.import_module("bsn_cuda.nn.utils.parametrizations")
    return mod


def legacy_api(impl):
    """``spectral_norm`` / ``remove_spectral_norm`` of the hook-based (legacy) flavour."""
    if impl == "torch":
        return types.SimpleNamespace(
            spectral_norm=torch.nn.utils.spectral_norm, remove_spectral_norm=torch.nn.utils.remove_spectral_norm
        )
    return types.SimpleNamespace(
        spectral_norm=BSN_UTILS.spectral_norm, remove_spectral_norm=BSN_UTILS.remove_spectral_norm
    )


def param_api(impl):
    """``spectral_norm`` of the parametrization flavour (removal is torch's parametrize API for both)."""
    if impl == "torch":
        return types.SimpleNamespace(spectral_norm=torch.nn.utils.parametrizations.spectral_norm)
    return types.SimpleNamespace(spectral_norm=_bsn_parametrizations().spectral_norm)


# Comparison of ours against torch: relative to the largest value of torch's tensor.
TOL = {
    torch.float64: 1e-10,
    torch.complex128: 1e-10,
    torch.float32: 1e-5,
    torch.complex64: 1e-5,
}


def assert_close(actual, expected, what=""):
    """Same shape and dtype; max |actual - expected| <= TOL * max(1, max |expected|)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert torch.isfinite(e).all(), f"{what}: torch's value is not finite (pick another input)"
    tol = TOL[e.dtype] * max(1.0, e.abs().max().item() if e.numel() else 1.0)
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.1e}"


def _flatten(results, prefix=""):
    if isinstance(results, torch.Tensor):
        yield prefix, results
    elif isinstance(results, dict):
        for key, value in results.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(results, (list, tuple)):
        for i, value in enumerate(results):
            yield from _flatten(value, f"{prefix}[{i}]")
    else:
        raise TypeError(f"scenario results: expected tensors, dicts, lists or tuples, got {type(results).__name__}")


def run_scenario(impl, make_api, scenario, seed=0):
    """``scenario(api)`` from ``torch.manual_seed(seed)``; returns its results (tensors in dicts/lists).

    For ``impl="bsn_cuda"`` the same scenario also runs with torch's API from
    the same seed and every returned tensor must match torch's.
    """
    torch.manual_seed(seed)
    results = scenario(make_api(impl))
    if impl != "torch":
        torch.manual_seed(seed)
        expected = scenario(make_api("torch"))
        got = dict(_flatten(results))
        want = dict(_flatten(expected))
        assert got.keys() == want.keys()
        for key in want:
            assert_close(got[key], want[key], f"{impl} vs torch: {key}")
    return results


@contextlib.contextmanager
def swap_module_params(enabled):
    """``torch.__future__.set_swap_module_params_on_conversion(enabled)`` for the duration."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(enabled)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
