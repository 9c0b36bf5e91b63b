"""The variants in the module API (docs/design.md, Variants), against each
variant's published formula re-expressed here in plain torch:

* soft bound (SNGP / DUE): torch's legacy v-first iteration, then
  ``W / max(1, sigma / c)``; and the parametrization's u-first order;
* learnable scale (sigmaReparam): ``gamma / sigma * W``, gamma starting at sigma;
* track-only (BigGAN's logged ``sv``, snrl's diagnostics): W unchanged, sigma tracked;
* converged sigma (refresh_spectral_norm), eval iterations, top-k singular values.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bsn_cuda
from bsn_cuda import functional
from bsn_cuda.diagnostics import top_singular_values
from bsn_cuda.nn.utils import spectral_norm as legacy_spectral_norm

TOL = dict(rtol=1e-5, atol=1e-6)


# -- the published formulas, in plain torch ----------------------------------


def due_soft_bound(weight, u, v, coeff, n_power_iterations=1, eps=1e-12, training=True):
    """DUE's spectral_norm_fc (a subclass of torch's legacy SN): v-first
    iterations on W_mat, sigma = u^T W v, W / max(1, sigma / coeff). Updates u, v."""
    w_mat = weight.reshape(weight.shape[0], -1)
    if training:
        with torch.no_grad():
            for _ in range(n_power_iterations):
                v.copy_(F.normalize(w_mat.t() @ u, dim=0, eps=eps))
                u.copy_(F.normalize(w_mat @ v, dim=0, eps=eps))
    sigma = torch.dot(u, w_mat @ v)
    return weight / torch.max(torch.ones_like(sigma), sigma / coeff)


def u_first_sigma(weight, u, v, training=True, eps=1e-12):
    """torch's parametrization order (u = normalize(W v), then v), then sigma = u^T W v."""
    w_mat = weight.reshape(weight.shape[0], -1)
    if training:
        with torch.no_grad():
            u.copy_(F.normalize(w_mat @ v, dim=0, eps=eps))
            v.copy_(F.normalize(w_mat.t() @ u, dim=0, eps=eps))
    return torch.dot(u, w_mat @ v)


def u_first_soft_bound(weight, u, v, coeff, training=True):
    """The soft bound with torch's parametrization order."""
    return weight / torch.clamp(u_first_sigma(weight, u, v, training) / coeff, min=1.0)


def sigma_reparam(weight, u, v, gamma, training=True):
    """sigmaReparam: W_hat = gamma / sigma(W) * W, sigma by one power iteration."""
    return gamma / u_first_sigma(weight, u, v, training) * weight


# -- soft bound ----------------------------------------------------------------


@pytest.mark.parametrize("coeff", [0.95, 3.0])
def test_legacy_soft_bound_matches_due(coeff):
    torch.manual_seed(0)
    layer = legacy_spectral_norm(nn.Linear(16, 24).double(), coeff=coeff)
    w = layer.weight_orig.detach().clone().requires_grad_()
    u, v = layer.weight_u.clone(), layer.weight_v.clone()
    x = torch.randn(8, 16, dtype=torch.float64)
    for step in range(4):
        with torch.no_grad():
            layer.weight_orig.mul_(1.5)  # push sigma across the bound over the steps
            w.mul_(1.5)
        out = layer(x)
        expected = F.linear(x, due_soft_bound(w, u, v, coeff), layer.bias)
        torch.testing.assert_close(out, expected, **TOL)
        torch.testing.assert_close(layer.weight_u, u, **TOL)
        grad = torch.autograd.grad(out.square().sum(), layer.weight_orig)[0]
        grad_expected = torch.autograd.grad(expected.square().sum(), w)[0]
        torch.testing.assert_close(grad, grad_expected, **TOL)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, due_soft_bound(w, u, v, coeff, training=False), layer.bias), **TOL)


@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_parametrization_soft_bound_matches_formula(kind):
    torch.manual_seed(1)
    layer = nn.Linear(12, 20)
    with torch.no_grad():
        layer.weight.mul_(4)
    register = bsn_cuda.spectral_norm if kind == "sn" else bsn_cuda.bidirectional_spectral_norm
    register(layer, coeff=1.5)
    p = layer.parametrizations.weight[0]
    u, v = (p._u, p._v) if kind == "sn" else (p._u0, p._v0)
    u, v = u.clone(), v.clone()
    w = layer.parametrizations.weight.original.detach().clone().requires_grad_()
    out = layer.weight
    expected = u_first_soft_bound(w, u, v, 1.5)
    torch.testing.assert_close(out, expected, **TOL)
    g = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad((out * g).sum(), layer.parametrizations.weight.original)[0],
        torch.autograd.grad((expected * g).sum(), w)[0],
        **TOL,
    )
    # The layer's own sigma is at most c (its estimate), the raw one above.
    assert bsn_cuda.get_sigma(layer) > 1.5
    sigma_out = torch.dot(u, out.detach() @ v)
    assert sigma_out <= 1.5 * (1 + 1e-5)


