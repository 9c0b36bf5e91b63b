"""Reliability of the module API inside long training runs (issue #5).

Bad arguments, non-finite and zero weights, AMP, torch.func.functional_call,
activation checkpointing, deepcopy/pickling, dtype and device moves, EMA,
checkpoints of torch's SN, determinism and memory. Distributed training is in
test_distributed.py, randomized op-vs-reference checks in test_properties.py.
"""

import copy
import gc
import io
import math
import pickle

import pytest
import torch
from conftest import CUDA_USABLE, DEVICES, requires_ops
from torch import nn
from torch.nn.utils import spectral_norm as legacy_spectral_norm
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm
from torch.utils.checkpoint import checkpoint

import bsn_cuda
from bsn_cuda import _ops, functional, reference
from bsn_cuda.ema import EMA, refresh_spectral_norm, update_ema
from bsn_cuda.nn import BidirectionalSpectralNorm, SpectralNorm, spectral_norm_checkpoint_context

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}
VECTOR_NAMES = ("_u", "_v", "_u0", "_v0", "_u1", "_v1")


def _disc(kind="mixed", dtype=torch.float32, device="cpu", seed=0):
    """A tiny discriminator: 8x8 input -> 1 logit. ``kind``: "sn", "bsn" or
    "mixed" (BSN on the convs, scaled SN on the linear)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 1),
    ).to(device, dtype)
    if kind == "mixed":
        bsn_cuda.bidirectional_spectral_norm(model[0])
        bsn_cuda.bidirectional_spectral_norm(model[2], n_power_iterations=2)
        bsn_cuda.spectral_norm(model[5], scale=1.5)
        return model
    return bsn_cuda.apply_spectral_norm(model, kind=kind)


def _batch(seed, dtype=torch.float32, device="cpu", n=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64).to(device, dtype)


def _vectors(model):
    return {k: b.detach().clone() for k, b in model.named_buffers() if k.rsplit(".", 1)[-1] in VECTOR_NAMES}


def _snapshot(model):
    """Every parameter, buffer and gradient (detached copies)."""
    out = {k: t.detach().clone() for k, t in model.state_dict(keep_vars=True).items()}
    out.update({k + ".grad": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    out.update({k: b.detach().clone() for k, b in model.named_buffers() if k.endswith(("_sigma", "_sigmas"))})
    return out


def _assert_equal_dicts(a, b, what=""):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _sgd_step(model, out, lr=0.05):
    model.zero_grad(set_to_none=True)
    out.square().mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad


def _norms(model):
    return [m.parametrizations.weight[0] for m in model if hasattr(m, "parametrizations")]


@pytest.fixture
def restore_global_state():
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture
def single_thread(restore_global_state):
    """Tiny models gain nothing from threads; one keeps long loops fast on a busy machine."""
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------
# Bad input: every public entry point names the argument and what it expected.


def _vector_module(shape=(), dtype=torch.float32, buffer=False):
    m = nn.Module()
    t = torch.zeros(shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype)
    if buffer:
        m.register_buffer("weight", t)
    else:
        m.weight = nn.Parameter(t, requires_grad=dtype.is_floating_point)
    return m


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_module_api_rejects_bad_arguments():
    lin = lambda: nn.Linear(3, 4)  # noqa: E731
    conv = lambda: nn.Conv2d(3, 4, 3)  # noqa: E731
    sn, bsn = bsn_cuda.spectral_norm, bsn_cuda.bidirectional_spectral_norm
    cases = [
        # module / name
        (lambda: sn("conv"), TypeError, "expected module to be a torch.nn.Module, got str"),
        (lambda: bsn(torch.randn(3, 3)), TypeError, "expected module to be a torch.nn.Module, got Tensor"),
        (lambda: sn(lin(), name=3), TypeError, "expected name to be a str, got int"),
        (lambda: sn(lin(), name="kernel"), ValueError, "no parameter or buffer with name 'kernel'"),
        (lambda: bsn(conv(), name="weights"), ValueError, "no parameter or buffer with name 'weights'"),
        # n_power_iterations
        (lambda: sn(lin(), n_power_iterations=0), ValueError, "n_power_iterations to be positive, but got n_power_iterations=0"),
        (lambda: bsn(conv(), n_power_iterations=-1), ValueError, "n_power_iterations to be positive"),
        (lambda: sn(lin(), n_power_iterations="2"), TypeError, "expected n_power_iterations to be an int, got str"),
        (lambda: bsn(conv(), n_power_iterations=None), TypeError, "expected n_power_iterations to be an int, got NoneType"),
        (lambda: sn(lin(), n_power_iterations=2.0), TypeError, "expected n_power_iterations to be an int, got float"),
        # eps / scale
        (lambda: sn(lin(), eps=-1), ValueError, "expected eps > 0 and finite, got -1"),
        (lambda: bsn(conv(), eps=0.0), ValueError, "expected eps > 0 and finite, got 0.0"),
        (lambda: sn(lin(), eps=float("nan")), ValueError, "expected eps > 0 and finite, got nan"),
        (lambda: sn(lin(), eps=None), TypeError, "expected eps to be a float, got NoneType"),
        (lambda: sn(lin(), scale=0), ValueError, "expected scale > 0 and finite, got 0"),
        (lambda: bsn(conv(), scale=float("nan")), ValueError, "expected scale > 0 and finite, got nan"),
        (lambda: sn(lin(), scale=float("inf")), ValueError, "expected scale > 0 and finite, got inf"),
        (lambda: bsn(conv(), scale=-2.0), ValueError, "expected scale > 0 and finite, got -2.0"),
        (lambda: sn(lin(), scale=torch.tensor(2.0)), TypeError, "expected scale to be a float, got Tensor"),
        # dim
        (lambda: sn(lin(), dim=2), IndexError, r"Dimension out of range \(expected to be in range of \[-2, 1\] but got 2\)"),
        (lambda: sn(conv(), dim=-5), IndexError, "Dimension out of range"),
        (lambda: sn(lin(), dim=0.5), TypeError, "expected dim to be an int, got float"),
        (lambda: sn(lin(), dim="0"), TypeError, "expected dim to be an int, got str"),
        # the weight itself
        (lambda: sn(_vector_module((3, 4), torch.int64)), TypeError, "weight of dtype float32, float64, float16 or bfloat16, got torch.int64"),
        (lambda: bsn(_vector_module((3, 4, 2), torch.int32, buffer=True)), TypeError, "got torch.int32"),
        (lambda: bsn(_vector_module((3, 4, 2), torch.complex64)), TypeError, "complex weights: use spectral_norm"),
        (lambda: sn(_vector_module(())), ValueError, "expected a weight with at least 1 dimension, got a 0-D tensor"),
        (lambda: bsn(_vector_module(())), ValueError, "at least 1 dimension"),
        (lambda: sn(nn.Linear(0, 3)), ValueError, r"expected a non-empty weight, got shape \[3, 0\]"),
        (lambda: bsn(nn.Conv2d(3, 0, 3)), ValueError, r"expected a non-empty weight, got shape \[0, 3, 3, 3\]"),
        (lambda: sn(nn.LazyLinear(4)), ValueError, "uninitialized parameter"),
        # twice on the same weight (stacking SN parametrizations is allowed, as in torch)
        (lambda: bsn(sn(conv())), ValueError, "already has a spectral norm"),
        (lambda: bsn(torch_spectral_norm(conv())), ValueError, "bsn_cuda.convert_spectral_norm"),
        (lambda: sn(legacy_spectral_norm(lin())), ValueError, r"has a legacy \(hook-based\) spectral norm"),
        # helpers
        (lambda: bsn_cuda.remove_spectral_norm("conv"), TypeError, "expected module to be a torch.nn.Module"),
        (lambda: bsn_cuda.remove_spectral_norm(lin()), ValueError, "spectral_norm of 'weight' not found"),
        (lambda: bsn_cuda.remove_spectral_norm(sn(lin()), name="bias"), ValueError, "spectral_norm of 'bias' not found"),
        (lambda: bsn_cuda.remove_spectral_norm(sn(lin()), name=None), TypeError, "expected name to be a str"),
        (lambda: bsn_cuda.convert_spectral_norm([lin()]), TypeError, "expected model to be a torch.nn.Module, got list"),
        (lambda: bsn_cuda.apply_spectral_norm(None), TypeError, "expected model to be a torch.nn.Module, got NoneType"),
        (lambda: bsn_cuda.apply_spectral_norm(lin(), kind="SN"), ValueError, "expected kind 'sn' or 'bsn', got 'SN'"),
        (lambda: bsn_cuda.apply_spectral_norm(lin(), n_power_iterations=0), ValueError, "expected n_power_iterations >= 1, got 0"),
        (lambda: bsn_cuda.apply_spectral_norm(lin(), scale=float("inf")), ValueError, "expected scale > 0 and finite"),
        (lambda: bsn_cuda.get_sigma(3), TypeError, "expected module to be a torch.nn.Module, got int"),
        (lambda: bsn_cuda.get_sigma(lin()), ValueError, "spectral_norm of 'weight' not found"),
        (lambda: bsn_cuda.get_sigma(sn(lin()), per_matricization=True), ValueError, "needs bidirectional_spectral_norm"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    # A 1-D weight is valid for both (normalized exactly, as torch does).
    vec = bsn(_vector_module((5,)), scale=2.0)
    torch.testing.assert_close(vec.weight.norm(), torch.tensor(2.0))


def test_functional_api_rejects_bad_arguments():
    w = torch.randn(4, 3)
    u, v = functional.init_sn_vectors(w)
    w3 = torch.randn(4, 3, 2)
    u0, v0, u1, v1 = functional.init_bsn_vectors(w3)
    cases = [
        (lambda: functional.spectral_norm(w, u, v, training="yes"), TypeError, "expected training to be a bool, got str"),
        (lambda: functional.bidirectional_spectral_norm(w3, u0, v0, u1, v1, training=None), TypeError, "expected training to be a bool"),
        (lambda: functional.bidirectional_spectral_norm(w3, u0, v0, u1, v1, eps=-1.0), ValueError, "expected eps > 0"),
        (lambda: functional.bidirectional_spectral_norm(w3, u0, v0, u1, v1, n_power_iterations=0), ValueError, "n_power_iterations >= 1"),
        (lambda: functional.bidirectional_spectral_norm(w3, u0, v0, None, v1), TypeError, "expected u1 to be a torch.Tensor, got NoneType"),
        (lambda: functional.spectral_norm(torch.ones(3, dtype=torch.int64), None, None), TypeError, "expected a floating-point weight"),
        (lambda: functional.warm_up_sn(w, u, v, n_power_iterations=0), ValueError, "n_power_iterations >= 1"),
        (lambda: functional.warm_up_bsn(w3, u0, v0, u1, v1, eps=float("inf")), ValueError, "expected eps > 0 and finite"),
        (lambda: functional.init_bsn_vectors(torch.randn(3)), ValueError, "at least 2 dimensions"),
        (lambda: functional.init_sn_vectors(w, dim=-3), ValueError, r"expected dim in \[-2, 1\]"),
        # shapes, dtypes and devices of the vectors: the op's RuntimeError, naming the argument
        (lambda: functional.spectral_norm(w, v, u), RuntimeError, "expected u to have 4 elements"),
        (lambda: functional.spectral_norm(w.double(), u, v), RuntimeError, "expected u to have the weight's dtype"),
        (lambda: functional.spectral_norm(w, u.to("meta"), v), RuntimeError, "expected u on the weight's device cpu, got meta"),
        (lambda: functional.spectral_norm(w.to("meta"), u, v), RuntimeError, "expected u on the weight's device meta, got cpu"),
        (lambda: functional.bidirectional_spectral_norm(w3, u0, v0, u1, v1.to("meta")), RuntimeError, "expected v1 on the weight's device"),
        (lambda: functional.spectral_norm(torch.randn(0, 3), u, v), RuntimeError, "expected a non-empty weight"),
    ]
    if bsn_cuda.HAS_EXTENSION:  # (the op's autograd kernel checks this; the reference fallback does not)
        cases.append(
            (lambda: functional.spectral_norm(w, u.clone().requires_grad_(), v), RuntimeError, "expected u not to require grad")
        )
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@requires_ops
def test_ops_reject_none_and_mixed_devices():
    w = torch.randn(4, 3, 2)
    u, v = functional.init_sn_vectors(w)
    u0, v0, u1, v1 = functional.init_bsn_vectors(w)
    _, state = torch.ops.bsn_cuda.sn_forward(w, u.clone(), v.clone(), 0, 1, 1e-12, 1.0, True)
    ops = torch.ops.bsn_cuda
    cases = [
        (lambda: ops.sn_forward(None, u, v, 0, 1, 1e-12, 1.0, True), "expected weight to be a tensor"),
        (lambda: ops.sn_forward(w, None, v, 0, 1, 1e-12, 1.0, True), "expected u to be a tensor"),
        (lambda: ops.bsn_forward(w, u0, v0, None, v1, 1, 1e-12, 1.0, True), "expected u1 to be a tensor"),
        (lambda: ops.sn_backward(None, w, state, 0, 1.0), "expected grad_out to be a tensor"),
        # A meta tensor among real ones dispatches to the fake kernels, which must check too.
        (lambda: ops.sn_forward(w, u.to("meta"), v, 0, 1, 1e-12, 1.0, True), "expected u on the weight's device cpu, got meta"),
        (lambda: ops.bsn_forward(w.to("meta"), u0, v0, u1, v1, 1, 1e-12, 1.0, True), "expected u0 on the weight's device meta"),
        (lambda: ops.sn_backward(w.to("meta"), w, state, 0, 1.0), "expected grad_out on the weight's device cpu, got meta"),
        (lambda: ops.bsn_backward(w, w, state.to("meta"), 1.0), "expected state on the weight's device cpu, got meta"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.skipif(not CUDA_USABLE, reason="needs CUDA")
def test_cuda_and_cpu_tensors_are_not_mixed():
    w = torch.randn(4, 3, device="cuda")
    u, v = functional.init_sn_vectors(w)
    with pytest.raises(RuntimeError, match="expected u on the weight's device cuda:0, got cpu"):
        functional.spectral_norm(w, u.cpu(), v)
    with pytest.raises(RuntimeError, match="device"):  # a CPU weight with a CUDA vector
        functional.spectral_norm(w.cpu(), u, v.cpu())


@requires_ops
def test_fake_kernels_check_arguments_while_tracing():
    """Under FakeTensorMode (torch.compile, export) mistakes surface with the op's message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w, u, v = torch.empty(4, 3, 2), torch.empty(4), torch.empty(6)
        u0, v0, u1, v1 = torch.empty(4), torch.empty(6), torch.empty(3), torch.empty(8)
        out, state = torch.ops.bsn_cuda.sn_forward(w, u, v, 0, 1, 1e-12, 1.0, True)
        assert out.shape == w.shape and state.shape == (11,)
        cases = [
            (lambda: torch.ops.bsn_cuda.sn_forward(w, torch.empty(5), v, 0, 1, 1e-12, 1.0, True), "expected u to have 4 elements"),
            (lambda: torch.ops.bsn_cuda.sn_forward(w, u, v, 0, 0, 1e-12, 1.0, True), "expected n_power_iterations >= 1"),
            (lambda: torch.ops.bsn_cuda.sn_forward(w, u, v, 0, 1, -1.0, 1.0, True), "expected eps > 0"),
            (lambda: torch.ops.bsn_cuda.sn_forward(w, u, v, 0, 1, 1e-12, float("nan"), True), "expected scale > 0"),
            (lambda: torch.ops.bsn_cuda.sn_forward(torch.empty(0, 3), u, v, 0, 1, 1e-12, 1.0, True), "non-empty weight"),
            (lambda: torch.ops.bsn_cuda.bsn_forward(w, u0, v0, u1, torch.empty(7), 1, 1e-12, 1.0, True), "expected v1 to have 8 elements"),
            (lambda: torch.ops.bsn_cuda.sn_backward(w, w, state, 0, 0.0), "expected scale > 0"),
            (lambda: torch.ops.bsn_cuda.sn_backward(w, w, state, 3, 1.0), "expected dim in"),
        ]
        for call, message in cases:
            with pytest.raises(RuntimeError, match=message):
                call()


