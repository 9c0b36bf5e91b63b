"""Grouped SN (bsn_cuda.group_spectral_norm) and update modes (issue 22).

Oracle: the per-layer path (the same model, ungrouped, same update mode),
bitwise: losses, gradients, parameters, u/v and sigma logs over training
steps with an optimizer. Plus the grouped ops themselves (opcheck, float64
gradcheck/gradgradcheck, errors), the one-call/one-node structure, and the
update modes' rules (.data writes, two-backward loops, explicit steps).
"""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bsn_cuda
from bsn_cuda import _ops
from bsn_cuda.nn import grouping
from grouping_models import MODELS, build

pytestmark = pytest.mark.skipif(not bsn_cuda.HAS_EXTENSION, reason="needs the compiled ops")


def _scaled(inputs, k):
    first = inputs[0] * (1 + 0.5 * k)
    return (first,) + tuple(inputs[1:])


def in_mode(model, mode, grouped):
    """``model`` grouped with update ``mode``, or with ``mode`` set per layer (the per-layer oracle)."""
    if grouped:
        bsn_cuda.group_spectral_norm(model, update=mode)
    else:
        bsn_cuda.set_update_mode(model, mode)
    return model


def train(name, grouped, mode="forward", forwards=2, steps=3, two_backward=False, seed=0):
    model, inputs = build(name, seed)
    in_mode(model, mode, grouped)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    record = []
    for _ in range(steps):
        opt.zero_grad()
        losses = []
        if two_backward:
            for k in range(forwards):
                loss = model(*_scaled(inputs, k))
                loss.backward()
                losses.append(loss.detach())
        else:
            losses = [model(*_scaled(inputs, k)) for k in range(forwards)]
            sum(losses).backward()
        record.append(([x.detach() for x in losses], [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        opt.step()
    return model, record


def assert_same_run(a, b):
    (ma, ra), (mb, rb) = a, b
    for (la, ga), (lb, gb) in zip(ra, rb):
        assert all(torch.equal(x, y) for x, y in zip(la, lb)), "losses differ"
        assert len(ga) == len(gb) and all(torch.equal(x, y) for x, y in zip(ga, gb)), "gradients differ"
    for (n, x), (_, y) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(x, y), n
    for (n, x), (_, y) in zip(ma.named_buffers(), mb.named_buffers()):
        assert torch.equal(x, y) or (x.isnan().all() and y.isnan().all()), n


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", grouping.UPDATE_MODES)
def test_grouped_equals_per_layer(name, mode):
    assert_same_run(train(name, False, mode), train(name, True, mode))


@pytest.mark.parametrize("mode", grouping.UPDATE_MODES)
def test_grouped_equals_per_layer_two_backward_loop(mode):
    assert_same_run(train("biggan_d", False, mode, two_backward=True),
                    train("biggan_d", True, mode, two_backward=True))


def test_forward_mode_is_torch_behaviour_per_layer():
    # update="forward" per layer is the path without any mode (set_update_mode installs nothing).
    a, b = build("mixed")[0], build("mixed")[0]
    bsn_cuda.set_update_mode(b, "once")
    bsn_cuda.set_update_mode(b, "forward")
    assert all(owner.__dict__.get("_intercept") is None for owner, _, _ in grouping._layers(b))
    x = torch.randn(1, 3, 7, 7)
    assert torch.equal(a(x), b(x))


def _count_calls(monkeypatch):
    calls = {"group": 0, "layer": 0}
    group_forward = _ops.group_forward

    def counting_group(*args, **kwargs):
        calls["group"] += 1
        return group_forward(*args, **kwargs)

    monkeypatch.setattr(_ops, "group_forward", counting_group)
    for name in ("sn_forward", "bsn_forward", "sn_forward_transposed"):
        fn = getattr(_ops, name)

        def counting(*args, _fn=fn, **kwargs):
            calls["layer"] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(_ops, name, counting)
    return calls


@pytest.mark.parametrize("name", ["sngan_resnet", "biggan_g", "conditional_d"])
def test_one_op_call_and_one_node_per_forward(name, monkeypatch):
    model, inputs = build(name)
    bsn_cuda.group_spectral_norm(model)
    calls = _count_calls(monkeypatch)
    nodes = set()
    group = model._bsn_spectral_norm_group
    original = group.compute

    def spy(*args, **kwargs):
        outs, weights = original(*args, **kwargs)
        nodes.update(id(o.grad_fn) for o in outs if o is not None)
        return outs, weights

    monkeypatch.setattr(group, "compute", spy)
    model(*inputs).backward()
    assert calls == {"group": 1, "layer": 0}
    assert len(nodes) == 1
    assert len(group.layers) == len(grouping._layers(model))


def test_mixed_model_groups_all_but_the_legacy_dim1_training_layer(monkeypatch):
    model, inputs = build("mixed")
    bsn_cuda.group_spectral_norm(model)
    calls = _count_calls(monkeypatch)
    model(*inputs)
    assert calls == {"group": 1, "layer": 1}  # the legacy ConvTranspose (dim 1) runs per layer in training
    model.eval()
    calls.update(group=0, layer=0)
    model(*inputs)
    assert calls == {"group": 1, "layer": 0}


def test_outside_the_model_forward_layers_run_per_layer(monkeypatch):
    model, inputs = build("sngan_cnn")
    bsn_cuda.group_spectral_norm(model)
    calls = _count_calls(monkeypatch)
    model.convs[0].weight
    assert calls == {"group": 0, "layer": 1}


def test_ungroup_restores_the_per_layer_path():
    a = build("conditional_d")
    b = build("conditional_d")
    bsn_cuda.ungroup_spectral_norm(bsn_cuda.group_spectral_norm(b[0]))
    assert all(owner.__dict__.get("_intercept") is None for owner, _, _ in grouping._layers(b[0]))
    assert not b[0]._forward_pre_hooks and not b[0]._forward_hooks
    assert torch.equal(a[0](*a[1]), b[0](*b[1]))
    with pytest.raises(ValueError, match="without a group"):
        bsn_cuda.ungroup_spectral_norm(b[0])


def test_state_dict_keys_and_parameters_unchanged():
    model, _ = build("mixed")
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    bsn_cuda.group_spectral_norm(model)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    other, _ = build("mixed", seed=3)
    other.load_state_dict(model.state_dict())


def test_bad_arguments():
    model, _ = build("sngan_cnn")
    with pytest.raises(ValueError, match="expected update to be one of 'forward', 'once', 'never', got 'always'"):
        bsn_cuda.group_spectral_norm(model, update="always")
    bsn_cuda.group_spectral_norm(model)
    with pytest.raises(ValueError, match="already has one|without a group"):
        bsn_cuda.group_spectral_norm(model)
    outer = nn.Sequential(model)
    with pytest.raises(ValueError, match="already grouped"):
        bsn_cuda.group_spectral_norm(outer)


# ---------------------------------------------------------------------------
# Double backward (WGAN-GP), AMP, copies.


def _gp_step(model, x, y):
    x = x.clone().requires_grad_(True)
    out = model(x, y)
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    loss = out + (g.flatten(1).norm(dim=1) - 1).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("mode", grouping.UPDATE_MODES)
def test_gradient_penalty_double_backward_bitwise(mode):
    runs = []
    for grouped in (False, True):
        model, (x, y) = build("conditional_d")
        in_mode(model, mode, grouped)
        runs.append([_gp_step(model, x, y) for _ in range(2)])
    for (la, ga), (lb, gb) in zip(*runs):
        assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_autocast_grouped_equals_per_layer():
    outs = []
    for grouped in (False, True):
        model, inputs = build("sngan_resnet")
        if grouped:
            bsn_cuda.group_spectral_norm(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(*inputs)
        loss.float().backward()
        outs.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0]) and all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


@pytest.mark.parametrize("mode", grouping.UPDATE_MODES)
def test_deepcopy_and_pickle_keep_the_group(mode, monkeypatch):
    model, inputs = build("conditional_d")
    bsn_cuda.group_spectral_norm(model, update=mode)
    model(*inputs).backward()
    with torch.no_grad():  # the legacy layer's module.weight is a graph output after a training forward,
        model(*inputs)     # which no tensor deepcopy takes (torch's legacy SN alike)
    calls = _count_calls(monkeypatch)
    for make in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        c, ref = make(model), make(model)
        assert c._bsn_spectral_norm_group is not model._bsn_spectral_norm_group
        assert all(owner.__dict__["_bsn_group"][0] is c._bsn_spectral_norm_group
                   for owner, _, _ in grouping._layers(c))
        bsn_cuda.ungroup_spectral_norm(ref)
        calls.update(group=0)
        out = c(*inputs)
        assert calls["group"] == 1
        assert torch.equal(out, ref(*inputs))


# ---------------------------------------------------------------------------
# Update modes.


def _vectors(model):
    return [b.clone() for n, b in model.named_buffers() if n.endswith(("_u", "_v", "_u0", "_v0", "_u1", "_v1"))]


@pytest.mark.parametrize("grouped", [False, True])
def test_once_updates_once_per_step_and_shares_w_sn(grouped):
    model, (x,) = build("sngan_cnn")
    ref = copy.deepcopy(model)
    in_mode(model, "once", grouped)
    seen = []
    layer = model.convs[3].parametrizations.weight[0]
    hook = layer.register_forward_hook(lambda m, a, out: seen.append(out))
    loss = model(x) + model(2 * x) + model(3 * x)
    hook.remove()
    assert seen[0] is seen[1] is seen[2]  # one W_sn, one graph, for the three forwards
    ref(x)  # one training forward of torch's behaviour: one update
    assert all(torch.equal(a, b) for a, b in zip(_vectors(model), _vectors(ref)))
    loss.backward()
    before = _vectors(model)
    model(x).backward()  # same step, after the backward: recomputed, no new update
    assert all(torch.equal(a, b) for a, b in zip(before, _vectors(model)))
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # a step boundary
    model(x)
    assert not all(torch.equal(a, b) for a, b in zip(before, _vectors(model)))


@pytest.mark.parametrize("grouped", [False, True])
def test_once_never_returns_a_stale_weight(grouped):
    model, (x,) = build("sngan_resnet")
    in_mode(model, "once", grouped)
    layer = model.fc
    w = layer.parametrizations.weight.original

    def expected():  # W / sigma from the current weight and vectors, no update
        p = layer.parametrizations.weight[0]
        return p.normalize(w.detach(), False)[0]

    model(x).backward()
    # 1. a counted in-place write between two forwards
    model(x)
    with torch.no_grad():
        w.mul_(0.5)
    assert torch.equal(layer.weight, expected())
    # 2. p.data = t (new storage) between two forwards, no backward in between
    model(x)
    w.data = w.data * 2
    assert torch.equal(layer.weight, expected())
    # 3. a .data write after a backward
    model(x).backward()
    w.data.mul_(0.5)
    assert torch.equal(layer.weight, expected())
    # 4. a .data write after an optimizer step
    model(x)
    torch.optim.SGD([w], lr=0.0).step()
    w.data.mul_(3.0)
    out = model.fc.weight
    assert torch.equal(out, expected())
    # 5. the documented blind spot (.data between forwards, nothing in between): invalidate_spectral_norm
    model(x)
    w.data.mul_(0.5)
    bsn_cuda.invalidate_spectral_norm(model)
    assert torch.equal(layer.weight, expected())


def test_once_under_no_grad_keeps_nothing():
    model, (x,) = build("sngan_cnn")
    bsn_cuda.group_spectral_norm(model, update="once")
    with torch.no_grad():
        model(x)
    w = model.fc.parametrizations.weight.original
    w.data.mul_(0.5)  # no graph was recorded, so nothing was shared: the next forward sees this
    with torch.no_grad():
        expected = model.fc.parametrizations.weight[0].normalize(w, False)[0]
        assert torch.equal(model.fc.weight, expected)


@pytest.mark.parametrize("grouped", [False, True])
def test_never_freezes_and_power_iteration_step_is_a_forward_update(grouped):
    model, (x,) = build("mixed")
    ref = copy.deepcopy(model)
    in_mode(model, "never", grouped)
    before = _vectors(model)
    model(x).backward()
    model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, _vectors(model)))
    bsn_cuda.power_iteration_step(model)
    ref(x)  # one training forward: one update of every layer
    assert all(torch.equal(a, b) for a, b in zip(_vectors(ref), _vectors(model)))


