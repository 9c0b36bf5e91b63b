"""Saving, copying and loading SN/BSN models.

state_dicts in torch's formats both ways (the parametrization's and the legacy
hook's, old checkpoints included), whole-model pickling and deepcopy (torch's
parametrized modules refuse; ours pickle), and checkpoints of torch's SN that
continue training identically after conversion or loading.
"""

import copy
import io
import pickle

import pytest
import torch
from conftest import TOL, assert_equal_dicts, build_discriminator, images, sgd_step, snapshot, spectral_norms
from torch import nn
from torch.nn.utils import spectral_norm as legacy_spectral_norm
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import bsn_cuda
from bsn_cuda.nn import BidirectionalSpectralNorm, SpectralNorm


# ---------------------------------------------------------------------------
# state_dict compatibility


def test_state_dict_round_trip_with_torch_parametrization():
    torch.manual_seed(4)
    theirs = torch_spectral_norm(nn.Conv2d(4, 6, 3))
    x = torch.randn(2, 4, 7, 7)
    for _ in range(3):
        theirs(x)
    ours = bsn_cuda.spectral_norm(nn.Conv2d(4, 6, 3))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(x), theirs(x))

    # And back: train ours, load into a fresh torch module.
    ours.train()
    for _ in range(3):
        ours(x)
    back = torch_spectral_norm(nn.Conv2d(4, 6, 3))
    back.load_state_dict(ours.state_dict(), strict=True)
    back.eval(), ours.eval()
    torch.testing.assert_close(back(x), ours(x))
    assert set(ours.state_dict()) == set(back.state_dict())


@pytest.mark.parametrize("make,dim", [(lambda: nn.Conv2d(4, 6, 3), 0), (lambda: nn.ConvTranspose2d(4, 6, 3), 1)])
def test_legacy_checkpoint_loads_into_ours(make, dim):
    torch.manual_seed(5)
    legacy = legacy_spectral_norm(make())
    x = torch.randn(2, 4, 6, 6)
    for _ in range(3):
        legacy(x)
    checkpoint = legacy.state_dict()
    assert {"weight_orig", "weight_u", "weight_v"} <= set(checkpoint)

    ours = bsn_cuda.spectral_norm(make())
    assert ours.parametrizations.weight[0].dim == dim
    ours.load_state_dict(checkpoint, strict=True)
    sn = ours.parametrizations.weight[0]
    assert torch.equal(sn._u, checkpoint["weight_u"]) and torch.equal(sn._v, checkpoint["weight_v"])
    assert torch.equal(ours.parametrizations.weight.original, checkpoint["weight_orig"])
    legacy.eval(), ours.eval()
    torch.testing.assert_close(ours(x), legacy(x))
    # Our own checkpoints still load after the hook is in place.
    ours.load_state_dict(copy.deepcopy(ours.state_dict()), strict=True)


def test_bsn_state_dict_keys_and_round_trip():
    torch.manual_seed(6)
    model = bsn_cuda.bidirectional_spectral_norm(nn.Conv2d(4, 6, 3))
    assert set(model.state_dict()) == {
        "bias",
        "parametrizations.weight.original",
        "parametrizations.weight.0._u0",
        "parametrizations.weight.0._v0",
        "parametrizations.weight.0._u1",
        "parametrizations.weight.0._v1",
    }
    single = bsn_cuda.bidirectional_spectral_norm(nn.Conv2d(4, 6, 1))
    assert {k for k in single.state_dict() if "._" in k} == {"parametrizations.weight.0._u0", "parametrizations.weight.0._v0"}
    x = torch.randn(2, 4, 7, 7)
    model(x)
    other = bsn_cuda.bidirectional_spectral_norm(nn.Conv2d(4, 6, 3))
    other.load_state_dict(model.state_dict(), strict=True)
    model.eval(), other.eval()
    assert torch.equal(model(x), other(x))


# ---------------------------------------------------------------------------
# deepcopy, pickling, state_dicts


def _train_outputs(model, steps=2, seed=50):
    outs = []
    for step in range(steps):
        out = model(images(seed + step))
        outs.append(out.detach())
        sgd_step(model, out)
    model.eval()
    with torch.no_grad():
        outs.append(model(images(seed + steps)))
    model.train()
    return outs


