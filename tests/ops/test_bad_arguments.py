"""Bad arguments, at every level: each entry point raises naming the argument
and what it expected ("<what>: expected X, got Y").

* the ops (torch.ops.bsn_cuda.*), the reference and the fake kernels: RuntimeError;
* the public API (modules, helpers, bsn_cuda.functional): TypeError / ValueError
  as torch's spectral norm raises them, and the ops' RuntimeError for the
  tensors' sizes, dtypes and devices.

(Errors of one feature stay with it: bsn_cuda.ema in training/test_ema.py,
conv_spectral_norm, diagnostics and the drop-in parity files in module/.)
"""

import pytest
import torch
from conftest import CUDA_USABLE, random_unit, requires_ops
from torch import nn
from torch.nn.utils import spectral_norm as legacy_spectral_norm
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import bsn_cuda
from bsn_cuda import functional, reference


# ---------------------------------------------------------------------------
# The ops, the reference and the fake kernels: RuntimeError naming the argument


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


@requires_ops
def test_ops_reject_none_and_mixed_devices():
    w = torch.randn(4, 3, 2)
    u, v = functional.init_sn_vectors(w)
    u0, v0, u1, v1 = functional.init_bsn_vectors(w)
    _, state = torch.ops.bsn_cuda.sn_forward(w, u.clone(), v.clone(), 0, 1, 1e-12, 1.0, True)
    _, bsn_state = torch.ops.bsn_cuda.bsn_forward(w, u0.clone(), v0.clone(), u1.clone(), v1.clone(), 1, 1e-12, 1.0, True)
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
        (lambda: ops.bsn_backward(w, w, bsn_state.to("meta"), 1.0), "expected state on the weight's device cpu, got meta"),
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
# The public API


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
    """Exception types as torch's spectral_norm raises them (IndexError for dim,
    ValueError for values, TypeError for types); messages naming the argument."""
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
        (lambda: bsn(conv(), n_power_iterations=1.5), TypeError, "n_power_iterations to be an int"),
        # eps / scale
        (lambda: sn(lin(), eps=-1), ValueError, "expected eps > 0 and finite, got -1"),
        (lambda: bsn(conv(), eps=0.0), ValueError, "expected eps > 0 and finite, got 0.0"),
        (lambda: sn(lin(), eps=0.0), ValueError, "eps > 0"),
        (lambda: sn(lin(), eps=float("nan")), ValueError, "expected eps > 0 and finite, got nan"),
        (lambda: sn(lin(), eps=None), TypeError, "expected eps to be a float, got NoneType"),
        (lambda: sn(lin(), scale=0), ValueError, "expected scale > 0 and finite, got 0"),
        (lambda: bsn(conv(), scale=float("nan")), ValueError, "expected scale > 0 and finite, got nan"),
        (lambda: sn(lin(), scale=float("inf")), ValueError, "expected scale > 0 and finite, got inf"),
        (lambda: bsn(conv(), scale=-2.0), ValueError, "expected scale > 0 and finite, got -2.0"),
        (lambda: bsn(lin(), scale=-1.0), ValueError, "scale > 0"),
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
        (lambda: functional.spectral_norm([[1.0]], u, v), TypeError, "expected weight to be a torch.Tensor, got list"),
        (lambda: functional.spectral_norm(torch.ones(4, 3, dtype=torch.int32), u, v), TypeError, "expected a floating-point weight"),
        (lambda: functional.spectral_norm(torch.tensor(1.0), u, v), ValueError, "at least 1 dimension"),
        (lambda: functional.spectral_norm(w, None, v), TypeError, "expected u to be a torch.Tensor, got NoneType"),
        (lambda: functional.spectral_norm(w, u, "v"), TypeError, "expected v to be a torch.Tensor, got str"),
        (lambda: functional.spectral_norm(w, u, v, dim=2), ValueError, r"expected dim in \[-2, 1\]"),
        (lambda: functional.spectral_norm(w, u, v, dim=0.0), TypeError, "expected dim to be an int, got float"),
        (lambda: functional.spectral_norm(w, u, v, n_power_iterations=0), ValueError, "expected n_power_iterations >= 1, got 0"),
        (lambda: functional.spectral_norm(w, u, v, n_power_iterations=True), TypeError, "expected n_power_iterations to be an int, got bool"),
        (lambda: functional.spectral_norm(w, u, v, eps=0.0), ValueError, "expected eps > 0 and finite, got 0.0"),
        (lambda: functional.spectral_norm(w, u, v, eps="1e-12"), TypeError, "expected eps to be a float, got str"),
        (lambda: functional.spectral_norm(w, u, v, scale=float("nan")), ValueError, "expected scale > 0 and finite, got nan"),
        (lambda: functional.spectral_norm(w, u, v, scale=-2), ValueError, "expected scale > 0 and finite, got -2"),
        (lambda: functional.bidirectional_spectral_norm(torch.randn(4, 3, 2), u, v, None, v), TypeError, "expected u1 to be a torch.Tensor"),
        (lambda: functional.init_sn_vectors(torch.randn(3)), ValueError, "at least 2 dimensions"),
        # shapes, dtypes and devices of the vectors: the op's RuntimeError, naming the argument
        (lambda: functional.spectral_norm(w, v, u), RuntimeError, "expected u to have 4 elements"),
        (lambda: functional.spectral_norm(w.double(), u, v), RuntimeError, "expected u to have the weight's dtype"),
        (lambda: functional.spectral_norm(w, u.to("meta"), v), RuntimeError, "expected u on the weight's device cpu, got meta"),
        (lambda: functional.spectral_norm(w.to("meta"), u, v), RuntimeError, "expected u on the weight's device meta, got cpu"),
        (lambda: functional.bidirectional_spectral_norm(w3, u0, v0, u1, v1.to("meta")), RuntimeError, "expected v1 on the weight's device"),
        (lambda: functional.spectral_norm(torch.randn(0, 3), u, v), RuntimeError, "expected a non-empty weight"),
        (lambda: functional.spectral_norm(w, torch.ones(3), v), RuntimeError, "expected u to have 4 elements"),
    ]
    if bsn_cuda.HAS_EXTENSION:  # (the op's autograd kernel checks this; the reference fallback does not)
        cases.append(
            (lambda: functional.spectral_norm(w, u.clone().requires_grad_(), v), RuntimeError, "expected u not to require grad")
        )
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