# ---------------------------------------------------------------------------
# Non-finite values and zero weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_non_finite_weight_does_not_poison_training(kind, bad):
    """A NaN/Inf weight (e.g. an optimizer step on overflowed gradients) gives a
    non-finite output, as in torch, but keeps u/v; once the weights are
    restored (the step undone, as a GradScaler would have skipped it),
    training continues exactly as in a run that never saw it."""
    clean = _disc(kind)
    hit = copy.deepcopy(clean)
    for step in range(2):
        x = _batch(step)
        out_clean, out_hit = clean(x), hit(x)
        assert torch.equal(out_clean, out_hit)
        _sgd_step(clean, out_clean)
        _sgd_step(hit, out_hit)

    layers = [hit[0], hit[2], hit[5]]
    saved = [m.parametrizations.weight.original.detach().clone() for m in layers]
    before = _vectors(hit)
    with torch.no_grad():  # one bad element in every normalized weight
        for m in layers:
            m.parametrizations.weight.original.view(-1)[3] = bad
    out = hit(_batch(99))
    assert not torch.isfinite(out).all()  # propagates to the output, like torch
    for m in layers:
        assert not torch.isfinite(m.weight).all()
        assert torch.isnan(bsn_cuda.get_sigma(m))
    _assert_equal_dicts(_vectors(hit), before, "vectors after a non-finite forward")
    out.sum().backward()  # non-finite gradients
    hit.zero_grad(set_to_none=True)
    with torch.no_grad():
        for m, w in zip(layers, saved):
            m.parametrizations.weight.original.copy_(w)

    for step in range(2, 5):
        x = _batch(step)
        out_clean, out_hit = clean(x), hit(x)
        assert torch.isfinite(out_hit).all()
        assert torch.equal(out_clean, out_hit)
        _assert_equal_dicts(_vectors(hit), _vectors(clean), f"step {step}")
        _sgd_step(clean, out_clean)
        _sgd_step(hit, out_hit)
    _assert_equal_dicts(_snapshot(hit), _snapshot(clean))


