"""The fused ops (torch.ops.bsn_cuda.*) against the reference, plus their contract.

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
from conftest import DEVICES, assert_close, random_unit, requires_ops

import bsn_cuda
from bsn_cuda import _ops, reference

LOW_PRECISION = (torch.float16, torch.bfloat16)

# (shape, dim). Odd sizes, degenerate rows/cols, all dims, and sizes large
# enough that the CPU kernels split the work into several chunks.
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
    ((4099, 20), 1),
    ((3, 40000), -1),
]
BSN_CASES = [(1, 1, 3), (4, 3, 3, 3), (6, 5, 2), (3, 7, 3, 3), (5, 4, 1, 1), (2, 3, 4, 5, 3), (16, 8, 5, 5), (128, 64, 3, 3)]
QUICK_SN_CASES = [((17, 33), 0), ((4, 3, 3, 3), 1), ((3, 4, 5, 6), 2), ((128, 64, 3, 3), 0)]
QUICK_BSN_CASES = [(4, 3, 3, 3), (6, 5, 2), (128, 64, 3, 3)]


def _warm_vectors(weight, dims, generator, iterations=5):
    """Unit vectors a few iterations into the power method (so sigma is near the
    true spectral norm, as in training), rounded to the weight dtype."""
    vectors = []
    w = weight.detach().double().cpu()
    for d in dims:
        m = w.shape[d]
        u = random_unit(m, torch.float64, "cpu", generator)
        v = random_unit(w.numel() // m, torch.float64, "cpu", generator)
        reference.sn_forward(w, u, v, d, iterations, 1e-12, 1.0, True)
        vectors += [u.to(weight.device, weight.dtype), v.to(weight.device, weight.dtype)]
    return vectors


def _make_weight(shape, dtype, device, generator, layout="contiguous"):
    """A weight with the given shape and memory layout (all layouts have the same values)."""
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    if layout == "contiguous":
        w = base.to(device, dtype)
    elif layout == "transposed":  # last two dims swapped in memory
        w = base.transpose(-1, -2).contiguous().to(device, dtype).transpose(-1, -2)
    elif layout == "sliced":  # every other element of a wider tensor along the last dim
        wide = torch.randn(shape[:-1] + (2 * shape[-1],), generator=generator, dtype=torch.float64)
        wide[..., ::2] = base
        w = wide.to(device, dtype)[..., ::2]
    elif layout == "channels_last":
        w = base.to(device, dtype).to(memory_format=torch.channels_last)
    else:
        raise AssertionError(layout)
    torch.testing.assert_close(w.double().cpu(), base.to(dtype).double(), rtol=0, atol=0)
    return w


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
    weight = _make_weight(shape, dtype, device, gen)
    vectors = _warm_vectors(weight, (dim % len(shape),), gen)
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
    weight = _make_weight(shape, dtype, device, gen)
    vectors = _warm_vectors(weight, (0, 1), gen)
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
        weight = _make_weight(shape, dtype, device, gen, layout)
        assert not weight.is_contiguous()
        vectors = _warm_vectors(weight, (dim % 4,), gen)
        grad = torch.randn(shape, generator=grad_gen, dtype=torch.float64).to(device, dtype)
        op, ref = _sn_both(weight, vectors, dim, 2, 1.5, True, grad)
        _compare(op, ref, dtype, ("out", "state", "u", "v", "grad"), grad, 1.5)
        # Same result as the contiguous copy of the weight, bit for bit.
        contiguous, _ = _sn_both(weight.contiguous(), vectors, dim, 2, 1.5, True, grad)
        for a, b in zip(op, contiguous):
            assert torch.equal(a, b)

        vectors = _warm_vectors(weight, (0, 1), gen)
        op, ref = _bsn_both(weight, vectors, 2, 1.5, True, grad)
        _compare(op, ref, dtype, ("out", "state", "u0", "v0", "u1", "v1", "grad"), grad, 1.5)

    # A non-contiguous gradient gives the same weight gradient as its contiguous copy.
    weight = _make_weight((8, 6, 3, 5), dtype, device, gen)
    vectors = _warm_vectors(weight, (0,), gen)
    _, state = torch.ops.bsn_cuda.sn_forward(weight, *[t.clone() for t in vectors], 0, 1, 1e-12, 1.0, True)
    grad = _make_weight((8, 6, 3, 5), dtype, device, gen, layout)
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
        weight = _make_weight(shape, dtype, device, gen)
        vectors = _warm_vectors(weight, (dim % len(shape),), gen)
        _, state = torch.ops.bsn_cuda.sn_forward(weight, *vectors, dim, 1, 1e-12, scale, True)
        grad = _make_weight(shape, dtype, device, gen)
        assert_close(
            torch.ops.bsn_cuda.sn_backward(grad, weight, state, dim, scale),
            reference.sn_backward(grad, weight, state, dim, scale),
            dtype,
            f"sn_backward {shape} dim={dim}",
        )
    for shape, scale in itertools.product(QUICK_BSN_CASES, (1.0, 3.0)):
        weight = _make_weight(shape, dtype, device, gen)
        vectors = _warm_vectors(weight, (0, 1), gen)
        _, state = torch.ops.bsn_cuda.bsn_forward(weight, *vectors, 1, 1e-12, scale, True)
        grad = _make_weight(shape, dtype, device, gen)
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
    weight = _make_weight((6, 4, 3, 3), torch.float64, device, gen).requires_grad_()
    grad = _make_weight((6, 4, 3, 3), torch.float64, device, gen)
    for dim in (0, 1, 3):
        vectors = _warm_vectors(weight, (dim,), gen)
        u, v = (t.clone() for t in vectors)
        out, state = torch.ops.bsn_cuda.sn_forward(weight, u, v, dim, 2, 1e-12, 1.7, True)
        (g_op,) = torch.autograd.grad(out, weight, grad)
        g_closed = reference.sn_backward(grad, weight.detach(), state, dim, 1.7)
        u, v = (t.clone() for t in vectors)
        out_ref, _ = reference.sn_forward(weight, u, v, dim, 2, 1e-12, 1.7, True)
        (g_auto,) = torch.autograd.grad(out_ref, weight, grad)
        assert_close(g_op, g_closed, torch.float64, "op vs closed form")
        assert_close(g_op, g_auto, torch.float64, "op vs autograd")


# ---------------------------------------------------------------------------
# Autograd checks (float64)


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
        weight = _make_weight(shape, torch.float64, device, gen).requires_grad_()
        fn = _sn_function(_warm_vectors(weight, (dim % len(shape),), gen), dim, 1, False)
        assert torch.autograd.gradcheck(fn, (weight,))
        assert torch.autograd.gradgradcheck(fn, (weight,))
    for shape in [(4, 3, 2), (3, 2, 2, 2)]:
        weight = _make_weight(shape, torch.float64, device, gen).requires_grad_()
        fn = _bsn_function(_warm_vectors(weight, (0, 1), gen), 1, False)
        assert torch.autograd.gradcheck(fn, (weight,))
        assert torch.autograd.gradgradcheck(fn, (weight,))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_training_with_converged_vectors(device):
    """With u, v held constant the gradient is exact at a fixed point of the power
    iteration, so gradcheck of the training forward passes once the vectors converged."""
    gen = torch.Generator().manual_seed(11)
    weight = _make_weight((5, 4, 3), torch.float64, device, gen).requires_grad_()
    vectors = _warm_vectors(weight, (1,), gen, iterations=2000)
    assert torch.autograd.gradcheck(_sn_function(vectors, 1, 1, True), (weight,))
    vectors = _warm_vectors(weight, (0, 1), gen, iterations=2000)
    assert torch.autograd.gradcheck(_bsn_function(vectors, 2, True), (weight,))


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_of_backward_ops_matches_reference(device):
    """Second derivatives through the backward ops' autograd formula vs full autograd of the reference."""
    gen = torch.Generator().manual_seed(12)
    weight = _make_weight((4, 3, 3), torch.float64, device, gen).requires_grad_()
    grad = _make_weight((4, 3, 3), torch.float64, device, gen).requires_grad_()
    probe = _make_weight((4, 3, 3), torch.float64, device, gen)
    for fn_op, fn_ref in [
        (torch.ops.bsn_cuda.sn_forward, reference.sn_forward),
        (torch.ops.bsn_cuda.bsn_forward, reference.bsn_forward),
    ]:
        grads = []
        for fn in (fn_op, fn_ref):
            if fn_op is torch.ops.bsn_cuda.sn_forward:
                out, _ = fn(weight, *_warm_vectors(weight, (1,), torch.Generator().manual_seed(0)), 1, 1, 1e-12, 2.0, True)
            else:
                out, _ = fn(weight, *_warm_vectors(weight, (0, 1), torch.Generator().manual_seed(0)), 1, 1e-12, 2.0, True)
            (g,) = torch.autograd.grad(out, weight, grad, create_graph=True)
            grads.append(torch.autograd.grad((g * probe).sum(), (weight, grad)))
        for a, e in zip(*grads):
            assert_close(a, e, torch.float64, "double backward")


