"""The fake (meta) kernels of every ``bsn_cuda`` op: output metadata only.

Each runs the op's checks first (:mod:`bsn_cuda._contract`, the same rules and
words as csrc/host.cpp and csrc/group.cpp), so that mistakes surface while
tracing (torch.compile, export, FakeTensor) rather than deep inside a compiled
graph. The checks also guard calls that mix a meta tensor with real ones,
which dispatch here. Registered by :mod:`bsn_cuda._library`.
"""

import torch

from . import _contract
from ._contract import KIND_BSN, KIND_NAMES, KIND_SN

__all__ = ["PER_LAYER", "GROUPED"]


def sn_forward(weight, u, v, dim, n_power_iterations, eps, scale, update, coeff=0.0, gamma=None, track_only=False):
    dim, _, _ = _contract.check_sn_forward(
        "bsn_cuda::sn_forward", weight, u, v, dim, n_power_iterations, eps, scale, coeff, gamma, track_only
    )
    out = weight.new_empty(0 if track_only else weight.shape)
    state = weight.new_empty(_contract.sn_state_size(weight.shape, dim), dtype=_contract.acc_dtype(weight.dtype))
    return out, state


def bsn_forward(weight, u0, v0, u1, v1, n_power_iterations, eps, scale, update, coeff=0.0, gamma=None,
                track_only=False):
    _contract.check_bsn_forward(
        "bsn_cuda::bsn_forward", weight, u0, v0, u1, v1, n_power_iterations, eps, scale, coeff, gamma, track_only
    )
    out = weight.new_empty(0 if track_only else weight.shape)
    state = weight.new_empty(_contract.bsn_state_size(weight.shape), dtype=_contract.acc_dtype(weight.dtype))
    return out, state


def sn_backward(grad_out, weight, state, dim, scale, coeff=0.0, gamma=None):
    _contract.check_sn_backward("bsn_cuda::sn_backward", grad_out, weight, state, dim, scale, coeff, gamma)
    return weight.new_empty(weight.shape)


def bsn_backward(grad_out, weight, state, scale, coeff=0.0, gamma=None):
    _contract.check_bsn_backward("bsn_cuda::bsn_backward", grad_out, weight, state, scale, coeff, gamma)
    return weight.new_empty(weight.shape)


# ---------------------------------------------------------------------------
# The grouped ops (docs/design.md "Grouped ops"): each layer checked as its per-layer op.

_GROUP_FORWARD = "bsn_cuda::group_forward"
_GROUP_BACKWARD = "bsn_cuda::group_backward"


def vector_count(kind):
    """How many of a grouped call's ``vectors`` layer of ``kind`` takes."""
    return 4 if kind == KIND_BSN else 2


def rows(t):
    """``t.reshape(t.shape[0], -1)``: the matrix the legacy kind runs on."""
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
        raise RuntimeError(f"{op}: layer {i} ({KIND_NAMES.get(kind, kind)}): {exc}") from None


def _check_group_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update):
    n = len(weights)
    _check_lists(_GROUP_FORWARD, n, kinds=kinds, dims=dims, n_power_iterations=n_power_iterations, eps=eps,
                 scales=scales, update=update)
    for i, kind in enumerate(kinds):
        torch._check(kind in KIND_NAMES,
                     lambda: f"{_GROUP_FORWARD}: expected kinds[{i}] to be 0 (sn), 1 (bsn) or 2 (sn_transposed), "
                             f"got {kind}")
    expected = sum(vector_count(k) for k in kinds)
    torch._check(len(vectors) == expected,
                 lambda: f"{_GROUP_FORWARD}: expected vectors to have {expected} elements (2 per sn/sn_transposed "
                         f"layer, 4 per bsn layer), got {len(vectors)}")


def group_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update):
    _check_group_forward(weights, vectors, kinds, dims, n_power_iterations, eps, scales, update)
    outs, states, vi = [], [], 0
    for i, (w, kind) in enumerate(zip(weights, kinds)):
        v = vectors[vi:vi + vector_count(kind)]
        vi += len(v)
        if kind == KIND_BSN:
            _in_layer(_GROUP_FORWARD, i, kind, lambda: _contract.check_bsn_forward(
                "bsn_cuda::bsn_forward", w, *v, n_power_iterations[i], eps[i], scales[i]))
            size = _contract.bsn_state_size(w.shape)
        else:
            mat, dim = (w, dims[i]) if kind == KIND_SN else (rows(w), 1)
            _in_layer(_GROUP_FORWARD, i, kind, lambda: _contract.check_sn_forward(
                "bsn_cuda::sn_forward", mat, v[0], v[1], dim, n_power_iterations[i], eps[i], scales[i]))
            size = _contract.sn_state_size(mat.shape, dim)
        outs.append(w.new_empty(w.shape))
        states.append(w.new_empty(size, dtype=_contract.acc_dtype(w.dtype)))
    return outs, states


def group_backward(grad_outs, weights, states, kinds, dims, scales):
    _check_lists(_GROUP_BACKWARD, len(weights), grad_outs=grad_outs, states=states, kinds=kinds, dims=dims,
                 scales=scales)
    grads = []
    for i, (g, w, s, kind) in enumerate(zip(grad_outs, weights, states, kinds)):
        if kind == KIND_BSN:
            _in_layer(_GROUP_BACKWARD, i, kind, lambda: _contract.check_bsn_backward(
                "bsn_cuda::bsn_backward", g, w, s, scales[i]))
        elif kind == KIND_SN:
            _in_layer(_GROUP_BACKWARD, i, kind, lambda: _contract.check_sn_backward(
                "bsn_cuda::sn_backward", g, w, s, dims[i], scales[i]))
        else:
            _in_layer(_GROUP_BACKWARD, i, kind, lambda: _contract.check_sn_backward(
                "bsn_cuda::sn_backward", rows(g), rows(w), s, 1, scales[i]))
        grads.append(w.new_empty(w.shape))
    return grads


#: op name -> fake kernel.
PER_LAYER = {"sn_forward": sn_forward, "bsn_forward": bsn_forward, "sn_backward": sn_backward,
             "bsn_backward": bsn_backward}
GROUPED = {"group_forward": group_forward, "group_backward": group_backward}
