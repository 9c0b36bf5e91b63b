"""The fused ops (torch.ops.bsn_cuda.*) against the reference: outputs, state,
buffer updates and gradients, on every device and dtype.

Tolerances are relative to the largest magnitude of the expected tensor
(|actual - expected| <= tol * max|expected|): the ops and the reference share
the algorithm and the accumulation dtype, only the reduction order differs.
    float64  1e-10
    float32  1e-5
    float16  2e-3   (2 ulp of the largest element)
    bfloat16 1.6e-2 (2 ulp)
Buffers (u, v) of float16/bfloat16 are rounded from float32 values that may
differ in the last bits, so they get the same per-dtype tolerance.
"""

import itertools

import pytest
import torch
from conftest import DEVICES, assert_close, requires_ops
from op_inputs import make_weight, warm_vectors

from bsn_cuda import reference


SN_CASES = [
    ((1, 1), 0),
    ((3, 5), 0),
    ((5, 3), 1),
    ((17, 33), -1),
    ((1, 100), 0),
    ((100, 1), 0),
    ((64, 27), 0),
    ((4, 3, 3, 3), 0),
    ((4, 3, 3, 3), 1),
    ((4, 3, 3, 3), -1),
    ((6, 5, 1, 1), 0),
    ((7, 3, 5), 1),
    ((3, 4, 5, 6), 2),
    ((2, 3, 4, 3, 2), 3),
    ((128, 64, 3, 3), 0),
    ((128, 64, 3, 3), 1),
    ((300, 1000), 0),
    ((4099, 20), 0),  # tall and narrow: rows 16 at a time, two chunks, 3 rows left over
    # 2-D weights along dim 1 (the legacy flavour's v-first iteration runs as
    # these): rows of W summed in one pass, then dotted in a second, several chunks
    ((300, 1000), 1),
    ((4099, 20), 1),  # short rows: 16 at a time for t, 3 left over
    ((64, 27), 1),  # the legacy flavour's Conv2d(3, 64, 3)
    ((3, 40000), -1),
]


BSN_CASES = [(1, 1, 3), (4, 3, 3, 3), (6, 5, 2), (3, 7, 3, 3), (5, 4, 1, 1), (2, 3, 4, 5, 3), (16, 8, 5, 5), (128, 64, 3, 3)]


QUICK_SN_CASES = [((17, 33), 0), ((4, 3, 3, 3), 1), ((3, 4, 5, 6), 2), ((128, 64, 3, 3), 0)]


QUICK_BSN_CASES = [(4, 3, 3, 3), (6, 5, 2), (128, 64, 3, 3)]


def _sn_both(weight, vectors, dim, n_power_iterations, scale, update, grad):
    """Run op and reference on copies; returns their (out, state, u, v, grad_weight)."""
    results = []
    for fn in (torch.ops.bsn_cuda.sn_forward, reference.sn_forward):
        w = weight.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        u, v = (t.clone() for t in vectors)
        out, state = fn(w, u, v, dim, n_power_iterations, 1e-12, scale, update)
        (g,) = torch.autograd.grad(out, w, grad)
        results.append((out, state, u, v, g))
    return results


def _bsn_both(weight, vectors, n_power_iterations, scale, update, grad):
    results = []
    for fn in (torch.ops.bsn_cuda.bsn_forward, reference.bsn_forward):
        w = weight.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        vecs = [t.clone() for t in vectors]
        out, state = fn(w, *vecs, n_power_iterations, 1e-12, scale, update)
        (g,) = torch.autograd.grad(out, w, grad)
        results.append((out, state, *vecs, g))
    return results


def _compare(op_result, ref_result, dtype, names, grad_out, scale):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sigma = ref_result[1][0].abs().item()
    for name, a, e in zip(names, op_result, ref_result):
        assert a.dtype == e.dtype, name
        if name == "state":
            # sigma in the acc dtype; the vectors in the state are rounded buffer values.
            assert_close(a[:1], e[:1], acc, "sigma")
        magnitude = grad_out.abs().max().item() * scale / sigma if name == "grad" else 0.0
        assert_close(a, e, dtype, name, magnitude)
        if name == "out":
            assert a.is_contiguous()


