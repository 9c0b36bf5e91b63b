"""Drop-in parity: the parametrization flavour of spectral norm.

``bsn_cuda.nn.utils.parametrizations.spectral_norm`` must behave as
``torch.nn.utils.parametrizations.spectral_norm`` does in every respect that
torch's own tests check (module structure, training/eval behaviour, removal,
stacking, state dicts, ConvTranspose dims, complex weights, errors) and that
users rely on (``parametrize.cached()``, ``load_state_dict(assign=True)``,
swapping module params on conversion). Each test runs with ``impl="torch"``
(validating the test) and ``impl="bsn_cuda"`` (also compared value by value
with torch from the same seed, see ``parity_helpers.run_scenario``).

Not asserted here: the documented differences of bsn_cuda (an all-zero weight
gives ``scale * W``, torch NaN; a non-finite weight leaves u/v unchanged) and
pickling of whole parametrized modules (torch refuses, bsn_cuda allows).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.nn.utils import parametrize

from parity_helpers import (
    IMPLS,
    assert_close,
    check_non_strict_loading,
    checkpoint_and_new_module,
    eval_after_training,
    linear_state_dict,
    param_api,
    replay,
    run_scenario,
    sn_linear,
    swap_module_params,
    train_eval_forwards,
)

pytestmark = pytest.mark.parametrize("impl", IMPLS)


def _sn_module(m, name="weight"):
    return m.parametrizations[name][0]


def test_registration_structure(impl):
    def scenario(api):
        m = sn_linear(api, 5, 7)
        sn = _sn_module(m)
        assert sn._u.shape == (7,) and sn._v.shape == (5,)
        plist = m.parametrizations.weight
        assert "original" in plist._parameters and isinstance(plist.original, nn.Parameter)
        assert "_u" in sn._buffers and "_v" in sn._buffers
        # The normalized weight is computed, neither a parameter nor a buffer of the module.
        assert "weight" not in m._parameters and "weight" not in m._buffers
        assert parametrize.is_parametrized(m, "weight") and not parametrize.is_parametrized(m, "bias")
        assert m.weight.shape == plist.original.shape and m.weight.stride() == plist.original.stride()
        assert {n for n, _ in m.named_parameters()} == {"bias", "parametrizations.weight.original"}
        return {"u": sn._u, "v": sn._v, "weight": m.weight}

    run_scenario(impl, param_api, scenario)


@pytest.mark.parametrize("leave_parametrized", [True, False])
@pytest.mark.parametrize("swap", [False, True])
def test_remove_parametrizations(impl, leave_parametrized, swap):
    def scenario(api):
        with swap_module_params(swap):
            m = sn_linear(api, 3, 4)
            x = torch.randn(2, 3, dtype=torch.float64)
            original = m.parametrizations.weight.original
            raw = original.detach().clone()
            for _ in range(3):
                m(x)
            m.eval()
            out = m(x).detach()
            normalized = m.weight.detach().clone()
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=leave_parametrized)
            assert not hasattr(m, "parametrizations") and type(m) is nn.Linear
            assert "weight" in m._parameters and isinstance(m.weight, nn.Parameter)
            if leave_parametrized:
                # The eval-mode value is kept; no further power iteration.
                assert torch.equal(m.weight.detach(), normalized)
                assert torch.equal(m(x).detach(), out)
            else:
                assert torch.equal(m.weight.detach(), raw)
            if not swap:
                assert m.weight is original  # optimizers holding it stay valid
            return {"weight": m.weight, "out": m(x)}

    run_scenario(impl, param_api, scenario)


def test_stacked_twice_and_on_bias(impl):
    def scenario(api):
        m = nn.Linear(5, 7, dtype=torch.float64)
        api.spectral_norm(m, "weight")
        api.spectral_norm(m, "weight")
        api.spectral_norm(m, "bias")
        assert len(m.parametrizations.weight) == 2 and len(m.parametrizations.bias) == 1
        # A 1-D tensor is divided by its norm.
        assert_close(m.bias, F.normalize(m.parametrizations.bias.original.detach(), dim=0), "bias")
        # The outer SN sees the inner one's output, which has sigma ~1: W_sn twice ~ W_sn once.
        x = torch.randn(3, 5, dtype=torch.float64)
        outs = [m(x), m(x)]
        m.eval()
        outs.append(m(x))
        sn0, sn1 = m.parametrizations.weight
        vectors = [sn0._u, sn0._v, sn1._u, sn1._v]
        weight = m.weight.detach().clone()
        parametrize.remove_parametrizations(m, "bias")
        assert "bias" in m._parameters and parametrize.is_parametrized(m, "weight")
        assert "weight" not in m._parameters
        parametrize.remove_parametrizations(m, "weight")
        assert not parametrize.is_parametrized(m) and "weight" in m._parameters
        assert torch.equal(m.weight.detach(), weight)
        return {"outs": outs, "vectors": vectors, "weight": m.weight}

    run_scenario(impl, param_api, scenario)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_training_updates_vectors_and_gradient_reaches_original(impl, requires_grad):
    def scenario(api):
        m = sn_linear(api, 3, 4, requires_grad=requires_grad)
        sn = _sn_module(m)
        x = torch.randn(2, 3, dtype=torch.float64)
        u0, v0 = sn._u.clone(), sn._v.clone()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()
        out = m(x)
        results = {"out": out, "u": sn._u, "v": sn._v}
        if requires_grad:
            assert not torch.equal(u0, sn._u) and not torch.equal(v0, sn._v)
            (grad,) = torch.autograd.grad(out.sum(), m.parametrizations.weight.original)
            results["grad"] = grad
        else:
            assert m.parametrizations.weight.original.grad is None
        return results

    run_scenario(impl, param_api, scenario)


def test_gradcheck_through_repeated_training_forwards(impl):
    m = sn_linear(param_api(impl), 3, 4)
    sn = _sn_module(m)
    saved_u, saved_v = sn._u.clone(), sn._v.clone()

    def two_forwards(x):
        # Each call starts from the same vectors, so the function is deterministic.
        sn._u.copy_(saved_u)
        sn._v.copy_(saved_v)
        return m(x) + m(x)

    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    two_forwards(x).sum().backward()
    assert m.parametrizations.weight.original.grad is not None
    assert gradcheck(two_forwards, (x,), check_batched_grad=False)

    def mixed_modes(x):
        sn._u.copy_(saved_u)
        sn._v.copy_(saved_v)
        return train_eval_forwards(m, x)

    assert gradcheck(mixed_modes, (x,), check_batched_grad=False)
    m.eval()
    assert gradcheck(lambda w: m(x.detach()), (m.parametrizations.weight.original,))


def test_eval_reuses_last_training_vectors(impl):
    def scenario(api):
        m = sn_linear(api, 3, 4)
        return eval_after_training(m, lambda: (_sn_module(m)._u, _sn_module(m)._v))

    run_scenario(impl, param_api, scenario)


KEYS = {"parametrizations.weight.original", "bias", "parametrizations.weight.0._u", "parametrizations.weight.0._v"}


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("forwards_before_save", [0, 3])
def test_state_dict_keys_and_loading(impl, swap, forwards_before_save):
    def scenario(api):
        with swap_module_params(swap):
            x, m, state = linear_state_dict(api, forwards_before_save)
            assert set(state.keys()) == KEYS
            sn_keys = ("parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v")
            check_non_strict_loading(m, state, sn_keys, lambda sd: sd._metadata.pop("parametrizations.weight.0"))

            # Removing and re-registering does not matter: the loaded state decides.
            parametrize.remove_parametrizations(m, "weight")
            m = api.spectral_norm(m)
            m.load_state_dict(state)
            first = replay(m, x)
            parametrize.remove_parametrizations(m, "weight")
            m = api.spectral_norm(m)
            m.load_state_dict(state)
            second = replay(m, x)
            for a, b in zip(first, second):
                assert torch.equal(a, b)
            return first

    run_scenario(impl, param_api, scenario)


def test_conv_transpose_uses_dim_1(impl):
    def scenario(api):
        m = api.spectral_norm(nn.ConvTranspose2d(3, 4, (5, 6)))
        original = m.parametrizations.weight.original
        sn = _sn_module(m)
        assert sn._u.shape == original[0, :, 0, 0].shape == (4,)
        assert sn._v.shape == (3 * 5 * 6,)
        out = m(torch.randn(2, 3, 10, 12))
        assert out.shape == (2, 4, 14, 17)
        explicit = api.spectral_norm(nn.ConvTranspose2d(3, 4, (5, 6)), dim=0)
        assert _sn_module(explicit)._u.shape == (3,)
        negative = api.spectral_norm(nn.Conv2d(3, 4, 3), dim=-1)
        assert _sn_module(negative)._u.shape == (3,) and _sn_module(negative)._v.shape == (4 * 3 * 3,)
        return {"out": out, "u": sn._u, "explicit": explicit.weight, "negative": negative.weight}

    run_scenario(impl, param_api, scenario)


def test_training_forward_is_one_power_iteration_then_division(impl):
    def scenario(api):
        m = sn_linear(api, 5, 7)
        sn = _sn_module(m)
        x = torch.randn(3, 5, dtype=torch.float64)
        w = m.parametrizations.weight.original.detach()
        # Our own formula, in torch's order: u from the stored v, then v from u.
        u = F.normalize(w @ sn._v, dim=0, eps=1e-12)
        v = F.normalize(w.t() @ u, dim=0, eps=1e-12)
        sigma = u @ w @ v
        out = m(x)
        assert_close(out, F.linear(x, w / sigma, m.bias), "output")
        assert_close(sn._u, u, "u")
        assert_close(sn._v, v, "v")
        return {"out": out}

    run_scenario(impl, param_api, scenario)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
def test_diagonal_weight_is_divided_by_its_largest_entry(impl, dtype):
    def scenario(api):
        m = nn.Linear(3, 3, dtype=dtype)
        with torch.no_grad():
            diag = torch.tensor([0.5, -2.0, 1.25], dtype=torch.float64)
            if dtype.is_complex:
                diag = diag * torch.tensor(complex(0.6, 0.8))
            m.weight = nn.Parameter(torch.diag(diag).to(dtype))
        api.spectral_norm(m)
        expected = torch.diag(diag / diag.abs().max()).to(dtype)
        assert_close(m.weight.detach(), expected, "normalized diagonal")
        return {"weight": m.weight}

    run_scenario(impl, param_api, scenario)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_weights_train_and_eval(impl, dtype):
    def scenario(api):
        m = api.spectral_norm(nn.Linear(6, 4, dtype=dtype), n_power_iterations=2)
        sn = _sn_module(m)
        assert sn._u.dtype == dtype and sn._v.dtype == dtype
        x = torch.randn(3, 6, dtype=dtype)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        outs = []
        for _ in range(3):
            out = m(x)
            opt.zero_grad()
            out.abs().pow(2).sum().backward()
            opt.step()
            outs.append(out.detach())
        m.eval()
        outs.append(m(x).detach())
        # sigma is real: the top singular value of the normalized weight is ~1 after training steps.
        top = torch.linalg.matrix_norm(m.weight.detach(), 2)
        assert abs(top.item() - 1.0) < 0.1
        return {"outs": outs, "u": sn._u, "v": sn._v, "weight": m.parametrizations.weight.original}

    run_scenario(impl, param_api, scenario)


def test_cached_evaluates_once(impl):
    def scenario(api):
        m = sn_linear(api, 4, 6)
        sn = _sn_module(m)
        x = torch.randn(2, 4, dtype=torch.float64)
        reference = copy.deepcopy(sn)
        with parametrize.cached():
            w1 = m.weight
            w2 = m.weight
            outs = [m(x), m(x)]
        assert w1 is w2
        # One power iteration for the whole cached block.
        w = m.parametrizations.weight.original.detach()
        reference(w)
        assert torch.equal(sn._u, reference._u) and torch.equal(sn._v, reference._v)
        assert torch.equal(outs[0], outs[1])
        outs[0].sum().backward()
        return {"outs": outs, "grad": m.parametrizations.weight.original.grad}

    run_scenario(impl, param_api, scenario)


@pytest.mark.parametrize("meta_init", [False, True])
@pytest.mark.parametrize("swap", [False, True])
def test_load_state_dict_assign(impl, swap, meta_init):
    def scenario(api):
        with swap_module_params(swap):
            x, src, state, dst = checkpoint_and_new_module(api, meta_init)
            assert dst.parametrizations.weight.original.is_meta == meta_init
            dst.load_state_dict(state, assign=True)
            original = dst.parametrizations.weight.original
            assert not original.is_meta and isinstance(original, nn.Parameter)
            assert original is not src.parametrizations.weight.original
            assert torch.equal(original, state["parametrizations.weight.original"])
            sn = _sn_module(dst)
            assert torch.equal(sn._u, state["parametrizations.weight.0._u"])
            src.eval(), dst.eval()
            assert torch.equal(dst(x), src(x))
            dst.train()
            out = dst(x)
            out.sum().backward()
            return {"eval": src(x), "train": out, "grad": original.grad}

    run_scenario(impl, param_api, scenario)


def test_bad_arguments_raise_torchs_exception_types(impl):
    api = param_api(impl)
    with pytest.raises(ValueError):
        api.spectral_norm(nn.Linear(3, 4), n_power_iterations=0)
    with pytest.raises(IndexError):
        api.spectral_norm(nn.Linear(3, 4), dim=2)
    with pytest.raises(IndexError):
        api.spectral_norm(nn.Conv2d(3, 4, 3), dim=-5)
    with pytest.raises(ValueError):
        api.spectral_norm(nn.Linear(3, 4), name="nonexistent")
    with pytest.raises(ValueError):
        api.spectral_norm(nn.Linear(3, 4, bias=False), name="bias")
