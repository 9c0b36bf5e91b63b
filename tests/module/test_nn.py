"""Module API: drop-in compatibility with torch's spectral norm, helpers, training steps,
dtype and device moves, the functional API. (Checkpoints and pickling: test_serialization.py;
bad arguments: tests/ops/test_bad_arguments.py.)"""

import copy

import pytest
import torch
from conftest import DEVICES, TOL, VECTOR_NAMES, build_discriminator, images, sgd_step, spectral_norms
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import spectral_norm as legacy_spectral_norm
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import bsn_cuda
from bsn_cuda import _ops, functional, reference
from torch.nn.utils.spectral_norm import SpectralNorm as TorchLegacySN

from bsn_cuda.nn import BidirectionalSpectralNorm, FusedLegacySpectralNorm, SpectralNorm

LAYERS = {
    "linear": (lambda: nn.Linear(13, 7), (5, 13)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 4), (2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3), (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 2)), (2, 2, 4, 5, 4)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 3, 3), (2, 4, 6)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3), (2, 4, 5, 5)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 3, 2), (2, 2, 3, 3, 3)),
}


def _input(shape, dtype, device, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)


def _buffers(module, name="weight"):
    return {k: b for k, b in module.parametrizations[name][0].named_buffers() if k in VECTOR_NAMES}


# ---------------------------------------------------------------------------
# Drop-in behaviour


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_spectral_norm_matches_torch_over_training_steps(layer, dtype, device):
    make, input_shape = LAYERS[layer]
    torch.manual_seed(0)
    theirs = torch_spectral_norm(make().to(device, dtype), n_power_iterations=2)
    torch.manual_seed(0)
    ours = bsn_cuda.spectral_norm(make().to(device, dtype), n_power_iterations=2)
    assert ours.parametrizations.weight[0].dim == theirs.parametrizations.weight[0].dim
    torch.testing.assert_close(_buffers(ours), _buffers(theirs), **TOL[dtype])

    for step in range(4):
        x = _input(input_shape, dtype, device, step)
        out_theirs, out_ours = theirs(x), ours(x)
        torch.testing.assert_close(out_ours, out_theirs, **TOL[dtype])
        torch.testing.assert_close(_buffers(ours), _buffers(theirs), **TOL[dtype])
        sgd_step(theirs, out_theirs, lr=0.1)
        sgd_step(ours, out_ours, lr=0.1)
        torch.testing.assert_close(
            ours.parametrizations.weight.original, theirs.parametrizations.weight.original, **TOL[dtype]
        )

    theirs.eval()
    ours.eval()
    before = {k: b.clone() for k, b in _buffers(ours).items()}
    x = _input(input_shape, dtype, device, 99)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[dtype])
    for k, b in _buffers(ours).items():
        assert torch.equal(b, before[k]), f"{k} changed in eval mode"


def test_rng_consumption_matches_torch():
    torch.manual_seed(1)
    torch_spectral_norm(nn.Conv2d(4, 6, 3))
    after_theirs = torch.randn(5)
    torch.manual_seed(1)
    bsn_cuda.spectral_norm(nn.Conv2d(4, 6, 3))
    assert torch.equal(torch.randn(5), after_theirs)
    # BSN with a single matricization draws exactly what SN draws.
    torch.manual_seed(1)
    bsn_cuda.bidirectional_spectral_norm(nn.Linear(4, 6))
    after_bsn = torch.randn(5)
    torch.manual_seed(1)
    torch_spectral_norm(nn.Linear(4, 6))
    assert torch.equal(torch.randn(5), after_bsn)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_embedding_and_vector_weights_match_torch(dtype):
    torch.manual_seed(2)
    theirs = torch_spectral_norm(nn.Embedding(11, 5).to(dtype))
    torch.manual_seed(2)
    ours = bsn_cuda.spectral_norm(nn.Embedding(11, 5).to(dtype))
    idx = torch.tensor([[1, 4, 10], [0, 0, 3]])
    for _ in range(3):
        torch.testing.assert_close(ours(idx), theirs(idx), **TOL[dtype])
    torch.testing.assert_close(_buffers(ours), _buffers(theirs), **TOL[dtype])

    # 1-D weights are normalized exactly, no buffers (torch: F.normalize).
    def vector_module():
        m = nn.Module()
        m.weight = nn.Parameter(torch.randn(7, dtype=dtype))
        return m

    torch.manual_seed(3)
    theirs = torch_spectral_norm(vector_module())
    torch.manual_seed(3)
    ours = bsn_cuda.spectral_norm(vector_module())
    torch.testing.assert_close(ours.weight, theirs.weight, **TOL[dtype])
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"parametrizations.weight.original"}
    torch.testing.assert_close(bsn_cuda.get_sigma(ours).to(dtype), ours.parametrizations.weight.original.norm())
    scaled = bsn_cuda.spectral_norm(vector_module(), scale=2.0)
    torch.testing.assert_close(scaled.weight, 2.0 * reference.normalize_vector(scaled.parametrizations.weight.original))
    bsn_vec = bsn_cuda.bidirectional_spectral_norm(vector_module(), scale=2.0)
    torch.testing.assert_close(bsn_vec.weight, 2.0 * reference.normalize_vector(bsn_vec.parametrizations.weight.original))


