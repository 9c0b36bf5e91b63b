"""The CUDA kernels of the fused ops (torch.ops.bsn_cuda.* on CUDA tensors).

Skipped as a whole without a GPU or without the CUDA kernels (CPU-only build).
tests/ops/test_numerics.py already runs its reference comparisons on every device; this
file adds what is specific to the CUDA backend:

* CUDA op == reference == CPU op (per-dtype tolerances): SN along every dim,
  BSN, training (1 and 3 power iterations) and eval, buffers and backward;
* the three launch modes (single block, cooperative, one kernel per phase;
  forced with BSN_CUDA_MODE) are bitwise identical on shapes that take every
  code path (a warp or the block per row, shared or global accumulators, ...);
* bitwise determinism run after run, a BigGAN-sized weight included;
* CUDA graph capture and replay == eager (buffers included); (whole models
  under torch.compile(mode="reduce-overhead"): tests/training/test_compile.py);
* gradcheck (float64), opcheck, odd shapes, non-contiguous weights, NaN and
  zero weights, 64-bit offsets (> 2^31 elements when the GPU has the memory).

Tolerances are relative to the largest magnitude of the expected tensor, as in
tests/ops/test_numerics.py.
"""

import pytest
import torch
from conftest import assert_close
from cuda_helpers import (
    acc_dtype,
    assert_equal,
    cuda_kernels_registered,
    cuda_mode,
    dims_of,
    environment,
    make_vectors,
    numel,
    op_backward,
    op_forward,
    ref_backward,
    ref_forward,
    seed_of,
    unit,
)

from bsn_cuda import _ops

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not cuda_kernels_registered():
    pytest.skip("the bsn_cuda CUDA kernels are not registered (CPU-only build)", allow_module_level=True)

DEV = "cuda"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MODES = ("single", "coop", "multi")


# ---------------------------------------------------------------------------
# CUDA == reference == CPU

