"""torch.compile(fullgraph=True) of models using the fused SN / BSN: no graph
breaks, same outputs, gradients and buffers as eager over a few training steps."""

import copy

import pytest
import torch
from torch import nn

from conftest import DEVICES

import bsn_cuda
from bsn_cuda import functional

TOL = dict(rtol=1e-5, atol=1e-6)


def _discriminator(kind):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(16, 16, 1),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 1),
    )
    if kind == "mixed":  # BSN on the convs (the 1x1 one takes its SN path), scaled SN on the linear
        for index in (0, 2, 4):
            bsn_cuda.bidirectional_spectral_norm(model[index], n_power_iterations=2)
        bsn_cuda.spectral_norm(model[6], n_power_iterations=2, scale=1.5)
        return model
    return bsn_cuda.apply_spectral_norm(model, kind=kind, n_power_iterations=2)


def _state(model):
    return {k: v.detach().clone() for k, v in list(model.named_buffers()) + list(model.named_parameters())}


def _sigmas(model):
    return [bsn_cuda.get_sigma(m) for m in model if hasattr(m, "parametrizations")]


# aot_eager covers dynamo (fullgraph) + AOTAutograd (functionalization of the
# in-place buffer updates, the autograd registration) quickly; one inductor run
# (slow to compile on CPU) checks the generated code path end to end.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,backend", [("sn", "aot_eager"), ("bsn", "aot_eager"), ("mixed", "inductor")])
def test_compiled_discriminator_matches_eager(kind, backend, device):
    torch._dynamo.reset()
    eager = _discriminator(kind).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_compiled = torch.optim.SGD(compiled_model.parameters(), lr=0.05)

    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 3, 16, 16, generator=gen).to(device)
        out_eager, out_compiled = eager(x), compiled(x)
        torch.testing.assert_close(out_compiled, out_eager, **TOL)
        out_eager.square().mean().backward()
        out_compiled.square().mean().backward()
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=f"step {step}: grad of {name}")
        opt_eager.step(), opt_compiled.step()
        opt_eager.zero_grad(), opt_compiled.zero_grad()
        # Buffers (u, v, sigma) were updated in place by the compiled graph too.
        expected, got = _state(eager), _state(compiled_model)
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], **TOL, msg=f"step {step}: {name}")
        torch.testing.assert_close(_sigmas(compiled_model), _sigmas(eager), **TOL)

    eager.eval(), compiled_model.eval()
    before = _state(compiled_model)
    x = torch.randn(4, 3, 16, 16, generator=gen).to(device)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), **TOL)
    after = _state(compiled_model)
    for name in before:
        if not name.endswith("_sigma") and not name.endswith("_sigmas"):
            assert torch.equal(before[name], after[name]), f"{name} changed in eval"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_functional_api_without_graph_breaks(device):
    torch._dynamo.reset()
    weight = torch.randn(8, 4, 3, 3, device=device, requires_grad=True)
    u, v = functional.init_sn_vectors(weight.detach())
    u0, v0, u1, v1 = functional.init_bsn_vectors(weight.detach())
    state = [t.clone() for t in (u, v, u0, v0, u1, v1)]

    def both(w, u, v, u0, v0, u1, v1):
        return functional.spectral_norm(w, u, v, scale=2.0) + functional.bidirectional_spectral_norm(w, u0, v0, u1, v1)

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    out_compiled = compiled(weight, *state)
    out_eager = both(weight, u, v, u0, v0, u1, v1)
    torch.testing.assert_close(out_compiled, out_eager, **TOL)
    for got, expected in zip(state, (u, v, u0, v0, u1, v1)):
        torch.testing.assert_close(got, expected, **TOL)
    grad = torch.randn_like(weight)
    (g_compiled,) = torch.autograd.grad(out_compiled, weight, grad)
    (g_eager,) = torch.autograd.grad(out_eager, weight, grad)
    torch.testing.assert_close(g_compiled, g_eager, **TOL)
