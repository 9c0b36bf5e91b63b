"""The ops' contract: the C++ ops, the fake kernels and the reference reject the
same bad inputs with the same words, and take the same good ones.

Three implementations of the checks run each case:

* ``cpp``: ``torch.ops.bsn_cuda.<op>`` on CPU tensors (csrc/host.cpp);
* ``fake``: the same call under FakeTensorMode (the fake kernels of
  bsn_cuda/_fakes.py, through the op's registration), and ``fake_kernel``: the
  fake kernel function itself, which needs no compiled extension;
* ``reference``: ``bsn_cuda.reference.<op>``.

The oracle is each case's expected words; every implementation's message must
equal the reference's once the ``<op>: `` prefix (which names the caller) is
stripped.
"""

import pytest
import torch
from conftest import CUDA_USABLE, requires_ops
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from bsn_cuda import _fakes, _ops, reference

# A second device for the mixed-device cases. On a CPU-only machine it is
# "meta", and a call mixing meta and CPU tensors dispatches to the fake kernel
# even in the ``cpp`` column: host.cpp's device words are then reached only
# where CUDA is usable.
OTHER_DEVICE = "cuda" if CUDA_USABLE else "meta"
OTHER = str(torch.device(OTHER_DEVICE, 0)) if OTHER_DEVICE == "cuda" else OTHER_DEVICE

SHAPE = (4, 3, 2)  # rows/cols: dim 0 -> 4 x 6, dim 1 -> 3 x 8, dim 2 -> 2 x 12
SN_STATE = 1 + 4 + 6
BSN_STATE = 3 + 4 + 6 + 3 + 8

FAKE_KERNELS = {
    "sn_forward": _fakes.sn_forward,
    "bsn_forward": _fakes.bsn_forward,
    "sn_backward": _fakes.sn_backward,
    "bsn_backward": _fakes.bsn_backward,
}


