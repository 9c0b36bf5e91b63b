"""The variant arguments of the ops (docs/design.md, Variants): soft bound
(``coeff``), learnable scale (``gamma``), track-only. The fused ops against
the reference, opcheck, float64 gradcheck / gradgradcheck, the tie rule and
the contract (C++, fakes and reference refuse the same inputs alike)."""

import re

import pytest
import torch
from conftest import DEVICES, assert_close, requires_ops
from op_inputs import make_weight, warm_vectors

from bsn_cuda import _contract, _ops, reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (kind, shape, dim): SN along dim 0 and 1, BSN.
CASES = [("sn", (12, 7), 0), ("sn", (6, 4, 3, 3), 1), ("bsn", (6, 4, 3, 3), None), ("bsn", (5, 3, 2), None)]
# coeff 0.5 projects (sigma is about 3-6 for these weights), 50 does not.
VARIANTS = [(0.5, None), (50.0, None), (0.0, 1.7), (0.5, 0.8), (50.0, 2.5)]


def _vectors(kind, weight, dim, gen):
    return warm_vectors(weight, (dim,) if kind == "sn" else (0, 1), gen)


def _forward(fn, kind, weight, vectors, dim, update, coeff, gamma, track_only=False, scale=1.3):
    if kind == "sn":
        return fn(weight, *vectors, dim, 2, 1e-12, scale, update, coeff, gamma, track_only)
    return fn(weight, *vectors, 2, 1e-12, scale, update, coeff, gamma, track_only)


def _backward(fn, kind, grad, weight, state, dim, coeff, gamma, scale=1.3):
    if kind == "sn":
        return fn(grad, weight, state, dim, scale, coeff, gamma)
    return fn(grad, weight, state, scale, coeff, gamma)


def _ops_of(kind):
    if kind == "sn":
        return torch.ops.bsn_cuda.sn_forward, torch.ops.bsn_cuda.sn_backward
    return torch.ops.bsn_cuda.bsn_forward, torch.ops.bsn_cuda.bsn_backward


def _ref_of(kind):
    if kind == "sn":
        return reference.sn_forward, reference.sn_backward
    return reference.bsn_forward, reference.bsn_backward


@requires_ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,shape,dim", CASES)
@pytest.mark.parametrize("coeff,gamma_value", VARIANTS)
@pytest.mark.parametrize("update", [True, False])
def test_ops_match_reference(device, dtype, kind, shape, dim, coeff, gamma_value, update):
    gen = torch.Generator().manual_seed(3)
    weight = make_weight(shape, dtype, device, gen)
    vectors = _vectors(kind, weight, dim, gen)
    acc = _contract.acc_dtype(dtype)
    gamma = None if gamma_value is None else torch.tensor(gamma_value, dtype=acc, device=device)
    fwd, bwd = _ops_of(kind)
    rfwd, rbwd = _ref_of(kind)
    mine = [t.clone() for t in vectors]
    ref = [t.clone() for t in vectors]
    out, state = _forward(fwd, kind, weight, mine, dim, update, coeff, gamma)
    out_r, state_r = _forward(rfwd, kind, weight, ref, dim, update, coeff, gamma)
    assert_close(state, state_r, dtype, "state", factor=4)
    for a, b in zip(mine, ref):
        assert_close(a, b, dtype, "vectors", factor=4)
    assert_close(out, out_r, dtype, "out", factor=4)
    grad = make_weight(shape, dtype, device, gen)
    dw = _backward(bwd, kind, grad, weight, state, dim, coeff, gamma)
    dw_r = _backward(rbwd, kind, grad, weight, state, dim, coeff, gamma)
    assert_close(dw, dw_r, dtype, "grad_weight", factor=8, magnitude=(grad.double().abs().max() * 3).item())


@requires_ops
@pytest.mark.parametrize("kind,shape,dim", CASES)
def test_track_only_iterates_as_sn_and_writes_no_output(kind, shape, dim):
    gen = torch.Generator().manual_seed(5)
    weight = make_weight(shape, torch.float32, "cpu", gen)
    vectors = _vectors(kind, weight, dim, gen)
    fwd, _ = _ops_of(kind)
    tracked = [t.clone() for t in vectors]
    plain = [t.clone() for t in vectors]
    out, state = _forward(fwd, kind, weight, tracked, dim, True, 0.0, None, track_only=True)
    _, state_plain = _forward(fwd, kind, weight, plain, dim, True, 0.0, None)
    assert out.shape == (0,) and out.dtype == weight.dtype
    assert torch.equal(state, state_plain)
    for a, b in zip(tracked, plain):
        assert torch.equal(a, b)


@requires_ops
@pytest.mark.parametrize("kind,shape,dim", CASES[:3])
def test_opcheck_variants(kind, shape, dim):
    gen = torch.Generator().manual_seed(7)
    fwd, bwd = _ops_of(kind)
    for dtype in (torch.float32, torch.float64):
        weight = make_weight(shape, dtype, "cpu", gen).requires_grad_()
        vectors = _vectors(kind, weight, dim, gen)
        gamma = torch.tensor(1.5, dtype=dtype, requires_grad=True)
        for coeff, g, track in [(0.5, None, False), (0.0, gamma, False), (0.5, gamma, False), (0.0, None, True)]:
            for update in (True, False):
                args = (weight, *vectors, dim) if kind == "sn" else (weight, *vectors)
                args = args + (2, 1e-12, 1.3, update, coeff, g, track)
                torch.library.opcheck(fwd.default, args)
        _, state = _forward(fwd, kind, weight.detach(), [t.clone() for t in vectors], dim, True, 0.0, None)
        grad = make_weight(shape, dtype, "cpu", gen).requires_grad_()
        for coeff, g in [(0.5, None), (0.0, gamma), (50.0, gamma)]:
            args = (grad, weight, state, dim) if kind == "sn" else (grad, weight, state)
            torch.library.opcheck(bwd.default, args + (1.3, coeff, g))