def test_grad_scaler_skipped_step_keeps_buffers_and_training_finite():
    model = _disc("mixed")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(4):
        out = model(_batch(step))
        assert torch.isfinite(out).all()
        loss = out.square().mean()
        if step == 1:
            loss = loss * float("inf")  # overflowing gradients: the step must be skipped
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if step == 1:
            assert scaler.get_scale() < scale
            _assert_equal_dicts({k: p.detach() for k, p in model.named_parameters()}, params, "skipped step")
        for name, vec in _vectors(model).items():
            assert torch.isfinite(vec).all(), name
            torch.testing.assert_close(vec.norm(), torch.tensor(1.0), rtol=1e-5, atol=0, msg=name)


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


@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_zero_weight_gives_scaled_weight_and_recovers(kind):
    """Zero weight -> scale * W = 0 (torch: NaN) with u/v kept; a non-zero weight then trains normally."""
    layer = nn.Conv2d(3, 4, 3)
    apply = bsn_cuda.spectral_norm if kind == "sn" else bsn_cuda.bidirectional_spectral_norm
    apply(layer, scale=2.0)
    original = layer.parametrizations.weight.original
    saved = original.detach().clone()
    before = _vectors(layer)
    with torch.no_grad():
        original.zero_()
    x = torch.randn(2, 3, 5, 5)
    out = layer(x)
    assert torch.isfinite(out).all()
    assert torch.equal(layer.weight, torch.zeros_like(saved))
    assert bsn_cuda.get_sigma(layer) == 0
    _assert_equal_dicts(_vectors(layer), before, "vectors after a zero-weight forward")
    out.sum().backward()
    assert torch.isfinite(original.grad).all()
    with torch.no_grad():
        original.copy_(saved)
    out = layer(x)
    assert torch.isfinite(out).all() and bsn_cuda.get_sigma(layer) > 0