def test_soft_bound_on_conv_bsn_keeps_sigma_below_coeff():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 16, 3)
    with torch.no_grad():
        conv.weight.mul_(10)
    bsn_cuda.bidirectional_spectral_norm(conv, coeff=2.0)
    bsn_cuda.refresh_spectral_norm(conv)
    w = conv.weight.detach()
    s0 = torch.linalg.matrix_norm(w.reshape(16, -1), 2)
    s1 = torch.linalg.matrix_norm(w.transpose(0, 1).reshape(8, -1), 2)
    assert (s0 + s1) / 2 <= 2.0 * (1 + 1e-3)


# -- learnable scale ------------------------------------------------------------


def test_learnable_scale_matches_sigma_reparam():
    torch.manual_seed(3)
    layer = bsn_cuda.spectral_norm(nn.Linear(24, 32), learnable_scale=True)
    p = layer.parametrizations.weight[0]
    original = layer.parametrizations.weight.original
    assert "parametrizations.weight.0.gamma" in layer.state_dict()
    assert p.gamma.dtype == torch.float32 and p.gamma.shape == ()
    # gamma starts at the converged sigma: W_hat == W.
    exact = torch.linalg.matrix_norm(original.detach(), 2)
    torch.testing.assert_close(p.gamma.detach(), exact, rtol=1e-4, atol=0)
    torch.testing.assert_close(layer.weight, original.detach(), rtol=1e-4, atol=1e-6)
    # Training steps against the formula, gamma's gradient included.
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    w = original.detach().clone().requires_grad_()
    gamma = p.gamma.detach().clone().requires_grad_()
    u, v = p._u.clone(), p._v.clone()
    x = torch.randn(16, 24)
    for _ in range(3):
        out = layer(x)
        expected = F.linear(x, sigma_reparam(w, u, v, gamma), layer.bias)
        torch.testing.assert_close(out, expected, **TOL)
        loss, loss_e = out.square().mean(), expected.square().mean()
        opt.zero_grad()
        loss.backward()
        gw, gg = torch.autograd.grad(loss_e, (w, gamma))
        torch.testing.assert_close(original.grad, gw, **TOL)
        torch.testing.assert_close(p.gamma.grad, gg, **TOL)
        opt.step()
        with torch.no_grad():
            w.copy_(original)
            gamma.copy_(p.gamma)