def _entry(kind, dim, vectors, update, coeff, track_only=False):
    """The package's entry point (fast path -> the op with its C++ autograd) as a function of (W, gamma)."""

    def f(weight, gamma):
        vecs = [t.clone() for t in vectors]  # the same vectors for every gradcheck evaluation
        if kind == "sn":
            return _ops.sn_forward(weight, *vecs, dim, 1, 1e-12, 1.3, update, None, coeff, gamma, track_only)[0]
        return _ops.bsn_forward(weight, *vecs, 1, 1e-12, 1.3, update, None, coeff, gamma, track_only)[0]

    return f


@requires_ops
@pytest.mark.parametrize("kind,shape,dim", CASES)
@pytest.mark.parametrize("coeff,gamma_value", VARIANTS)
def test_gradcheck_float64(kind, shape, dim, coeff, gamma_value):
    gen = torch.Generator().manual_seed(11)
    weight = make_weight(shape, torch.float64, "cpu", gen).requires_grad_()
    vectors = _vectors(kind, weight, dim, gen)
    gamma = None if gamma_value is None else torch.tensor(gamma_value, dtype=torch.float64, requires_grad=True)
    # Eval (u, v fixed): the function of W the backward differentiates.
    f = _entry(kind, dim, vectors, False, coeff)
    inputs = (weight,) if gamma is None else (weight, gamma)

    def fn(w, *g):
        return f(w, g[0] if g else None)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@requires_ops
@pytest.mark.parametrize("kind,shape,dim", CASES)
def test_tie_rule_takes_the_identity_branch(kind, shape, dim):
    """At sigma == coeff the forward is W * scale and the gradient scale * G exactly (docs/design.md)."""
    gen = torch.Generator().manual_seed(13)
    weight = make_weight(shape, torch.float64, "cpu", gen)
    vectors = _vectors(kind, weight, dim, gen)
    fwd, bwd = _ops_of(kind)
    _, state = _forward(fwd, kind, weight, vectors, dim, False, 0.0, None)
    coeff = float(state[0])
    out, state = _forward(fwd, kind, weight, vectors, dim, False, coeff, None)
    assert float(state[0]) == coeff
    assert torch.equal(out, weight * 1.3)
    grad = make_weight(shape, torch.float64, "cpu", gen)
    assert torch.equal(_backward(bwd, kind, grad, weight, state, dim, coeff, None), grad * 1.3)
    # Just above the tie: the projecting branch (a different gradient).
    below = torch.nextafter(torch.tensor(coeff, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)).item()
    projected = _backward(bwd, kind, grad, weight, state, dim, below, None)
    assert not torch.allclose(projected, grad * 1.3 * below / coeff)


@requires_ops
def test_soft_bound_of_a_nan_weight_is_nan():
    weight = torch.randn(5, 4)
    weight[1, 2] = float("nan")
    u = torch.nn.functional.normalize(torch.randn(5), dim=0)
    v = torch.nn.functional.normalize(torch.randn(4), dim=0)
    out, state = torch.ops.bsn_cuda.sn_forward(weight, u, v, 0, 1, 1e-12, 1.0, True, 3.0, None, False)
    assert torch.isnan(state[0]) and torch.isnan(out).all()


def _bad_variant_calls(device):
    weight = torch.randn(6, 4, 3, device=device)
    u = torch.nn.functional.normalize(torch.randn(6, device=device), dim=0)
    v = torch.nn.functional.normalize(torch.randn(12, device=device), dim=0)
    good_gamma = torch.tensor(1.0, device=device)
    return [
        ((weight, u, v, 0, 1, 1e-12, 1.0, True, -1.0, None, False), "expected coeff >= 0 and finite, got -1"),
        ((weight, u, v, 0, 1, 1e-12, 1.0, True, float("nan"), None, False), "expected coeff >= 0 and finite, got nan"),
        ((weight, u, v, 0, 1, 1e-12, 1.0, True, 0.0, torch.ones(2, device=device), False),
         "expected gamma to have 1 element, got shape [2]"),
        ((weight, u, v, 0, 1, 1e-12, 1.0, True, 0.0, torch.tensor(1.0, dtype=torch.float64, device=device), False),
         "expected gamma of dtype torch.float32 (the accumulation dtype), got torch.float64"),
        ((weight, u, v, 0, 1, 1e-12, 1.0, True, 0.5, None, True),
         "expected coeff=0 and gamma=None with track_only=True, got coeff=0.5, gamma=None"),
        ((weight, u, v, 0, 1, 1e-12, 1.0, True, 0.0, good_gamma, True),
         "expected coeff=0 and gamma=None with track_only=True, got coeff=0, gamma=a tensor"),
    ]


@requires_ops
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_variant_arguments_same_words(device):
    for args, words in _bad_variant_calls(device):
        with pytest.raises(RuntimeError, match="bsn_cuda::sn_forward: " + re.escape(words)):
            torch.ops.bsn_cuda.sn_forward(*args)
        if device == "cpu":
            with pytest.raises(RuntimeError, match=re.escape(words)):
                reference.sn_forward(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])


@requires_ops
def test_gamma_on_another_device_is_refused():
    weight = torch.randn(4, 3)
    state = torch.zeros(1 + 4 + 3)
    words = "bsn_cuda::sn_backward: expected gamma on the weight's device cpu, got meta"
    with pytest.raises(RuntimeError, match=words):
        torch.ops.bsn_cuda.sn_backward(weight, weight, state, 0, 1.0, 0.0, torch.tensor(1.0, device="meta"))