# ---------------------------------------------------------------------------
# opcheck


def _opcheck_cases(device):
    gen = torch.Generator().manual_seed(13)
    cases = []
    for dtype in (torch.float32, torch.float64):
        weight = _make_weight((6, 4, 3), dtype, device, gen).requires_grad_()
        for dim, update in [(0, True), (1, False), (-1, True)]:
            u, v = _warm_vectors(weight, (dim % 3,), gen)
            cases.append((torch.ops.bsn_cuda.sn_forward.default, (weight, u, v, dim, 2, 1e-12, 1.5, update)))
            _, state = torch.ops.bsn_cuda.sn_forward(weight.detach(), u.clone(), v.clone(), dim, 1, 1e-12, 1.5, True)
            grad = _make_weight((6, 4, 3), dtype, device, gen).requires_grad_()
            cases.append((torch.ops.bsn_cuda.sn_backward.default, (grad, weight, state, dim, 1.5)))
        for update in (True, False):
            vectors = _warm_vectors(weight, (0, 1), gen)
            cases.append((torch.ops.bsn_cuda.bsn_forward.default, (weight, *vectors, 2, 1e-12, 0.5, update)))
            _, state = torch.ops.bsn_cuda.bsn_forward(weight.detach(), *[t.clone() for t in vectors], 1, 1e-12, 0.5, True)
            grad = _make_weight((6, 4, 3), dtype, device, gen).requires_grad_()
            cases.append((torch.ops.bsn_cuda.bsn_backward.default, (grad, weight, state, 0.5)))
    return cases


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    names = set()
    for op, args in _opcheck_cases(device):
        result = torch.library.opcheck(op, args)
        assert set(result) == {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}
        assert all(status == "SUCCESS" for status in result.values()), (op, result)
        names.add(op.name())
    assert names == {f"bsn_cuda::{n}" for n in ("sn_forward", "sn_backward", "bsn_forward", "bsn_backward")}