# ---------------------------------------------------------------------------
# AMP


AUTOCAST_CASES = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not CUDA_USABLE, reason="needs CUDA")),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not CUDA_USABLE, reason="needs CUDA")),
]


GRAD_TOL = {torch.bfloat16: 0.15, torch.float16: 0.03}  # relative (Frobenius) error of low-precision convs


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST_CASES)
def test_autocast_keeps_sn_in_float32(device, amp_dtype):
    """Under autocast the weight and the buffers stay fp32 (the SN op runs in
    fp32, it is not on the autocast lists); the convs run in low precision."""
    eager = _disc("mixed", device=device)
    amp = copy.deepcopy(eager)
    for step in range(3):
        x = _batch(step, device=device)
        out_eager = eager(x)
        with torch.autocast(device, dtype=amp_dtype):
            out_amp = amp(x)
        assert out_amp.dtype == amp_dtype
        assert all(p.dtype == torch.float32 for p in amp.parameters())
        scale = out_eager.abs().max().item()
        torch.testing.assert_close(out_amp.float(), out_eager, rtol=0, atol=3e-2 * scale)
        # The power iteration saw the same fp32 weights: buffers equal bit for bit.
        for (name, b_eager), b_amp in zip(eager.named_buffers(), amp.buffers()):
            assert b_amp.dtype in (torch.float32,), name
            assert torch.equal(b_amp, b_eager), name
        out_eager.float().square().mean().backward()
        out_amp.float().square().mean().backward()
        for (name, p), q in zip(eager.named_parameters(), amp.parameters()):
            assert q.grad.dtype == torch.float32
            err = (q.grad - p.grad).norm() / p.grad.norm()
            assert err < GRAD_TOL[amp_dtype], f"{name}: relative gradient error {err:.3e}"
            q.grad = None
            p.grad = None
        with torch.no_grad():  # same update for both, so the weights stay equal
            for p, q in zip(eager.parameters(), amp.parameters()):
                p -= 0.05 * p.detach().sign()
                q -= 0.05 * q.detach().sign()


# ---------------------------------------------------------------------------
# torch.func.functional_call


