"""Special weights: all-zero, non-finite (NaN, Inf) and tiny float16 ones.

The rules (docs/design.md): a zero weight gives scale * W = 0 with finite
gradients and u/v kept (torch: NaN); a non-finite weight gives a non-finite
output, as in torch, but keeps u/v, so training resumes exactly once the
weight is finite again; float16 norms are accumulated in float32, so tiny
weights do not underflow to 0/0. Checked on the ops and on modules in training.
"""

import copy

import pytest
import torch
from conftest import (
    DEVICES,
    VECTOR_NAMES,
    assert_close,
    assert_equal_dicts,
    build_discriminator,
    images,
    power_vectors,
    sgd_step,
    snapshot,
)
from op_inputs import warm_vectors
from torch import nn

import bsn_cuda
from bsn_cuda import _ops, reference


# ---------------------------------------------------------------------------
# The ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_zero_weight_gives_scaled_weight_and_finite_grads(dtype, device):
    gen = torch.Generator().manual_seed(14)
    for shape, fn, dims in [((5, 4, 3), "sn", (1,)), ((5, 4, 3), "bsn", (0, 1))]:
        weight = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
        vectors = warm_vectors(torch.randn(shape, dtype=dtype, device=device), dims, gen)
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
        vectors = warm_vectors(torch.randn(6, 5, 2, device=device), dims, gen)
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


# ---------------------------------------------------------------------------
# Modules


def test_zero_weight_module_gives_scaled_zero_not_nan():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.zero_()
    bsn_cuda.spectral_norm(layer, scale=2.0)
    out = layer(torch.randn(2, 4))
    assert torch.isfinite(out).all() and torch.equal(layer.weight, torch.zeros(3, 4))
    assert bsn_cuda.get_sigma(layer) == 0
    out.sum().backward()
    assert torch.isfinite(layer.parametrizations.weight.original.grad).all()


@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_zero_weight_gives_scaled_weight_and_recovers(kind):
    """Zero weight -> scale * W = 0 (torch: NaN) with u/v kept; a non-zero weight then trains normally."""
    layer = nn.Conv2d(3, 4, 3)
    apply = bsn_cuda.spectral_norm if kind == "sn" else bsn_cuda.bidirectional_spectral_norm
    apply(layer, scale=2.0)
    original = layer.parametrizations.weight.original
    saved = original.detach().clone()
    before = power_vectors(layer)
    with torch.no_grad():
        original.zero_()
    x = torch.randn(2, 3, 5, 5)
    out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.equal(layer.weight, torch.zeros_like(saved))
    assert bsn_cuda.get_sigma(layer) == 0
    assert_equal_dicts(power_vectors(layer), before, "vectors after a zero-weight forward")
    out.sum().backward()
    assert torch.isfinite(original.grad).all()
    with torch.no_grad():
        original.copy_(saved)
    out = layer(x)
    assert torch.isfinite(out).all() and bsn_cuda.get_sigma(layer) > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_non_finite_weight_does_not_poison_training(kind, bad):
    """A NaN/Inf weight (e.g. an optimizer step on overflowed gradients) gives a
    non-finite output, as in torch, but keeps u/v; once the weights are
    restored (the step undone, as a GradScaler would have skipped it),
    training continues exactly as in a run that never saw it."""
    clean = build_discriminator(kind)
    hit = copy.deepcopy(clean)
    for step in range(2):
        x = images(step)
        out_clean, out_hit = clean(x), hit(x)
        assert torch.equal(out_clean, out_hit)
        sgd_step(clean, out_clean)
        sgd_step(hit, out_hit)

    layers = [hit[0], hit[2], hit[5]]
    saved = [m.parametrizations.weight.original.detach().clone() for m in layers]
    before = power_vectors(hit)
    with torch.no_grad():  # one bad element in every normalized weight
        for m in layers:
            m.parametrizations.weight.original.view(-1)[3] = bad
    out = hit(images(99))
    assert not torch.isfinite(out).all()  # propagates to the output, like torch
    for m in layers:
        assert not torch.isfinite(m.weight).all()
        assert torch.isnan(bsn_cuda.get_sigma(m))
    assert_equal_dicts(power_vectors(hit), before, "vectors after a non-finite forward")
    out.sum().backward()  # non-finite gradients
    hit.zero_grad(set_to_none=True)
    with torch.no_grad():
        for m, w in zip(layers, saved):
            m.parametrizations.weight.original.copy_(w)

    for step in range(2, 5):
        x = images(step)
        out_clean, out_hit = clean(x), hit(x)
        assert torch.isfinite(out_hit).all()
        assert torch.equal(out_clean, out_hit)
        assert_equal_dicts(power_vectors(hit), power_vectors(clean), f"step {step}")
        sgd_step(clean, out_clean)
        sgd_step(hit, out_hit)
    assert_equal_dicts(snapshot(hit), snapshot(clean))


@pytest.mark.parametrize("magnitude", [1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_float16_small_weights_do_not_underflow(kind, magnitude):
    """fp16 weights with tiny norms and eps=1e-12 (0 in fp16): the norms are
    accumulated in fp32, so nothing underflows to 0/0 = NaN."""
    torch.manual_seed(3)
    layer = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight) * magnitude)
    layer = layer.half()
    assert layer.weight.abs().max() > 0
    apply = bsn_cuda.spectral_norm if kind == "sn" else bsn_cuda.bidirectional_spectral_norm
    apply(layer, eps=1e-12)
    norm = layer.parametrizations.weight[0]
    w = layer.parametrizations.weight.original.detach()
    vectors = [getattr(norm, n).clone() for n in VECTOR_NAMES if hasattr(norm, n)]
    for name in VECTOR_NAMES:
        if hasattr(norm, name):
            assert torch.isfinite(getattr(norm, name)).all()
    out = layer.weight  # one training forward
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    if kind == "sn":
        expected, state = reference.sn_forward(w, *vectors, 0, 1, 1e-12, 1.0, True)
    else:
        expected, state = reference.bsn_forward(w, *vectors, 1, 1e-12, 1.0, True)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())
    assert 0.9 < out.double().abs().max().item() / expected.double().abs().max().item() < 1.1
    torch.testing.assert_close(bsn_cuda.get_sigma(layer), state[0], rtol=1e-3, atol=0)
    if magnitude >= 1e-4:  # (the gradient scales with 1 / sigma: beyond fp16's range for 1e-6)
        out.float().sum().backward()
        assert torch.isfinite(layer.parametrizations.weight.original.grad).all()