def test_power_iteration_step_counts_as_the_once_update():
    model, (x,) = build("sngan_cnn")
    bsn_cuda.group_spectral_norm(model, update="once")
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    bsn_cuda.power_iteration_step(model)
    after = _vectors(model)
    model(x)
    assert all(torch.equal(a, b) for a, b in zip(after, _vectors(model)))


def test_once_is_eager_only():
    model, (x,) = build("sngan_cnn")
    bsn_cuda.set_update_mode(model, "once")
    params = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="plain eager execution"):
        torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)))(params)


def test_eval_forward_does_not_update_in_any_mode():
    for mode in grouping.UPDATE_MODES:
        model, inputs = build("biggan_g")
        bsn_cuda.group_spectral_norm(model, update=mode)
        model.eval()
        before = _vectors(model)
        model(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(before, _vectors(model)))


# ---------------------------------------------------------------------------
# The ops.


def _op_inputs(dtype=torch.float64, update=True):
    torch.manual_seed(0)
    ws = [torch.randn(8, 4, dtype=dtype, requires_grad=True), torch.randn(6, 3, 3, 3, dtype=dtype, requires_grad=True),
          torch.randn(5, 7, 3, dtype=dtype, requires_grad=True), torch.randn(4, 5, 2, dtype=dtype, requires_grad=True)]
    sizes = [8, 4, 6, 27, 3, 54, 21, 5, 5, 8]
    vs = [F.normalize(torch.randn(n, dtype=dtype), dim=0) for n in sizes]
    args = ([0, 1, 2, 0], [0, 0, 0, -2], [1, 2, 1, 3], [1e-12] * 4, [1.0, 2.0, 0.5, 1.0], [update] * 4)
    return ws, vs, args


