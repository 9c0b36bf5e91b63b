"""torch.func transforms and forward-mode AD through SN / BSN layers.

The fused ops have no batching rule and no forward derivative, so bsn_cuda
routes these calls to the differentiable reference; derivatives must equal
those of torch's SN under the same transforms (same seed, so the same
vectors), and a direct op call with a tangent must raise, never return an
output without one. torch.func.functional_call updates the buffers it is
given, as torch's SN does.
"""

import copy

import pytest
import torch
from conftest import assert_equal_dicts, build_discriminator, images, power_vectors
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import bsn_cuda
from bsn_cuda import reference

TOL = dict(rtol=1e-9, atol=1e-11)


def _model(make, seed=3):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)
    ).double()
    for layer in (model[0], model[3]):
        make(layer)
    return model


TORCH_SN = torch.nn.utils.parametrizations.spectral_norm
OURS = {
    "parametrization": bsn_cuda.spectral_norm,
    "legacy": bsn_cuda.nn.utils.spectral_norm,
}
TORCH = {
    "parametrization": TORCH_SN,
    "legacy": torch.nn.utils.spectral_norm,
}


def _pair(flavour, mode):
    ours, theirs = _model(OURS[flavour]), _model(TORCH[flavour])
    getattr(ours, mode)(), getattr(theirs, mode)()
    return ours, theirs


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _buffers(model):
    return {k: v for k, v in model.named_buffers() if not k.endswith(("_sigma", "_sigmas"))}


def _x(n=5, seed=0):
    return torch.randn(n, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("flavour", ["parametrization", "legacy"])
def test_grad_matches_torch(flavour):
    ours, theirs = _pair(flavour, "eval")
    x = _x()

    def loss(model, params):
        return functional_call(model, params, (x,)).square().sum()

    g_ours = grad(lambda p: loss(ours, p))(_params(ours))
    g_theirs = grad(lambda p: loss(theirs, p))(_params(theirs))
    assert g_ours.keys() == g_theirs.keys()
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], **TOL, msg=k)
    # and equal to plain autograd through the fused ops
    loss(ours, dict(ours.named_parameters())).backward()
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, g_ours[k], **TOL, msg=k)


@pytest.mark.parametrize("flavour", ["parametrization", "legacy"])
def test_per_sample_grads_with_vmap_match_torch(flavour):
    ours, theirs = _pair(flavour, "eval")
    x = _x(4)

    def per_sample(model):
        def loss(params, xi):
            return functional_call(model, params, (xi.unsqueeze(0),)).square().sum()

        return vmap(grad(loss), in_dims=(None, 0))(_params(model), x)

    g_ours, g_theirs = per_sample(ours), per_sample(theirs)
    for k in g_ours:
        assert g_ours[k].shape[0] == 4
        torch.testing.assert_close(g_ours[k], g_theirs[k], **TOL, msg=k)


def test_jacrev_of_the_normalized_weight_matches_torch():
    torch.manual_seed(1)
    ours = bsn_cuda.spectral_norm(nn.Linear(4, 3).double()).eval()
    torch.manual_seed(1)
    theirs = TORCH_SN(nn.Linear(4, 3).double()).eval()

    def weight_of(model):
        return model.parametrizations.weight[0]  # W -> W_sn

    j_ours = jacrev(weight_of(ours))(ours.parametrizations.weight.original.detach())
    j_theirs = jacrev(weight_of(theirs))(theirs.parametrizations.weight.original.detach())
    assert j_ours.shape == (3, 4, 3, 4)
    torch.testing.assert_close(j_ours, j_theirs, **TOL)