# ---------------------------------------------------------------------------
# ops == reference


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", SN_CASES)
def test_sn_forward_backward_match_reference(shape, dim, dtype, device):
    gen = torch.Generator().manual_seed(hash((shape, dim)) % 2**31)
    weight = make_weight(shape, dtype, device, gen)
    vectors = warm_vectors(weight, (dim % len(shape),), gen)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    for n_power_iterations, update, scale in [(1, True, 1.0), (3, True, 2.5), (1, False, 0.5)]:
        op, ref = _sn_both(weight, vectors, dim, n_power_iterations, scale, update, grad)
        _compare(op, ref, dtype, ("out", "state", "u", "v", "grad"), grad, scale)
        if not update:
            assert torch.equal(op[2], vectors[0]) and torch.equal(op[3], vectors[1])


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", BSN_CASES)
def test_bsn_forward_backward_match_reference(shape, dtype, device):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    weight = make_weight(shape, dtype, device, gen)
    vectors = warm_vectors(weight, (0, 1), gen)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    for n_power_iterations, update, scale in [(1, True, 1.0), (3, True, 2.5), (1, False, 0.5)]:
        op, ref = _bsn_both(weight, vectors, n_power_iterations, scale, update, grad)
        _compare(op, ref, dtype, ("out", "state", "u0", "v0", "u1", "v1", "grad"), grad, scale)
        assert_close(op[1][1:3], ref[1][1:3], torch.float64 if dtype == torch.float64 else torch.float32, "sigmas")


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_weights(layout, dtype, device):
    gen = torch.Generator().manual_seed(5)
    grad_gen = torch.Generator().manual_seed(6)
    for shape, dim in [((8, 6, 3, 5), 0), ((8, 6, 3, 5), 1), ((8, 6, 3, 5), -1), ((33, 4, 7, 2), 2)]:
        weight = make_weight(shape, dtype, device, gen, layout)
        assert not weight.is_contiguous()
        vectors = warm_vectors(weight, (dim % 4,), gen)
        grad = torch.randn(shape, generator=grad_gen, dtype=torch.float64).to(device, dtype)
        op, ref = _sn_both(weight, vectors, dim, 2, 1.5, True, grad)
        _compare(op, ref, dtype, ("out", "state", "u", "v", "grad"), grad, 1.5)
        # Same result as the contiguous copy of the weight, bit for bit.
        contiguous, _ = _sn_both(weight.contiguous(), vectors, dim, 2, 1.5, True, grad)
        for a, b in zip(op, contiguous):
            assert torch.equal(a, b)

        vectors = warm_vectors(weight, (0, 1), gen)
        op, ref = _bsn_both(weight, vectors, 2, 1.5, True, grad)
        _compare(op, ref, dtype, ("out", "state", "u0", "v0", "u1", "v1", "grad"), grad, 1.5)

    # A non-contiguous gradient gives the same weight gradient as its contiguous copy.
    weight = make_weight((8, 6, 3, 5), dtype, device, gen)
    vectors = warm_vectors(weight, (0,), gen)
    _, state = torch.ops.bsn_cuda.sn_forward(weight, *[t.clone() for t in vectors], 0, 1, 1e-12, 1.0, True)
    grad = make_weight((8, 6, 3, 5), dtype, device, gen, layout)
    assert torch.equal(
        torch.ops.bsn_cuda.sn_backward(grad, weight, state, 0, 1.0),
        torch.ops.bsn_cuda.sn_backward(grad.contiguous(), weight, state, 0, 1.0),
    )


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_backward_ops_match_reference_backward(dtype, device):
    """Same state in, same gradient out: checks the backward kernels on their own."""
    gen = torch.Generator().manual_seed(8)
    for (shape, dim), scale in itertools.product(QUICK_SN_CASES, (1.0, 3.0)):
        weight = make_weight(shape, dtype, device, gen)
        vectors = warm_vectors(weight, (dim % len(shape),), gen)
        _, state = torch.ops.bsn_cuda.sn_forward(weight, *vectors, dim, 1, 1e-12, scale, True)
        grad = make_weight(shape, dtype, device, gen)
        assert_close(
            torch.ops.bsn_cuda.sn_backward(grad, weight, state, dim, scale),
            reference.sn_backward(grad, weight, state, dim, scale),
            dtype,
            f"sn_backward {shape} dim={dim}",
        )
    for shape, scale in itertools.product(QUICK_BSN_CASES, (1.0, 3.0)):
        weight = make_weight(shape, dtype, device, gen)
        vectors = warm_vectors(weight, (0, 1), gen)
        _, state = torch.ops.bsn_cuda.bsn_forward(weight, *vectors, 1, 1e-12, scale, True)
        grad = make_weight(shape, dtype, device, gen)
        assert_close(
            torch.ops.bsn_cuda.bsn_backward(grad, weight, state, scale),
            reference.bsn_backward(grad, weight, state, scale),
            dtype,
            f"bsn_backward {shape}",
        )


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_op_gradient_equals_closed_form_reference_backward(device):
    """Backward of the op == reference closed form with the op's own state == autograd through the reference."""
    gen = torch.Generator().manual_seed(9)
    weight = make_weight((6, 4, 3, 3), torch.float64, device, gen).requires_grad_()
    grad = make_weight((6, 4, 3, 3), torch.float64, device, gen)
    for dim in (0, 1, 3):
        vectors = warm_vectors(weight, (dim,), gen)
        u, v = (t.clone() for t in vectors)
        out, state = torch.ops.bsn_cuda.sn_forward(weight, u, v, dim, 2, 1e-12, 1.7, True)
        (g_op,) = torch.autograd.grad(out, weight, grad)
        g_closed = reference.sn_backward(grad, weight.detach(), state, dim, 1.7)
        u, v = (t.clone() for t in vectors)
        out_ref, _ = reference.sn_forward(weight, u, v, dim, 2, 1e-12, 1.7, True)
        (g_auto,) = torch.autograd.grad(out_ref, weight, grad)
        assert_close(g_op, g_closed, torch.float64, "op vs closed form")
        assert_close(g_op, g_auto, torch.float64, "op vs autograd")