def test_opcheck():
    ws, vs, args = _op_inputs()
    # test_aot_dispatch_dynamic is left out for group_forward: torch's auto_functionalize does not take
    # mutable ops that return Tensor[] (torch/_higher_order_ops/auto_functionalize.py); groups are
    # eager-only (compiled models run per layer).
    torch.library.opcheck(torch.ops.bsn_cuda.group_forward.default, (ws, vs) + args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    outs, states = torch.ops.bsn_cuda.group_forward(ws, vs, *args)
    grads = [torch.randn_like(w) for w in ws]
    torch.library.opcheck(torch.ops.bsn_cuda.group_backward.default,
                          (grads, [w.detach() for w in ws], states, args[0], args[1], args[4]))


def test_ops_equal_per_layer_ops():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        ws, vs, args = _op_inputs(dtype)
        ref_vs = [v.clone() for v in vs]
        outs, states = torch.ops.bsn_cuda.group_forward(ws, vs, *args)
        r = [torch.ops.bsn_cuda.sn_forward(ws[0], ref_vs[0], ref_vs[1], 0, 1, 1e-12, 1.0, True),
             torch.ops.bsn_cuda.bsn_forward(ws[1], *ref_vs[2:6], 2, 1e-12, 2.0, True),
             _ops.sn_forward_transposed(ws[2], ref_vs[7], ref_vs[6], 1, 1e-12, 0.5, True),
             torch.ops.bsn_cuda.sn_forward(ws[3], ref_vs[8], ref_vs[9], -2, 3, 1e-12, 1.0, True)]
        assert all(torch.equal(a, b[0]) and torch.equal(s, b[1]) for a, s, b in zip(outs, states, r))
        assert all(torch.equal(a, b) for a, b in zip(vs, ref_vs))
        g = [torch.randn_like(w) for w in ws]
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(outs, ws, g),
                                                     torch.autograd.grad([x[0] for x in r], ws, g)))


