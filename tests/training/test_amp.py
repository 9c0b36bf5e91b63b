"""Automatic mixed precision: autocast and GradScaler with SN/BSN layers.

Under autocast the SN op runs in float32 (it is on no autocast list), so the
buffers equal an fp32 run's bit for bit; a step GradScaler skips for
overflowing gradients leaves the weights and the unit vectors as they were.
"""

import copy

import pytest
import torch
from conftest import CUDA_USABLE, assert_equal_dicts, build_discriminator, images, power_vectors


AUTOCAST_CASES = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not CUDA_USABLE, reason="needs CUDA")),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not CUDA_USABLE, reason="needs CUDA")),
]


GRAD_TOL = {torch.bfloat16: 0.15, torch.float16: 0.03}  # relative (Frobenius) error of low-precision convs


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST_CASES)
def test_autocast_keeps_sn_in_float32(device, amp_dtype):
    """Under autocast the weight and the buffers stay fp32 (the SN op runs in
    fp32, it is not on the autocast lists); the convs run in low precision."""
    eager = build_discriminator("mixed", device=device)
    amp = copy.deepcopy(eager)
    for step in range(3):
        x = images(step, device=device)
        out_eager = eager(x)
        with torch.autocast(device, dtype=amp_dtype):
            out_amp = amp(x)
        assert out_amp.dtype == amp_dtype
        assert all(p.dtype == torch.float32 for p in amp.parameters())
        scale = out_eager.abs().max().item()
        torch.testing.assert_close(out_amp.float(), out_eager, rtol=0, atol=3e-2 * scale)
        # The power iteration saw the same fp32 weights: buffers equal bit for bit.
        for (name, b_eager), b_amp in zip(eager.named_buffers(), amp.buffers()):
            assert b_amp.dtype in (torch.float32,), name
            assert torch.equal(b_amp, b_eager), name
        out_eager.float().square().mean().backward()
        out_amp.float().square().mean().backward()
        for (name, p), q in zip(eager.named_parameters(), amp.parameters()):
            assert q.grad.dtype == torch.float32
            err = (q.grad - p.grad).norm() / p.grad.norm()
            assert err < GRAD_TOL[amp_dtype], f"{name}: relative gradient error {err:.3e}"
            q.grad = None
            p.grad = None
        with torch.no_grad():  # same update for both, so the weights stay equal
            for p, q in zip(eager.parameters(), amp.parameters()):
                p -= 0.05 * p.detach().sign()
                q -= 0.05 * q.detach().sign()


def test_grad_scaler_skipped_step_keeps_buffers_and_training_finite():
    model = build_discriminator("mixed")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(4):
        out = model(images(step))
        assert torch.isfinite(out).all()
        loss = out.square().mean()
        if step == 1:
            loss = loss * float("inf")  # overflowing gradients: the step must be skipped
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if step == 1:
            assert scaler.get_scale() < scale
            assert_equal_dicts({k: p.detach() for k, p in model.named_parameters()}, params, "skipped step")
        for name, vec in power_vectors(model).items():
            assert torch.isfinite(vec).all(), name
            torch.testing.assert_close(vec.norm(), torch.tensor(1.0), rtol=1e-5, atol=0, msg=name)
