"""Determinism of the fused ops: bitwise the same results for 1 and 2 CPU
threads and for repeated calls. (Whole training runs: training/test_reproducibility.py.)"""

import pytest
import torch
from conftest import DEVICES, requires_ops
from op_inputs import make_weight, warm_vectors

from bsn_cuda import _ops


@requires_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_results_independent_of_thread_count(dtype):
    gen = torch.Generator().manual_seed(16)
    cases = [("sn", (300, 1000), 0), ("sn", (128, 64, 3, 3), 1), ("sn", (64, 32, 5, 5), 3), ("bsn", (128, 64, 3, 3), None)]
    previous = torch.get_num_threads()
    try:
        for kind, shape, dim in cases:
            weight = make_weight(shape, dtype, "cpu", gen)
            grad = make_weight(shape, dtype, "cpu", gen)
            dims = (dim,) if kind == "sn" else (0, 1)
            vectors = warm_vectors(weight, dims, gen, iterations=1)
            results = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                w = weight.clone().requires_grad_()
                vecs = [t.clone() for t in vectors]
                if kind == "sn":
                    out, state = torch.ops.bsn_cuda.sn_forward(w, *vecs, dim, 3, 1e-12, 1.0, True)
                else:
                    out, state = torch.ops.bsn_cuda.bsn_forward(w, *vecs, 3, 1e-12, 1.0, True)
                (g,) = torch.autograd.grad(out, w, grad)
                results.append((out, state, g, *vecs))
            for a, b in zip(*results):
                assert torch.equal(a, b), f"{kind} {shape}: results differ between 1 and 2 threads"
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_calls_are_deterministic(device):
    gen = torch.Generator().manual_seed(17)
    weight = make_weight((64, 32, 3, 3), torch.float32, device, gen)
    vectors = warm_vectors(weight, (0, 1), gen)
    first = _ops.bsn_forward(weight, *[t.clone() for t in vectors], 2, 1e-12, 1.0, True)
    second = _ops.bsn_forward(weight, *[t.clone() for t in vectors], 2, 1e-12, 1.0, True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