def test_gradcheck_and_gradgradcheck():
    ws, vs, args = _op_inputs(update=False)

    def f(*w):
        return tuple(torch.ops.bsn_cuda.group_forward(list(w), [v.clone() for v in vs], *args)[0])

    assert torch.autograd.gradcheck(f, tuple(ws))
    assert torch.autograd.gradgradcheck(f, tuple(ws))


def test_frozen_layer_gets_no_gradient_and_unused_output_no_work():
    ws, vs, args = _op_inputs(torch.float32)
    ws[1] = ws[1].detach()
    outs, _ = torch.ops.bsn_cuda.group_forward(ws, vs, *args)
    assert not outs[1].requires_grad and outs[0].requires_grad
    (outs[0].sum() + outs[2].sum()).backward()
    assert ws[0].grad is not None and ws[2].grad is not None and ws[3].grad is None


def test_shared_vectors_run_in_list_order():
    torch.manual_seed(0)
    w = torch.randn(5, 4)
    u, v = F.normalize(torch.randn(5), dim=0), F.normalize(torch.randn(4), dim=0)
    u2, v2 = u.clone(), v.clone()
    outs, _ = torch.ops.bsn_cuda.group_forward([w, w * 2], [u, v, u, v], [0, 0], [0, 0], [1, 1], [1e-12] * 2,
                                               [1.0] * 2, [True] * 2)
    a, _ = torch.ops.bsn_cuda.sn_forward(w, u2, v2, 0, 1, 1e-12, 1.0, True)
    b, _ = torch.ops.bsn_cuda.sn_forward(w * 2, u2, v2, 0, 1, 1e-12, 1.0, True)
    assert torch.equal(outs[0], a) and torch.equal(outs[1], b) and torch.equal(u, u2)