def test_eval_mode_uses_stored_vectors_and_scale():
    layer = bsn_cuda.spectral_norm(nn.Conv2d(3, 5, 3), scale=2.0).eval()
    sn = layer.parametrizations.weight[0]
    w = layer.parametrizations.weight.original.detach()
    u, v = sn._u.clone(), sn._v.clone()
    expected = 2.0 * w / (u @ reference.matricize(w, 0) @ v)
    for _ in range(2):
        torch.testing.assert_close(layer.weight, expected)
    assert torch.equal(sn._u, u) and torch.equal(sn._v, v)


# ---------------------------------------------------------------------------
# BSN module


def test_bsn_module_matches_functional_reference():
    torch.manual_seed(7)
    layer = bsn_cuda.bidirectional_spectral_norm(nn.Conv2d(4, 6, 3), n_power_iterations=2, scale=1.5)
    # Recreate the registration with the reference: same draws, 15 warm-up iterations, one check forward.
    torch.manual_seed(7)
    weight = nn.Conv2d(4, 6, 3).weight.detach()
    u0, v0, u1, v1 = functional.init_bsn_vectors(weight)
    reference.bsn_forward(weight, u0, v0, u1, v1, 15, 1e-12, 1.5, True)
    reference.bsn_forward(weight, u0, v0, u1, v1, 2, 1e-12, 1.5, True)
    buffers = _buffers(layer)
    for name, expected in zip(("_u0", "_v0", "_u1", "_v1"), (u0, v0, u1, v1)):
        torch.testing.assert_close(buffers[name], expected)
    out, state = reference.bsn_forward(weight, u0, v0, u1, v1, 2, 1e-12, 1.5, True)
    torch.testing.assert_close(layer.weight, out)
    torch.testing.assert_close(bsn_cuda.get_sigma(layer), state[0])
    torch.testing.assert_close(bsn_cuda.get_sigma(layer, per_matricization=True), state[1:3])


def test_bsn_single_matricization_is_sn_along_dim_0():
    for make in (lambda: nn.Linear(5, 8), lambda: nn.Conv2d(5, 8, 1), lambda: nn.Conv1d(3, 4, 1)):
        torch.manual_seed(8)
        theirs = torch_spectral_norm(make())
        torch.manual_seed(8)
        ours = bsn_cuda.bidirectional_spectral_norm(make())
        norm = ours.parametrizations.weight[0]
        assert norm.single and not hasattr(norm, "_u1")
        torch.testing.assert_close(ours.weight, theirs.weight)
        sigmas = bsn_cuda.get_sigma(ours, per_matricization=True)
        assert sigmas[0] == sigmas[1] == bsn_cuda.get_sigma(ours)


# ---------------------------------------------------------------------------
# remove / convert / apply / get_sigma


@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_remove_spectral_norm_keeps_the_parameter_object(kind):
    layer = nn.Conv2d(3, 5, 3)
    apply = bsn_cuda.spectral_norm if kind == "sn" else bsn_cuda.bidirectional_spectral_norm
    apply(layer, scale=2.0)
    param = layer.parametrizations.weight.original
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(2, 3, 6, 6)
    layer(x).sum().backward()
    optimizer.step()
    layer.eval()
    expected = layer.weight.detach().clone()
    layer.train()  # removal must not run another power iteration
    bsn_cuda.remove_spectral_norm(layer)
    assert type(layer) is nn.Conv2d and not parametrize.is_parametrized(layer)
    assert layer.weight is param and isinstance(layer.weight, nn.Parameter)
    torch.testing.assert_close(layer.weight.detach(), expected)
    assert set(layer.state_dict()) == {"weight", "bias"}
    # The optimizer still updates the module's weight.
    layer(x).sum().backward()
    before = layer.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(layer.weight, before)
    with pytest.raises(ValueError, match="spectral_norm of 'weight' not found"):
        bsn_cuda.remove_spectral_norm(layer)


