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
import copy
import importlib
import types

import pytest
import torch
from torch import nn

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


def replay(module, x):
    """Outputs of eval, two training and another eval forward (no grad): what a loaded state gives."""
    with torch.no_grad():
        module.eval()
        outs = [module(x)]
        module.train()
        outs += [module(x), module(x)]
        module.eval()
        return outs + [module(x)]


def checkpoint_and_new_module(api, meta_init):
    """An input x, a Linear(3, 5) with SN after one forward on it, a copy of its
    state_dict, and a new one of the same kind to load it into, built on the
    meta device (no memory, no values: all from the checkpoint) or the CPU."""
    x = torch.randn(2, 3)
    src = api.spectral_norm(nn.Linear(3, 5))
    src(x)
    state = copy.deepcopy(src.state_dict())
    with torch.device("meta" if meta_init else "cpu"):
        dst = api.spectral_norm(nn.Linear(3, 5))
    return x, src, state, dst


def sn_linear(api, n_in=3, n_out=4, dtype=torch.float64, requires_grad=True, **kwargs):
    """A Linear(n_in, n_out) with ``api``'s spectral norm."""
    m = nn.Linear(n_in, n_out, dtype=dtype)
    m.weight.requires_grad_(requires_grad)
    return api.spectral_norm(m, **kwargs)


def train_eval_forwards(m, x):
    """The sum of a training, an eval, a training and an eval output (for gradcheck across modes)."""
    outs = []
    for training in (True, False, True, False):
        m.train(training)
        outs.append(m(x))
    return sum(outs)


def linear_state_dict(api, forwards):
    """An input x, a Linear(3, 5) with SN after ``forwards`` forwards on it, and a copy of its state_dict."""
    x = torch.randn(2, 3)
    m = api.spectral_norm(nn.Linear(3, 5))
    for _ in range(forwards):
        m(x)
    return x, m, copy.deepcopy(m.state_dict())


def check_non_strict_loading(m, state, sn_keys, drop_metadata):
    """torch's rules for loading into ``m``: strict loading refuses an unknown key;
    non-strict loading accepts it, any subset of the SN tensors ``sn_keys``, an
    extra "weight", a state_dict without SN's metadata (``drop_metadata(sd)``
    removes it) and one without weight and bias."""
    loose = copy.deepcopy(state)
    loose["nonsense"] = "nonsense"
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "nonsense"'):
        m.load_state_dict(loose, strict=True)
    m.load_state_dict(loose, strict=False)
    for key in sn_keys:
        del loose[key]
        m.load_state_dict(loose, strict=False)
    loose["weight"] = m.weight.detach().clone()
    m.load_state_dict(loose, strict=False)
    drop_metadata(loose)
    m.load_state_dict(loose, strict=False)
    del loose["weight"], loose["bias"]
    m.load_state_dict(loose, strict=False)


def eval_after_training(m, vectors):
    """Two training forwards, then eval forwards of ``m`` (a Linear(3, 4) with SN;
    ``vectors()`` gives its u and v): the first eval output equals the last
    training one (up to rounding), the next equals it exactly, u and v stay."""
    x = torch.randn(2, 3, dtype=torch.float64)
    m(x)
    last_train = m(x)
    u, v = (t.clone() for t in vectors())
    m.eval()
    first_eval = m(x)
    assert_close(first_eval, last_train, "eval vs last training output")
    assert torch.equal(m(x), first_eval)
    assert all(torch.equal(a, b) for a, b in zip(vectors(), (u, v)))
    return {"train": last_train, "eval": first_eval, "u": u, "v": v}