@pytest.mark.parametrize("call", ["torch.ops", "fake"])
def test_errors_name_the_op_the_layer_and_the_argument(call):
    ws, vs, args = _op_inputs(torch.float32)
    vs[3] = torch.zeros(5)

    def run(*a):
        if call == "fake":
            from torch._subclasses.fake_tensor import FakeTensorMode
            with FakeTensorMode(allow_non_fake_inputs=True):
                return torch.ops.bsn_cuda.group_forward(*a)
        return torch.ops.bsn_cuda.group_forward(*a)

    with pytest.raises(RuntimeError, match=r"bsn_cuda::group_forward: layer 1 \(bsn\): bsn_cuda::bsn_forward: "
                                           r"expected v0 to have 27 elements .* got 5"):
        run(ws, vs, *args)
    ws, vs, args = _op_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="bsn_cuda::group_forward: expected kinds\\[1\\] to be 0 \\(sn\\), 1 "
                                           "\\(bsn\\) or 2 \\(sn_transposed\\), got 7"):
        run(ws, vs, [0, 7, 2, 0], *args[1:])
    with pytest.raises(RuntimeError, match="bsn_cuda::group_forward: expected dims to have 4 elements "
                                           "\\(one per weight\\), got 3"):
        run(ws, vs, args[0], [0, 0, 0], *args[2:])
    with pytest.raises(RuntimeError, match="bsn_cuda::group_forward: expected vectors to have 10 elements"):
        run(ws, vs[:-1], *args)


@pytest.mark.parametrize("mode", grouping.UPDATE_MODES)
def test_variant_layers_run_per_layer_inside_a_group(mode, monkeypatch):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(bsn_cuda.spectral_norm(nn.Linear(6, 5), coeff=0.9),
                             bsn_cuda.spectral_norm(nn.Linear(5, 4), learnable_scale=True),
                             bsn_cuda.nn.utils.spectral_norm(nn.Linear(4, 3), coeff=0.8),
                             bsn_cuda.spectral_norm(nn.Linear(3, 2)))
    a, b = make(), make()
    bsn_cuda.set_update_mode(a, mode)
    bsn_cuda.group_spectral_norm(b, update=mode)
    x = torch.randn(2, 6)
    calls = _count_calls(monkeypatch)
    for m in (a, b):
        for _ in range(2):
            m(x).sum().backward()
    assert calls["group"] == 2
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.buffers(), b.buffers()))


def test_backward_refuses_a_weight_whose_storage_was_replaced():
    # `.data = t` (or a storage freed and regrown, as FSDP2 does when it reshards) is not counted by the
    # version counter: the group's backward sees it through the storage address and raises.
    ws, vs, args = _op_inputs(torch.float32)
    outs, _ = torch.ops.bsn_cuda.group_forward(ws, vs, *args)
    ws[2].data = ws[2].data.clone()
    with pytest.raises(RuntimeError, match=r"expected weights\[2\] \(shape \[5, 7, 3\]\) to hold the memory it had "
                                           r"in the forward, got a tensor whose storage was replaced or freed"):
        sum(o.sum() for o in outs).backward()
    # Untouched weights (or unused outputs) are not checked: a layer not differentiated may change.
    ws, vs, args = _op_inputs(torch.float32)
    outs, _ = torch.ops.bsn_cuda.group_forward(ws, vs, *args)
    ws[2].data = ws[2].data.clone()
    (outs[0].sum() + outs[1].sum()).backward()
    assert ws[0].grad is not None and ws[2].grad is None