def _discriminator():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(8, 4, 3),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 1),
    )


@pytest.mark.parametrize("flavour", ["parametrized", "legacy"])
def test_convert_spectral_norm_keeps_outputs_and_parameters(flavour):
    torch.manual_seed(9)
    model = _discriminator()
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            (torch_spectral_norm if flavour == "parametrized" else legacy_spectral_norm)(m, n_power_iterations=2)
    x = torch.randn(4, 3, 11, 11)
    with torch.no_grad():  # (legacy SN cannot be deep-copied after a forward with grad)
        for _ in range(3):
            model(x)  # a few torch power-iteration updates
    reference_model = copy.deepcopy(model)
    params = {id(p) for p in model.parameters()}
    keys = list(model.state_dict())

    bsn_cuda.convert_spectral_norm(model)  # keeps each layer's flavour
    assert {id(p) for p in model.parameters()} == params
    assert list(model.state_dict()) == keys  # the checkpoint format does not change
    for m in (model[0], model[2], model[5]):
        if flavour == "parametrized":
            assert isinstance(m.parametrizations.weight[0], SpectralNorm)
        else:
            hooks = [h for h in m._forward_pre_hooks.values() if isinstance(h, TorchLegacySN)]
            assert len(hooks) == 1 and isinstance(hooks[0], FusedLegacySpectralNorm)
    if flavour == "parametrized":
        assert model[2].parametrizations.weight[0].dim == 1

    # Outputs, buffers and gradients follow torch's, step by step, in both modes.
    for mode in ("eval", "train", "eval"):
        getattr(model, mode)(), getattr(reference_model, mode)()
        for _ in range(3):
            out, expected = model(x), reference_model(x)
            torch.testing.assert_close(out, expected)
            out.sum().backward()
            expected.sum().backward()
            for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
                torch.testing.assert_close(p.grad, q.grad, msg=name)
                p.grad = q.grad = None
    expected_state = reference_model.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected_state[name], msg=name)


def test_convert_spectral_norm_to_parametrization_flavour():
    torch.manual_seed(9)
    model = _discriminator()
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            legacy_spectral_norm(m, n_power_iterations=2)
    x = torch.randn(4, 3, 11, 11)
    with torch.no_grad():
        model(x)
    reference_model = copy.deepcopy(model)
    params = {id(p) for p in model.parameters()}

    bsn_cuda.convert_spectral_norm(model, flavour="parametrization")
    assert {id(p) for p in model.parameters()} == params
    for m in (model[0], model[2], model[5]):
        assert isinstance(m.parametrizations.weight[0], SpectralNorm)
        assert not any(isinstance(h, TorchLegacySN) for h in m._forward_pre_hooks.values())
    assert model[2].parametrizations.weight[0].dim == 1
    model.eval(), reference_model.eval()
    torch.testing.assert_close(model(x), reference_model(x))
    state = model.state_dict()
    assert not any(k.endswith(("weight_orig", "weight_u", "weight_v")) for k in state)
    # The legacy checkpoint of the unconverted model loads into the converted one.
    model.load_state_dict(reference_model.state_dict(), strict=True)
    model.train()
    model(x).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="flavour"):
        bsn_cuda.convert_spectral_norm(model, flavour="legacy")


