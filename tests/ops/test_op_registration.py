"""How the ops are registered with torch: torch.library.opcheck (schema, autograd
registration, fake kernels, AOT dispatch), meta tensors on the fake kernels,
the package's entry points on the C++ autograd node, and on the reference when
the extension does not load."""

import pytest
import torch
from conftest import DEVICES, random_unit, requires_ops
from op_inputs import make_weight, warm_vectors

from bsn_cuda import _ops


def _opcheck_cases(device):
    gen = torch.Generator().manual_seed(13)
    cases = []
    for dtype in (torch.float32, torch.float64):
        weight = make_weight((6, 4, 3), dtype, device, gen).requires_grad_()
        for dim, update in [(0, True), (1, False), (-1, True)]:
            u, v = warm_vectors(weight, (dim % 3,), gen)
            cases.append((torch.ops.bsn_cuda.sn_forward.default, (weight, u, v, dim, 2, 1e-12, 1.5, update)))
            _, state = torch.ops.bsn_cuda.sn_forward(weight.detach(), u.clone(), v.clone(), dim, 1, 1e-12, 1.5, True)
            grad = make_weight((6, 4, 3), dtype, device, gen).requires_grad_()
            cases.append((torch.ops.bsn_cuda.sn_backward.default, (grad, weight, state, dim, 1.5)))
        for update in (True, False):
            vectors = warm_vectors(weight, (0, 1), gen)
            cases.append((torch.ops.bsn_cuda.bsn_forward.default, (weight, *vectors, 2, 1e-12, 0.5, update)))
            _, state = torch.ops.bsn_cuda.bsn_forward(weight.detach(), *[t.clone() for t in vectors], 1, 1e-12, 0.5, True)
            grad = make_weight((6, 4, 3), dtype, device, gen).requires_grad_()
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