@pytest.mark.parametrize("make", [bsn_cuda.spectral_norm, torch_spectral_norm], ids=["ours", "torch"])
def test_functional_call_updates_the_passed_buffers_like_torch(make):
    """With buffers in the dict, the power iteration updates the dict's tensors in
    place and leaves the module's own buffers alone; without them, the module's
    buffers are updated. The same for torch's SN and ours."""
    from torch.func import functional_call

    torch.manual_seed(5)
    layer = make(nn.Linear(5, 4))
    state = {k: t.detach().clone() for k, t in layer.state_dict().items()}
    state["parametrizations.weight.original"] = state["parametrizations.weight.original"] * 1.5 + 0.1
    module_vectors = _vectors(layer)
    dict_u = state["parametrizations.weight.0._u"]
    dict_u_before = dict_u.clone()
    x = torch.randn(3, 5)
    out = functional_call(layer, state, (x,))
    assert state["parametrizations.weight.0._u"] is dict_u and not torch.equal(dict_u, dict_u_before)
    _assert_equal_dicts(_vectors(layer), module_vectors, "module buffers")
    # The output is the function of the passed weight and the updated vectors.
    w = state["parametrizations.weight.original"]
    sigma = dict_u @ w @ state["parametrizations.weight.0._v"]
    torch.testing.assert_close(out, x @ (w / sigma).T + state["bias"])

    params_only = {"parametrizations.weight.original": w}
    functional_call(layer, params_only, (x,))
    assert not torch.equal(layer.parametrizations.weight[0]._u, module_vectors["parametrizations.weight.0._u"])