MATCH_CASES = [
    ("sn", (64, 27), 0),
    ("sn", (33, 65), 1),
    ("sn", (7, 5, 3, 3), 0),
    ("sn", (7, 5, 3, 3), 1),
    ("sn", (7, 5, 3, 3), 2),
    ("sn", (7, 5, 3, 3), -1),
    ("sn", (3, 5, 1, 1), 0),
    ("sn", (128, 64, 3, 3), 1),
    ("sn", (300, 1000), 0),
    ("sn", (1000, 3), 0),
    ("bsn", (7, 5, 3, 3), None),
    ("bsn", (3, 5, 1, 1), None),
    ("bsn", (64, 32, 3, 3), None),
    ("bsn", (5, 2, 64), None),
    ("bsn", (3, 2, 300), None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,shape,dim", MATCH_CASES)
def test_cuda_matches_reference_and_cpu(kind, shape, dim, dtype):
    gen = torch.Generator().manual_seed(seed_of(kind, shape, dim))
    weight_cpu = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
    weight = weight_cpu.to(DEV)
    vectors = make_vectors(shape, dims_of(kind, shape, dim or 0), dtype, DEV, gen, warm=3, weight=weight_cpu)
    grad = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV, dtype)
    acc = acc_dtype(dtype)
    for n, update, scale in [(1, True, 1.0), (3, True, 2.5), (1, False, 0.5)]:
        tag = f"{kind} {list(shape)} dim={dim} {dtype} n={n} update={update}"
        out, state, vecs = op_forward(kind, weight, vectors, dim or 0, n, scale, update)
        r_out, r_state, r_vecs = ref_forward(kind, weight, vectors, dim or 0, n, scale, update)
        c_out, c_state, c_vecs = op_forward(kind, weight_cpu, [t.cpu() for t in vectors], dim or 0, n, scale, update)
        assert out.is_cuda and out.is_contiguous() and out.dtype == dtype and state.dtype == acc
        for name, a, r, c in [("out", out, r_out, c_out), ("state", state, r_state, c_state)] + [
            (f"vec{i}", a, r, c) for i, (a, r, c) in enumerate(zip(vecs, r_vecs, c_vecs))
        ]:
            assert_close(a, r, dtype, f"{tag} {name} vs reference")
            assert_close(a, c, dtype, f"{tag} {name} vs cpu op", factor=2.0)
        assert_close(state[:1], r_state[:1], acc, f"{tag} sigma")
        if kind == "bsn":
            assert_close(state[1:3], r_state[1:3], acc, f"{tag} sigmas")
        if not update:
            for a, b in zip(vecs, vectors):
                assert torch.equal(a, b)
        # Backward from the same state.
        g = op_backward(kind, grad, weight, state, dim or 0, scale)
        sigma = abs(state[0].item()) or 1.0
        magnitude = grad.double().abs().max().item() * scale / sigma
        assert_close(g, ref_backward(kind, grad, weight, state, dim or 0, scale), dtype, f"{tag} grad", magnitude)
        g_cpu = op_backward(kind, grad.cpu(), weight_cpu, state.cpu(), dim or 0, scale)
        assert_close(g, g_cpu, dtype, f"{tag} grad vs cpu op", magnitude, factor=2.0)


# ---------------------------------------------------------------------------
# Launch modes: bitwise identical

# Each case takes a different path through the kernels (see csrc/cuda/forward.cuh).
MODE_CASES = [
    ("sn", (64, 27), 0),  # a warp per row, registers
    ("sn", (33, 65), 1),  # strided pair, sr = 1, warp mode
    ("sn", (7, 5, 3, 3), 1),  # strided pair, sr = 9
    ("sn", (300, 1000), 0),  # the block per row, shared accumulators
    ("sn", (4, 30000), 0),  # block per row, accumulators in the workspace (float32 / float64)
    ("sn", (10, 3000, 5), 1),  # strided, block mode (float64: workspace accumulators)
    ("sn", (100000, 3), 0),  # many short rows
    ("sn", (2048, 1024), 0),  # the most phase-A chunks
    ("sn", (1, 5000), 0),  # one long row
    ("bsn", (7, 5, 3, 3), None),
    ("bsn", (64, 32, 3, 3), None),
    ("bsn", (6, 2000, 9), None),  # BSN with workspace accumulators
    ("bsn", (5, 2, 64), None),  # phase C: sr >= 32 in warp mode
    ("bsn", (3, 2, 300), None),  # phase C: sr >= 256 in block mode
    ("bsn", (5, 4, 1, 1), None),  # sr = 1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_launch_modes_are_bitwise_identical(dtype):
    for kind, shape, dim in MODE_CASES:
        if dtype == torch.float16 and numel(shape) > 100000:
            continue  # same code as bfloat16 but for the conversions
        gen = torch.Generator().manual_seed(seed_of(kind, shape, dim))
        weight = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV, dtype)
        vectors = make_vectors(shape, dims_of(kind, shape, dim or 0), dtype, DEV, gen)
        grad = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV, dtype)
        for n, update in [(1, True), (3, True), (1, False)]:
            results = []
            modes = MODES if numel(shape) <= 1 << 20 else ("coop", "multi")
            for mode in modes:
                with cuda_mode(mode):
                    out, state, vecs = op_forward(kind, weight, vectors, dim or 0, n, 1.5, update)
                    g = op_backward(kind, grad, weight, state, dim or 0, 1.5)
                results.append((out, state, g, *vecs))
            for mode, result in zip(modes[1:], results[1:]):
                for i, (a, b) in enumerate(zip(result, results[0])):
                    assert_equal(a, b, f"{kind} {list(shape)} {dtype} n={n} update={update}: {mode} vs {modes[0]}, item {i}")
            # and the auto mode agrees with them
            out, state, vecs = op_forward(kind, weight, vectors, dim or 0, n, 1.5, update)
            assert_equal(out, results[0][0], f"{kind} {list(shape)} auto out")
            assert_equal(state, results[0][1], f"{kind} {list(shape)} auto state")


def refused_cooperative_launches():
    """Make the driver refuse every cooperative launch (launch.cu asks for one
    block more than can be co-resident), as under MPS."""
    return environment("BSN_CUDA_TEST_COOP_OVERSUBSCRIBE", "1")


