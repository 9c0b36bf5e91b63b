"""Activation checkpointing (torch.utils.checkpoint) of SN/BSN layers.

The recomputation in backward must not run the power iteration again, and
bsn_cuda.nn.spectral_norm_checkpoint_context (selective checkpointing) saves the
SN ops' outputs so that gradients are bitwise those of a plain run.
"""

import copy

import pytest
import torch
from conftest import TOL, assert_equal_dicts, build_discriminator, images, power_vectors, requires_ops, snapshot
from torch import nn
from torch.utils.checkpoint import checkpoint

import bsn_cuda
from bsn_cuda.nn import spectral_norm_checkpoint_context


def _legacy_norms(model):
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            bsn_cuda.nn.utils.spectral_norm(layer)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("kind", ["sn", "bsn", "legacy"])
def test_checkpointing_updates_vectors_once_and_keeps_gradients(kind, use_reentrant):
    """The recomputation in backward must not iterate again: buffers equal the
    plain run's bit for bit after forward and after backward, sigma is not
    overwritten, gradients equal up to rounding (the recomputation evaluates
    sigma = u^T W v from the stored vectors). The legacy flavour too, where
    torch's legacy SN iterates again in the recomputation (on eb13708 ours did
    as well)."""
    plain = build_discriminator(_legacy_norms if kind == "legacy" else kind, dtype=torch.float64)
    ckpt = copy.deepcopy(plain)
    sigma_log = kind != "legacy"  # the legacy flavour keeps no sigma log
    for step in range(3):
        x = images(step, torch.float64).requires_grad_()  # reentrant checkpointing needs an input with grad
        out_plain = plain(x)
        out_ckpt = checkpoint(ckpt, x, use_reentrant=use_reentrant)
        assert torch.equal(out_ckpt, out_plain)
        assert_equal_dicts(power_vectors(ckpt), power_vectors(plain), f"step {step}, after forward")
        sigmas = [bsn_cuda.get_sigma(m) for m in (ckpt[0], ckpt[2], ckpt[5])] if sigma_log else []
        out_plain.square().mean().backward()
        out_ckpt.square().mean().backward()
        assert_equal_dicts(power_vectors(ckpt), power_vectors(plain), f"step {step}, after backward")
        assert all(torch.equal(bsn_cuda.get_sigma(m), s) for m, s in zip((ckpt[0], ckpt[2], ckpt[5]), sigmas))
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL[torch.float64], msg=f"step {step}: {name}")
        with torch.no_grad():
            for p, q in zip(plain.parameters(), ckpt.parameters()):
                p -= 0.05 * p.grad
                q.copy_(p)  # same weights for the next step (the gradients differ by rounding)
                p.grad = q.grad = None


def _gan_step(model, real, fake, wrap):
    """Two training forwards of the same layers, one backward (the GAN discriminator pattern)."""
    loss = nn.functional.softplus(-wrap(model, real)).mean() + nn.functional.softplus(wrap(model, fake)).mean()
    loss.backward()
    return loss.detach()


_HAS_SELECTIVE_CHECKPOINT = hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts")


@pytest.mark.skipif(_HAS_SELECTIVE_CHECKPOINT, reason="torch has selective checkpointing")
def test_selective_checkpoint_context_names_the_torch_it_needs():
    with pytest.raises(RuntimeError, match=r"expected torch >= 2\.5"):
        spectral_norm_checkpoint_context()


@requires_ops
@pytest.mark.skipif(not _HAS_SELECTIVE_CHECKPOINT, reason="selective checkpointing needs torch >= 2.5")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_selective_checkpoint_context_is_exact(compiled):
    """spectral_norm_checkpoint_context saves the SN ops' outputs: bitwise the
    plain run's gradients even with two forwards per backward, and under
    torch.compile (whose partitioner would otherwise recompute the op from the
    already-updated buffers)."""
    torch._dynamo.reset()
    plain = build_discriminator("mixed")
    ckpt = copy.deepcopy(plain)

    class Checkpointed(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            h = checkpoint(self.net[:4], x, use_reentrant=False, context_fn=spectral_norm_checkpoint_context)
            return self.net[4:](h)

    wrapped = Checkpointed(ckpt)
    run = torch.compile(wrapped, fullgraph=True, backend="aot_eager") if compiled else wrapped
    for step in range(2):
        real, fake = images(2 * step), images(2 * step + 1)
        loss_plain = _gan_step(plain, real, fake, lambda m, x: m(x))
        loss_ckpt = _gan_step(run, real, fake, lambda m, x: m(x))
        assert torch.equal(loss_plain, loss_ckpt)
        assert_equal_dicts(snapshot(ckpt), snapshot(plain), f"step {step}")
        with torch.no_grad():
            for p, q in zip(plain.parameters(), ckpt.parameters()):
                p -= 0.05 * p.grad
                q -= 0.05 * q.grad
                p.grad = q.grad = None