class _FakeShardUnit:
    """Stands in for FSDP2's FSDPModule: fully_shard swaps a module's class for a subclass of it."""


@pytest.mark.parametrize("mode", grouping.UPDATE_MODES)
def test_layers_under_an_fsdp2_unit_run_per_layer(mode, monkeypatch):
    # An FSDP2 unit reshards its weights and reduce-scatters their gradients when its own backward is
    # done, before the group's node (created first, run last) could compute them: its layers leave the
    # group, whether fully_shard came before or after grouping (tests/training/test_fsdp.py runs FSDP2).
    monkeypatch.setattr(grouping, "_FSDP_TYPES", (_FakeShardUnit,))
    per_layer = train("sngan_resnet", grouped=False, mode=mode)
    model, inputs = build("sngan_resnet")
    bsn_cuda.group_spectral_norm(model, update=mode)
    block = model.blocks[0]
    block.__class__ = type("FSDP" + type(block).__name__, (_FakeShardUnit, type(block)), {})
    group = model._bsn_spectral_norm_group
    seen = []
    original = _ops.group_forward

    def spy(weights, *rest):
        seen.append({id(w) for w in weights})
        return original(weights, *rest)

    monkeypatch.setattr(_ops, "group_forward", spy)
    model(*inputs)
    inside = {id(p) for p in block.parameters()}
    assert seen and not (seen[-1] & inside) and len(seen[-1]) == len(group.layers) - 3
    # The results stay those of the per-layer path (train() groups a fresh model: unit it after grouping).
    monkeypatch.setattr(grouping, "_ancestry", _with_unit(grouping._ancestry))
    assert_same_run(per_layer, train("sngan_resnet", grouped=True, mode=mode))


def _with_unit(ancestry):
    def wrapped(model):
        block = model.blocks[0]
        if not isinstance(block, _FakeShardUnit):
            block.__class__ = type("FSDP" + type(block).__name__, (_FakeShardUnit, type(block)), {})
        return ancestry(model)
    return wrapped


@pytest.mark.parametrize("grouped", [False, True])
def test_once_sees_a_replaced_parameter(grouped):
    # A new Parameter object between two forwards of a step: the shared W_sn is not reused (the weight is
    # compared by identity; comparing tensors with == raised "Boolean value of Tensor ... ambiguous").
    model, (x,) = build("sngan_resnet")
    in_mode(model, "once", grouped)
    plist = model.fc.parametrizations.weight
    model(x)
    plist.original = nn.Parameter(plist.original.detach() * 3)
    model(x)
    assert torch.equal(model.fc.weight, plist[0].normalize(plist.original.detach(), False)[0])


def test_once_step_boundaries_come_from_the_weights_optimizer_or_any_if_none_holds_it():
    torch.manual_seed(0)
    x = torch.randn(2, 6, dtype=torch.float64)
    unrelated = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)

    def layer():
        m = bsn_cuda.spectral_norm(nn.Linear(6, 5).double())
        bsn_cuda.set_update_mode(m, "once")
        return m, m.parametrizations.weight[0]._u

    def updates(m, u, before):
        old = u.clone()
        before()
        m(x)
        return not torch.equal(u, old)

    # Held by an optimizer: its steps are the boundaries; another optimizer's steps are not.
    held, u = layer()
    opt = torch.optim.SGD(held.parameters(), lr=0.0)
    held(x).sum().backward()
    assert updates(held, u, opt.step)
    assert not updates(held, u, unrelated.step)
    # Held by none (FSDP2's gathered weights: the optimizer holds the shards): any optimizer step.
    free, u = layer()
    free(x)
    assert updates(free, u, unrelated.step)
    assert not updates(free, u, lambda: None)
