"""Smoke test of examples/train_gan.py (a few steps, tiny widths) and unit checks of its metric."""

import json
import math
import os
import sys

import pytest
import torch
from conftest import REPO_ROOT

EXAMPLES = os.path.join(REPO_ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import metrics  # noqa: E402
import train_gan  # noqa: E402

try:
    import sklearn  # noqa: F401

    HAS_SKLEARN = True
except ImportError:
    HAS_SKLEARN = False

needs_sklearn = pytest.mark.skipif(
    not HAS_SKLEARN, reason="scikit-learn is not installed (the example's offline dataset is sklearn's digits)"
)


@needs_sklearn
@pytest.mark.parametrize("norm", ["none", "sn", "strict", "bssn"])  # bsn: test_train_gan_with_metric
def test_train_gan_runs_and_logs_sigmas(norm, tmp_path):
    out = tmp_path / "run.json"
    result = train_gan.main([
        "--norm", norm, "--steps", "3", "--width", "2", "--batch-size", "8", "--z-dim", "8",
        "--log-every", "1", "--no-eval", "--quiet", "--json", str(out),
    ])
    assert result["diverged_at"] is None
    logged = json.loads(out.read_text())
    assert [h["step"] for h in logged["history"]] == [1, 2, 3]
    sigmas = logged["history"][-1]["sigmas"]
    assert len(sigmas) == 8  # 7 convolutions + the linear layer
    if norm == "none":
        assert all(math.isnan(s) for s in sigmas)
    else:
        assert all(s > 0 and math.isfinite(s) for s in sigmas)
    assert logged["config"]["scale"] == (1.4 if norm == "bssn" else 1.0)


@needs_sklearn
def test_train_gan_with_metric():
    result = train_gan.main([
        "--norm", "bsn", "--steps", "2", "--width", "2", "--batch-size", "8", "--z-dim", "8",
        "--eval-samples", "64", "--classifier-epochs", "1", "--quiet",
    ])
    final = result["final"]
    assert final["fd"] > 0 and math.isfinite(final["fd"])
    assert 0 < final["coverage"] <= 1


def test_frechet_distance_closed_form():
    # Same covariance, mean shifted by d: FD = ||d||^2. Identical sets: 0.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64) @ torch.tensor([[1.0, 0.2, 0], [0, 1.0, 0.3], [0, 0, 0.5]], dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(shift.square().sum().item(), rel=1e-6)
    # Diagonal covariances: FD = sum (sqrt(s1) - sqrt(s2))^2 per dimension, for zero means.
    b = torch.randn(1000, 2, generator=g, dtype=torch.float64)
    b = b - b.mean(0)
    b = b @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(b.T))).T  # sample covariance exactly I
    fd = metrics.frechet_distance(b * torch.tensor([1.0, 1.0], dtype=torch.float64), b * torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert fd == pytest.approx((2 - 1) ** 2 + (3 - 1) ** 2, rel=1e-6)


def test_class_coverage():
    probs = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 2] * 25), 10).double()
    assert metrics.class_coverage(probs, 10) == pytest.approx(0.3)


def test_cifar_loader_reads_python_batches(tmp_path):
    import pickle

    import data

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(1, 6):
        raw = torch.randint(0, 256, (4, 3072), generator=rng, dtype=torch.uint8).numpy()
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": raw, b"labels": [i % 10] * 4}, f)
    x, y = data.load_cifar10(str(tmp_path), size=32)
    assert x.shape == (20, 3, 32, 32) and y.tolist() == sum(([i % 10] * 4 for i in range(1, 6)), [])
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f)[b"data"][0]
    # Channel-major rows of 32x32 pixels, mapped from 0..255 to -1..1.
    torch.testing.assert_close(x[0], torch.tensor(first).view(3, 32, 32).double().float() / 255 * 2 - 1)
    with pytest.raises(FileNotFoundError, match="load_cifar10: expected the CIFAR-10 python batches"):
        data.load_cifar10(str(tmp_path / "missing"))


def test_folder_loader(tmp_path):
    PIL = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
    import data

    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            PIL.new("RGB", (20, 12), (255 * i, 0, 0)).save(tmp_path / cls / f"{i}.png")
    x, y = data.load_folder(str(tmp_path), size=8)
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]
    assert x[1, 0].min().item() == pytest.approx(1.0) and x[1, 1].max().item() == pytest.approx(-1.0)
