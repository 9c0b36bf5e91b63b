"""pytest-benchmark cases: SN and BSN of one SNGAN CNN layer on the CPU, fused vs torch.

    pytest benchmarks/test_bench.py                       # time them (a few seconds)
    pytest benchmarks/test_bench.py --benchmark-disable   # run each once, as a smoke test
    pytest benchmarks/test_bench.py --benchmark-json out.json

Each case times what a training step pays for the weight: ``module.weight``
in training mode (power iteration + normalization) and the same followed by
``W_sn.backward(G)``; grads are set to None between rounds, outside the timed
region. The cases are built by :mod:`bsn_cuda.benchmark.impls` (same code as
``python -m bsn_cuda.benchmark``). When the compiled ops are missing, the fused
cases run bsn_cuda's reference fallback and say so in ``extra_info`` and in
their group name.
"""

import math
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytest.importorskip("bsn_cuda")

from bsn_cuda import benchmark as B  # noqa: E402
from bsn_cuda.benchmark import markers as M  # noqa: E402
from bsn_cuda.benchmark import plot as P  # noqa: E402
from bsn_cuda.benchmark.suites import merge_layers  # noqa: E402

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
    """The command line runs end to end and writes its JSON, markdown, plot and README blocks."""
    out = tmp_path / "r"
    readme = tmp_path / "README.md"
    names = ["speed-run", "speed-summary", "speed-e2e", "speed-host", "speed-goals", "speed-headline"]
    readme.write_text("".join(f"{M.OPEN.format(n)}\n{M.CLOSE}\n" for n in names))
    argv = [
        "--device", "cpu", "--suite", "sngan_cnn,e2e", "--mode", "train,fwd_bwd",
        "--impls", "torch_sn,torch_legacy,fused_sn,fused_bsn", "--quick", "--retries", "0",
        "--e2e-batch", "2", "--e2e-reps", "1", "--no-progress",
        "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--plot", str(out / "r"),
        "--markdown-into", str(readme),
    ]
    assert B.main(argv) == 0
    blocks = M.regions(readme.read_text())
    assert sorted(blocks) == sorted(names) and all(blocks.values()), blocks
    assert "`--quick`" in blocks["speed-run"]
    row = next(r for r in blocks["speed-goals"].splitlines() if "fused SN >= 3x torch parametrized SN" in r)
    measured, needed, margin, spread, verdict = [c.strip() for c in row.strip("|").split("|")][2:]
    assert needed == ">= 3" and float(spread) >= 0 and verdict, row  # judged with the run's spread
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
    if P.importlib.util.find_spec("matplotlib") is not None:
        for name in ("speedup", "bsn_cost", "host", "all_points"):
            assert (out / f"r_{name}.png").stat().st_size > 0, name
        assert not (out / "r_gpu_bandwidth.png").exists()  # no CUDA records
    assert math.isfinite(res["summary"][0]["vs_torch_sn"])