def test_apply_spectral_norm_covers_all_layer_types():
    model = nn.ModuleDict(
        {
            "c1": nn.Conv1d(2, 3, 3),
            "c2": nn.Conv2d(2, 3, 3),
            "c3": nn.Conv3d(2, 3, 3),
            "t1": nn.ConvTranspose1d(2, 3, 3),
            "t2": nn.ConvTranspose2d(2, 3, 3),
            "t3": nn.ConvTranspose3d(2, 3, 3),
            "lin": nn.Linear(4, 5),
            "emb": nn.Embedding(6, 4),
            "norm": nn.LayerNorm(4),
        }
    )
    for kind, cls in (("sn", SpectralNorm), ("bsn", BidirectionalSpectralNorm)):
        m = bsn_cuda.apply_spectral_norm(copy.deepcopy(model), kind=kind, scale=1.5)
        for name, layer in m.items():
            if name == "norm":
                assert not parametrize.is_parametrized(layer)
                continue
            norm = layer.parametrizations.weight[0]
            assert isinstance(norm, cls) and norm.scale == 1.5
            if kind == "sn":
                assert norm.dim == (1 if name.startswith("t") else 0)
        x = torch.randn(2, 2, 5, 5)
        assert m["c2"](x).shape == (2, 3, 3, 3)
        assert m["emb"](torch.tensor([1, 5])).shape == (2, 4)
        with pytest.raises(ValueError, match="already has a spectral norm"):
            bsn_cuda.apply_spectral_norm(m, kind=kind)
    with pytest.raises(ValueError, match="expected kind 'sn' or 'bsn'"):
        bsn_cuda.apply_spectral_norm(model, kind="spectral")


def test_get_sigma_tracks_the_last_forward():
    layer = bsn_cuda.spectral_norm(nn.Linear(6, 4))
    sn = layer.parametrizations.weight[0]
    layer(torch.randn(3, 6))
    w = layer.parametrizations.weight.original.detach()
    expected = sn._u @ w @ sn._v
    torch.testing.assert_close(bsn_cuda.get_sigma(layer), expected)
    torch.testing.assert_close(layer.weight, w / expected)
    assert "parametrizations.weight.0._sigma" not in layer.state_dict()
    sigma = bsn_cuda.get_sigma(layer)
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(3.0)
    layer(torch.randn(3, 6))
    torch.testing.assert_close(bsn_cuda.get_sigma(layer), 3.0 * sigma, rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="per_matricization=True needs bidirectional_spectral_norm"):
        bsn_cuda.get_sigma(layer, per_matricization=True)
    with pytest.raises(ValueError, match="not found"):
        bsn_cuda.get_sigma(nn.Linear(2, 2))


# ---------------------------------------------------------------------------
# dtype and device moves


@pytest.mark.parametrize("device", DEVICES)
def test_dtype_and_device_moves_carry_the_buffers(device, monkeypatch):
    model = build_discriminator("mixed", dtype=torch.float64)
    model(images(0, torch.float64))
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.float64):
        model.to(device, dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for norm in spectral_norms(model):
            for name in VECTOR_NAMES:
                if hasattr(norm, name):
                    vec = getattr(norm, name)
                    assert vec.dtype == dtype and vec.device.type == device, name
            sigma_log = norm._sigmas if isinstance(norm, BidirectionalSpectralNorm) else norm._sigma
            assert sigma_log.dtype == acc and sigma_log.device.type == device
        x = images(1, dtype, device)
        fused = copy.deepcopy(model)
        out = fused(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert bsn_cuda.get_sigma(fused[0]).dtype == acc
        with monkeypatch.context() as m:  # the same step through the reference
            m.setattr(_ops, "OP_DEVICES", frozenset())
            expected = model(x)
        torch.testing.assert_close(out, expected, **TOL[dtype])
        for (name, a), b in zip(fused.named_buffers(), model.buffers()):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=name)
        sgd_step(fused, out)
        assert all(torch.isfinite(p).all() for p in fused.parameters())
    model.cpu()
    assert all(b.device.type == "cpu" for b in model.buffers())


# ---------------------------------------------------------------------------
# WGAN-GP: gradient penalty through the fused ops vs the reference path.


def _critic(kind, dtype, device):
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 1),
    ).to(device, dtype)
    return bsn_cuda.apply_spectral_norm(model, kind=kind)


def _wgan_gp_step(model, real, fake, alpha):
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_()
    (grad_x,) = torch.autograd.grad(model(mixed).sum(), mixed, create_graph=True)
    penalty = ((grad_x.flatten(1).norm(dim=1) - 1) ** 2).mean()
    loss = model(fake).mean() - model(real).mean() + 10.0 * penalty
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_wgan_gp_step_matches_reference_path(kind, device, monkeypatch):
    dtype = torch.float64
    gen = torch.Generator().manual_seed(11)
    real, fake = (torch.randn(4, 3, 9, 9, generator=gen, dtype=dtype).to(device) for _ in range(2))
    alpha = torch.rand(4, 1, 1, 1, generator=gen, dtype=dtype).to(device)

    fused = _critic(kind, dtype, device)
    plain = copy.deepcopy(fused)
    fused_losses = [_wgan_gp_step(fused, real, fake, alpha) for _ in range(2)]
    monkeypatch.setattr(_ops, "OP_DEVICES", frozenset())  # the reference path
    plain_losses = [_wgan_gp_step(plain, real, fake, alpha) for _ in range(2)]

    torch.testing.assert_close(fused_losses, plain_losses, **TOL[dtype])
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, **TOL[dtype], msg=name)
    for (name, b), c in zip(fused.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, c, **TOL[dtype], msg=name)


