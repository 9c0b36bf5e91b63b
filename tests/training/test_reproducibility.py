"""Bitwise reproducible training: the same run twice, and the same steps with
1 or 2 threads and deterministic algorithms on or off."""

import torch
from conftest import assert_equal_dicts, build_discriminator, images, requires_ops, snapshot

from bsn_cuda import functional


def _training_run(steps=3):
    model = build_discriminator("mixed")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    outs = []
    for step in range(steps):
        out = model(images(step))
        outs.append(out.detach())
        optimizer.zero_grad()
        out.square().mean().backward()
        optimizer.step()
    return outs, snapshot(model)


def test_training_runs_are_bitwise_reproducible(restore_global_state):
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        first_outs, first_state = _training_run()
        second_outs, second_state = _training_run()
        for a, b in zip(first_outs, second_outs):
            assert torch.equal(a, b)
        assert_equal_dicts(first_state, second_state, f"deterministic={deterministic}")


@requires_ops
def test_sn_training_is_bitwise_independent_of_threads_and_deterministic_mode(restore_global_state):
    """The fused ops split work by shape only: several SN/BSN training steps
    (forward, backward, buffer updates) are bitwise equal for 1 and 2 threads
    and with deterministic algorithms on or off. (The gradient is a fixed
    tensor G, so no other reduction is involved.)"""
    gen = torch.Generator().manual_seed(21)
    shapes = [("sn", (96, 64, 3, 3), 1), ("bsn", (64, 48, 3, 3), None), ("sn", (300, 200), 0)]
    weights = [torch.randn(s, generator=gen) for _, s, _ in shapes]
    grads = [torch.randn(s, generator=gen) for _, s, _ in shapes]

    def run():
        results = []
        for (kind, shape, dim), w0, g in zip(shapes, weights, grads):
            w = w0.clone().requires_grad_()
            if kind == "sn":
                vectors = list(functional.init_sn_vectors(w0, dim))
            else:
                vectors = list(functional.init_bsn_vectors(w0))
            for _ in range(3):
                if kind == "sn":
                    out, state = torch.ops.bsn_cuda.sn_forward(w, *vectors, dim, 2, 1e-12, 1.0, True)
                else:
                    out, state = torch.ops.bsn_cuda.bsn_forward(w, *vectors, 2, 1e-12, 1.0, True)
                (grad,) = torch.autograd.grad(out, w, g)
                results += [out.detach(), state, grad, *[t.clone() for t in vectors]]
                with torch.no_grad():
                    w -= 0.1 * grad
        return results

    runs = []
    for threads, deterministic in ((1, False), (2, False), (2, True), (1, True)):
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.manual_seed(0)  # init_*_vectors draw from the global RNG
        runs.append(run())
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            assert torch.equal(a, b), f"result {i} differs"