@pytest.mark.parametrize("kind,shape", [("conv", (128, 64, 3, 3)), ("conv", (96, 3, 1, 1)), ("linear", (192, 148))])
def test_torch_bsn_baseline_agrees_with_the_reference_ops(kind, shape):
    """torch_bsn (lean, from reference.matricize / normalize_vector) and ref_bsn
    (reference.bsn_forward / sn_forward) start from the same vectors and must
    produce the same normalized weight, step after step, and the same gradient."""
    base = B.make_layer(kind, shape)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    results = []
    for impl in ("torch_bsn", "ref_bsn"):
        torch.manual_seed(7)
        m, fn, _ = B.make_impl(impl, base)
        outs = [fn() for _ in range(3)]
        outs[-1].backward(grad)
        results.append(([o.detach() for o in outs], m.parametrizations.weight.original.grad))
    (lean, g_lean), (ref, g_ref) = results
    for a, b in zip(lean, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(g_lean, g_ref, rtol=2e-5, atol=1e-6)


def test_suites_are_well_formed():
    for name, suite in B.SUITES.items():
        for layer, kind, shape, count in suite["layers"]:
            assert kind in ("conv", "linear", "embedding"), (name, layer)
            assert len(shape) == (4 if kind == "conv" else 2), (name, layer)
            assert count >= 1
    # a repeated shape is measured once and counted with its multiplicity
    merged = merge_layers(B.SUITES["sngan_resnet"]["layers"])
    m = {(x["kind"], x["shape"]): x["count"] for x in merged}
    assert m[("conv", (128, 128, 3, 3))] == 7
    assert sum(x["count"] for x in merge_layers(B.SUITES["biggan_g_linear"]["layers"])) == 19


def _synthetic_result():
    """A small result in the --json format: CPU and CUDA records of two suites
    (one conv layer where BSN differs from SN, one linear where it does not),
    two modes, and a host section; times chosen so that every ratio is known."""
    layers = {"sngan_cnn": [("c3", "conv", [128, 128, 4, 4]), ("l7", "linear", [1, 8192])],
              "sngan_resnet": [("b1.c2,b2.c1-2,b3-4.c1-2", "conv", [128, 128, 3, 3]), ("l5", "linear", [1, 128])]}
    times = {"torch_sn": 4e-4, "torch_compiled": 2e-4, "fused_sn": 1e-4, "fused_bsn": 1.25e-4}
    records = []
    for dev in ("cpu", "cuda:0"):
        for suite, rows in layers.items():
            for layer, kind, shape in rows:
                for mode in ("train", "fwd_bwd"):
                    for impl, t in times.items():
                        rec = {"impl": impl, "mode": mode, "median_s": t, "suite": suite, "layer": layer,
                               "kind": kind, "shape": shape, "count": 7 if "," in layer else 1,
                               "numel": math.prod(shape), "device": dev, "dtype": "float32",
                               "bytes_model": 3 * math.prod(shape) * 4}
                        if dev != "cpu":
                            rec.update(gbps=rec["bytes_model"] / t / 1e9, peak_bw_gbps=4800.0)
                            rec["pct_peak_bw"] = 100 * rec["gbps"] / 4800.0
                        records.append(rec)
    host = [{"kind": kind, "mode": mode, "impl": impl, "title": title, "median_s": 1e-5 * (i + 1)}
            for kind, title in (("linear", "Linear(4, 4)"), ("bsn_conv3x3", "BSN Conv2d(2, 2, 3)"))
            for mode in ("train", "fwd_bwd", "eval", "eval_nograd")
            for i, impl in enumerate(("identity", "torch_sn", "fused", "functional"))]
    env = {"torch_num_threads": 2, "cpu_model": "Test CPU",
           "devices": {"cpu": {"name": "Test CPU", "fused_native": True},
                       "cuda:0": {"name": "NVIDIA H200", "fused_native": True, "peak_bw_gbps": 4800.0}}}
    config = {"dtype": "float32", "quick": True, "modes": ["train", "fwd_bwd"], "impls": list(times)}
    return {"env": env, "config": config, "measurements": records, "host": host}


def test_model_predictions_are_read_from_the_bandwidth_model_table():
    pred = P.load_model_predictions()
    if pred is None:
        pytest.skip("tools/gpu/model_predictions.md is not next to this package (installed copy)")
    assert pred["gpu"] == "H200"
    # The oracle: the table's own row for c3, read here cell by cell (µs, with the
    # launch mode in parentheses), e.g. | sngan_cnn | c3 | [128, 128, 4, 4] | 262,144 | 8.1 (C1) | ...
    lines = open(P.MODEL_PREDICTIONS, encoding="utf-8").read().splitlines()
    header = next(line for line in lines if line.startswith("| suite |"))
    row = next(line for line in lines if line.startswith("| sngan_cnn | c3 |"))
    cells = dict(zip([c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]))
    c3 = pred[("sngan_cnn", (128, 128, 4, 4))]
    for column in ("SN train fwd", "BSN fwd+bwd"):
        assert c3[column] == pytest.approx(float(cells[column].split()[0]) * 1e-6)
    assert "BSN/SN fwd" not in c3 and "SN fwd vs roofline" not in c3


def test_every_figure_is_drawn_from_a_synthetic_result(tmp_path):
    pytest.importorskip("matplotlib")
    result = _synthetic_result()
    predictions = {"gpu": "H200", ("sngan_cnn", (128, 128, 4, 4)): {"SN train fwd": 8.2e-6}}
    figs = P.figures(result, str(tmp_path / "r.png"), predictions)
    panels = {os.path.basename(path): len(fig.axes) for path, fig in figs.items()}
    # two devices: one file per device; host overhead: one panel per mode drawn (train, fwd+bwd, eval no_grad)
    assert panels == {
        "r_host.png": 3,
        "r_speedup_cpu.png": 2, "r_bsn_cost_cpu.png": 2, "r_all_points_cpu.png": 2,
        "r_speedup_cuda0.png": 2, "r_bsn_cost_cuda0.png": 2, "r_all_points_cuda0.png": 2,  # one panel per mode
        "r_gpu_bandwidth_cuda0.png": 2,
    }
    # the bars are the ratios of the records: fused SN 4x, fused BSN 3.2x, compiled 2x, and their geomean
    ax = figs[str(tmp_path / "r_speedup_cpu.png")].axes[0]
    heights = sorted({round(p.get_height(), 6) for p in ax.patches})
    assert heights == [2.0, 3.2, 4.0]
    # the model's 8.2 µs for c3 on the 4.8 TB/s peak: 3 * 262144 * 4 bytes / 8.2 µs = 19.98% of the peak
    bw = figs[str(tmp_path / "r_gpu_bandwidth_cuda0.png")].axes[0]
    assert any(abs(p.get_height() - 100 * 3 * 262144 * 4 / 8.2e-6 / 4.8e12) < 1e-6 for p in bw.patches)
    written = P.plot(result, str(tmp_path / "r"), predictions)
    assert sorted(os.path.basename(p) for p in written) == sorted(panels)
    assert all(os.path.getsize(p) > 0 for p in written)
    # one device: no device in the names; no CUDA records: no bandwidth figure
    cpu_only = dict(result, measurements=[r for r in result["measurements"] if r["device"] == "cpu"])
    assert sorted(os.path.basename(p) for p in P.figures(cpu_only, str(tmp_path / "c"))) == [
        "c_all_points.png", "c_bsn_cost.png", "c_host.png", "c_speedup.png"]


def test_model_step_models_and_table():
    from bsn_cuda.benchmark import model_step as M

    assert sum(count for *_, count in M.MODEL_SUITES["bert_linear"]) == 74
    model = M.build_model("sngan_cnn", "fused_sn")
    assert len(model.layers) == 8 and all(hasattr(m, "parametrizations") for m in model.layers)
    assert model().ndim == 0  # every layer runs on its minimal input
    # The table's SN cost is step - no_sn; its ratios come from the records.
    us = {"no_sn": 100, "identity": 120, "torch_sn": 500, "torch_legacy": 450, "fused_sn": 200, "fused_legacy": 190,
          "kernel_floor": 50}
    records = [{"suite": "sngan_cnn", "forwards": 2, "impl": k, "median_s": v * 1e-6} for k, v in us.items()]
    row = M.model_step_table(records).splitlines()[-1]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[:3] == ["sngan_cnn", "8", "2"]
    assert cells[-3:] == ["4.00x", "2.00", "10.0 µs"]  # (500-100)/(200-100); (200-100)/50; (200-120)/8


def test_model_step_grouped_rows_and_table():
    from bsn_cuda.benchmark import model_step as M

    model = M.build_model("sngan_cnn", "grouped_once")
    assert model._bsn_spectral_norm_group is not None and len(model._bsn_spectral_norm_group.layers) == 8
    assert model().ndim == 0
    us = {"no_sn": 100, "identity": 120, "torch_sn": 500, "grouped_forward": 180, "grouped_once": 140,
          "grouped_never": 150, "torch_sn_compiled": 300, "kernel_floor": 50}
    records = [{"suite": "sngan_cnn", "forwards": 2, "impl": k, "median_s": v * 1e-6} for k, v in us.items()]
    cells = [c.strip() for c in M.model_step_grouped_table(records).splitlines()[-1].split("|")[1:-1]]
    # (500-100)/(180-100); (180-100)/50; (140-100)/(180-100); (180-120)/8
    assert cells == ["sngan_cnn", "2", "300", "180", "140", "150", "5.00x", "1.60", "0.50", "7.5 µs"]


def test_model_step_goals_use_the_quartile_band():
    from bsn_cuda.benchmark import model_step as M

    def rec(suite, k, impl, med, q1, q3):
        return {"suite": suite, "forwards": k, "impl": impl, "median_s": med * 1e-6, "q1_s": q1 * 1e-6,
                "q3_s": q3 * 1e-6}

    records = [rec("tiny_linear16", 1, "no_sn", 100, 99, 101), rec("tiny_linear16", 1, "identity", 200, 199, 201),
               rec("tiny_linear16", 1, "grouped_forward", 272, 271, 273),  # 2 µs per layer above identity
               rec("tiny_linear16", 1, "kernel_floor", 100, 99, 101),  # cost 172 / floor 100: not met
               rec("tiny_linear16", 2, "no_sn", 100, 90, 110), rec("tiny_linear16", 2, "grouped_forward", 300, 290, 310),
               rec("tiny_linear16", 2, "grouped_once", 210, 200, 220),  # 110 / 200 = 0.55: within the band
               rec("tiny_linear16", 2, "kernel_floor", 200, 195, 205)]
    rows = [(goal, k, round(value, 3), status) for goal, _, k, value, _, status in M.judge_model_goals(records)]
    floor, host, once = (goal for goal, *_ in M.MODEL_GOALS)
    assert rows == [(floor, 1, 1.72, "NOT met"), (floor, 2, 1.0, "met"), (host, 1, 2.0, "met"),
                    (once, 2, 0.55, "within noise")]  # 0.55 < 0.6, but its band reaches 0.41 .. 0.72
    assert "| grouped - identity <= 3 µs per layer, fwd+bwd | tiny_linear16 | 1 | 2.00 |" in M.model_goals_table(records)


def test_model_step_breakdown_parts_add_up():
    from bsn_cuda.benchmark import model_step as M

    us = {"identity_forward": 100, "identity_step": 300, "grouped_forward": 190, "grouped_step": 430,
          "group_compute": 60, "group_op_forward": 40, "group_op_backward": 20}
    rows = dict(M.breakdown_rows({k: {"median_s": v * 1e-6} for k, v in us.items()}, n_layers=10))
    parts = [v for k, v in rows.items() if not k.startswith("total")]
    total = rows["total above identity, forward + backward"]
    assert total == pytest.approx(13.0) and sum(parts) == pytest.approx(total)  # (90 + 40) / 10