@pytest.mark.parametrize("flavour", ["parametrization", "legacy"])
def test_jvp_matches_torch_and_finite_differences(flavour):
    ours, theirs = _pair(flavour, "eval")
    x = _x(3)
    params = _params(ours)
    gen = torch.Generator().manual_seed(7)  # (randn_like takes no generator before torch 2.5)
    tangents = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}

    def f(model):
        return lambda p: functional_call(model, p, (x,))

    out, t_ours = jvp(f(ours), (params,), (tangents,))
    _, t_theirs = jvp(f(theirs), (_params(theirs),), (tangents,))
    torch.testing.assert_close(t_ours, t_theirs, **TOL)
    h = 1e-6
    plus = f(ours)({k: v + h * tangents[k] for k, v in params.items()})
    minus = f(ours)({k: v - h * tangents[k] for k, v in params.items()})
    torch.testing.assert_close(t_ours, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flavour", ["parametrization", "legacy"])
def test_forward_ad_gives_the_tangent(flavour):
    import torch.autograd.forward_ad as fwAD

    ours, theirs = _pair(flavour, "eval")
    x = _x(2)
    tangent = torch.randn_like(x)
    results = []
    for model in (ours, theirs):
        with fwAD.dual_level():
            out = model(fwAD.make_dual(x, tangent))
            results.append(fwAD.unpack_dual(out).tangent)
    assert results[0] is not None
    torch.testing.assert_close(results[0], results[1], **TOL)



def test_forward_ad_tangent_of_the_weight_has_the_sn_term():
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(2)
    norm = bsn_cuda.spectral_norm(nn.Linear(5, 4).double()).eval().parametrizations.weight[0]
    w = torch.randn(4, 5, dtype=torch.float64)
    dw = torch.randn_like(w)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(norm(fwAD.make_dual(w, dw))).tangent
    assert tangent is not None
    h = 1e-6
    fd = (norm(w + h * dw) - norm(w - h * dw)) / (2 * h)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)


def test_bsn_under_grad_and_jvp_matches_its_formula():
    torch.manual_seed(5)
    layer = bsn_cuda.bidirectional_spectral_norm(nn.Conv2d(3, 4, 3).double()).eval()
    norm = layer.parametrizations.weight[0]
    b = norm._buffers

    def formula(w):
        s0 = b["_u0"] @ reference.matricize(w, 0) @ b["_v0"]
        s1 = b["_u1"] @ reference.matricize(w, 1) @ b["_v1"]
        return w / ((s0 + s1) / 2)

    w = layer.parametrizations.weight.original.detach()
    g = torch.randn_like(w)
    torch.testing.assert_close(grad(lambda w: (norm(w) * g).sum())(w), grad(lambda w: (formula(w) * g).sum())(w), **TOL)
    dw = torch.randn_like(w)
    torch.testing.assert_close(jvp(norm, (w,), (dw,))[1], jvp(formula, (w,), (dw,))[1], **TOL)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    per_sample = vmap(grad(lambda p, xi: functional_call(layer, p, (xi[None],)).sum()), in_dims=(None, 0))
    grads = per_sample(_params(layer), x)
    assert grads["parametrizations.weight.original"].shape == (2,) + tuple(w.shape)


def _grad_with_passed_buffers(model, x):
    params, buffers = _params(model), {k: v.clone() for k, v in _buffers(model).items()}
    g = grad(lambda p: functional_call(model, (p, buffers), (x,)).sum())(params)
    return g, buffers


@pytest.mark.parametrize("flavour", ["parametrization", "legacy"])
def test_training_mode_under_grad_matches_torch(flavour):
    """Training mode updates buffers in place; under a transform that works when the
    buffers are passed to functional_call, for torch's SN and for ours, with the
    same gradients and the same updated vectors. (On eb13708 this test returned
    without checking anything whenever torch raised.)"""
    ours, theirs = _pair(flavour, "train")
    x = _x(3)
    g_theirs, b_theirs = _grad_with_passed_buffers(theirs, x)  # torch must work here, or the test is wrong
    g_ours, b_ours = _grad_with_passed_buffers(ours, x)
    assert g_ours.keys() == g_theirs.keys() and b_ours.keys() == b_theirs.keys()
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], **TOL, msg=k)
    for k in b_ours:
        torch.testing.assert_close(b_ours[k], b_theirs[k], **TOL, msg=k)
        assert not torch.equal(b_ours[k], _buffers(ours)[k]), f"{k}: the passed buffer was not updated"


@pytest.mark.parametrize("make", [bsn_cuda.spectral_norm, bsn_cuda.bidirectional_spectral_norm,
                                  bsn_cuda.nn.utils.spectral_norm], ids=["sn", "bsn", "legacy"])
def test_training_mode_under_grad_equals_an_eager_training_step(make):
    """Independently of torch: grad() of a training forward with the buffers passed
    gives eager autograd's gradients and the eager forward's vector update."""
    model = _model(make).train()
    x = _x(3)
    eager = copy.deepcopy(model)
    g, buffers = _grad_with_passed_buffers(model, x)
    eager(x).sum().backward()
    for k, p in eager.named_parameters():
        torch.testing.assert_close(g[k], p.grad, **TOL, msg=k)
    for k, b in _buffers(eager).items():
        torch.testing.assert_close(buffers[k], b, **TOL, msg=k)