@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no_grad"])
def test_deepcopy_and_pickle_after_a_forward(with_grad, tmp_path):
    """torch's parametrized modules refuse to pickle; ours pickle whole (and
    deepcopy) after a forward with or without grad, and the copies train on
    exactly like the original."""
    model = build_discriminator("mixed")
    x = images(0)
    if with_grad:
        model(x).sum().backward()
    else:
        with torch.no_grad():
            model(x)
    expected = _train_outputs(copy.deepcopy(model))

    path = tmp_path / "model.pt"
    torch.save(model, path)
    copies = {
        "deepcopy": copy.deepcopy(model),
        "torch.save(model)": torch.load(path, weights_only=False),
        "pickle": pickle.loads(pickle.dumps(model)),
    }
    shallow = copy.copy(model[0])  # (torch's parametrized modules refuse copy.copy too)
    assert shallow.parametrizations is model[0].parametrizations
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build_discriminator("mixed", seed=123)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    for got, want in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(got, want)
    with torch.no_grad():  # the non-persistent sigma buffers are not in the state_dict
        for got, want in zip(spectral_norms(fresh), spectral_norms(model)):
            for name in ("_sigma", "_sigmas"):  # SN has the first, BSN the second
                if hasattr(got, name):
                    getattr(got, name).copy_(getattr(want, name))
    copies["state_dict"] = fresh

    for name, clone in copies.items():
        assert isinstance(clone[0].parametrizations.weight[0], BidirectionalSpectralNorm), name
        # (copying or pickling a Parameter does not keep .grad)
        expected_state = {k: v for k, v in snapshot(model).items() if not k.endswith(".grad")}
        assert_equal_dicts(snapshot(clone), expected_state, name)
        outs = _train_outputs(clone)
        for step, (a, b) in enumerate(zip(outs, expected)):
            assert torch.equal(a, b), f"{name}: step {step}"
        # and the reloaded model pickles again
        again = pickle.loads(pickle.dumps(clone))
        assert torch.equal(again[0].weight, clone[0].weight), name


def test_remove_after_unpickling_restores_the_plain_class():
    model = pickle.loads(pickle.dumps(build_discriminator("sn")))
    bsn_cuda.remove_spectral_norm(model[0])
    assert type(model[0]) is nn.Conv2d
    assert set(model[0].state_dict()) == {"weight", "bias"}


# ---------------------------------------------------------------------------
# Checkpoints of torch's spectral norm


def _torch_disc(flavour, dtype=torch.float64, seed=11):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1),  # SN along dim 1
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 1),
    ).to(dtype)
    apply = torch_spectral_norm if flavour == "parametrized" else legacy_spectral_norm
    for index in (0, 2, 5):
        if flavour == "ours":
            bsn_cuda.spectral_norm(model[index], n_power_iterations=2)
        else:
            apply(model[index], n_power_iterations=2)
    return model


def _train_steps(model, steps, seed, optimizer):
    outs = []
    for step in range(steps):
        out = model(images(seed + step, torch.float64))
        outs.append(out.detach())
        optimizer.zero_grad()
        out.square().mean().backward()
        optimizer.step()
    return outs


@pytest.mark.parametrize("how", ["convert", "load_state_dict"])
def test_torch_parametrized_sn_checkpoint_continues_training_identically(how):
    theirs = _torch_disc("parametrized")
    _train_steps(theirs, 3, 0, torch.optim.SGD(theirs.parameters(), lr=0.05))
    if how == "convert":
        ours = bsn_cuda.convert_spectral_norm(copy.deepcopy(theirs))
    else:
        ours = _torch_disc("ours", seed=99)
        ours.load_state_dict(theirs.state_dict(), strict=True)
    assert all(isinstance(ours[i].parametrizations.weight[0], SpectralNorm) for i in (0, 2, 5))
    out_theirs = _train_steps(theirs, 4, 10, torch.optim.SGD(theirs.parameters(), lr=0.05))
    out_ours = _train_steps(ours, 4, 10, torch.optim.SGD(ours.parameters(), lr=0.05))
    torch.testing.assert_close(out_ours, out_theirs, **TOL[torch.float64])
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=name)

    # And back: our checkpoint loads into torch's SN (strict) and continues identically.
    back = _torch_disc("parametrized", seed=98)
    back.load_state_dict(ours.state_dict(), strict=True)
    out_back = _train_steps(back, 3, 20, torch.optim.SGD(back.parameters(), lr=0.05))
    out_ours = _train_steps(ours, 3, 20, torch.optim.SGD(ours.parameters(), lr=0.05))
    torch.testing.assert_close(out_ours, out_back, **TOL[torch.float64])


@pytest.mark.parametrize("how", ["convert", "load_state_dict"])
def test_legacy_sn_checkpoint_matches_in_eval_and_trains_on(how):
    """Legacy torch.nn.utils.spectral_norm: same eval outputs; in training its
    power iteration updates v before u, so outputs differ slightly (both
    estimate the same sigma)."""
    legacy = _torch_disc("legacy")
    with torch.no_grad():  # (legacy SN cannot be deep-copied after a forward with grad)
        for step in range(3):
            legacy(images(step, torch.float64))
    if how == "convert":
        ours = bsn_cuda.convert_spectral_norm(copy.deepcopy(legacy))
    else:
        ours = _torch_disc("ours", seed=99)
        ours.load_state_dict(legacy.state_dict(), strict=True)
    legacy.eval(), ours.eval()
    x = images(5, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), legacy(x), **TOL[torch.float64])
    legacy.train(), ours.train()
    out_legacy = _train_steps(legacy, 3, 10, torch.optim.SGD(legacy.parameters(), lr=0.05))
    out_ours = _train_steps(ours, 3, 10, torch.optim.SGD(ours.parameters(), lr=0.05))
    for a, b in zip(out_ours, out_legacy):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())
