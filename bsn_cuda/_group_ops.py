"""The grouped ops' Python side: fake kernels, double backward, the entry point.

``bsn_cuda::group_forward`` runs the SN/BSN forwards of many layers in one op
call, ``bsn_cuda::group_backward`` their backwards (schemas in csrc/ops.cpp,
contract in docs/design.md "Grouped ops"). Layer ``i`` is, by ``kinds[i]``:

* ``KIND_SN`` (0): ``sn_forward(weights[i], u, v, dims[i], ...)``, two vectors;
* ``KIND_BSN`` (1): ``bsn_forward(weights[i], u0, v0, u1, v1, ...)``, four vectors;
* ``KIND_SN_TRANSPOSED`` (2): ``sn_forward(weights[i].reshape(size(0), -1), u, v, dim=1)``
  (torch's legacy v-first order; ``u``, ``v`` of that matrix, i.e. torch's ``v``, ``u``),
  output in the weight's shape.

``vectors`` holds every layer's vectors in layer order. The result is
``(outs, states)``, each layer's exactly as its per-layer op gives them.
"""

import torch

from . import _contract, _ops, reference

__all__ = ["KIND_SN", "KIND_BSN", "KIND_SN_TRANSPOSED", "GROUP_DEVICES", "group_forward", "group_backward"]

KIND_SN, KIND_BSN, KIND_SN_TRANSPOSED = 0, 1, 2
_FORWARD = "bsn_cuda::group_forward"
_BACKWARD = "bsn_cuda::group_backward"
_KIND_NAMES = {KIND_SN: "sn", KIND_BSN: "bsn", KIND_SN_TRANSPOSED: "sn_transposed"}


def _vector_count(kind):
    return 4 if kind == KIND_BSN else 2


def _rows(t):
    return t.reshape(t.shape[0], -1)


def _check_lists(op, n, **lists):
    for name, values in lists.items():
        torch._check(len(values) == n, lambda: f"{op}: expected {name} to have {n} elements (one per weight), "
                                               f"got {len(values)}")


def _in_layer(op, i, kind, check):
    """Runs a per-layer check with the group op and the layer in front of its message (as csrc/group.cpp)."""
    try:
        return check()
    except RuntimeError as exc:
        raise RuntimeError(f"{op}: layer {i} ({_KIND_NAMES.get(kind, kind)}): {exc}") from None


def _check_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update):
    n = len(weights)
    _check_lists(_FORWARD, n, kinds=kinds, dims=dims, n_power_iterations=n_power_iterations, eps=eps,
                 scales=scales, update=update)
    for i, kind in enumerate(kinds):
        torch._check(kind in _KIND_NAMES,
                     lambda: f"{_FORWARD}: expected kinds[{i}] to be 0 (sn), 1 (bsn) or 2 (sn_transposed), got {kind}")
    expected = sum(_vector_count(k) for k in kinds)
    torch._check(len(vectors) == expected,
                 lambda: f"{_FORWARD}: expected vectors to have {expected} elements (2 per sn/sn_transposed layer, "
                         f"4 per bsn layer), got {len(vectors)}")


def _fake_group_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update):
    _check_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update)
    outs, states, vi = [], [], 0
    for i, (w, kind) in enumerate(zip(weights, kinds)):
        v = vectors[vi:vi + _vector_count(kind)]
        vi += len(v)
        if kind == KIND_BSN:
            _in_layer(_FORWARD, i, kind, lambda: _contract.check_bsn_forward(
                "bsn_cuda::bsn_forward", w, *v, n_power_iterations[i], eps[i], scales[i]))
            size = _contract.bsn_state_size(w.shape)
        else:
            mat, dim = (w, dims[i]) if kind == KIND_SN else (_rows(w), 1)
            _in_layer(_FORWARD, i, kind, lambda: _contract.check_sn_forward(
                "bsn_cuda::sn_forward", mat, v[0], v[1], dim, n_power_iterations[i], eps[i], scales[i]))
            size = _contract.sn_state_size(mat.shape, dim)
        outs.append(w.new_empty(w.shape))
        states.append(w.new_empty(size, dtype=_contract.acc_dtype(w.dtype)))
    return outs, states