def test_functional_call_with_grad_through_params_dict():
    from torch.func import functional_call

    model = _disc("mixed")
    params = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    reference_model = copy.deepcopy(model)
    x = _batch(0)
    out = functional_call(model, (params, buffers), (x,))
    out_ref = reference_model(x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    out.sum().backward()
    out_ref.sum().backward()
    for (k, p), q in zip(reference_model.named_parameters(), params.values()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=k)
    for k, b in reference_model.named_buffers():
        torch.testing.assert_close(buffers[k], b, rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------
# Activation checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_checkpointing_updates_vectors_once_and_keeps_gradients(kind, use_reentrant):
    """The recomputation in backward must not iterate again: buffers equal the
    plain run's bit for bit after forward and after backward, sigma is not
    overwritten, gradients equal up to rounding (the recomputation evaluates
    sigma = u^T W v from the stored vectors)."""
    plain = _disc(kind, torch.float64)
    ckpt = copy.deepcopy(plain)
    for step in range(3):
        x = _batch(step, torch.float64).requires_grad_()  # reentrant checkpointing needs an input with grad
        out_plain = plain(x)
        out_ckpt = checkpoint(ckpt, x, use_reentrant=use_reentrant)
        assert torch.equal(out_ckpt, out_plain)
        _assert_equal_dicts(_vectors(ckpt), _vectors(plain), f"step {step}, after forward")
        sigmas = [bsn_cuda.get_sigma(m) for m in (ckpt[0], ckpt[2], ckpt[5])]
        out_plain.square().mean().backward()
        out_ckpt.square().mean().backward()
        _assert_equal_dicts(_vectors(ckpt), _vectors(plain), f"step {step}, after backward")
        assert all(torch.equal(bsn_cuda.get_sigma(m), s) for m, s in zip((ckpt[0], ckpt[2], ckpt[5]), sigmas))
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL[torch.float64], msg=f"step {step}: {name}")
        with torch.no_grad():
            for p, q in zip(plain.parameters(), ckpt.parameters()):
                p -= 0.05 * p.grad
                q.copy_(p)  # same weights for the next step (the gradients differ by rounding)
                p.grad = q.grad = None


def _gan_step(model, real, fake, wrap):
    """Two training forwards of the same layers, one backward (the GAN discriminator pattern)."""
    loss = nn.functional.softplus(-wrap(model, real)).mean() + nn.functional.softplus(wrap(model, fake)).mean()
    loss.backward()
    return loss.detach()


_HAS_SELECTIVE_CHECKPOINT = hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts")


@pytest.mark.skipif(_HAS_SELECTIVE_CHECKPOINT, reason="torch has selective checkpointing")
def test_selective_checkpoint_context_names_the_torch_it_needs():
    with pytest.raises(RuntimeError, match=r"expected torch >= 2\.5"):
        spectral_norm_checkpoint_context()


@requires_ops
@pytest.mark.skipif(not _HAS_SELECTIVE_CHECKPOINT, reason="selective checkpointing needs torch >= 2.5")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_selective_checkpoint_context_is_exact(compiled):
    """spectral_norm_checkpoint_context saves the SN ops' outputs: bitwise the
    plain run's gradients even with two forwards per backward, and under
    torch.compile (whose partitioner would otherwise recompute the op from the
    already-updated buffers)."""
    torch._dynamo.reset()
    plain = _disc("mixed")
    ckpt = copy.deepcopy(plain)

    class Checkpointed(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            h = checkpoint(self.net[:4], x, use_reentrant=False, context_fn=spectral_norm_checkpoint_context)
            return self.net[4:](h)

    wrapped = Checkpointed(ckpt)
    run = torch.compile(wrapped, fullgraph=True, backend="aot_eager") if compiled else wrapped
    for step in range(2):
        real, fake = _batch(2 * step), _batch(2 * step + 1)
        loss_plain = _gan_step(plain, real, fake, lambda m, x: m(x))
        loss_ckpt = _gan_step(run, real, fake, lambda m, x: m(x))
        assert torch.equal(loss_plain, loss_ckpt)
        _assert_equal_dicts(_snapshot(ckpt), _snapshot(plain), f"step {step}")
        with torch.no_grad():
            for p, q in zip(plain.parameters(), ckpt.parameters()):
                p -= 0.05 * p.grad
                q -= 0.05 * q.grad
                p.grad = q.grad = None


# ---------------------------------------------------------------------------
# deepcopy, pickling, state_dicts


def _train_outputs(model, steps=2, seed=50):
    outs = []
    for step in range(steps):
        out = model(_batch(seed + step))
        outs.append(out.detach())
        _sgd_step(model, out)
    model.eval()
    with torch.no_grad():
        outs.append(model(_batch(seed + steps)))
    model.train()
    return outs


@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no_grad"])
def test_deepcopy_and_pickle_after_a_forward(with_grad, tmp_path):
    """torch's parametrized modules refuse to pickle; ours pickle whole (and
    deepcopy) after a forward with or without grad, and the copies train on
    exactly like the original."""
    model = _disc("mixed")
    x = _batch(0)
    if with_grad:
        model(x).sum().backward()
    else:
        with torch.no_grad():
            model(x)
    expected = _train_outputs(copy.deepcopy(model))

    path = tmp_path / "model.pt"
    torch.save(model, path)
    copies = {
        "deepcopy": copy.deepcopy(model),
        "torch.save(model)": torch.load(path, weights_only=False),
        "pickle": pickle.loads(pickle.dumps(model)),
    }
    shallow = copy.copy(model[0])  # (torch's parametrized modules refuse copy.copy too)
    assert shallow.parametrizations is model[0].parametrizations
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _disc("mixed", seed=123)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    for got, want in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(got, want)
    with torch.no_grad():  # the non-persistent sigma buffers are not in the state_dict
        for got, want in zip(_norms(fresh), _norms(model)):
            for name in ("_sigma", "_sigmas"):  # SN has the first, BSN the second
                if hasattr(got, name):
                    getattr(got, name).copy_(getattr(want, name))
    copies["state_dict"] = fresh

    for name, clone in copies.items():
        assert isinstance(clone[0].parametrizations.weight[0], BidirectionalSpectralNorm), name
        # (copying or pickling a Parameter does not keep .grad)
        expected_state = {k: v for k, v in _snapshot(model).items() if not k.endswith(".grad")}
        _assert_equal_dicts(_snapshot(clone), expected_state, name)
        outs = _train_outputs(clone)
        for step, (a, b) in enumerate(zip(outs, expected)):
            assert torch.equal(a, b), f"{name}: step {step}"
        # and the reloaded model pickles again
        again = pickle.loads(pickle.dumps(clone))
        assert torch.equal(again[0].weight, clone[0].weight), name


def test_remove_after_unpickling_restores_the_plain_class():
    model = pickle.loads(pickle.dumps(_disc("sn")))
    bsn_cuda.remove_spectral_norm(model[0])
    assert type(model[0]) is nn.Conv2d
    assert set(model[0].state_dict()) == {"weight", "bias"}


# ---------------------------------------------------------------------------
# dtype and device moves


@pytest.mark.parametrize("device", DEVICES)
def test_dtype_and_device_moves_carry_the_buffers(device, monkeypatch):
    model = _disc("mixed", torch.float64)
    model(_batch(0, torch.float64))
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.float64):
        model.to(device, dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for norm in _norms(model):
            for name in VECTOR_NAMES:
                if hasattr(norm, name):
                    vec = getattr(norm, name)
                    assert vec.dtype == dtype and vec.device.type == device, name
            sigma_log = norm._sigmas if isinstance(norm, BidirectionalSpectralNorm) else norm._sigma
            assert sigma_log.dtype == acc and sigma_log.device.type == device
        x = _batch(1, dtype, device)
        fused = copy.deepcopy(model)
        out = fused(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert bsn_cuda.get_sigma(fused[0]).dtype == acc
        with monkeypatch.context() as m:  # the same step through the reference
            m.setattr(_ops, "OP_DEVICES", frozenset())
            expected = model(x)
        torch.testing.assert_close(out, expected, **TOL[dtype])
        for (name, a), b in zip(fused.named_buffers(), model.buffers()):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=name)
        _sgd_step(fused, out)
        assert all(torch.isfinite(p).all() for p in fused.parameters())
    model.cpu()
    assert all(b.device.type == "cpu" for b in model.buffers())


# ---------------------------------------------------------------------------
# EMA


def _true_sigma(norm, weight):
    """The exact quantity the layer's sigma estimates (SN: ||W_mat||_2; BSN: the mean over both matricizations)."""
    w = weight.detach().double()
    if isinstance(norm, SpectralNorm):
        return torch.linalg.matrix_norm(reference.matricize(w, norm.dim), ord=2)
    dims = (0,) if norm.single else (0, 1)
    return sum(torch.linalg.matrix_norm(reference.matricize(w, d), ord=2) for d in dims) / len(dims)


def test_ema_keeps_unit_vectors_where_naive_averaging_does_not(single_thread):
    torch.manual_seed(7)
    model = _disc("mixed")
    ema = EMA(model, decay=0.95)
    naive = copy.deepcopy(model).eval()  # StudioGAN-style: average every float entry of the state_dict
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(40):
        loss = model(_batch(step)).square().mean() - model(_batch(step + 100)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        with torch.no_grad():
            current = model.state_dict()
            for key, value in naive.state_dict().items():
                if value.is_floating_point():
                    value.lerp_(current[key], 0.05)

    # The parameters are the same average in both.
    for (name, p), q in zip(ema.module.named_parameters(), naive.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    naive_norms = [v.norm().item() for v in _vectors(naive).values()]
    ema_norms = [v.norm().item() for v in _vectors(ema.module).values()]
    assert min(naive_norms) < 0.98  # averaged unit vectors are shorter
    assert all(abs(n - 1) < 1e-5 for n in ema_norms), ema_norms
    assert not ema.module.training and all(not p.requires_grad for p in ema.module.parameters())

    # Sanity of the EMA model: its sigma estimates the averaged weight's true one
    # (an estimate from below); the naive one underestimates by ~|u| |v|.
    x = _batch(999)
    with torch.no_grad():
        out = ema(x)
        naive(x)
    assert torch.isfinite(out).all()
    ratios_ema, ratios_naive = [], []
    for index in (0, 2, 5):
        for m, ratios in ((ema.module, ratios_ema), (naive, ratios_naive)):
            layer = m[index]
            norm = layer.parametrizations.weight[0]
            ratios.append((_true_sigma(norm, layer.parametrizations.weight.original) / bsn_cuda.get_sigma(layer)).item())
    assert all(0.999 < r < 1.01 for r in ratios_ema), ratios_ema
    assert max(ratios_naive) > 1.05, ratios_naive

    # A state_dict of the EMA round-trips; refresh_spectral_norm repairs averaged vectors.
    restored = EMA(_disc("mixed", seed=1))
    restored.load_state_dict(ema.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored(x), out, rtol=0, atol=0)
    refresh_spectral_norm(naive, n_power_iterations=3)
    assert all(abs(v.norm().item() - 1) < 1e-5 for v in _vectors(naive).values())


def test_update_ema_options_and_errors():
    model = _disc("sn")
    ema_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model(_batch(0))  # move the live vectors
    update_ema(ema_model, model, 0.0, n_power_iterations=0)  # decay 0: a copy, vectors copied
    _assert_equal_dicts(
        {k: v for k, v in ema_model.state_dict().items()}, {k: v for k, v in model.state_dict().items()}, "decay=0"
    )
    update_ema(ema_model, model, 1.0)  # decay 1: parameters frozen; vectors iterate on them
    for (name, p), q in zip(ema_model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    for name, vec in _vectors(ema_model).items():
        torch.testing.assert_close(vec.norm(), torch.tensor(1.0), msg=name)
    with pytest.raises(ValueError, match=r"expected decay in \[0, 1\], got 1.5"):
        update_ema(ema_model, model, 1.5)
    with pytest.raises(TypeError, match="expected decay to be a float, got str"):
        update_ema(ema_model, model, "0.9")
    with pytest.raises(ValueError, match="expected n_power_iterations >= 0, got -1"):
        update_ema(ema_model, model, 0.9, n_power_iterations=-1)
    with pytest.raises(TypeError, match="expected ema_model to be a torch.nn.Module"):
        update_ema(None, model, 0.9)
    with pytest.raises(ValueError, match="different parameters or buffers"):
        update_ema(_disc("bsn"), model, 0.9)


# ---------------------------------------------------------------------------
# Checkpoints of torch's spectral norm


def _torch_disc(flavour, dtype=torch.float64, seed=11):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1),  # SN along dim 1
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 1),
    ).to(dtype)
    apply = torch_spectral_norm if flavour == "parametrized" else legacy_spectral_norm
    for index in (0, 2, 5):
        if flavour == "ours":
            bsn_cuda.spectral_norm(model[index], n_power_iterations=2)
        else:
            apply(model[index], n_power_iterations=2)
    return model


def _train_steps(model, steps, seed, optimizer):
    outs = []
    for step in range(steps):
        out = model(_batch(seed + step, torch.float64))
        outs.append(out.detach())
        optimizer.zero_grad()
        out.square().mean().backward()
        optimizer.step()
    return outs


@pytest.mark.parametrize("how", ["convert", "load_state_dict"])
def test_torch_parametrized_sn_checkpoint_continues_training_identically(how):
    theirs = _torch_disc("parametrized")
    _train_steps(theirs, 3, 0, torch.optim.SGD(theirs.parameters(), lr=0.05))
    if how == "convert":
        ours = bsn_cuda.convert_spectral_norm(copy.deepcopy(theirs))
    else:
        ours = _torch_disc("ours", seed=99)
        ours.load_state_dict(theirs.state_dict(), strict=True)
    assert all(isinstance(ours[i].parametrizations.weight[0], SpectralNorm) for i in (0, 2, 5))
    out_theirs = _train_steps(theirs, 4, 10, torch.optim.SGD(theirs.parameters(), lr=0.05))
    out_ours = _train_steps(ours, 4, 10, torch.optim.SGD(ours.parameters(), lr=0.05))
    torch.testing.assert_close(out_ours, out_theirs, **TOL[torch.float64])
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=name)

    # And back: our checkpoint loads into torch's SN (strict) and continues identically.
    back = _torch_disc("parametrized", seed=98)
    back.load_state_dict(ours.state_dict(), strict=True)
    out_back = _train_steps(back, 3, 20, torch.optim.SGD(back.parameters(), lr=0.05))
    out_ours = _train_steps(ours, 3, 20, torch.optim.SGD(ours.parameters(), lr=0.05))
    torch.testing.assert_close(out_ours, out_back, **TOL[torch.float64])


@pytest.mark.parametrize("how", ["convert", "load_state_dict"])
def test_legacy_sn_checkpoint_matches_in_eval_and_trains_on(how):
    """Legacy torch.nn.utils.spectral_norm: same eval outputs; in training its
    power iteration updates v before u, so outputs differ slightly (both
    estimate the same sigma)."""
    legacy = _torch_disc("legacy")
    with torch.no_grad():  # (legacy SN cannot be deep-copied after a forward with grad)
        for step in range(3):
            legacy(_batch(step, torch.float64))
    if how == "convert":
        ours = bsn_cuda.convert_spectral_norm(copy.deepcopy(legacy))
    else:
        ours = _torch_disc("ours", seed=99)
        ours.load_state_dict(legacy.state_dict(), strict=True)
    legacy.eval(), ours.eval()
    x = _batch(5, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), legacy(x), **TOL[torch.float64])
    legacy.train(), ours.train()
    out_legacy = _train_steps(legacy, 3, 10, torch.optim.SGD(legacy.parameters(), lr=0.05))
    out_ours = _train_steps(ours, 3, 10, torch.optim.SGD(ours.parameters(), lr=0.05))
    for a, b in zip(out_ours, out_legacy):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())


