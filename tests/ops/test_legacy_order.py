"""bsn_cuda._ops.sn_forward_transposed: torch's legacy (v-first) order as one op call.

The eager fast path (csrc/autograd.h) runs ``sn_forward`` on
``W_mat = weight.reshape(rows, -1)`` with ``dim=1`` and the vectors swapped, as
one autograd node. Its oracle is that same composition written out with
torch.ops (reshape, op, view): outputs, state, vector updates and gradients
must be bitwise the same, since both run the same kernels on the same data.
"""

import pytest
import torch

import bsn_cuda
from bsn_cuda import _ops

pytestmark = pytest.mark.skipif(not bsn_cuda.HAS_EXTENSION, reason="needs the compiled ops")

SHAPES = [(7, 5), (6, 3, 3, 3), (5,), (4, 2, 5)]


def _composed(weight, u, v, n, eps, scale, update):
    """The oracle: the op on W_mat^T, written out with autograd-tracked views."""
    mat = weight.reshape(weight.shape[0], -1)
    out, state = torch.ops.bsn_cuda.sn_forward.default(mat, v, u, 1, n, eps, scale, update)
    return out.view(weight.shape), state


def _inputs(shape, dtype, seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g, dtype=dtype)
    if layout == "transposed" and weight.dim() >= 2:  # a non-contiguous weight of the same shape
        weight = torch.randn(shape[1], shape[0], *shape[2:], generator=g, dtype=dtype).transpose(0, 1)
    if layout == "channels_last" and weight.dim() == 4:
        weight = weight.contiguous(memory_format=torch.channels_last)
    if layout == "offset":  # contiguous, at a storage offset (the 2-D alias must keep it)
        weight = torch.randn(2, *shape, generator=g, dtype=dtype)[1]
    rows, cols = shape[0], weight.numel() // shape[0]
    u = torch.nn.functional.normalize(torch.randn(rows, generator=g, dtype=dtype), dim=0)
    v = torch.nn.functional.normalize(torch.randn(cols, generator=g, dtype=dtype), dim=0)
    return weight, u, v


def _same_layout_leaf(weight):
    """A leaf copy of ``weight`` that requires grad, with its strides and storage offset."""
    flat = torch.empty(weight.untyped_storage().nbytes() // weight.element_size(), dtype=weight.dtype)
    copy = flat.as_strided(weight.shape, weight.stride(), weight.storage_offset())
    copy.copy_(weight)
    return copy.detach().requires_grad_()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last", "offset"])
@pytest.mark.parametrize("update", [True, False])
def test_matches_the_composed_op_bitwise(shape, dtype, layout, update):
    weight, u, v = _inputs(shape, dtype, seed=len(shape) * 7 + 1, layout=layout)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    results = []
    for fn in (_ops.sn_forward_transposed, _composed):
        w = _same_layout_leaf(weight)
        uu, vv = u.clone(), v.clone()
        outs = []
        for _ in range(2):  # a second call starts from the updated vectors
            out, state = fn(w, uu, vv, 1, 1e-12, 1.0, update)
            out.backward(grad)
            outs += [out.detach(), state]
        results.append((outs, uu, vv, w.grad))
    (fast, u_f, v_f, g_f), (ref, u_r, v_r, g_r) = results
    for a, b in zip(fast, ref):
        assert a.shape == b.shape and torch.equal(a, b)
    assert torch.equal(u_f, u_r) and torch.equal(v_f, v_r)
    assert torch.equal(g_f, g_r)
    if not update:
        assert torch.equal(u_f, u) and torch.equal(v_f, v)


def test_is_torchs_legacy_iteration():
    weight, u, v = _inputs((6, 3, 2, 2), torch.float64, seed=5)
    mat = weight.reshape(6, -1)
    v_new = torch.nn.functional.normalize(mat.t() @ u, dim=0, eps=1e-12)
    u_new = torch.nn.functional.normalize(mat @ v_new, dim=0, eps=1e-12)
    sigma = torch.dot(u_new, mat @ v_new)
    out, state = _ops.sn_forward_transposed(weight, u, v, 1, 1e-12, 1.0, True)
    torch.testing.assert_close(u, u_new, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v, v_new, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out, weight / sigma, rtol=1e-12, atol=1e-14)
    assert state[0].item() == pytest.approx(sigma.item(), rel=1e-12)


def test_one_graph_node_between_output_and_weight():
    weight, u, v = _inputs((4, 3, 3), torch.float32, seed=2)
    weight.requires_grad_()
    out, _ = _ops.sn_forward_transposed(weight, u, v, 1, 1e-12, 1.0, True)
    assert out.shape == weight.shape and not out._is_view()
    (next_fn, _), = [e for e in out.grad_fn.next_functions if e[0] is not None]
    assert type(next_fn).__name__ == "AccumulateGrad" and next_fn.variable is weight


def test_gradcheck_and_double_backward_float64():
    weight, u, v = _inputs((5, 2, 3), torch.float64, seed=9)
    weight.requires_grad_()

    def fn(w):  # fixed vectors: no update, so every evaluation is the same function
        return _ops.sn_forward_transposed(w, u, v, 1, 1e-12, 1.3, False)[0]

    assert torch.autograd.gradcheck(fn, (weight,))
    assert torch.autograd.gradgradcheck(fn, (weight,))


def test_no_grad_and_inference_mode_give_the_graph_results():
    weight, u, v = _inputs((6, 4, 3), torch.float32, seed=4)
    w = weight.clone().requires_grad_()
    u1, v1 = u.clone(), v.clone()
    out1, state1 = _ops.sn_forward_transposed(w, u1, v1, 2, 1e-12, 1.0, True)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            u2, v2 = u.clone(), v.clone()
            out2, state2 = _ops.sn_forward_transposed(w, u2, v2, 2, 1e-12, 1.0, True)
        assert out2.grad_fn is None
        assert torch.equal(out1.detach(), out2) and torch.equal(state1, state2)
        assert torch.equal(u1, u2) and torch.equal(v1, v2)


def test_vectors_versions_saved_weight_and_saved_tensor_hooks():
    weight, u, v = _inputs((3, 4), torch.float32, seed=6)
    weight.requires_grad_()
    before = (u._version, v._version)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = _ops.sn_forward_transposed(weight, u, v, 1, 1e-12, 1.0, True)
    assert u._version > before[0] and v._version > before[1]
    assert torch.Size([3, 4]) in packed  # the weight went through the user's hooks
    out, _ = _ops.sn_forward_transposed(weight, u, v, 1, 1e-12, 1.0, True)  # no hooks: version-checked
    with torch.no_grad():
        weight.add_(1.0)  # the saved weight is stale now: backward must refuse
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_bad_inputs_raise_with_the_op_name():
    weight, u, v = _inputs((3, 4), torch.float32, seed=7)
    with pytest.raises(RuntimeError, match=r"bsn_cuda::sn_forward: expected weight with at least 1 dimension"):
        _ops.sn_forward_transposed(torch.tensor(1.0), u, v, 1, 1e-12, 1.0, True)
    with pytest.raises(RuntimeError, match=r"bsn_cuda::sn_forward: expected u to have 4 elements"):
        _ops.sn_forward_transposed(weight.requires_grad_(), v, u, 1, 1e-12, 1.0, True)  # roles swapped
    with pytest.raises(RuntimeError, match=r"expected v not to require grad"):
        _ops.sn_forward_transposed(weight, u, v.clone().requires_grad_(), 1, 1e-12, 1.0, True)
