"""ONNX export of models using bsn_cuda's SN / BSN, with both exporters.

``torch.onnx.export(..., dynamo=False)`` (TorchScript exporter) and
``dynamo=True`` trace the eval-mode formula of :mod:`bsn_cuda._onnx_export`
instead of the fused op; onnxruntime's outputs must equal eager eval outputs
(float32, 1e-5 relative to the output's size). Also: the zero rule survives
export, exporting changes no state, and training mode is refused with a clear
error (the power iteration's in-place update has no ONNX equivalent).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import bsn_cuda

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo=True exporter needs it

from parity_helpers import BSN_UTILS  # noqa: E402

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


def _train_steps(model, x, steps=3):
    """A few training steps, so that u/v and weights are not their initial values."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model


def _models():
    sn = bsn_cuda.spectral_norm
    bsn = bsn_cuda.bidirectional_spectral_norm
    return {
        "sn_linear": (
            lambda: nn.Sequential(sn(nn.Linear(8, 6)), nn.ReLU(), sn(nn.Linear(6, 3), scale=1.5, n_power_iterations=2)),
            (4, 8),
        ),
        "sn_conv2d": (lambda: nn.Sequential(sn(nn.Conv2d(3, 5, 3, padding=1)), nn.LeakyReLU(0.2)), (2, 3, 8, 8)),
        "sn_conv_transpose2d": (lambda: sn(nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)), (2, 4, 5, 5)),
        "bsn_conv2d": (
            lambda: nn.Sequential(
                bsn(nn.Conv2d(3, 6, 3, padding=1)),
                nn.LeakyReLU(0.2),
                bsn(nn.Conv2d(6, 4, 3, stride=2), scale=1.4),
                nn.LeakyReLU(0.2),
                bsn(nn.Conv2d(4, 2, 1)),  # 1x1: one matricization (SN along dim 0)
            ),
            (2, 3, 9, 9),
        ),
        "sn_on_bias": (lambda: sn(sn(nn.Linear(5, 4)), "bias"), (3, 5)),  # 1-D: W / ||W||
    }


MODELS = _models()


def _export(model, x, path, dynamo, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation/tracer warnings of the exporters
        if dynamo:
            kwargs.setdefault("verbose", False)
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["y"], **kwargs)
    model_proto = onnx.load(str(path))
    onnx.checker.check_model(model_proto)
    return model_proto


def _run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _assert_matches(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual - expected).abs().max().item()
    tol = 1e-5 * max(1.0, expected.abs().max().item())
    assert err <= tol, f"onnxruntime vs eager: max error {err:.3e} > {tol:.1e}"


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_model_matches_eager(tmp_path, name, dynamo):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    x = torch.randn(*shape)
    model = _train_steps(make(), x).eval()
    with torch.no_grad():
        expected = model(x)
    before = _state(model)
    proto = _export(model, x, tmp_path / "model.onnx", dynamo)
    # Plain ONNX ops only: nothing of the fused op survives.
    ops = {(node.domain, node.op_type) for node in proto.graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops
    _assert_matches(_run_onnx(tmp_path / "model.onnx", x), expected)
    # Exporting neither iterated nor replaced any tensor, and eager still runs the fused op.
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_zero_weight_rule_survives_export(tmp_path, dynamo):
    # bsn_cuda's documented rule: sigma == 0 gives scale * W (torch: NaN).
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight.zero_()
    model = bsn_cuda.bidirectional_spectral_norm(conv, scale=2.0).eval()
    x = torch.randn(1, 2, 5, 5)
    with torch.no_grad():
        expected = model(x)
    assert torch.isfinite(expected).all()
    _export(model, x, tmp_path / "zero.onnx", dynamo)
    got = _run_onnx(tmp_path / "zero.onnx", x)
    _assert_matches(got, expected)
    _assert_matches(got, conv.bias.detach().reshape(1, 3, 1, 1).expand_as(got).contiguous())


def test_dynamo_export_in_training_mode_is_refused(tmp_path):
    model = bsn_cuda.spectral_norm(nn.Linear(4, 3)).train()
    u = model.parametrizations.weight[0]._u.clone()
    with pytest.raises(Exception, match="eval mode") as info:
        _export(model, torch.randn(2, 4), tmp_path / "train.onnx", True)
    assert "u/v" in "".join(str(e) for e in _chain(info.value))
    assert torch.equal(model.parametrizations.weight[0]._u, u)


def test_torchscript_export_in_training_mode_is_refused(tmp_path):
    model = bsn_cuda.bidirectional_spectral_norm(nn.Conv2d(2, 3, 3)).train()
    with pytest.raises(Exception, match="eval mode"):
        _export(model, torch.randn(1, 2, 5, 5), tmp_path / "train.onnx", False, training=torch.onnx.TrainingMode.TRAINING)


def test_torchscript_exporter_default_puts_the_model_in_eval_mode(tmp_path):
    # Its default training=TrainingMode.EVAL switches the model to eval while tracing.
    torch.manual_seed(0)
    model = bsn_cuda.spectral_norm(nn.Linear(6, 4)).train()
    x = torch.randn(2, 6)
    expected = copy.deepcopy(model).eval()(x).detach()
    _export(model, x, tmp_path / "default.onnx", False)
    assert model.training
    _assert_matches(_run_onnx(tmp_path / "default.onnx", x), expected)


@pytest.mark.skipif(BSN_UTILS is None, reason="bsn_cuda.nn.utils (legacy flavour) not importable")
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_legacy_flavour_exports(tmp_path, dynamo):
    torch.manual_seed(0)
    model = nn.Sequential(
        BSN_UTILS.spectral_norm(nn.Conv1d(2, 4, 5, dilation=2)), nn.LeakyReLU(0.1), BSN_UTILS.spectral_norm(nn.Conv1d(4, 1, 3))
    )
    x = torch.randn(2, 2, 32)
    model = _train_steps(model, x).eval()
    with torch.no_grad():
        expected = model(x)
    _export(model, x, tmp_path / "legacy.onnx", dynamo)
    _assert_matches(_run_onnx(tmp_path / "legacy.onnx", x), expected)
    if dynamo:  # in training mode the hook would update u/v: refused
        model.train()
        with pytest.raises(Exception, match="eval mode"):
            _export(model, x, tmp_path / "legacy_train.onnx", dynamo)


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__