def _valid_args(op, dtype=torch.float32):
    """Valid arguments of ``op`` by schema name, in schema order (fresh tensors)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=g, dtype=dtype)
    acc = reference.acc_dtype(dtype)
    if op == "sn_forward":
        u, v = torch.randn(4, generator=g).to(dtype), torch.randn(6, generator=g).to(dtype)
        return dict(weight=w, u=u, v=v, dim=0, n_power_iterations=1, eps=1e-12, scale=1.0, update=True)
    if op == "bsn_forward":
        u0, v0 = torch.randn(4, generator=g).to(dtype), torch.randn(6, generator=g).to(dtype)
        u1, v1 = torch.randn(3, generator=g).to(dtype), torch.randn(8, generator=g).to(dtype)
        return dict(weight=w, u0=u0, v0=v0, u1=u1, v1=v1, n_power_iterations=1, eps=1e-12, scale=1.0, update=True)
    grad = torch.randn(SHAPE, generator=g, dtype=dtype)
    if op == "sn_backward":
        state = torch.randn(SN_STATE, generator=g, dtype=acc)
        return dict(grad_out=grad, weight=w, state=state, dim=0, scale=1.0)
    state = torch.randn(BSN_STATE, generator=g, dtype=acc)
    return dict(grad_out=grad, weight=w, state=state, scale=1.0)


def _strided(n, dtype=torch.float32):
    return torch.randn(2 * n, dtype=dtype)[::2]  # 1-D, stride 2


NAN, INF = float("nan"), float("inf")
FORWARDS = ("sn_forward", "bsn_forward")
BACKWARDS = ("sn_backward", "bsn_backward")
SN_OPS = ("sn_forward", "sn_backward")
ALL_OPS = FORWARDS + BACKWARDS

# (ops, id, changes to the valid arguments, expected message without the op prefix).
# Changes are values, or callables of the valid arguments.
_RULES = [
    # the weight
    (ALL_OPS, "weight_none", {"weight": None}, "expected weight to be a tensor, got None"),
    (
        ALL_OPS,
        "weight_int64",
        {"weight": lambda a: a["weight"].long()},
        "expected weight of dtype float32, float64, float16 or bfloat16, got torch.int64",
    ),
    (
        ALL_OPS,
        "weight_complex",
        {"weight": lambda a: a["weight"].to(torch.complex64)},
        "expected weight of dtype float32, float64, float16 or bfloat16, got torch.complex64",
    ),
    (
        ALL_OPS,
        "weight_bool",
        {"weight": lambda a: a["weight"] > 0},
        "expected weight of dtype float32, float64, float16 or bfloat16, got torch.bool",
    ),
    (
        ALL_OPS,
        "weight_float8",
        {"weight": lambda a: a["weight"].to(torch.float8_e4m3fn)},
        "expected weight of dtype float32, float64, float16 or bfloat16, got torch.float8_e4m3fn",
    ),
    (SN_OPS, "weight_1d", {"weight": torch.ones(4)}, "expected weight with at least 2 dimensions, got 1 (shape [4])"),
    (
        ("bsn_forward", "bsn_backward"),
        "weight_2d",
        {"weight": torch.ones(4, 6)},
        "expected weight with at least 3 dimensions, got 2 (shape [4, 6])",
    ),
    (ALL_OPS, "weight_empty", {"weight": torch.ones(4, 0, 2)}, "expected a non-empty weight, got shape [4, 0, 2]"),
    # dim
    (SN_OPS, "dim_3", {"dim": 3}, "expected dim in [-3, 2] for a weight with 3 dimensions, got 3"),
    (SN_OPS, "dim_-4", {"dim": -4}, "expected dim in [-3, 2] for a weight with 3 dimensions, got -4"),
    # n_power_iterations, eps, scale
    (FORWARDS, "n_0", {"n_power_iterations": 0}, "expected n_power_iterations >= 1, got 0"),
    (FORWARDS, "n_-3", {"n_power_iterations": -3}, "expected n_power_iterations >= 1, got -3"),
    (
        FORWARDS,
        "n_too_large",
        {"n_power_iterations": 2**30 + 1},
        f"expected n_power_iterations <= 2^30, got {2**30 + 1}",
    ),
    (FORWARDS, "eps_0", {"eps": 0.0}, "expected eps > 0 and finite, got 0"),
    (FORWARDS, "eps_negative", {"eps": -1e-12}, "expected eps > 0 and finite, got -1e-12"),
    (FORWARDS, "eps_inf", {"eps": INF}, "expected eps > 0 and finite, got inf"),
    (FORWARDS, "eps_nan", {"eps": NAN}, "expected eps > 0 and finite, got nan"),
    (ALL_OPS, "scale_0", {"scale": 0.0}, "expected scale > 0 and finite, got 0"),
    (ALL_OPS, "scale_negative", {"scale": -1.5}, "expected scale > 0 and finite, got -1.5"),
    (ALL_OPS, "scale_inf", {"scale": INF}, "expected scale > 0 and finite, got inf"),
    (ALL_OPS, "scale_nan", {"scale": NAN}, "expected scale > 0 and finite, got nan"),
    # the power-iteration vectors
    (("sn_forward",), "u_none", {"u": None}, "expected u to be a tensor, got None"),
    (
        ("sn_forward",),
        "u_2d",
        {"u": torch.ones(2, 2)},
        "expected u to be 1-D, got 2-D (shape [2, 2])",
    ),
    (
        ("sn_forward",),
        "u_size",
        {"u": torch.ones(5)},
        "expected u to have 4 elements (size(dim) of weight of shape [4, 3, 2]), got 5",
    ),
    (
        ("sn_forward",),
        "v_size",
        {"v": torch.ones(4)},
        "expected v to have 6 elements (numel / size(dim) of weight of shape [4, 3, 2]), got 4",
    ),
    (
        ("sn_forward",),
        "v_size_dim_-1",
        {"dim": -1, "u": torch.ones(2)},
        "expected v to have 12 elements (numel / size(dim) of weight of shape [4, 3, 2]), got 6",
    ),
    (
        ("sn_forward",),
        "u_float64",
        {"u": lambda a: a["u"].double()},
        "expected u to have the weight's dtype torch.float32, got torch.float64",
    ),
    (
        ("sn_forward",),
        "v_other_device",
        {"v": lambda a: a["v"].to(OTHER_DEVICE)},
        f"expected v on the weight's device cpu, got {OTHER}",
    ),
    (
        ("sn_forward",),
        "v_strided",
        {"v": _strided(6)},
        "expected v to be contiguous, got strides [2]",
    ),
    (("bsn_forward",), "u1_none", {"u1": None}, "expected u1 to be a tensor, got None"),
    (
        ("bsn_forward",),
        "u0_size",
        {"u0": torch.ones(3)},
        "expected u0 to have 4 elements (size(0) of weight of shape [4, 3, 2]), got 3",
    ),
    (
        ("bsn_forward",),
        "v0_2d",
        {"v0": torch.ones(6, 1)},
        "expected v0 to be 1-D, got 2-D (shape [6, 1])",
    ),
    (
        ("bsn_forward",),
        "u1_size",
        {"u1": torch.ones(4)},
        "expected u1 to have 3 elements (size(1) of weight of shape [4, 3, 2]), got 4",
    ),
    (
        ("bsn_forward",),
        "v1_size",
        {"v1": torch.ones(7)},
        "expected v1 to have 8 elements (numel / size(1) of weight of shape [4, 3, 2]), got 7",
    ),
    (
        ("bsn_forward",),
        "v1_float16",
        {"v1": lambda a: a["v1"].half()},
        "expected v1 to have the weight's dtype torch.float32, got torch.float16",
    ),
    (
        ("bsn_forward",),
        "u0_other_device",
        {"u0": lambda a: a["u0"].to(OTHER_DEVICE)},
        f"expected u0 on the weight's device cpu, got {OTHER}",
    ),
    (
        ("bsn_forward",),
        "u1_strided",
        {"u1": _strided(3)},
        "expected u1 to be contiguous, got strides [2]",
    ),
    # grad_out
    (BACKWARDS, "grad_none", {"grad_out": None}, "expected grad_out to be a tensor, got None"),
    (
        BACKWARDS,
        "grad_shape",
        {"grad_out": torch.ones(4, 6)},
        "expected grad_out of the weight's shape [4, 3, 2], got [4, 6]",
    ),
    (
        BACKWARDS,
        "grad_float64",
        {"grad_out": lambda a: a["grad_out"].double()},
        "expected grad_out of the weight's dtype torch.float32, got torch.float64",
    ),
    (
        BACKWARDS,
        "grad_other_device",
        {"grad_out": lambda a: a["grad_out"].to(OTHER_DEVICE)},
        f"expected grad_out on the weight's device cpu, got {OTHER}",
    ),
    # state
    (BACKWARDS, "state_none", {"state": None}, "expected state to be a tensor, got None"),
    (
        ("sn_backward",),
        "state_size",
        {"state": torch.ones(SN_STATE - 1)},
        f"expected state to be 1-D with {SN_STATE} elements (as returned by the forward), got shape [{SN_STATE - 1}]",
    ),
    (
        ("sn_backward",),
        "state_size_dim_1",
        {"dim": 1},
        f"expected state to be 1-D with {1 + 3 + 8} elements (as returned by the forward), got shape [{SN_STATE}]",
    ),
    (
        ("bsn_backward",),
        "state_of_sn",
        {"state": torch.ones(SN_STATE)},
        f"expected state to be 1-D with {BSN_STATE} elements (as returned by the forward), got shape [{SN_STATE}]",
    ),
    (
        BACKWARDS,
        "state_2d",
        {"state": lambda a: a["state"].reshape(1, -1)},
        "expected state to be 1-D with {n} elements (as returned by the forward), got shape [1, {n}]",
    ),
    (
        BACKWARDS,
        "state_float64",
        {"state": lambda a: a["state"].double()},
        "expected state of dtype torch.float32, got torch.float64",
    ),
    (
        BACKWARDS,
        "state_other_device",
        {"state": lambda a: a["state"].to(OTHER_DEVICE)},
        f"expected state on the weight's device cpu, got {OTHER}",
    ),
    (
        BACKWARDS,
        "state_strided",
        {"state": lambda a: _strided(a["state"].shape[0])},
        "expected state to be contiguous, got strides [2]",
    ),
]

CASES = [
    pytest.param(op, changes, expected, id=f"{op}-{name}")
    for ops, name, changes, expected in _RULES
    for op in ops
]


def _bad_args(op, changes):
    args = _valid_args(op)
    for name, change in changes.items():
        assert name in args, (op, name)
        args[name] = change(args) if callable(change) else change
    return args


def _expected(op, expected):
    n = SN_STATE if op == "sn_backward" else BSN_STATE
    return expected.replace("{n}", str(n))


def _strip_op(message, op):
    """The message without the ``<op>: `` prefix that names the caller."""
    message = message.split("\nException raised from")[0]  # a C++ backtrace, if torch adds one
    for prefix in (f"bsn_cuda::{op}: ", f"bsn_cuda.reference.{op}: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    raise AssertionError(f"message without the op's prefix: {message!r}")


def _run(impl, op, args):
    """Call ``op`` through ``impl`` on ``args`` (real CPU tensors or None)."""
    if impl == "reference":
        return getattr(reference, op)(*args.values())
    if impl == "cpp":
        return getattr(torch.ops.bsn_cuda, op)(*args.values())
    target = getattr(torch.ops.bsn_cuda, op) if impl == "fake" else FAKE_KERNELS[op]
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args.values()]
        return target(*fake_args)


def _message(impl, op, args):
    with pytest.raises(RuntimeError) as info:
        _run(impl, op, args)
    return _strip_op(str(info.value), op)


IMPLS = [
    pytest.param("cpp", marks=requires_ops),
    pytest.param("fake", marks=requires_ops),
    "fake_kernel",
]


@pytest.mark.parametrize("op, changes, expected", CASES)
def test_reference_rejects_with_the_contract_words(op, changes, expected):
    assert _message("reference", op, _bad_args(op, changes)) == _expected(op, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op, changes, expected", CASES)
def test_ops_and_fakes_reject_as_the_reference(impl, op, changes, expected):
    want = _message("reference", op, _bad_args(op, changes))
    assert _message(impl, op, _bad_args(op, changes)) == want


GOOD = [
    ("sn_forward", {}),
    ("sn_forward", {"dim": -1, "u": torch.ones(2), "v": torch.ones(12)}),
    ("sn_forward", {"dim": 2, "u": torch.ones(2), "v": torch.ones(12), "update": False}),
    ("sn_forward", {"n_power_iterations": 3, "eps": 1e-300, "scale": 1e-30}),
    # the largest n_power_iterations; in eval, so that nothing iterates
    ("sn_forward", {"n_power_iterations": 2**30, "update": False}),
    ("bsn_forward", {}),
    ("bsn_forward", {"eps": 0.5, "scale": 2.0, "update": False}),
    ("bsn_forward", {"n_power_iterations": 2**30, "update": False}),
    ("sn_backward", {}),
    ("sn_backward", {"dim": -2, "state": torch.ones(1 + 3 + 8)}),
    ("bsn_backward", {}),
]


def _good_args(op, changes, dtype):
    args = _valid_args(op, dtype)
    for name, value in changes.items():
        args[name] = value.to(dtype) if isinstance(value, torch.Tensor) and name != "state" else value
    if "state" in changes:
        args["state"] = changes["state"].to(reference.acc_dtype(dtype))
    return args


def _metadata(result):
    results = result if isinstance(result, tuple) else (result,)
    return [(tuple(r.shape), r.dtype, r.device.type) for r in results]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op, changes", GOOD)
def test_good_inputs_pass_everywhere(impl, op, changes, dtype):
    expected = _metadata(_run("reference", op, _good_args(op, changes, dtype)))
    assert expected[0] == (SHAPE, dtype, "cpu")
    assert _metadata(_run(impl, op, _good_args(op, changes, dtype))) == expected


@pytest.mark.parametrize("op", ALL_OPS)
def test_fakes_check_symbolic_shapes(op):
    """With dynamic shapes the fakes still return symbolic metadata for good
    inputs, and still reject bad ones with the contract's words."""
    args = _valid_args(op)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake = {
            name: mode.from_tensor(a, static_shapes=False) if isinstance(a, torch.Tensor) else a
            for name, a in args.items()
        }
        result = FAKE_KERNELS[op](*fake.values())
        out = result[0] if isinstance(result, tuple) else result
        assert isinstance(out.shape[0], torch.SymInt) and out.shape == fake["weight"].shape
        if isinstance(result, tuple):  # the state's length, symbolic, is the layout's
            size = reference.sn_state_size(SHAPE, 0) if op == "sn_forward" else reference.bsn_state_size(SHAPE)
            assert isinstance(result[1].shape[0], torch.SymInt) and result[1].shape[0] == size
        fake["scale"] = 0.0
        with pytest.raises(RuntimeError) as info:
            FAKE_KERNELS[op](*fake.values())
    assert _strip_op(str(info.value), op) == "expected scale > 0 and finite, got 0"
