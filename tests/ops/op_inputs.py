"""Weights and power-iteration vectors for the op tests (tests/ops)."""

import torch
from conftest import random_unit

from bsn_cuda import reference


def warm_vectors(weight, dims, generator, iterations=5):
    """Unit vectors a few iterations into the power method (so sigma is near the
    true spectral norm, as in training), rounded to the weight dtype."""
    vectors = []
    w = weight.detach().double().cpu()
    for d in dims:
        m = w.shape[d]
        u = random_unit(m, torch.float64, "cpu", generator)
        v = random_unit(w.numel() // m, torch.float64, "cpu", generator)
        reference.sn_forward(w, u, v, d, iterations, 1e-12, 1.0, True)
        vectors += [u.to(weight.device, weight.dtype), v.to(weight.device, weight.dtype)]
    return vectors


def make_weight(shape, dtype, device, generator, layout="contiguous"):
    """A weight with the given shape and memory layout (all layouts have the same values)."""
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    if layout == "contiguous":
        w = base.to(device, dtype)
    elif layout == "transposed":  # last two dims swapped in memory
        w = base.transpose(-1, -2).contiguous().to(device, dtype).transpose(-1, -2)
    elif layout == "sliced":  # every other element of a wider tensor along the last dim
        wide = torch.randn(shape[:-1] + (2 * shape[-1],), generator=generator, dtype=torch.float64)
        wide[..., ::2] = base
        w = wide.to(device, dtype)[..., ::2]
    elif layout == "channels_last":
        w = base.to(device, dtype).to(memory_format=torch.channels_last)
    else:
        raise AssertionError(layout)
    torch.testing.assert_close(w.double().cpu(), base.to(dtype).double(), rtol=0, atol=0)
    return w