@requires_ops
def test_meta_tensors_use_fake_kernels():
    weight = torch.empty(6, 4, 3, device="meta")
    out, state = torch.ops.bsn_cuda.sn_forward(weight, torch.empty(4, device="meta"), torch.empty(18, device="meta"), 1, 1, 1e-12, 1.0, True)
    assert out.shape == weight.shape and out.device.type == "meta" and out.is_contiguous()
    assert state.shape == (1 + 4 + 18,) and state.dtype == torch.float32
    vectors = [torch.empty(n, dtype=torch.float64, device="meta") for n in (6, 12, 4, 18)]
    out, state = torch.ops.bsn_cuda.bsn_forward(weight.double(), *vectors, 1, 1e-12, 1.0, True)
    assert state.shape == (3 + 6 + 12 + 4 + 18,) and state.dtype == torch.float64


@requires_ops
def test_entry_points_use_the_ops():
    weight = torch.randn(4, 3, requires_grad=True)
    out, _ = _ops.sn_forward(weight, random_unit(4, torch.float32, "cpu"), random_unit(3, torch.float32, "cpu"), 0, 1, 1e-12, 1.0, True)
    assert out.grad_fn.name().endswith("SNForward>")  # the C++ autograd node of csrc/autograd.cpp
    assert "cpu" in _ops.OP_DEVICES


