"""The reference (the oracle of the other tests) against torch and plain linear algebra."""

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from bsn_cuda import functional, reference

# (layer factory, SN dim): the layers torch's SN is used with, dim as torch picks it.
LAYERS = {
    "linear": (lambda: nn.Linear(13, 7), 0),
    "conv1d": (lambda: nn.Conv1d(3, 5, 4), 0),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3), 0),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 2)), 0),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3), 1),
    "embedding": (lambda: nn.Embedding(11, 5), 0),
}

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _perturb_(weight, generator):
    # A stand-in for an optimizer step, identical on both sides.
    with torch.no_grad():
        weight.add_(0.05 * torch.randn(weight.shape, generator=generator, dtype=torch.float64).to(weight.dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_sn_reference_matches_torch_parametrization(layer, dtype):
    make, dim = LAYERS[layer]
    n_power_iterations, eps = 2, 1e-12

    torch.manual_seed(123)
    theirs = make().to(dtype)
    torch_spectral_norm(theirs, n_power_iterations=n_power_iterations, eps=eps)

    # The same RNG calls in the same order: the layer, then u and v.
    torch.manual_seed(123)
    weight = make().to(dtype).weight.detach().clone()
    u, v = functional.init_sn_vectors(weight, dim=dim, eps=eps)
    reference.sn_forward(weight, u, v, dim, 15, eps, 1.0, True)  # torch's warm-up
    reference.sn_forward(weight, u, v, dim, n_power_iterations, eps, 1.0, True)  # registration's check forward

    sn = theirs.parametrizations.weight[0]
    original = theirs.parametrizations.weight.original
    torch.testing.assert_close(u, sn._u, **TOL[dtype])
    torch.testing.assert_close(v, sn._v, **TOL[dtype])

    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(4):
        _perturb_(original, gen_a)
        _perturb_(weight, gen_b)
        expected = theirs.weight
        out, state = reference.sn_forward(weight, u, v, dim, n_power_iterations, eps, 1.0, True)
        torch.testing.assert_close(out, expected, **TOL[dtype])
        torch.testing.assert_close(u, sn._u, **TOL[dtype])
        torch.testing.assert_close(v, sn._v, **TOL[dtype])
        assert state.dtype == reference.acc_dtype(dtype)

    theirs.eval()
    u_before, v_before = u.clone(), v.clone()
    out, _ = reference.sn_forward(weight, u, v, dim, n_power_iterations, eps, 1.0, False)
    torch.testing.assert_close(out, theirs.weight, **TOL[dtype])
    assert torch.equal(u, u_before) and torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vector_case_matches_torch(dtype):
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(9, dtype=dtype))
    torch_spectral_norm(module)
    original = module.parametrizations.weight.original
    torch.testing.assert_close(reference.normalize_vector(original, 1e-12), module.weight, **TOL[dtype])
    torch.testing.assert_close(
        reference.normalize_vector(original, 1e-12, scale=3.0), 3.0 * module.weight, **TOL[dtype]
    )
    assert torch.equal(reference.normalize_vector(torch.zeros(4)), torch.zeros(4))


def _well_separated(shape, generator):
    # Random weights have a clear gap between the top two singular values of both matricizations.
    return torch.randn(shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (5, 7, 2), (3, 2, 4, 1, 2)])
def test_bsn_reference_converges_to_both_spectral_norms(shape):
    gen = torch.Generator().manual_seed(0)
    weight = _well_separated(shape, gen)
    u0, v0, u1, v1 = functional.init_bsn_vectors(weight)
    out, state = reference.bsn_forward(weight, u0, v0, u1, v1, 3000, 1e-12, 2.0, True)

    sigma_0 = torch.linalg.matrix_norm(weight.reshape(shape[0], -1), ord=2)
    sigma_1 = torch.linalg.matrix_norm(weight.transpose(0, 1).reshape(shape[1], -1), ord=2)
    torch.testing.assert_close(state[1], sigma_0, rtol=1e-9, atol=0)
    torch.testing.assert_close(state[2], sigma_1, rtol=1e-9, atol=0)
    torch.testing.assert_close(state[0], (sigma_0 + sigma_1) / 2, rtol=1e-9, atol=0)
    torch.testing.assert_close(out, 2.0 * weight / ((sigma_0 + sigma_1) / 2), rtol=1e-9, atol=1e-12)
    # The stored vectors are the top singular vectors (up to sign).
    left, _, right = torch.linalg.svd(weight.reshape(shape[0], -1))
    assert abs(torch.dot(u0, left[:, 0])) == pytest.approx(1.0, abs=1e-9)
    assert abs(torch.dot(v0, right[0])) == pytest.approx(1.0, abs=1e-9)