# ---------------------------------------------------------------------------
# Determinism


def _training_run(steps=3):
    model = _disc("mixed")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    outs = []
    for step in range(steps):
        out = model(_batch(step))
        outs.append(out.detach())
        optimizer.zero_grad()
        out.square().mean().backward()
        optimizer.step()
    return outs, _snapshot(model)


def test_training_runs_are_bitwise_reproducible(restore_global_state):
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        first_outs, first_state = _training_run()
        second_outs, second_state = _training_run()
        for a, b in zip(first_outs, second_outs):
            assert torch.equal(a, b)
        _assert_equal_dicts(first_state, second_state, f"deterministic={deterministic}")


@requires_ops
def test_sn_training_is_bitwise_independent_of_threads_and_deterministic_mode(restore_global_state):
    """The fused ops split work by shape only: several SN/BSN training steps
    (forward, backward, buffer updates) are bitwise equal for 1 and 2 threads
    and with deterministic algorithms on or off. (The gradient is a fixed
    tensor G, so no other reduction is involved.)"""
    gen = torch.Generator().manual_seed(21)
    shapes = [("sn", (96, 64, 3, 3), 1), ("bsn", (64, 48, 3, 3), None), ("sn", (300, 200), 0)]
    weights = [torch.randn(s, generator=gen) for _, s, _ in shapes]
    grads = [torch.randn(s, generator=gen) for _, s, _ in shapes]

    def run():
        results = []
        for (kind, shape, dim), w0, g in zip(shapes, weights, grads):
            w = w0.clone().requires_grad_()
            if kind == "sn":
                vectors = list(functional.init_sn_vectors(w0, dim))
            else:
                vectors = list(functional.init_bsn_vectors(w0))
            for _ in range(3):
                if kind == "sn":
                    out, state = torch.ops.bsn_cuda.sn_forward(w, *vectors, dim, 2, 1e-12, 1.0, True)
                else:
                    out, state = torch.ops.bsn_cuda.bsn_forward(w, *vectors, 2, 1e-12, 1.0, True)
                (grad,) = torch.autograd.grad(out, w, g)
                results += [out.detach(), state, grad, *[t.clone() for t in vectors]]
                with torch.no_grad():
                    w -= 0.1 * grad
        return results

    runs = []
    for threads, deterministic in ((1, False), (2, False), (2, True), (1, True)):
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.manual_seed(0)  # init_*_vectors draw from the global RNG
        runs.append(run())
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            assert torch.equal(a, b), f"result {i} differs"