# ---------------------------------------------------------------------------
# Edge cases and contract


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_zero_weight_gives_scaled_weight_and_finite_grads(dtype, device):
    gen = torch.Generator().manual_seed(14)
    for shape, fn, dims in [((5, 4, 3), "sn", (1,)), ((5, 4, 3), "bsn", (0, 1))]:
        weight = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        vectors = _warm_vectors(torch.randn(shape, dtype=dtype, device=device), dims, gen)
        before = [t.clone() for t in vectors]
        for update in (True, False):
            if fn == "sn":
                out, state = _ops.sn_forward(weight, *vectors, 1, 2, 1e-12, 3.0, update)
            else:
                out, state = _ops.bsn_forward(weight, *vectors, 2, 1e-12, 3.0, update)
            assert torch.equal(out, torch.zeros_like(out))
            assert state[0] == 0
            grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
            (g,) = torch.autograd.grad(out, weight, grad)
            assert torch.isfinite(g).all()
            assert_close(g, 3.0 * grad, dtype, "zero-weight gradient")
            for a, b in zip(vectors, before):  # W v == 0: the update is rejected
                assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weight_keeps_buffers(bad_value, device):
    gen = torch.Generator().manual_seed(15)
    weight = torch.randn(6, 5, 2, generator=gen).to(device)
    weight[2, 3, 1] = bad_value
    for fn, dims in [("sn", (0,)), ("bsn", (0, 1))]:
        vectors = _warm_vectors(torch.randn(6, 5, 2, device=device), dims, gen)
        before = [t.clone() for t in vectors]
        if fn == "sn":
            out, state = _ops.sn_forward(weight, *vectors, 0, 3, 1e-12, 1.0, True)
        else:
            out, state = _ops.bsn_forward(weight, *vectors, 3, 1e-12, 1.0, True)
        assert torch.isnan(state[0])
        assert not torch.isfinite(out).all()
        for a, b in zip(vectors, before):
            assert torch.equal(a, b)
        # A finite weight afterwards works normally with the kept vectors.
        finite = torch.randn(6, 5, 2, generator=gen).to(device)
        if fn == "sn":
            out, state = _ops.sn_forward(finite, *vectors, 0, 1, 1e-12, 1.0, True)
        else:
            out, state = _ops.bsn_forward(finite, *vectors, 1, 1e-12, 1.0, True)
        assert torch.isfinite(out).all() and torch.isfinite(state).all()


