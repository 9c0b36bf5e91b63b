"""pytest-benchmark cases: SN and BSN of one SNGAN CNN layer on the CPU, fused vs torch.

    pytest benchmarks/test_bench.py                       # time them (a few seconds)
    pytest benchmarks/test_bench.py --benchmark-disable   # run each once, as a smoke test
    pytest benchmarks/test_bench.py --benchmark-json out.json

Each case times what a training step pays for the weight: ``module.weight``
in training mode (power iteration + normalization) and the same followed by
``W_sn.backward(G)``; grads are set to None between rounds, outside the timed
region. The cases are built by :mod:`bsn_cuda.benchmark` (same code as
``python -m bsn_cuda.benchmark``). When the compiled ops are missing, the fused
cases run bsn_cuda's reference fallback and say so in ``extra_info`` and in
their group name.
"""

import math

import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytest.importorskip("bsn_cuda")

from bsn_cuda import benchmark as B  # noqa: E402

# SNGAN CNN CIFAR-10 layer c3 (128 <- 128, 4x4 kernel)
KIND, SHAPE = "conv", (128, 128, 4, 4)
IMPLS = ["torch_sn", "torch_bsn", "fused_sn", "fused_bsn"]
MODES = ["train", "fwd_bwd"]


@pytest.fixture(scope="module")
def base():
    return B.make_layer(KIND, SHAPE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_sngan_layer(benchmark, base, impl, mode):
    native = B.fused_native("cpu")
    call, reset, module, note = B.make_case(impl, base, mode)
    label = B.impl_title(impl, native)
    benchmark.group = f"sngan_cnn c3 {'x'.join(map(str, SHAPE))} {mode}"
    if impl in B.FUSED and not native:
        benchmark.group += " (reference fallback)"
    benchmark.extra_info.update(
        impl=impl, label=label, mode=mode, shape=list(SHAPE), threads=torch.get_num_threads(),
        has_extension=B.has_extension(), fused_native=native if impl in B.FUSED else None,
    )
    benchmark.pedantic(call, setup=reset, rounds=60, warmup_rounds=5, iterations=1)
    # the case computed something sensible
    with torch.no_grad():
        w = module.weight
    assert w.shape == SHAPE and bool(torch.isfinite(w).all())
    if mode == "fwd_bwd":
        reset()
        call()
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_benchmark_cli_smoke(tmp_path, capsys):
    """The command line runs end to end and writes its JSON, markdown and plot."""
    out = tmp_path / "r"
    argv = [
        "--device", "cpu", "--suite", "sngan_cnn,e2e", "--mode", "train,fwd_bwd",
        "--impls", "torch_sn,torch_legacy,fused_sn,fused_bsn", "--quick", "--retries", "0",
        "--e2e-batch", "2", "--e2e-reps", "1", "--no-progress",
        "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--plot", str(out / "r.png"),
    ]
    assert B.main(argv) == 0
    text = capsys.readouterr().out
    assert "goals" in text and "sngan_cnn" in text
    import json

    res = json.loads((out / "r.json").read_text())
    assert res["env"]["torch_num_threads"] == torch.get_num_threads()
    layers = {r["layer"] for r in res["measurements"]}
    assert len(layers) == len(B.SUITES["sngan_cnn"]["layers"])
    assert all("median_s" in r for r in res["measurements"]), [r for r in res["measurements"] if "median_s" not in r]
    assert {r["variant"] for r in res["e2e"]} == set(B.E2E_VARIANTS)
    assert "| layer |" in (out / "r.md").read_text()
    try:
        import matplotlib  # noqa: F401

        assert (out / "r.png").stat().st_size > 0
    except ImportError:
        pass
    assert math.isfinite(res["summary"][0]["vs_torch_sn"])


def test_suites_are_well_formed():
    for name, suite in B.SUITES.items():
        for layer, kind, shape, count in suite["layers"]:
            assert kind in ("conv", "linear", "embedding"), (name, layer)
            assert len(shape) == (4 if kind == "conv" else 2), (name, layer)
            assert count >= 1
    # a repeated shape is measured once and counted with its multiplicity
    merged = B._merge_layers(B.SUITES["sngan_resnet"]["layers"])
    m = {(x["kind"], x["shape"]): x["count"] for x in merged}
    assert m[("conv", (128, 128, 3, 3))] == 7
    assert sum(x["count"] for x in B._merge_layers(B.SUITES["biggan_g_linear"]["layers"])) == 19