def cuda_kernel_names(fn):
    """Names of the CUDA kernels fn() launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("kind,shape,dim", [("sn", (300, 1000), 0), ("bsn", (64, 32, 3, 3), None), ("sn", (7, 5, 3, 3), 1)])
def test_refused_cooperative_launch_falls_back_to_multi(kind, shape, dim):
    # A cooperative launch the driver refuses runs as one kernel per phase,
    # with the same bits, and leaves no error behind for the next launch.
    gen = torch.Generator().manual_seed(seed_of("fallback", kind, shape, dim))
    weight = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV, torch.float32)
    vectors = make_vectors(shape, dims_of(kind, shape, dim or 0), torch.float32, DEV, gen)
    grad = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV, torch.float32)

    def run():
        out, state, vecs = op_forward(kind, weight, vectors, dim or 0, 2, 1.5, True)
        return out, state, op_backward(kind, grad, weight, state, dim or 0, 1.5), *vecs

    with cuda_mode("multi"):
        expected = run()
    with cuda_mode("coop"), refused_cooperative_launches():
        got = run()
        names = cuda_kernel_names(run)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_equal(a, b, f"{kind} {list(shape)}: refused coop vs multi, item {i}")
    assert any("phase_a_kernel" in n for n in names) and any("bw_dot_kernel" in n for n in names), names
    assert not any("fused_" in n for n in names), names
    torch.cuda.synchronize()
    # The next (cooperative) call works: the refused launch's error was cleared.
    with cuda_mode("coop"):
        again = run()
    for i, (a, b) in enumerate(zip(again, expected)):
        assert_equal(a, b, f"{kind} {list(shape)}: coop after a refused launch, item {i}")


def test_bad_mode_raises():
    weight = torch.randn(4, 3, device=DEV)
    u, v = unit(4, torch.float32, DEV, torch.Generator()), unit(3, torch.float32, DEV, torch.Generator())
    with cuda_mode("bogus"), pytest.raises(RuntimeError, match="BSN_CUDA_MODE"):
        torch.ops.bsn_cuda.sn_forward(weight, u, v, 0, 1, 1e-12, 1.0, True)


# ---------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kind,shape,dim",
    [("sn", (1536, 1536, 3, 3), 0), ("bsn", (1536, 1536, 3, 3), None), ("sn", (1536, 1536, 3, 3), 1), ("bsn", (512, 256, 3, 3), None), ("sn", (64, 27), 0)],
)
def test_repeated_calls_are_bitwise_identical(kind, shape, dim, dtype):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=gen).to(DEV, dtype)
    vectors = make_vectors(shape, dims_of(kind, shape, dim or 0), dtype, DEV, gen)
    grad = torch.randn(shape, generator=gen).to(DEV, dtype)
    runs = []
    for _ in range(2):
        out, state, vecs = op_forward(kind, weight, vectors, dim or 0, 2, 1.0, True)
        g = op_backward(kind, grad, weight, state, dim or 0, 1.0)
        runs.append((out, state, g, *vecs))
    for i, (a, b) in enumerate(zip(*runs)):
        assert_equal(a, b, f"{kind} {list(shape)} {dtype} item {i}")
    assert torch.isfinite(runs[0][1]).all()


def test_other_streams_and_devices_guard():
    """Launches go to the current stream; results equal the default stream's."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(128, 64, 3, 3, generator=gen).to(DEV)
    vectors = make_vectors((128, 64, 3, 3), (0, 1), torch.float32, DEV, gen)
    expected = op_forward("bsn", weight, vectors)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = op_forward("bsn", weight, vectors)
    torch.cuda.current_stream().wait_stream(stream)
    assert_equal(got[0], expected[0], "out on a side stream")
    assert_equal(got[1], expected[1], "state on a side stream")
    if torch.cuda.device_count() > 1:
        w1 = weight.to("cuda:1")
        got = op_forward("bsn", w1, [t.to("cuda:1") for t in vectors])
        assert got[0].device == w1.device
        assert_close(got[0], expected[0], torch.float32, "second device")


# ---------------------------------------------------------------------------
# CUDA graph capture and replay


def _graph_case(kind, shape, dim, mode):
    gen = torch.Generator().manual_seed(seed_of(kind, shape, dim))
    weight = torch.randn(shape, generator=gen).to(DEV)
    vectors = make_vectors(shape, dims_of(kind, shape, dim or 0), torch.float32, DEV, gen)
    grad = torch.randn(shape, generator=gen).to(DEV)

    def step(vecs):
        if kind == "sn":
            out, state = torch.ops.bsn_cuda.sn_forward(weight, *vecs, dim, 2, 1e-12, 1.5, True)
        else:
            out, state = torch.ops.bsn_cuda.bsn_forward(weight, *vecs, 2, 1e-12, 1.5, True)
        return out, state, op_backward(kind, grad, weight, state, dim or 0, 1.5)

    with cuda_mode(mode):
        # Eager: two steps on the same buffers.
        eager_vecs = [t.clone() for t in vectors]
        eager = [[t.clone() for t in step(eager_vecs)] + [t.clone() for t in eager_vecs] for _ in range(2)]

        # Warm up on a side stream (on copies: the captured buffers must start as `vectors`).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step([t.clone() for t in vectors])
        torch.cuda.current_stream().wait_stream(side)

        graph_vecs = [t.clone() for t in vectors]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step(graph_vecs)
    for expected in eager:
        graph.replay()
        torch.cuda.synchronize()
        got = list(captured) + graph_vecs
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_equal(a, b, f"{kind} {list(shape)} mode={mode}: graph replay item {i}")


