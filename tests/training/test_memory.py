"""Memory over a training run: no growth in live tensors or Python objects.

tests/training/memory_soak.py runs the same check over thousands of steps (RSS and
CUDA memory included); this is its quick form.
"""

import gc

import torch
from conftest import build_discriminator, images


def _live_tensors():
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_no_memory_growth_over_training_steps(single_thread):
    """Training must not accumulate tensors, autograd graphs or Python objects:
    after warm-up, the number of live tensors does not grow and the number of
    gc-tracked objects grows by less than one per step (a leak of even one
    object per step would add 150)."""
    model = build_discriminator("mixed")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = images(0)

    def step():
        out = model(x)
        optimizer.zero_grad(set_to_none=True)
        out.mean().backward()
        optimizer.step()

    for _ in range(30):
        step()
    gc.collect()
    tensors, objects = _live_tensors(), len(gc.get_objects())
    for _ in range(150):
        step()
    gc.collect()
    assert _live_tensors() <= tensors
    assert len(gc.get_objects()) - objects < 50
    for name, buf in model.named_buffers():  # no autograd history kept in the buffers
        assert buf.grad_fn is None and not buf.requires_grad, name