def _plain_iteration(mat, v, eps):
    u = torch.nn.functional.normalize(mat @ v, dim=0, eps=eps)
    v = torch.nn.functional.normalize(mat.t() @ u, dim=0, eps=eps)
    return u, v


@pytest.mark.parametrize("update", [True, False])
def test_bsn_reference_one_step_matches_plain_formula(update):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    u0, v0, u1, v1 = functional.init_bsn_vectors(weight.detach())
    vectors = [t.clone() for t in (u0, v0, u1, v1)]
    out, state = reference.bsn_forward(weight, u0, v0, u1, v1, 1, 1e-12, 1.5, update)

    mats = [weight.detach().reshape(4, -1), weight.detach().transpose(0, 1).reshape(5, -1)]
    expected_vectors = []
    for k, mat in enumerate(mats):
        u, v = vectors[2 * k], vectors[2 * k + 1]
        if update:
            u, v = _plain_iteration(mat, v, 1e-12)
        expected_vectors += [u, v]
    for got, want in zip((u0, v0, u1, v1), expected_vectors):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)

    # Plain autograd formula: sigma = (u0^T W0 v0 + u1^T W1 v1) / 2 with constant vectors.
    w0 = weight.reshape(4, -1)
    w1 = weight.transpose(0, 1).reshape(5, -1)
    eu0, ev0, eu1, ev1 = expected_vectors
    sigma = (eu0 @ w0 @ ev0 + eu1 @ w1 @ ev1) / 2
    expected = 1.5 * weight / sigma
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state[0], sigma.detach(), rtol=1e-12, atol=0)

    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(out, weight, grad)
    (g_plain,) = torch.autograd.grad(expected, weight, grad)
    torch.testing.assert_close(g_ref, g_plain, rtol=1e-10, atol=1e-12)
    g_closed = reference.bsn_backward(grad, weight.detach(), state, 1.5)
    torch.testing.assert_close(g_closed, g_plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,dim", [((7, 5), 0), ((4, 3, 2, 2), 1), ((3, 4, 5), -1), ((2, 3, 4, 5), 2)])
def test_sn_closed_form_backward_matches_autograd(shape, dim):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    u, v = functional.init_sn_vectors(weight.detach(), dim=dim)
    out, state = reference.sn_forward(weight, u, v, dim, 2, 1e-12, 0.7, True)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    (g_auto,) = torch.autograd.grad(out, weight, grad)
    g_closed = reference.sn_backward(grad, weight.detach(), state, dim, 0.7)
    torch.testing.assert_close(g_closed, g_auto, rtol=1e-10, atol=1e-12)

    # The plain formula: W / (u^T W_mat v) with the updated vectors, torch's matricization.
    perm = (dim % len(shape),) + tuple(d for d in range(len(shape)) if d != dim % len(shape))
    mat = weight.permute(perm).flatten(1)
    expected = 0.7 * weight / (u @ mat @ v)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)


def test_matricize_fold_roundtrip_and_layout():
    weight = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    for dim in range(4):
        mat = reference.matricize(weight, dim)
        perm = (dim,) + tuple(d for d in range(4) if d != dim)
        assert torch.equal(mat, weight.permute(perm).flatten(1))
        assert torch.equal(reference.fold(mat, weight.shape, dim), weight)
    # Design layout: W_mat(d)[m, p * R + r] = W[p, m, r].
    mat = reference.matricize(weight, 1)
    view = weight.reshape(2, 3, 20)
    assert mat[2, 1 * 20 + 7] == view[1, 2, 7]


def test_reference_zero_and_nan_rules():
    u, v = functional.init_sn_vectors(torch.ones(3, 4))
    u0, v0 = u.clone(), v.clone()
    weight = torch.zeros(3, 4, requires_grad=True)
    out, state = reference.sn_forward(weight, u, v, 0, 1, 1e-12, 2.0, True)
    assert torch.equal(out, torch.zeros(3, 4)) and state[0] == 0
    assert torch.equal(u, u0) and torch.equal(v, v0)  # rejected update
    (grad,) = torch.autograd.grad(out, weight, torch.ones(3, 4))
    assert torch.equal(grad, torch.full((3, 4), 2.0))

    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    out, state = reference.sn_forward(bad, u, v, 0, 1, 1e-12, 1.0, True)
    assert torch.isnan(state[0]) and torch.isnan(out).all()
    assert torch.equal(u, u0) and torch.equal(v, v0)