@pytest.mark.parametrize("mode", ("auto",) + MODES)
@pytest.mark.parametrize("kind,shape,dim", [("sn", (64, 27), 1), ("sn", (128, 64, 3, 3), 0), ("bsn", (128, 64, 3, 3), None)])
def test_cuda_graph_replay_matches_eager(kind, shape, dim, mode):
    _graph_case(kind, shape, dim, mode)


def test_cuda_graph_replay_matches_eager_large():
    _graph_case("bsn", (1024, 512, 3, 3), None, "auto")
    _graph_case("sn", (1024, 512, 3, 3), 1, "auto")


# ---------------------------------------------------------------------------
# Autograd and opcheck


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(10)
    for shape, dim in [((5, 4), 0), ((4, 3, 2, 2), 1), ((3, 2, 2, 3), -1)]:
        weight = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV).requires_grad_()
        for update, warm in ((False, 3), (True, 3000)):
            vecs = make_vectors(shape, (dim % len(shape),), torch.float64, DEV, gen, warm=warm, weight=weight)

            def fn(w, vecs=vecs, update=update):
                u, v = (t.clone() for t in vecs)
                return _ops.sn_forward(w, u, v, dim, 1, 1e-12, 1.3, update)[0]

            assert torch.autograd.gradcheck(fn, (weight,))
    for shape in [(4, 3, 2), (3, 2, 2, 2)]:
        weight = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV).requires_grad_()
        for update, warm in ((False, 3), (True, 3000)):
            vecs = make_vectors(shape, (0, 1), torch.float64, DEV, gen, warm=warm, weight=weight)

            def fn(w, vecs=vecs, update=update):
                return _ops.bsn_forward(w, *[t.clone() for t in vecs], 1, 1e-12, 1.3, update)[0]

            assert torch.autograd.gradcheck(fn, (weight,))


def test_opcheck_cuda():
    gen = torch.Generator().manual_seed(13)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        weight = torch.randn(6, 4, 3, generator=gen).to(DEV, dtype).requires_grad_()
        for dim, update in [(0, True), (1, False), (-1, True)]:
            u, v = make_vectors((6, 4, 3), (dim % 3,), dtype, DEV, gen)
            result = torch.library.opcheck(torch.ops.bsn_cuda.sn_forward.default, (weight, u, v, dim, 2, 1e-12, 1.5, update))
            assert all(s == "SUCCESS" for s in result.values()), result
            _, state = torch.ops.bsn_cuda.sn_forward(weight.detach(), u.clone(), v.clone(), dim, 1, 1e-12, 1.5, True)
            grad = torch.randn(6, 4, 3, generator=gen).to(DEV, dtype).requires_grad_()
            result = torch.library.opcheck(torch.ops.bsn_cuda.sn_backward.default, (grad, weight, state, dim, 1.5))
            assert all(s == "SUCCESS" for s in result.values()), result
        for update in (True, False):
            vectors = make_vectors((6, 4, 3), (0, 1), dtype, DEV, gen)
            result = torch.library.opcheck(torch.ops.bsn_cuda.bsn_forward.default, (weight, *vectors, 2, 1e-12, 0.5, update))
            assert all(s == "SUCCESS" for s in result.values()), result
            _, state = torch.ops.bsn_cuda.bsn_forward(weight.detach(), *[t.clone() for t in vectors], 1, 1e-12, 0.5, True)
            grad = torch.randn(6, 4, 3, generator=gen).to(DEV, dtype).requires_grad_()
            result = torch.library.opcheck(torch.ops.bsn_cuda.bsn_backward.default, (grad, weight, state, 0.5))
            assert all(s == "SUCCESS" for s in result.values()), result


# ---------------------------------------------------------------------------
# Shapes, layouts, special values

