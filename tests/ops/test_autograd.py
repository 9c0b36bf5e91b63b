"""Autograd of the fused ops: gradcheck and gradgradcheck (float64), double
backward through the backward ops, buffer versions, and the GAN pattern of two
training forwards before one backward."""

import pytest
import torch
from conftest import DEVICES, assert_close, random_unit, requires_ops
from op_inputs import make_weight, warm_vectors

import bsn_cuda
from bsn_cuda import _ops, reference


def _sn_function(vectors, dim, n_power_iterations, update, scale=1.3):
    # Clone the vectors so every evaluation starts from the same ones.
    def fn(w):
        u, v = (t.clone() for t in vectors)
        return _ops.sn_forward(w, u, v, dim, n_power_iterations, 1e-12, scale, update)[0]

    return fn


def _bsn_function(vectors, n_power_iterations, update, scale=1.3):
    def fn(w):
        return _ops.bsn_forward(w, *[t.clone() for t in vectors], n_power_iterations, 1e-12, scale, update)[0]

    return fn


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck_eval(device):
    """In eval mode sigma = u^T W_mat v exactly, so first and second derivatives are exact."""
    gen = torch.Generator().manual_seed(10)
    for shape, dim in [((5, 4), 0), ((4, 3, 2, 2), 1), ((3, 2, 2, 3), -1)]:
        weight = make_weight(shape, torch.float64, device, gen).requires_grad_()
        fn = _sn_function(warm_vectors(weight, (dim % len(shape),), gen), dim, 1, False)
        assert torch.autograd.gradcheck(fn, (weight,))
        assert torch.autograd.gradgradcheck(fn, (weight,))
    for shape in [(4, 3, 2), (3, 2, 2, 2)]:
        weight = make_weight(shape, torch.float64, device, gen).requires_grad_()
        fn = _bsn_function(warm_vectors(weight, (0, 1), gen), 1, False)
        assert torch.autograd.gradcheck(fn, (weight,))
        assert torch.autograd.gradgradcheck(fn, (weight,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_training_with_converged_vectors(device):
    """With u, v held constant the gradient is exact at a fixed point of the power
    iteration, so gradcheck of the training forward passes once the vectors converged."""
    gen = torch.Generator().manual_seed(11)
    weight = make_weight((5, 4, 3), torch.float64, device, gen).requires_grad_()
    vectors = warm_vectors(weight, (1,), gen, iterations=2000)
    assert torch.autograd.gradcheck(_sn_function(vectors, 1, 1, True), (weight,))
    vectors = warm_vectors(weight, (0, 1), gen, iterations=2000)
    assert torch.autograd.gradcheck(_bsn_function(vectors, 2, True), (weight,))


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_of_backward_ops_matches_reference(device):
    """Second derivatives through the backward ops' autograd formula vs full autograd of the reference."""
    gen = torch.Generator().manual_seed(12)
    weight = make_weight((4, 3, 3), torch.float64, device, gen).requires_grad_()
    grad = make_weight((4, 3, 3), torch.float64, device, gen).requires_grad_()
    probe = make_weight((4, 3, 3), torch.float64, device, gen)
    for fn_op, fn_ref in [
        (torch.ops.bsn_cuda.sn_forward, reference.sn_forward),
        (torch.ops.bsn_cuda.bsn_forward, reference.bsn_forward),
    ]:
        grads = []
        for fn in (fn_op, fn_ref):
            if fn_op is torch.ops.bsn_cuda.sn_forward:
                out, _ = fn(weight, *warm_vectors(weight, (1,), torch.Generator().manual_seed(0)), 1, 1, 1e-12, 2.0, True)
            else:
                out, _ = fn(weight, *warm_vectors(weight, (0, 1), torch.Generator().manual_seed(0)), 1, 1e-12, 2.0, True)
            (g,) = torch.autograd.grad(out, weight, grad, create_graph=True)
            grads.append(torch.autograd.grad((g * probe).sum(), (weight, grad)))
        for a, e in zip(*grads):
            assert_close(a, e, torch.float64, "double backward")


@pytest.mark.parametrize("device", DEVICES)
def test_update_bumps_buffer_versions_and_rejects_grad_buffers(device):
    weight = torch.randn(4, 3, device=device, requires_grad=True)
    u, v = random_unit(4, torch.float32, device), random_unit(3, torch.float32, device)
    versions = (u._version, v._version)
    _ops.sn_forward(weight, u, v, 0, 1, 1e-12, 1.0, True)
    assert u._version > versions[0] and v._version > versions[1]
    if bsn_cuda.HAS_EXTENSION:
        with pytest.raises(RuntimeError, match="expected u not to require grad"):
            torch.ops.bsn_cuda.sn_forward(weight, u.clone().requires_grad_(), v, 0, 1, 1e-12, 1.0, True)


@pytest.mark.parametrize("device", DEVICES)
def test_output_of_two_forwards_can_both_be_backpropagated(device):
    """GAN pattern: two training forwards on the same buffers, one backward (torch clones u/v for this)."""
    weight = torch.randn(6, 5, 3, device=device, requires_grad=True)
    u, v = random_unit(6, torch.float32, device), random_unit(15, torch.float32, device)
    out1, _ = _ops.sn_forward(weight, u, v, 0, 1, 1e-12, 1.0, True)
    out2, _ = _ops.sn_forward(weight, u, v, 0, 1, 1e-12, 1.0, True)
    (out1.sum() - 2 * out2.sum()).backward()
    assert torch.isfinite(weight.grad).all()