# ---------------------------------------------------------------------------
# Memory


def _live_tensors():
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_no_memory_growth_over_training_steps(single_thread):
    """Training must not accumulate tensors, autograd graphs or Python objects:
    after warm-up, the number of live tensors does not grow and the number of
    gc-tracked objects grows by less than one per step (a leak of even one
    object per step would add 150)."""
    model = _disc("mixed")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = _batch(0)

    def step():
        out = model(x)
        optimizer.zero_grad(set_to_none=True)
        out.mean().backward()
        optimizer.step()

    for _ in range(30):
        step()
    gc.collect()
    tensors, objects = _live_tensors(), len(gc.get_objects())
    for _ in range(150):
        step()
    gc.collect()
    assert _live_tensors() <= tensors
    assert len(gc.get_objects()) - objects < 50
    for name, buf in model.named_buffers():  # no autograd history kept in the buffers
        assert buf.grad_fn is None and not buf.requires_grad, name


# ---------------------------------------------------------------------------
# CUDA graphs (torch.compile mode="reduce-overhead"): GPU only


@pytest.mark.skipif(not CUDA_USABLE, reason="CUDA graphs need CUDA and the bsn_cuda CUDA kernels")
@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_compile_reduce_overhead_matches_eager(kind):
    torch._dynamo.reset()
    eager = _disc(kind, device="cuda")
    graphed = copy.deepcopy(eager)
    compiled = torch.compile(graphed, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = _batch(step, device="cuda")
        torch.compiler.cudagraph_mark_step_begin()
        out_compiled = compiled(x)
        out_eager = eager(x)
        torch.testing.assert_close(out_compiled, out_eager, **TOL[torch.float32])
        out_compiled.square().mean().backward()
        out_eager.square().mean().backward()
        for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL[torch.float32], msg=f"step {step}: {name}")
        for (name, b), c in zip(eager.named_buffers(), graphed.buffers()):
            torch.testing.assert_close(c, b, **TOL[torch.float32], msg=f"step {step}: {name}")
        with torch.no_grad():
            for p, q in zip(eager.parameters(), graphed.parameters()):
                p -= 0.05 * p.grad
                q -= 0.05 * q.grad
                p.grad = q.grad = None
    assert math.isfinite(bsn_cuda.get_sigma(graphed[0]).item())