ODD_SN = [(1, 1), (1, 1000), (1000, 1), (33, 65), (1000, 3), (7, 5, 3, 3), (3, 5, 1, 1), (1, 100000), (100000, 1), (2, 1, 1, 5)]
ODD_BSN = [(1, 1, 1), (7, 5, 3, 3), (3, 5, 1, 1), (1, 7, 9), (7, 1, 9), (2, 1, 1, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_odd_shapes_match_reference(dtype):
    gen = torch.Generator().manual_seed(20)
    cases = [("sn", s, d) for s in ODD_SN for d in range(len(s))] + [("bsn", s, 0) for s in ODD_BSN]
    for kind, shape, dim in cases:
        weight = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV, dtype)
        vectors = make_vectors(shape, dims_of(kind, shape, dim), dtype, DEV, gen)
        grad = torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV, dtype)
        for n, update in [(2, True), (1, False)]:
            tag = f"{kind} {list(shape)} dim={dim} {dtype} n={n} update={update}"
            out, state, vecs = op_forward(kind, weight, vectors, dim, n, 1.5, update)
            r_out, r_state, r_vecs = ref_forward(kind, weight, vectors, dim, n, 1.5, update)
            assert_close(out, r_out, dtype, tag + " out")
            assert_close(state, r_state, dtype, tag + " state")
            for i, (a, b) in enumerate(zip(vecs, r_vecs)):
                assert_close(a, b, dtype, f"{tag} vec{i}")
            g = op_backward(kind, grad, weight, state, dim, 1.5)
            sigma = abs(state[0].item()) or 1.0
            magnitude = grad.double().abs().max().item() * 1.5 / sigma
            assert_close(g, ref_backward(kind, grad, weight, state, dim, 1.5), dtype, tag + " grad", magnitude)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_weight_equals_contiguous_copy(layout):
    gen = torch.Generator().manual_seed(21)
    shape = (16, 12, 3, 5)
    base = torch.randn(shape, generator=gen)
    if layout == "transposed":
        weight = base.transpose(-1, -2).contiguous().to(DEV).transpose(-1, -2)
    elif layout == "sliced":
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],))
        wide[..., ::2] = base
        weight = wide.to(DEV)[..., ::2]
    else:
        weight = base.to(DEV).to(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    grad = torch.randn(shape, generator=gen).to(DEV).transpose(0, 1).contiguous().transpose(0, 1)
    for kind, dim in [("sn", 0), ("sn", 1), ("sn", 3), ("bsn", 0)]:
        vectors = make_vectors(shape, dims_of(kind, shape, dim), torch.float32, DEV, gen)
        a = op_forward(kind, weight, vectors, dim, 2, 1.0, True)
        b = op_forward(kind, weight.contiguous(), vectors, dim, 2, 1.0, True)
        for x, y in zip(a[:2] + tuple(a[2]), b[:2] + tuple(b[2])):
            assert_equal(x, y, f"{layout} {kind} dim={dim}")
        assert_equal(
            op_backward(kind, grad, weight, a[1], dim, 1.0),
            op_backward(kind, grad.contiguous(), weight.contiguous(), a[1], dim, 1.0),
            f"{layout} {kind} backward",
        )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weight_keeps_buffers(bad_value, mode):
    gen = torch.Generator().manual_seed(22)
    for kind, shape, dim in [("sn", (6, 5, 2), 0), ("sn", (6, 5, 2), 1), ("bsn", (6, 5, 2), 0), ("bsn", (200, 100, 3), 0)]:
        weight = torch.randn(shape, generator=gen).to(DEV)
        weight.view(-1)[numel(shape) // 3] = bad_value
        vectors = make_vectors(shape, dims_of(kind, shape, dim), torch.float32, DEV, gen)
        with cuda_mode(mode):
            out, state, vecs = op_forward(kind, weight, vectors, dim, 3, 1.0, True)
        assert torch.isnan(state[0]), (kind, shape, mode)
        assert not torch.isfinite(out).all()
        for a, b in zip(vecs, vectors):
            assert torch.equal(a, b), (kind, shape, mode, "buffers changed")
        # The state holds the (kept) buffer values.
        offset = 1 if kind == "sn" else 3
        stored = torch.cat([t.to(state.dtype) for t in vectors])
        assert torch.equal(state[offset:], stored)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_zero_weight_gives_scaled_weight(dtype, mode):
    gen = torch.Generator().manual_seed(23)
    for kind, shape, dim in [("sn", (5, 4, 3), 1), ("bsn", (5, 4, 3), 0), ("sn", (300, 1000), 0)]:
        weight = torch.zeros(shape, dtype=dtype, device=DEV)
        vectors = make_vectors(shape, dims_of(kind, shape, dim), dtype, DEV, gen)
        grad = torch.randn(shape, generator=gen).to(DEV, dtype)
        with cuda_mode(mode):
            for update in (True, False):
                out, state, vecs = op_forward(kind, weight, vectors, dim, 2, 3.0, update)
                assert torch.equal(out, torch.zeros_like(out))
                assert state[0].item() == 0
                for a, b in zip(vecs, vectors):
                    assert torch.equal(a, b)
                g = op_backward(kind, grad, weight, state, dim, 3.0)
                assert torch.equal(g, (3.0 * grad.to(acc_dtype(dtype))).to(dtype))


# ---------------------------------------------------------------------------
# Large weights and 64-bit offsets


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def test_weight_with_more_than_2_pow_31_over_64_elements():
    """33.6M elements: chunk x cols products and offsets well past 2^25 (fp32, vs the reference)."""
    if _free_gib() < 4:
        pytest.skip("not enough GPU memory")
    gen = torch.Generator(device=DEV).manual_seed(24)
    for kind, shape, dim in [("sn", (4100, 8200), 0), ("sn", (4100, 8200), 1), ("bsn", (4100, 2050, 4), 0)]:
        weight = torch.randn(shape, device=DEV, generator=gen)
        vectors = []
        for d in dims_of(kind, shape, dim):
            for n in (shape[d], numel(shape) // shape[d]):
                x = torch.randn(n, device=DEV, generator=gen)
                vectors.append(x / x.norm())
        out, state, vecs = op_forward(kind, weight, vectors, dim, 1, 1.0, True)
        r_out, r_state, r_vecs = ref_forward(kind, weight, vectors, dim, 1, 1.0, True)
        assert_close(out, r_out, torch.float32, f"{kind} {shape} out", factor=10.0)
        assert_close(state[:1], r_state[:1], torch.float32, f"{kind} {shape} sigma", factor=10.0)
        for i, (a, b) in enumerate(zip(vecs, r_vecs)):
            assert_close(a, b, torch.float32, f"{kind} {shape} vec{i}", factor=10.0)
        del out, r_out, weight


def _rank_one(pattern, n, device):
    """Entries from `pattern` (powers of two, so products are exact in bfloat16)."""
    return torch.tensor(pattern, dtype=torch.float64, device=device)[torch.arange(n, device=device) % len(pattern)]


@pytest.mark.parametrize("kind", ["sn", "bsn"])
def test_more_than_2_pow_31_elements(kind):
    """A rank-one bfloat16 weight with > 2^31 elements: sigma, u, v, out and the
    gradient (zero for G = W) are known in closed form, so no reference is needed."""
    if _free_gib() < 24:
        pytest.skip("needs ~20 GiB of free GPU memory")
    bf16 = torch.bfloat16
    if kind == "sn":
        shape = (65537, 32771)
        a, b = _rank_one([1.0, 2.0, 0.5], shape[0], DEV), _rank_one([1.0, -1.0, 0.25, 0.5], shape[1], DEV)
        weight = torch.outer(a.to(bf16), b.to(bf16))  # exact: products of powers of two
        sigma = (a.norm() * b.norm()).item()
        u_exp, v_exp = a / a.norm(), b / b.norm()
    else:
        shape = (65537, 16385, 2)
        a, b, c = _rank_one([1.0, 2.0, 0.5], shape[0], DEV), _rank_one([1.0, -1.0, 0.25], shape[1], DEV), _rank_one([1.0, 0.5], 2, DEV)
        weight = torch.outer(a.to(bf16), torch.outer(b, c).flatten().to(bf16)).view(shape)
        sigma = (a.norm() * b.norm() * c.norm()).item()
    assert weight.numel() > 2**31
    gen = torch.Generator().manual_seed(25)
    vectors = make_vectors(shape, dims_of(kind, shape, 0), torch.bfloat16, DEV, gen)
    out, state, vecs = op_forward(kind, weight, vectors, 0, 1, 2.0, True)
    assert abs(state[0].item() - sigma) <= 1e-3 * sigma, (state[0].item(), sigma)
    if kind == "bsn":
        assert abs(state[1].item() - sigma) <= 1e-3 * sigma and abs(state[2].item() - sigma) <= 1e-3 * sigma
    else:
        sign = torch.sign(vecs[0][0].double() * u_exp[0])
        assert_close(vecs[0], sign * u_exp, torch.bfloat16, "u")
        assert_close(vecs[1], sign * v_exp, torch.bfloat16, "v")
    # out at flat offsets on both sides of 2^31.
    flat_w, flat_out = weight.view(-1), out.view(-1)
    idx = torch.tensor([0, 2**31 - 1, 2**31, 2**31 + 12345, weight.numel() - 1], device=DEV)
    expected = flat_w[idx].double() * (2.0 / state[0].double())
    assert_close(flat_out[idx], expected.to(torch.bfloat16), torch.bfloat16, "out")
    del out
    # G = W: c = <W, W> = sigma^2 and D = u v^T (= W / sigma), so dW = a (W - sigma D) ~ 0.
    g = op_backward(kind, weight, weight, state, 0, 2.0)
    assert g.abs().max().item() <= 2e-2 * 2.0 / sigma * weight.abs().max().item()


# ---------------------------------------------------------------------------
# Grouped ops (issue 22): one launch per phase step for the layers of a dtype
# (launch.cu, "Grouped launches"), bitwise the per-layer path (BSN_CUDA_GROUP=layers).

# (kind, shape, dim, n_power_iterations, update); kinds: 0 sn, 1 bsn, 2 sn_transposed.
GROUP_LAYERS = [
    (0, (64, 27), 0, 1, True),
    (0, (128, 64, 3, 3), 1, 2, True),
    (0, (33, 65), 1, 1, False),
    (1, (7, 5, 3, 3), 0, 1, True),
    (1, (64, 32, 3, 3), 0, 2, True),
    (2, (5, 7, 3), 0, 1, True),
    (0, (300, 1000), 0, 1, True),
    (1, (5, 2, 64), 0, 1, False),
    (0, (1000, 3), 0, 3, True),
    (0, (3, 5, 1, 1), 0, 1, True),
]
# Phase A's accumulators of (2, 14000, 1) take ~170 KB of shared memory (opt-in
# maximum): the launch that holds its phase A asks for that much.
GROUP_WIDE = [(1, (2, 14000, 1), 0, 1, True), (0, (64, 27), 0, 1, True), (1, (7, 5, 3, 3), 0, 2, False)]


def group_phases(kind, shape, dim, n, update):
    """Phases (launches of the grouped path) of one layer: A, B, [C], [B2] per
    iteration, then D; eval: A, D."""
    if not update:
        return 2
    strided = kind == 1 or (kind == 0 and numel(shape[: dim % len(shape)]) > 1)
    return n * (2 + int(strided)) + (n - 1) + 1


def group_inputs(layers, dtype, key, share=False):
    gen = torch.Generator().manual_seed(seed_of("group", key))
    ws, vs, grads = [], [], []
    for kind, shape, dim, n, update in layers:
        ws.append(torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV, dtype))
        grads.append(torch.randn(shape, dtype=torch.float64, generator=gen).to(DEV, dtype))
        if kind == 1:
            sizes = [shape[0], numel(shape) // shape[0], shape[1], numel(shape) // shape[1]]
        elif kind == 0:
            sizes = [shape[dim % len(shape)], numel(shape) // shape[dim % len(shape)]]
        else:
            sizes = [numel(shape) // shape[0], shape[0]]
        vs += [unit(m, dtype, DEV, gen) for m in sizes]
    if share:  # layers 0 and 1 (same shape and kind) share their vectors
        vs[2], vs[3] = vs[0], vs[1]
    args = ([l[0] for l in layers], [l[2] for l in layers], [l[3] for l in layers], [1e-12] * len(layers),
            [1.0 + 0.25 * i for i in range(len(layers))], [l[4] for l in layers])
    return ws, vs, grads, args


def run_group(ws, vs, grads, args, clone=True):
    vs = [v.clone() for v in vs] if clone else vs
    outs, states = torch.ops.bsn_cuda.group_forward(ws, vs, *args)
    gws = torch.ops.bsn_cuda.group_backward(grads, ws, states, args[0], args[1], args[4])
    return [*outs, *states, *vs, *gws]


def group_per_layer():
    return environment("BSN_CUDA_GROUP", "layers")


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_launches_equal_per_layer(dtype):
    for name, layers in (("mixed", GROUP_LAYERS), ("wide", GROUP_WIDE)):
        ws, vs, grads, args = group_inputs(layers, dtype, name)
        got = run_group(ws, vs, grads, args)
        for mode in ("auto", "multi", "single"):
            with group_per_layer(), cuda_mode(mode):
                expected = run_group(ws, vs, grads, args)
            for i, (a, b) in enumerate(zip(got, expected)):
                assert_equal(a, b, f"{name} {dtype}: grouped vs per-layer ({mode}), item {i}")
        # and the reference (the per-layer tests' tolerances)
        outs = got[: len(layers)]
        states = got[len(layers): 2 * len(layers)]
        for j, ((kind, shape, dim, n, update), w, s, o) in enumerate(zip(layers, ws, states, outs)):
            if kind == 2:
                continue  # the legacy order: tests/module/test_grouping.py
            vj = vs[sum(4 if l[0] == 1 else 2 for l in layers[:j]):][: 4 if kind == 1 else 2]
            ro, _, _ = ref_forward("bsn" if kind == 1 else "sn", w.cpu().double(), [v.cpu().double() for v in vj],
                                    dim, n, args[4][j], update)
            assert_close(o.cpu(), ro, dtype, f"{name} layer {j} out")


def test_grouped_launch_count():
    # One launch per phase step (the most phases of any layer), not one per layer and phase;
    # the backward: 2. No per-layer kernel runs.
    ws, vs, grads, args = group_inputs(GROUP_LAYERS, torch.float32, "count")
    states = torch.ops.bsn_cuda.group_forward(ws, [v.clone() for v in vs], *args)[1]
    fwd = cuda_kernel_names(lambda: torch.ops.bsn_cuda.group_forward(ws, [v.clone() for v in vs], *args))
    bwd = cuda_kernel_names(lambda: torch.ops.bsn_cuda.group_backward(grads, ws, states, args[0], args[1], args[4]))
    expected = max(group_phases(*l) for l in GROUP_LAYERS)
    assert expected == 8  # BSN with 2 iterations
    assert sum("group_forward_kernel" in n for n in fwd) == expected, fwd
    assert sum("group_backward_kernel" in n for n in bwd) == 2, bwd
    for n in fwd + bwd:
        assert not any(k in n for k in ("phase_", "fused_", "bw_dot", "bw_apply")), n
    with group_per_layer():
        per_layer = cuda_kernel_names(lambda: torch.ops.bsn_cuda.group_forward(ws, [v.clone() for v in vs], *args))
    assert not any("group_forward_kernel" in n for n in per_layer), per_layer


def test_grouped_mixed_dtypes_one_sequence_per_dtype():
    layers = GROUP_LAYERS[:4]
    w32, v32, g32, a32 = group_inputs(layers, torch.float32, "mixed dtypes")
    w64, v64, g64, a64 = group_inputs(layers[:2], torch.float64, "mixed dtypes 64")
    ws, vs, grads = w32 + w64, v32 + v64, g32 + g64
    args = tuple(x + y for x, y in zip(a32, a64))
    got = run_group(ws, vs, grads, args)
    with group_per_layer():
        expected = run_group(ws, vs, grads, args)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_equal(a, b, f"mixed dtypes: grouped vs per-layer, item {i}")
    names = cuda_kernel_names(lambda: torch.ops.bsn_cuda.group_forward(ws, [v.clone() for v in vs], *args))
    n32 = max(group_phases(*l) for l in layers)
    n64 = max(group_phases(*l) for l in layers[:2])
    assert sum("group_forward_kernel" in n for n in names) == n32 + n64, names


def test_grouped_shared_vectors_run_per_layer_in_list_order():
    layers = [(0, (64, 27), 0, 1, True), (0, (64, 27), 0, 2, True), (1, (7, 5, 3, 3), 0, 1, True)]
    ws, vs, grads, args = group_inputs(layers, torch.float32, "shared", share=True)
    vs_a = [v.clone() for v in vs]
    vs_a[2], vs_a[3] = vs_a[0], vs_a[1]
    got = run_group(ws, vs_a, grads, args, clone=False)
    # the per-layer ops in list order, the second layer seeing the first one's update
    vs_b = [v.clone() for v in vs]
    vs_b[2], vs_b[3] = vs_b[0], vs_b[1]
    expected = []
    for j, w in enumerate(ws[:2]):
        expected.append(torch.ops.bsn_cuda.sn_forward(w, vs_b[0], vs_b[1], 0, args[2][j], 1e-12, args[4][j], True))
    expected.append(torch.ops.bsn_cuda.bsn_forward(ws[2], *vs_b[4:8], 1, 1e-12, args[4][2], True))
    for j in range(3):
        assert_equal(got[j], expected[j][0], f"shared vectors: out {j}")
        assert_equal(got[3 + j], expected[j][1], f"shared vectors: state {j}")
    for j in range(8):
        assert_equal(vs_a[j], vs_b[j], f"shared vectors: vector {j}")


def test_grouped_graph_capture_matches_eager():
    # Under capture the grouped op runs per layer (the table copy would re-read host
    # memory at replay): same bits as eager grouped calls.
    ws, vs, grads, args = group_inputs(GROUP_LAYERS, torch.float32, "graph")
    eager_vs = [v.clone() for v in vs]
    eager = [run_group(ws, eager_vs, grads, args, clone=False) for _ in range(3)]
    graph_vs = [v.clone() for v in vs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        warm = [v.clone() for v in vs]
        run_group(ws, warm, grads, args, clone=False)  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_group(ws, graph_vs, grads, args, clone=False)
    for expected in eager:
        graph.replay()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(captured, expected)):
            assert_equal(a, b, f"graph replay of the grouped op, item {i}")


def test_bad_group_mode_raises():
    ws, vs, grads, args = group_inputs(GROUP_LAYERS[:2], torch.float32, "bad")
    with environment("BSN_CUDA_GROUP", "fast"), pytest.raises(RuntimeError, match="BSN_CUDA_GROUP must be grouped or layers, got 'fast'"):
        torch.ops.bsn_cuda.group_forward(ws, vs, *args)