@requires_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_results_independent_of_thread_count(dtype):
    gen = torch.Generator().manual_seed(16)
    cases = [("sn", (300, 1000), 0), ("sn", (128, 64, 3, 3), 1), ("sn", (64, 32, 5, 5), 3), ("bsn", (128, 64, 3, 3), None)]
    previous = torch.get_num_threads()
    try:
        for kind, shape, dim in cases:
            weight = _make_weight(shape, dtype, "cpu", gen)
            grad = _make_weight(shape, dtype, "cpu", gen)
            dims = (dim,) if kind == "sn" else (0, 1)
            vectors = _warm_vectors(weight, dims, gen, iterations=1)
            results = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                w = weight.clone().requires_grad_()
                vecs = [t.clone() for t in vectors]
                if kind == "sn":
                    out, state = torch.ops.bsn_cuda.sn_forward(w, *vecs, dim, 3, 1e-12, 1.0, True)
                else:
                    out, state = torch.ops.bsn_cuda.bsn_forward(w, *vecs, 3, 1e-12, 1.0, True)
                (g,) = torch.autograd.grad(out, w, grad)
                results.append((out, state, g, *vecs))
            for a, b in zip(*results):
                assert torch.equal(a, b), f"{kind} {shape}: results differ between 1 and 2 threads"
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_calls_are_deterministic(device):
    gen = torch.Generator().manual_seed(17)
    weight = _make_weight((64, 32, 3, 3), torch.float32, device, gen)
    vectors = _warm_vectors(weight, (0, 1), gen)
    first = _ops.bsn_forward(weight, *[t.clone() for t in vectors], 2, 1e-12, 1.0, True)
    second = _ops.bsn_forward(weight, *[t.clone() for t in vectors], 2, 1e-12, 1.0, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


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


# ---------------------------------------------------------------------------
# Bad inputs: RuntimeError naming the argument, from the ops and the reference alike.

IMPLEMENTATIONS = [
    pytest.param("ops", marks=requires_ops),
    "reference",
]


def _impl(name):
    if name == "ops":
        return torch.ops.bsn_cuda.sn_forward, torch.ops.bsn_cuda.bsn_forward, torch.ops.bsn_cuda.sn_backward, torch.ops.bsn_cuda.bsn_backward
    return reference.sn_forward, reference.bsn_forward, reference.sn_backward, reference.bsn_backward


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bad_inputs_raise_naming_the_argument(impl):
    sn_fwd, bsn_fwd, sn_bwd, bsn_bwd = _impl(impl)
    w = torch.randn(4, 3, 2)
    u, v = random_unit(4, torch.float32, "cpu"), random_unit(6, torch.float32, "cpu")
    u1, v1 = random_unit(3, torch.float32, "cpu"), random_unit(8, torch.float32, "cpu")

    def sn(weight=w, u=u, v=v, dim=0, n=1, eps=1e-12, scale=1.0):
        return sn_fwd(weight, u, v, dim, n, eps, scale, True)

    cases = [
        (lambda: sn(weight=torch.ones(4, 3, 2, dtype=torch.int64)), r"weight of dtype float32, float64, float16 or bfloat16"),
        (lambda: sn(weight=torch.randn(4)), r"weight with at least 2 dimensions"),
        (lambda: sn(weight=torch.randn(0, 3)), r"non-empty weight"),
        (lambda: sn(u=random_unit(5, torch.float32, "cpu")), r"expected u to have 4 elements"),
        (lambda: sn(v=random_unit(7, torch.float32, "cpu")), r"expected v to have 6 elements"),
        (lambda: sn(u=u.double()), r"expected u to have the weight's dtype"),
        (lambda: sn(v=v.half()), r"expected v to have the weight's dtype"),
        (lambda: sn(u=u.reshape(2, 2)), r"expected u to be 1-D"),
        (lambda: sn(v=torch.randn(12)[::2]), r"expected v to be contiguous"),
        (lambda: sn(n=0), r"n_power_iterations >= 1"),
        (lambda: sn(n=-3), r"n_power_iterations >= 1"),
        (lambda: sn(dim=3), r"expected dim in \[-3, 2\]"),
        (lambda: sn(dim=-4), r"expected dim in \[-3, 2\]"),
        (lambda: sn(eps=0.0), r"expected eps > 0"),
        (lambda: sn(eps=-1e-12), r"expected eps > 0"),
        (lambda: sn(scale=0.0), r"expected scale > 0"),
        (lambda: sn(scale=-1.0), r"expected scale > 0"),
        (lambda: sn(scale=float("inf")), r"expected scale > 0 and finite"),
        (lambda: bsn_fwd(torch.randn(4, 3), u, u1, u1, u1, 1, 1e-12, 1.0, True), r"weight with at least 3 dimensions"),
        (lambda: bsn_fwd(w, u, v, u1, v[:5].clone(), 1, 1e-12, 1.0, True), r"expected v1 to have 8 elements"),
        (lambda: bsn_fwd(w, u, v, u1.double(), v1, 1, 1e-12, 1.0, True), r"expected u1 to have the weight's dtype"),
        (lambda: bsn_fwd(w, u1, v, u1, v1, 1, 1e-12, 1.0, True), r"expected u0 to have 4 elements"),
        (lambda: bsn_fwd(w, u, v, u1, v1, 0, 1e-12, 1.0, True), r"n_power_iterations >= 1"),
    ]
    _, sn_state = reference.sn_forward(w, u.clone(), v.clone(), 0, 1, 1e-12, 1.0, True)
    _, bsn_state = reference.bsn_forward(w, u.clone(), v.clone(), u1.clone(), v1.clone(), 1, 1e-12, 1.0, True)
    cases += [
        (lambda: sn_bwd(torch.randn(4, 3), w, sn_state, 0, 1.0), r"expected grad_out of the weight's shape"),
        (lambda: sn_bwd(w.double(), w, sn_state, 0, 1.0), r"expected grad_out of the weight's dtype"),
        (lambda: sn_bwd(w, w, sn_state[:-1], 0, 1.0), r"expected state to be 1-D with 11 elements"),
        (lambda: sn_bwd(w, w, sn_state.double(), 0, 1.0), r"expected state of dtype"),
        (lambda: sn_bwd(w, w, sn_state, 5, 1.0), r"expected dim in"),
        (lambda: sn_bwd(w, w, sn_state, 0, 0.0), r"expected scale > 0"),
        (lambda: bsn_bwd(w, w, sn_state, 1.0), r"expected state to be 1-D with"),
        (lambda: bsn_bwd(w, w, bsn_state, -2.0), r"expected scale > 0"),
    ]
    sn()  # the baseline arguments themselves are valid
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


# ---------------------------------------------------------------------------
# Without the extension


_FALLBACK_SCRIPT = r"""
import sys, warnings
sys.modules["bsn_cuda._C"] = None  # makes `from . import _C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import bsn_cuda
    import bsn_cuda.nn, bsn_cuda.functional, bsn_cuda._ops
import torch
ours = [w for w in caught if "bsn_cuda._C" in str(w.message)]
assert len(ours) == 1 and ours[0].category is RuntimeWarning, [str(w.message) for w in caught]
assert bsn_cuda.HAS_EXTENSION is False and bsn_cuda._ops.OP_DEVICES == frozenset()
layer = bsn_cuda.bidirectional_spectral_norm(torch.nn.Conv2d(3, 4, 3))
layer(torch.randn(1, 3, 5, 5)).sum().backward()
assert torch.isfinite(layer.parametrizations.weight.original.grad).all()
print("fallback ok")
"""


def test_import_without_extension_warns_once_and_runs_the_reference():
    import os
    import subprocess
    import sys

    from conftest import REPO_ROOT as root
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
