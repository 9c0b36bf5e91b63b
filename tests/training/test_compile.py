"""torch.compile(fullgraph=True) of models using the fused SN / BSN: no graph
breaks, same outputs, gradients and buffers as eager over a few training steps;
compiled autograd (the backward captured whole) gives eager's gradients;
mode="reduce-overhead" (CUDA graphs) on a GPU."""

import copy
import math

import pytest
import torch
from conftest import CUDA_USABLE, DEVICES, TOL, build_discriminator, images

import bsn_cuda
from bsn_cuda import functional

requires_cuda_kernels = pytest.mark.skipif(not CUDA_USABLE, reason="CUDA graphs need CUDA and the bsn_cuda CUDA kernels")


def _discriminator(kind):
    """16x16 images, a 1x1 conv (BSN's SN path), two power iterations per layer."""
    return build_discriminator(kind, channels=(8, 16), pointwise=True, size=16, n_power_iterations=2)


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
        torch.testing.assert_close(out_compiled, out_eager, **TOL[torch.float32])
        out_eager.square().mean().backward()
        out_compiled.square().mean().backward()
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL[torch.float32], msg=f"step {step}: grad of {name}")
        opt_eager.step(), opt_compiled.step()
        opt_eager.zero_grad(), opt_compiled.zero_grad()
        # Buffers (u, v, sigma) were updated in place by the compiled graph too.
        expected, got = _state(eager), _state(compiled_model)
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], **TOL[torch.float32], msg=f"step {step}: {name}")
        torch.testing.assert_close(_sigmas(compiled_model), _sigmas(eager), **TOL[torch.float32])

    eager.eval(), compiled_model.eval()
    before = _state(compiled_model)
    x = torch.randn(4, 3, 16, 16, generator=gen).to(device)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), **TOL[torch.float32])
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
    torch.testing.assert_close(out_compiled, out_eager, **TOL[torch.float32])
    for got, expected in zip(state, (u, v, u0, v0, u1, v1)):
        torch.testing.assert_close(got, expected, **TOL[torch.float32])
    grad = torch.randn_like(weight)
    (g_compiled,) = torch.autograd.grad(out_compiled, weight, grad)
    (g_eager,) = torch.autograd.grad(out_eager, weight, grad)
    torch.testing.assert_close(g_compiled, g_eager, **TOL[torch.float32])


# ---------------------------------------------------------------------------
# Compiled autograd: the backward graph captured by dynamo, eager forward.


def _legacy_discriminator():
    def legacy(model):
        for m in model:
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                bsn_cuda.nn.utils.spectral_norm(m)

    return build_discriminator(legacy)


def _compiled_autograd(compiler):
    from torch._dynamo import compiled_autograd

    enable = getattr(compiled_autograd, "_enable", None) or compiled_autograd.enable
    return enable(compiler)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["sn", "bsn", "legacy"])
def test_compiled_autograd_matches_eager(kind, device):
    # Every fused node (SN, BSN, the legacy order) must be capturable: torch's
    # compiled autograd refuses C++ nodes with non-differentiable outputs.
    torch._dynamo.reset()
    eager = (_legacy_discriminator() if kind == "legacy" else build_discriminator(kind)).to(device)
    other = copy.deepcopy(eager)
    captured = []

    def backend(graph, example_inputs):
        captured.append(graph)
        return graph.forward

    def compiler(graph):  # fullgraph: the fused nodes' backward is traced, no graph break
        return torch.compile(graph, backend=backend, fullgraph=True)

    for step in range(2):
        x = images(step, device=device)
        eager(x).square().mean().backward()
        loss = other(x).square().mean()
        with _compiled_autograd(compiler):
            loss.backward()
        for (name, p), q in zip(eager.named_parameters(), other.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL[torch.float32], msg=f"step {step}: grad of {name}")
    assert captured, "compiled autograd did not capture the backward"


# ---------------------------------------------------------------------------
# mode="reduce-overhead": CUDA graphs


@requires_cuda_kernels
@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_compile_reduce_overhead_matches_eager(kind):
    torch._dynamo.reset()
    eager = build_discriminator(kind, device="cuda")
    graphed = copy.deepcopy(eager)
    compiled = torch.compile(graphed, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x = images(step, device="cuda")
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


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@requires_cuda_kernels
def test_torch_compile_reduce_overhead_matches_eager(no_tf32):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = torch.nn.Sequential(
        bsn_cuda.bidirectional_spectral_norm(torch.nn.Conv2d(8, 16, 3, padding=1), n_power_iterations=2),
        torch.nn.LeakyReLU(0.2),
        bsn_cuda.spectral_norm(torch.nn.Conv2d(16, 16, 3, padding=1)),
        torch.nn.Flatten(),
        bsn_cuda.spectral_norm(torch.nn.Linear(16 * 8 * 8, 1), scale=1.5),
    ).to("cuda")
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, mode="reduce-overhead")
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(4, 8, 8, 8, generator=gen).to("cuda")
        out_eager = eager(x)
        out_compiled = compiled(x)
        torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
        out_eager.square().mean().backward()
        out_compiled.square().mean().backward()
    torch.cuda.synchronize()
    for (name, a), (_, b) in zip(model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"buffer {name}")
    for (name, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=f"grad {name}")