def _fake_group_backward(grad_outs, weights, states, kinds, dims, scales):
    _check_lists(_BACKWARD, len(weights), grad_outs=grad_outs, states=states, kinds=kinds, dims=dims,
                 scales=scales)
    grads = []
    for i, (g, w, s, kind) in enumerate(zip(grad_outs, weights, states, kinds)):
        if kind == KIND_BSN:
            _in_layer(_BACKWARD, i, kind, lambda: _contract.check_bsn_backward(
                "bsn_cuda::bsn_backward", g, w, s, scales[i]))
        elif kind == KIND_SN:
            _in_layer(_BACKWARD, i, kind, lambda: _contract.check_sn_backward(
                "bsn_cuda::sn_backward", g, w, s, dims[i], scales[i]))
        else:
            _in_layer(_BACKWARD, i, kind, lambda: _contract.check_sn_backward(
                "bsn_cuda::sn_backward", _rows(g), _rows(w), s, 1, scales[i]))
        grads.append(w.new_empty(w.shape))
    return grads


# ---------------------------------------------------------------------------
# Double backward: each layer's as its per-layer backward op's (bsn_cuda/_ops.py).


def _setup_group_backward(ctx, inputs, output):
    grad_outs, weights, states, kinds, dims, scales = inputs
    ctx.save_for_backward(*grad_outs, *weights, *states)
    ctx.layout = (len(weights), list(kinds), list(dims), list(scales))


def _group_backward_backward(ctx, grad_grads):
    n, kinds, dims, scales = ctx.layout
    saved = ctx.saved_tensors
    grad_outs, weights, states = saved[:n], saved[n:2 * n], saved[2 * n:]
    grad_g, grad_w = [], []
    needs = (True, True)
    for i in range(n):
        g, w, s, h = grad_outs[i], weights[i], states[i], grad_grads[i]
        if h is None:
            grad_g.append(None)
            grad_w.append(None)
            continue
        if kinds[i] == KIND_BSN:
            direction = reference.bsn_direction(s, w.shape)
            gg, gw, _ = _ops._backward_of_backward(h, g, w, s, direction, scales[i], needs)
        elif kinds[i] == KIND_SN:
            direction = reference.sn_direction(s, w.shape, dims[i])
            gg, gw, _ = _ops._backward_of_backward(h, g, w, s, direction, scales[i], needs)
        else:
            w2 = _rows(w)
            direction = reference.sn_direction(s, w2.shape, 1)
            gg, gw, _ = _ops._backward_of_backward(_rows(h), _rows(g), w2, s, direction, scales[i], needs)
            gg, gw = gg.view(g.shape), gw.view(w.shape)
        grad_g.append(gg)
        grad_w.append(gw)
    return grad_g, grad_w, [None] * n, None, None, None


def _register():
    lib = torch.library.Library("bsn_cuda", "IMPL")
    torch.library.register_fake(_FORWARD, _fake_group_forward, lib=lib)
    torch.library.register_fake(_BACKWARD, _fake_group_backward, lib=lib)
    torch.library.register_autograd(_BACKWARD, _group_backward_backward, setup_context=_setup_group_backward,
                                    lib=lib)
    return lib


def _group_devices():
    if not _ops.HAS_EXTENSION:
        return frozenset()
    devices = set()
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        if device in _ops.OP_DEVICES and all(
                torch._C._dispatch_has_kernel_for_dispatch_key(name, key) for name in (_FORWARD, _BACKWARD)):
            devices.add(device)
    return frozenset(devices)


_LIBRARY = _register() if _ops.HAS_EXTENSION else None
#: Device types with a grouped kernel; weights elsewhere run per layer.
GROUP_DEVICES = _group_devices()
_FAST = _ops._C.group_forward if _ops.HAS_EXTENSION else None


def _write_logs(logs, states, kinds):
    with torch.no_grad():
        for log, state, kind in zip(logs, states, kinds):
            if log is not None:
                header = 3 if kind == KIND_BSN else 1
                if log.shape[0] == header:
                    log.copy_(state[:header])
                else:
                    log.copy_(state[:1].expand(log.shape[0]))


def group_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update, logs=None):
    """``bsn_cuda::group_forward`` (lists as in the schema; ``eps``/``scales`` floats, ``update`` bools);
    returns ``(outs, states)``. ``logs``: None or one sigma-log tensor (or None) per layer, written
    from the states as the per-layer entry points write them. Eager calls go through
    ``bsn_cuda._C.group_forward``; compiled ones through ``torch.ops``."""
    if _FAST is not None and not torch.compiler.is_compiling():
        result = _FAST(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update, logs)
        if result is not None:
            return result
    outs, states = torch.ops.bsn_cuda.group_forward.default(weights, vectors, kinds, dims, n_power_iterations,
                                                            eps, scales, update)
    if logs is not None:
        _write_logs(logs, states, kinds)
    return outs, states


def group_backward(grad_outs, weights, states, kinds, dims, scales):
    """``bsn_cuda::group_backward``: each layer's ``*_backward`` op, in one call."""
    return torch.ops.bsn_cuda.group_backward.default(grad_outs, weights, states, kinds, dims, scales)
