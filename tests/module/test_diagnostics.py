"""bsn_cuda.diagnostics.probe, checked against direct autograd on a tiny model.

Oracles: loss.backward() into .grad of the raw parameters; a plain copy of
the model whose weights are the effective (normalized) weights, for the
gradient w.r.t. the weight each layer computes with; torch.linalg for sigmas;
the dense matrix of each convolution for the strict norm.
"""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import bsn_cuda
from bsn_cuda import diagnostics


def tiny(norm, scale=1.0):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(3, 4, 4, stride=2, padding=1),
        nn.LeakyReLU(0.1),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 1),
    ).double()
    shapes = {0: (2, 6, 6), 2: (3, 6, 6)}
    for i, layer in enumerate(model):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        if norm == "sn":
            bsn_cuda.spectral_norm(layer, scale=scale)
        elif norm == "bsn":
            bsn_cuda.bidirectional_spectral_norm(layer, scale=scale)
        elif norm == "strict":
            if isinstance(layer, nn.Conv2d):
                bsn_cuda.conv_spectral_norm(layer, shapes[i], scale=scale)
            else:
                bsn_cuda.spectral_norm(layer, scale=scale)
    return model


def dense_norm(conv, input_shape, weight):
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=weight.dtype).reshape((n,) + input_shape)
    out = conv._conv_forward(basis, weight, None)
    return torch.linalg.matrix_norm(out.reshape(n, -1), ord=2).item()


@pytest.mark.parametrize("norm,scale", [("none", 1.0), ("sn", 1.0), ("bsn", 1.0), ("bsn", 1.4), ("strict", 1.0), ("sn", 0.7)])
def test_probe_matches_direct_autograd(norm, scale):
    model = tiny(norm, scale)
    model.train()
    for _ in range(2):  # move the power-iteration vectors away from their start
        model(torch.randn(3, 2, 6, 6, dtype=torch.float64))
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    # Persistent buffers (u, v); the non-persistent sigma logs record the probe's own forward.
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "original" not in k}

    reports = diagnostics.probe(model, x, strict_iterations=400)

    # No side effects: mode restored, buffers untouched, no .grad written.
    assert model.training
    for k, v in model.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in model.parameters())

    # Oracle 1: raw-weight gradients by loss.backward() in eval mode.
    model.eval()
    model(x).mean().backward()
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [r.name for r in reports] == ["0", "2", "5"]
    with torch.no_grad():
        eff_weights = [m.weight.detach().clone() for m in layers]
    raws = [m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight for m in layers]

    # Oracle 2: a plain copy whose weights are the effective weights.
    plain = copy.deepcopy(model)
    for m in plain:
        if isinstance(m, (nn.Conv2d, nn.Linear)) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight")  # keeps the eval-mode W_eff
    for p in plain.parameters():
        p.grad = None
    plain(x).mean().backward()
    plain_layers = [m for m in plain if isinstance(m, (nn.Conv2d, nn.Linear))]

    expected_kind = {"none": "none", "sn": "sn", "bsn": "bsn", "strict": "strict"}[norm]
    for i, (r, layer, raw, eff, pl) in enumerate(zip(reports, layers, raws, eff_weights, plain_layers)):
        kind = expected_kind if not (norm == "strict" and i == 2) else "sn"
        assert r.kind == kind
        assert r.grad_norm == pytest.approx(raw.grad.norm().item(), rel=1e-10)
        assert r.grad_norm_eff == pytest.approx(pl.weight.grad.norm().item(), rel=1e-10)
        torch.testing.assert_close(pl.weight.detach(), eff)
        w = raw.detach()
        assert r.weight_norm == pytest.approx(w.norm().item(), rel=1e-12)
        assert r.sigma_mat0 == pytest.approx(torch.linalg.svdvals(w.reshape(w.shape[0], -1))[0].item(), rel=1e-10)
        assert r.factor == pytest.approx(eff.norm().item() / w.norm().item(), rel=1e-10)
        assert r.eff_sigma_mat0 == pytest.approx(torch.linalg.svdvals(eff.reshape(eff.shape[0], -1))[0].item(), rel=1e-10)
        if norm == "none":
            assert r.factor == pytest.approx(1.0) and math.isnan(r.sigma_used) and r.scale == 1.0
        else:
            assert r.scale == scale
            assert r.factor == pytest.approx(scale / r.sigma_used, rel=1e-10)
        if isinstance(layer, nn.Conv2d):
            assert r.sigma_mat1 == pytest.approx(
                torch.linalg.svdvals(w.transpose(0, 1).reshape(w.shape[1], -1))[0].item(), rel=1e-10
            )
            shape = tuple(r.input_shape)
            assert shape == ((2, 6, 6) if i == 0 else (3, 6, 6))
            assert r.sigma_strict == pytest.approx(dense_norm(layer, shape, w), rel=1e-4)
            assert r.eff_sigma_strict == pytest.approx(dense_norm(layer, shape, eff), rel=1e-4)
        else:
            assert math.isnan(r.sigma_mat1) and math.isnan(r.sigma_strict)
    if norm == "sn":
        assert reports[0].sigma_used == pytest.approx(bsn_cuda.get_sigma(layers[0]).item(), rel=1e-6)
    if norm == "strict":
        # The strict layer's effective operator norm is about `scale` (one step of power iteration per forward).
        assert reports[0].eff_sigma_strict == pytest.approx(scale, rel=0.05)


def test_probe_custom_loss_and_train_mode():
    model = tiny("sn")
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    before = model[0].parametrizations.weight[0]._u.clone()
    reports = diagnostics.probe(model, x, loss_fn=lambda out: (out**2).sum(), train_mode=True, strict_iterations=0)
    assert not torch.equal(model[0].parametrizations.weight[0]._u, before)  # train mode: one update
    assert math.isnan(reports[0].sigma_strict)
    model.eval()
    model.zero_grad()
    (model(x) ** 2).sum().backward()
    assert reports[0].grad_norm == pytest.approx(model[0].parametrizations.weight.original.grad.norm().item(), rel=1e-10)
    table = diagnostics.to_markdown(reports)
    assert table.splitlines()[0].startswith("| name | kind | grad_norm")
    assert len(table.splitlines()) == 2 + 3


def test_probe_errors():
    with pytest.raises(TypeError, match="probe: expected model to be a torch.nn.Module, got int"):
        diagnostics.probe(3, torch.zeros(1))
    with pytest.raises(ValueError, match="probe: expected a model with Conv/ConvTranspose/Linear layers, got none"):
        diagnostics.probe(nn.ReLU(), torch.zeros(1))
    with pytest.raises(ValueError, match="probe: expected loss_fn to return a scalar, got shape"):
        diagnostics.probe(tiny("none"), torch.zeros(2, 2, 6, 6, dtype=torch.float64), loss_fn=lambda o: o)
