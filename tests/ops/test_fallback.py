"""Devices without fused kernels (MPS, XPU, HPU, PrivateUse1, ...): bsn_cuda/_fallback.py.

This machine has none of those devices, so the fallback is forced on the CPU,
where the fused kernels serve as the oracle, by the two routes a real device
takes:

* the package's entry points (modules, bsn_cuda.functional): ``cpu`` is taken
  out of ``_ops.OP_DEVICES``, which is exactly the state of an ``mps`` tensor;
* direct calls of ``torch.ops.bsn_cuda.*``: the fallback's backend kernels are
  registered for the ``CPU`` key on top of the fused ones (and removed again),
  so the C++ autograd kernel redispatches to them as it does for ``MPS``.
"""

import contextlib
import copy
import inspect
import warnings

import pytest
import torch

import bsn_cuda
from bsn_cuda import _fallback, _ops, functional

from conftest import assert_close, requires_ops

pytestmark = requires_ops  # the fused CPU ops are the oracle

SHAPES_SN = [((6, 4, 3), 0), ((6, 4, 3), 1), ((5, 7), -1), ((4, 3, 2, 2), 2)]
SHAPES_BSN = [(6, 4, 3), (5, 3, 2, 2)]
DTYPES = [torch.float64, torch.float32]


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which devices were warned about, so a test sees its first warning."""
    monkeypatch.setattr(_fallback, "_WARNED", set())


@pytest.fixture
def cpu_without_fused_kernels(monkeypatch, fresh_warnings):
    """The entry points treat the CPU as a device without fused kernels."""
    monkeypatch.setattr(_ops, "OP_DEVICES", _ops.OP_DEVICES - {"cpu"})


@contextlib.contextmanager
def fallback_kernels_on_cpu():
    """torch.ops.bsn_cuda.* on CPU tensors run the fallback's backend kernels."""
    lib = torch.library.Library("bsn_cuda", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the CPU kernels are overridden
            _fallback.register_kernels(lib, ["CPU"])
        yield
    finally:
        lib._destroy()  # the fused CPU kernels are back


def fallback_warnings(record):
    return [w for w in record if "no fused kernels for device" in str(w.message)]


# Warmed-up vectors: with raw random ones sigma = u^T W v can be near 0 and
# the eval-mode gradients ill-conditioned.
def _sn_vectors(weight, dim):
    torch.manual_seed(3)
    u, v = functional.init_sn_vectors(weight, dim)
    functional.warm_up_sn(weight, u, v, dim=dim, n_power_iterations=10)
    return [u, v]


def _bsn_vectors(weight):
    torch.manual_seed(4)
    vectors = functional.init_bsn_vectors(weight)
    functional.warm_up_bsn(weight, *vectors, n_power_iterations=10)
    return list(vectors)


def _run_op(kind, weight, vectors, dim, update, grad_out):
    """out, state, updated vectors, grad, double-backward grad of one op call."""
    w = weight.clone().requires_grad_()
    vecs = [t.clone() for t in vectors]
    versions = [t._version for t in vecs]
    if kind == "sn":
        out, state = torch.ops.bsn_cuda.sn_forward(w, *vecs, dim, 2, 1e-12, 1.5, update)
    else:
        out, state = torch.ops.bsn_cuda.bsn_forward(w, *vecs, 2, 1e-12, 1.5, update)
    assert all(t._version > v for t, v in zip(vecs, versions)), "u/v version counters not bumped"
    (grad,) = torch.autograd.grad(out, w, grad_out, create_graph=True)
    (grad2,) = torch.autograd.grad((grad * grad).sum(), w)
    return [out.detach(), state, *vecs, grad.detach(), grad2]


CASES = [("sn", shape, dim) for shape, dim in SHAPES_SN] + [("bsn", shape, None) for shape in SHAPES_BSN]


@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,shape,dim", CASES)
def test_direct_ops_on_fallback_kernels_match_fused(kind, shape, dim, dtype, update, fresh_warnings):
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    vectors = _sn_vectors(weight, dim) if kind == "sn" else _bsn_vectors(weight)

    fused = _run_op(kind, weight, vectors, dim, update, grad_out)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with fallback_kernels_on_cpu():
            fallback = _run_op(kind, weight, vectors, dim, update, grad_out)
            fallback_again = _run_op(kind, weight, vectors, dim, update, grad_out)
    # The fallback kernel ran (it warned, once, naming the device), and
    # removing it restored the fused kernel.
    (warning,) = fallback_warnings(record)
    assert warning.category is RuntimeWarning
    assert "no fused kernels for device 'cpu'" in str(warning.message)
    for a, b in zip(fused, _run_op(kind, weight, vectors, dim, update, grad_out)):
        assert torch.equal(a, b)
    for a, b in zip(fallback, fallback_again):
        assert torch.equal(a, b)

    names = ["out", "state"] + [f"vector {i}" for i in range(len(vectors))] + ["grad", "double-backward grad"]
    for name, actual, expected in zip(names, fallback, fused):
        assert actual.dtype == expected.dtype, name
        assert_close(actual, expected, expected.dtype if name == "state" else dtype, name, factor=4.0)
    if not update:
        for name, actual, original in zip(names[2:], fallback[2:], vectors):
            assert torch.equal(actual, original), f"{name} changed in eval mode"


def test_fallback_kernels_keep_the_accept_rule(fresh_warnings):
    """A zero weight: the norms are zero, u and v must stay as they were."""
    weight = torch.zeros(4, 3, 2)
    u, v = _sn_vectors(torch.randn(4, 3, 2), 0)
    u0, v0 = u.clone(), v.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with fallback_kernels_on_cpu():
            out, state = torch.ops.bsn_cuda.sn_forward(weight, u, v, 0, 1, 1e-12, 1.0, True)
    assert torch.equal(u, u0) and torch.equal(v, v0)
    assert torch.equal(out, weight) and state[0].item() == 0.0


def test_fallback_kernels_check_inputs(fresh_warnings):
    weight = torch.randn(4, 3)
    u, v = torch.randn(5), torch.randn(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with fallback_kernels_on_cpu(), pytest.raises(RuntimeError, match="expected u to have 4 elements"):
            torch.ops.bsn_cuda.sn_forward(weight, u, v, 0, 1, 1e-12, 1.0, True)


def test_fallback_registered_for_accelerator_keys():
    """MPS, XPU, HPU and PrivateUse1 tensors reach the reference kernels; the
    C++ autograd kernel (Autograd alias) covers their autograd keys."""
    for key in ("MPS", "XPU", "HPU", "PrivateUse1"):
        assert key in _fallback.REGISTERED_KEYS
        for name in ("sn_forward", "sn_backward", "bsn_forward", "bsn_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bsn_cuda::{name}", key), (name, key)
    table = torch._C._dispatch_dump_table("bsn_cuda::sn_forward")
    rows = dict(line.split(": ", 1) for line in table.splitlines() if ": " in line)
    python_file = "_fallback.py" if "_fallback.py" in rows["MPS"] else "/dev/null"  # torch 2.4 records no file
    for key in ("MPS", "XPU", "PrivateUse1"):
        assert python_file in rows[key], rows[key]
        assert "autograd.cpp" in rows[f"Autograd{key}"], rows[f"Autograd{key}"]


def test_register_leaves_existing_kernels_alone(monkeypatch):
    """A key with a kernel of its own (the fused CPU one, ours already
    registered, a device plugin's) and keys this torch lacks are skipped."""
    monkeypatch.setattr(_fallback, "FALLBACK_KEYS", ("CPU", "MPS", "NoSuchKey"))
    monkeypatch.setattr(_fallback, "REGISTERED_KEYS", _fallback.REGISTERED_KEYS)
    lib = _fallback.register()
    try:
        assert _fallback.REGISTERED_KEYS == ()
    finally:
        lib._destroy()


# ---------------------------------------------------------------------------
# The entry points: modules and the functional API.


def test_entry_points_warn_once_per_device(cpu_without_fused_kernels):
    weight = torch.randn(6, 4, 3)
    u, v = functional.init_sn_vectors(weight, 0)
    bsn_vectors = functional.init_bsn_vectors(weight)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer_line = inspect.currentframe().f_lineno + 1
        layer = bsn_cuda.bidirectional_spectral_norm(torch.nn.Linear(3, 5))  # warms u/v up: warns
        for _ in range(3):
            functional.spectral_norm(weight, u, v)
            functional.bidirectional_spectral_norm(weight, *bsn_vectors)
            layer(torch.randn(2, 3))
    (warning,) = fallback_warnings(record)
    assert warning.category is RuntimeWarning
    assert "no fused kernels for device 'cpu'" in str(warning.message)
    assert "bsn_cuda.reference" in str(warning.message)
    assert (warning.filename, warning.lineno) == (__file__, layer_line)  # points at the user's line


def test_no_warning_on_devices_with_kernels(fresh_warnings):
    weight = torch.randn(6, 4, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        functional.spectral_norm(weight, *_sn_vectors(weight, 0))
        torch.ops.bsn_cuda.sn_forward(weight, *_sn_vectors(weight, 0), 0, 1, 1e-12, 1.0, True)
    assert fallback_warnings(record) == []


def _model(kind):
    torch.manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten(),
        torch.nn.Linear(4 * 3 * 3, 1),
    ).double()
    apply = bsn_cuda.spectral_norm if kind == "sn" else bsn_cuda.bidirectional_spectral_norm
    for i in (0, 2, 4):
        model[i] = apply(model[i], n_power_iterations=2)
    return model


def _train(model, steps):
    gen = torch.Generator().manual_seed(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 7, 7, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_modules_on_fallback_match_fused(kind, monkeypatch, fresh_warnings):
    fused_model = _model(kind)
    fallback_model = copy.deepcopy(fused_model)
    fused_losses = _train(fused_model, 3)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    fused_eval = fused_model.eval()(x)

    with monkeypatch.context() as m:
        m.setattr(_ops, "OP_DEVICES", _ops.OP_DEVICES - {"cpu"})
        with pytest.warns(RuntimeWarning, match="no fused kernels for device 'cpu'"):
            fallback_losses = _train(fallback_model, 3)
        fallback_eval = fallback_model.eval()(x)
        before = {k: t.clone() for k, t in fallback_model.state_dict().items()}
        fallback_model(x)  # eval mode: the buffers stay as they are
        for k, t in fallback_model.state_dict().items():
            assert torch.equal(t, before[k]), k

    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(fallback_losses, fused_losses, **tol)
    torch.testing.assert_close(fallback_eval, fused_eval, **tol)
    # The same state_dict: keys, shapes, dtypes and (up to rounding) values,
    # and each side's checkpoint loads into the other.
    fused_state, fallback_state = fused_model.state_dict(), fallback_model.state_dict()
    assert list(fused_state) == list(fallback_state)
    for k in fused_state:
        torch.testing.assert_close(fallback_state[k], fused_state[k], **tol, msg=k)
    reloaded = _model(kind).eval()
    reloaded.load_state_dict(fallback_state)
    torch.testing.assert_close(reloaded(x), fallback_eval, **tol)
    with monkeypatch.context() as m:
        m.setattr(_ops, "OP_DEVICES", _ops.OP_DEVICES - {"cpu"})
        reloaded.load_state_dict(fused_state)
        torch.testing.assert_close(reloaded(x), fused_eval, **tol)
    assert bsn_cuda.get_sigma(fallback_model[0]).shape == bsn_cuda.get_sigma(fused_model[0]).shape


def test_compiled_layer_on_fallback_matches_fused(monkeypatch, fresh_warnings):
    """torch.compile traces the reference's torch ops with no graph break (the
    warning is skipped while tracing) and gives the fused layer's results."""
    torch.manual_seed(8)
    fused = bsn_cuda.bidirectional_spectral_norm(torch.nn.Conv2d(3, 4, 3).double())
    fallback = copy.deepcopy(fused)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    fused(x).sum().backward()
    monkeypatch.setattr(_ops, "OP_DEVICES", _ops.OP_DEVICES - {"cpu"})
    torch.compile(fallback, fullgraph=True, backend="aot_eager")(x).sum().backward()
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(fallback.parametrizations.weight.original.grad,
                               fused.parametrizations.weight.original.grad, **tol)
    for (k, a), b in zip(fused.state_dict().items(), fallback.state_dict().values()):
        torch.testing.assert_close(b, a, **tol, msg=k)