@pytest.mark.parametrize("op", ["sn", "bsn"])
def test_direct_op_call_with_a_tangent_raises(op):
    import torch.autograd.forward_ad as fwAD

    w = torch.randn(3, 4, 3, dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(w, torch.randn_like(w))
        with pytest.raises(RuntimeError, match="forward-mode tangent"):
            if op == "sn":
                torch.ops.bsn_cuda.sn_forward(dual, torch.ones(3, dtype=torch.float64), torch.ones(12, dtype=torch.float64),
                                              0, 1, 1e-12, 1.0, True)
            else:
                torch.ops.bsn_cuda.bsn_forward(
                    dual, torch.ones(3, dtype=torch.float64), torch.ones(12, dtype=torch.float64),
                    torch.ones(4, dtype=torch.float64), torch.ones(9, dtype=torch.float64), 1, 1e-12, 1.0, True,
                )


# ---------------------------------------------------------------------------
# torch.func.functional_call of the modules


@pytest.mark.parametrize("make", [bsn_cuda.spectral_norm, TORCH_SN], ids=["ours", "torch"])
def test_functional_call_updates_the_passed_buffers_like_torch(make):
    """With buffers in the dict, the power iteration updates the dict's tensors in
    place and leaves the module's own buffers alone; without them, the module's
    buffers are updated. The same for torch's SN and ours."""
    torch.manual_seed(5)
    layer = make(nn.Linear(5, 4))
    state = {k: t.detach().clone() for k, t in layer.state_dict().items()}
    state["parametrizations.weight.original"] = state["parametrizations.weight.original"] * 1.5 + 0.1
    module_vectors = power_vectors(layer)
    dict_u = state["parametrizations.weight.0._u"]
    dict_u_before = dict_u.clone()
    x = torch.randn(3, 5)
    out = functional_call(layer, state, (x,))
    assert state["parametrizations.weight.0._u"] is dict_u and not torch.equal(dict_u, dict_u_before)
    assert_equal_dicts(power_vectors(layer), module_vectors, "module buffers")
    # The output is the function of the passed weight and the updated vectors.
    w = state["parametrizations.weight.original"]
    sigma = dict_u @ w @ state["parametrizations.weight.0._v"]
    torch.testing.assert_close(out, x @ (w / sigma).T + state["bias"])

    params_only = {"parametrizations.weight.original": w}
    functional_call(layer, params_only, (x,))
    assert not torch.equal(layer.parametrizations.weight[0]._u, module_vectors["parametrizations.weight.0._u"])


def test_functional_call_with_grad_through_params_dict():
    model = build_discriminator("mixed")
    params = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    reference_model = copy.deepcopy(model)
    x = images(0)
    out = functional_call(model, (params, buffers), (x,))
    out_ref = reference_model(x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    out.sum().backward()
    out_ref.sum().backward()
    for (k, p), q in zip(reference_model.named_parameters(), params.values()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=k)
    for k, b in reference_model.named_buffers():
        torch.testing.assert_close(buffers[k], b, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("make", [bsn_cuda.spectral_norm, bsn_cuda.bidirectional_spectral_norm,
                                  bsn_cuda.nn.utils.spectral_norm], ids=["sn", "bsn", "legacy"])
def test_eval_forward_under_vmap_grad_writes_no_state(make):
    """Per-sample gradients of an eval-mode model: no state is written (torch's SN
    writes none in eval), and each sample's gradient is eager autograd's. BSN
    raised on eb13708 (its sigma-log write mutated a captured buffer)."""
    model = _model(make).eval()
    with torch.no_grad():
        model(_x(1, seed=9))  # an eager forward first, so the sigma logs hold a value
    before = {k: b.clone() for k, b in model.named_buffers()}
    x = _x(3)
    per_sample = vmap(grad(lambda p, xi: functional_call(model, p, (xi[None],)).sum()), in_dims=(None, 0))
    grads = per_sample(_params(model), x)
    for k, b in model.named_buffers():
        torch.testing.assert_close(b, before[k], rtol=0, atol=0, equal_nan=True, msg=k)
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        model(x[i:i + 1]).sum().backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(grads[k][i], p.grad, **TOL, msg=f"{k}[{i}]")
