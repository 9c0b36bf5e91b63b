"""EMA of SN/BSN models (bsn_cuda.ema): averaged weights with unit vectors.

Averaging every float entry of a state_dict (the naive EMA) shortens the unit
vectors and so underestimates sigma; bsn_cuda's EMA keeps them unit length.
"""

import copy

import pytest
import torch
from conftest import assert_equal_dicts, build_discriminator, images, power_vectors

import bsn_cuda
from bsn_cuda import reference
from bsn_cuda.ema import EMA, refresh_spectral_norm, update_ema
from bsn_cuda.nn import SpectralNorm


def _true_sigma(norm, weight):
    """The exact quantity the layer's sigma estimates (SN: ||W_mat||_2; BSN: the mean over both matricizations)."""
    w = weight.detach().double()
    if isinstance(norm, SpectralNorm):
        return torch.linalg.matrix_norm(reference.matricize(w, norm.dim), ord=2)
    dims = (0,) if norm.single else (0, 1)
    return sum(torch.linalg.matrix_norm(reference.matricize(w, d), ord=2) for d in dims) / len(dims)


def test_ema_keeps_unit_vectors_where_naive_averaging_does_not(single_thread):
    torch.manual_seed(7)
    model = build_discriminator("mixed")
    ema = EMA(model, decay=0.95)
    naive = copy.deepcopy(model).eval()  # StudioGAN-style: average every float entry of the state_dict
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(40):
        loss = model(images(step)).square().mean() - model(images(step + 100)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(model)
        with torch.no_grad():
            current = model.state_dict()
            for key, value in naive.state_dict().items():
                if value.is_floating_point():
                    value.lerp_(current[key], 0.05)

    # The parameters are the same average in both.
    for (name, p), q in zip(ema.module.named_parameters(), naive.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    naive_norms = [v.norm().item() for v in power_vectors(naive).values()]
    ema_norms = [v.norm().item() for v in power_vectors(ema.module).values()]
    assert min(naive_norms) < 0.98  # averaged unit vectors are shorter
    assert all(abs(n - 1) < 1e-5 for n in ema_norms), ema_norms
    assert not ema.module.training and all(not p.requires_grad for p in ema.module.parameters())

    # Sanity of the EMA model: its sigma estimates the averaged weight's true one
    # (an estimate from below); the naive one underestimates by ~|u| |v|.
    x = images(999)
    with torch.no_grad():
        out = ema(x)
        naive(x)
    assert torch.isfinite(out).all()
    ratios_ema, ratios_naive = [], []
    for index in (0, 2, 5):
        for m, ratios in ((ema.module, ratios_ema), (naive, ratios_naive)):
            layer = m[index]
            norm = layer.parametrizations.weight[0]
            ratios.append((_true_sigma(norm, layer.parametrizations.weight.original) / bsn_cuda.get_sigma(layer)).item())
    assert all(0.999 < r < 1.01 for r in ratios_ema), ratios_ema
    assert max(ratios_naive) > 1.05, ratios_naive

    # A state_dict of the EMA round-trips; refresh_spectral_norm repairs averaged vectors.
    restored = EMA(build_discriminator("mixed", seed=1))
    restored.load_state_dict(ema.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored(x), out, rtol=0, atol=0)
    refresh_spectral_norm(naive, n_power_iterations=3)
    assert all(abs(v.norm().item() - 1) < 1e-5 for v in power_vectors(naive).values())


def test_update_ema_options_and_errors():
    model = build_discriminator("sn")
    ema_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model(images(0))  # move the live vectors
    update_ema(ema_model, model, 0.0, n_power_iterations=0)  # decay 0: a copy, vectors copied
    assert_equal_dicts(
        {k: v for k, v in ema_model.state_dict().items()}, {k: v for k, v in model.state_dict().items()}, "decay=0"
    )
    update_ema(ema_model, model, 1.0)  # decay 1: parameters frozen; vectors iterate on them
    for (name, p), q in zip(ema_model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    for name, vec in power_vectors(ema_model).items():
        torch.testing.assert_close(vec.norm(), torch.tensor(1.0), msg=name)
    with pytest.raises(ValueError, match=r"expected decay in \[0, 1\], got 1.5"):
        update_ema(ema_model, model, 1.5)
    with pytest.raises(TypeError, match="expected decay to be a float, got str"):
        update_ema(ema_model, model, "0.9")
    with pytest.raises(ValueError, match="expected n_power_iterations >= 0, got -1"):
        update_ema(ema_model, model, 0.9, n_power_iterations=-1)
    with pytest.raises(TypeError, match="expected ema_model to be a torch.nn.Module"):
        update_ema(None, model, 0.9)
    with pytest.raises(ValueError, match="different parameters or buffers"):
        update_ema(build_discriminator("bsn"), model, 0.9)