def test_learnable_scale_keeps_float32_with_half_weights_and_autocast():
    torch.manual_seed(4)
    layer = bsn_cuda.spectral_norm(nn.Linear(32, 32), learnable_scale=True).to(torch.bfloat16)
    p = layer.parametrizations.weight[0]
    assert p.gamma.dtype == torch.float32 and p._sigma.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(4, 32, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert p.gamma.grad.dtype == torch.float32 and torch.isfinite(p.gamma.grad)
    assert bsn_cuda.get_sigma(layer).dtype == torch.float32


def test_learnable_scale_state_dict_round_trip():
    torch.manual_seed(5)
    a = bsn_cuda.bidirectional_spectral_norm(nn.Conv2d(4, 6, 3), learnable_scale=True)
    with torch.no_grad():
        a.parametrizations.weight[0].gamma.fill_(0.25)
    b = bsn_cuda.bidirectional_spectral_norm(nn.Conv2d(4, 6, 3), learnable_scale=True)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    c = copy.deepcopy(a)
    torch.testing.assert_close(c.weight, a.weight, rtol=0, atol=0)


def test_functional_gamma_gradient():
    torch.manual_seed(6)
    w = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    u, v = functional.init_sn_vectors(w)
    gamma = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    u2, v2 = u.clone(), v.clone()
    out = functional.spectral_norm(w, u, v, gamma=gamma)
    expected = sigma_reparam(w, u2, v2, gamma)
    torch.testing.assert_close(out, expected)
    assert torch.autograd.gradcheck(
        lambda w_, g_: functional.spectral_norm(w_, u.clone(), v.clone(), gamma=g_, training=False), (w, gamma)
    )


# -- track-only ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_track_only_passes_the_weight_through(kind):
    torch.manual_seed(7)
    conv = nn.Conv2d(4, 6, 3)
    plain = copy.deepcopy(conv)
    register = bsn_cuda.spectral_norm if kind == "sn" else bsn_cuda.bidirectional_spectral_norm
    torch.manual_seed(8)
    register(conv, track_only=True)
    torch.manual_seed(8)
    register(plain)
    x = torch.randn(2, 4, 8, 8)
    out = conv(x)
    assert conv.weight is conv.parametrizations.weight.original
    expected = F.conv2d(x, conv.parametrizations.weight.original, conv.bias)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    grad = conv.parametrizations.weight.original.grad
    ones = torch.ones_like(out)
    expected_grad = torch.nn.grad.conv2d_weight(x, conv.weight.shape, ones)
    torch.testing.assert_close(grad, expected_grad)  # the identity's gradient
    plain(x)
    plain.weight  # as many forwards as `conv` had (conv.weight above is one)
    plain.weight
    # sigma tracked as SN tracks it (same vectors, same iteration), a tensor (no host sync).
    sigma = bsn_cuda.get_sigma(conv)
    assert isinstance(sigma, torch.Tensor)
    torch.testing.assert_close(sigma, bsn_cuda.get_sigma(plain), rtol=0, atol=0)
    p, q = conv.parametrizations.weight[0], plain.parametrizations.weight[0]
    for name in p._vector_names:
        torch.testing.assert_close(p._buffers[name], q._buffers[name], rtol=0, atol=0)


def test_functional_track_only_returns_the_weight():
    w = torch.randn(5, 3, requires_grad=True)
    u, v = functional.init_sn_vectors(w)
    u0 = u.clone()
    assert functional.spectral_norm(w, u, v, track_only=True) is w
    assert not torch.equal(u, u0)


# -- converged sigma -----------------------------------------------------------


def _decaying(m, n, ratio=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    k = min(m, n)
    s = ratio ** torch.arange(k, dtype=torch.float32) * 5
    return q1[:, :k] @ torch.diag(s) @ q2[:, :k].t()


def test_refresh_spectral_norm_converges():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 32))
    with torch.no_grad():
        model[0].weight.copy_(_decaying(48, 64, 0.98, 1))
        model[1].weight.copy_(_decaying(32, 48, 0.98, 2))
    bsn_cuda.apply_spectral_norm(model)
    bsn_cuda.refresh_spectral_norm(model, tol=1e-7, max_iter=5000)
    for layer in model:
        exact = torch.linalg.matrix_norm(layer.parametrizations.weight.original.detach(), 2)
        torch.testing.assert_close(bsn_cuda.get_sigma(layer), exact, rtol=1e-4, atol=0)
    # The old ema.refresh_spectral_norm call (a number of iterations) still works.
    assert bsn_cuda.ema.refresh_spectral_norm is bsn_cuda.refresh_spectral_norm
    bsn_cuda.refresh_spectral_norm(model, n_power_iterations=2)
    with pytest.raises(ValueError, match="expected tol > 0"):
        bsn_cuda.refresh_spectral_norm(model, tol=0.0)


def test_eval_iterations_do_not_store_the_vectors():
    torch.manual_seed(10)
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight.copy_(_decaying(48, 64, 0.99, 3))
    bsn_cuda.spectral_norm(layer, n_power_iterations_eval=50)
    p = layer.parametrizations.weight[0]
    u0, v0 = p._u.clone(), p._v.clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert torch.equal(p._u, u0) and torch.equal(p._v, v0)
    exact = torch.linalg.matrix_norm(layer.parametrizations.weight.original, 2)
    plain_sigma = torch.dot(u0, layer.parametrizations.weight.original.detach() @ v0)
    err_eval = (bsn_cuda.get_sigma(layer) - exact).abs()
    assert err_eval < (plain_sigma - exact).abs()
    layer.train()
    layer(torch.randn(2, 64))
    assert not torch.equal(p._u, u0)  # training forwards still update


def test_top_singular_values():
    w = _decaying(40, 60, 0.7, 4)
    values, vecs = top_singular_values(w, k=3, n_iter=30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(values, torch.linalg.svdvals(w)[:3], rtol=1e-4, atol=0)
    # Warm start from the previous vectors; a layer gives its raw weight's values.
    layer = bsn_cuda.spectral_norm(nn.Linear(60, 40))
    with torch.no_grad():
        layer.parametrizations.weight.original.copy_(w)
    again = top_singular_values(layer, k=3, n_iter=2, init=vecs)
    torch.testing.assert_close(again.values, values, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="expected k <= min"):
        top_singular_values(w, k=41)


def test_variant_keyword_checks():
    with pytest.raises(ValueError, match="expected coeff > 0 and finite, got -1"):
        bsn_cuda.spectral_norm(nn.Linear(3, 4), coeff=-1)
    with pytest.raises(ValueError, match="expected track_only=True alone"):
        bsn_cuda.spectral_norm(nn.Linear(3, 4), track_only=True, learnable_scale=True)
    with pytest.raises(TypeError, match="expected learnable_scale to be a bool"):
        bsn_cuda.spectral_norm(nn.Linear(3, 4), learnable_scale=1)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bsn_cuda.spectral_norm(nn.Linear(3, 4), "bias", coeff=1.0)
    with pytest.raises(ValueError, match="expected coeff > 0 and finite, got 0"):
        legacy_spectral_norm(nn.Linear(3, 4), coeff=0)