# ---------------------------------------------------------------------------
# Functional API


def test_functional_spectral_norm_updates_caller_vectors():
    gen = torch.Generator().manual_seed(12)
    weight = torch.randn(6, 4, 3, generator=gen, requires_grad=True)
    u, v = functional.init_sn_vectors(weight.detach(), dim=1)
    assert u.shape == (4,) and v.shape == (18,)
    functional.warm_up_sn(weight, u, v, dim=1)
    u_ref, v_ref = u.clone(), v.clone()
    out = functional.spectral_norm(weight, u, v, dim=1, n_power_iterations=2, scale=1.5)
    expected, _ = reference.sn_forward(weight, u_ref, v_ref, 1, 2, 1e-12, 1.5, True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(u, u_ref)
    torch.testing.assert_close(v, v_ref)
    frozen = (u.clone(), v.clone())
    out = functional.spectral_norm(weight, u, v, dim=-2, training=False)
    assert torch.equal(u, frozen[0]) and torch.equal(v, frozen[1])
    torch.testing.assert_close(out, weight / (u @ reference.matricize(weight, 1) @ v))
    out.sum().backward()
    assert torch.isfinite(weight.grad).all()


def test_functional_bidirectional_spectral_norm():
    gen = torch.Generator().manual_seed(13)
    weight = torch.randn(6, 4, 3, 3, generator=gen)
    vectors = functional.init_bsn_vectors(weight)
    functional.warm_up_bsn(weight, *vectors, n_power_iterations=5)
    expected_vectors = [t.clone() for t in vectors]
    out = functional.bidirectional_spectral_norm(weight, *vectors, scale=2.0)
    expected, _ = reference.bsn_forward(weight, *expected_vectors, 1, 1e-12, 2.0, True)
    torch.testing.assert_close(out, expected)
    for got, want in zip(vectors, expected_vectors):
        torch.testing.assert_close(got, want)
    # Single matricization: SN along dim 0, pair 1 unused.
    linear = torch.randn(5, 7, generator=gen)
    u0, v0, u1, v1 = functional.init_bsn_vectors(linear)
    assert u1 is None and v1 is None
    u_ref, v_ref = u0.clone(), v0.clone()
    out = functional.bidirectional_spectral_norm(linear, u0, v0, None, None)
    torch.testing.assert_close(out, reference.sn_forward(linear, u_ref, v_ref, 0, 1, 1e-12, 1.0, True)[0])
    vector = torch.randn(9, generator=gen)
    torch.testing.assert_close(functional.bidirectional_spectral_norm(vector, None, None, None, None, scale=3.0), 3.0 * vector / vector.norm())
    torch.testing.assert_close(functional.spectral_norm(vector, None, None), vector / vector.norm())


def test_functional_init_vectors_draw_like_torch():
    torch.manual_seed(14)
    layer = torch_spectral_norm(nn.Conv2d(3, 4, 3))
    torch.manual_seed(14)
    weight = nn.Conv2d(3, 4, 3).weight.detach()
    u, v = functional.init_sn_vectors(weight)
    functional.warm_up_sn(weight, u, v)  # torch's 15 warm-up iterations
    functional.spectral_norm(weight, u, v)  # the forward torch runs at registration (training mode)
    torch.testing.assert_close(u, layer.parametrizations.weight[0]._u)
    torch.testing.assert_close(v, layer.parametrizations.weight[0]._v)


def test_convert_parametrized_vector_weight_and_inference_mode():
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(6))
    torch_spectral_norm(module)
    expected = module.weight.detach().clone()
    bsn_cuda.convert_spectral_norm(module)
    assert isinstance(module.parametrizations.weight[0], SpectralNorm)
    torch.testing.assert_close(module.weight, expected)

    layer = bsn_cuda.bidirectional_spectral_norm(nn.Conv2d(3, 4, 3)).eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        expected = layer(x)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected)
