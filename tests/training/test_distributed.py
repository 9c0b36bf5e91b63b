"""DistributedDataParallel with the fused SN/BSN: 2 processes, gloo, loopback only.

What "match" means. Each rank runs the discriminator on its half of the batch;
DDP all-reduces (averages) the gradients, which for equal shards and a mean
loss is the gradient of the loss on the concatenated batch. The power
iteration depends only on the weight and the stored vectors, never on the
data, so ranks with equal weights compute bitwise-equal vectors on their own:
u/v stay identical across ranks with or without ``broadcast_buffers`` (with
it, the default, DDP re-sends rank 0's identical copies before each forward;
torch's DataParallel issues #11476/#8160 came from replicas whose updates were
dropped, which cannot happen here). So we test:

* ranks agree bit for bit (vectors, sigma buffers, weights) after every step;
* they equal a single-process run on the concatenated batch (losses averaged
  over ranks, weights, vectors) up to rounding: the gradient reduction order
  differs (float64, tolerance 1e-10);
* the same under torch.compile (aot_eager) of the DDP model, and with the
  GAN pattern (two forwards, real and fake, per backward).

The workers are this file run as a script (``python test_distributed.py
RANK WORLD STORE OUT``), started as subprocesses with OMP_NUM_THREADS=1, a
file:// rendezvous in a temporary directory and GLOO_SOCKET_IFNAME=lo.
"""

import os
import sys

import torch
from discriminator import build_discriminator
from torch import nn

import bsn_cuda

WORLD_SIZE = 2
STEPS = 3
BATCH_PER_RANK = 3
# (name, kind, broadcast_buffers, compiled)
SCENARIOS = [
    ("sn", "sn", True, False),
    ("bsn", "bsn", True, False),
    ("mixed-no-broadcast", "mixed", False, False),
    ("mixed-compiled", "mixed", True, True),
]
VECTOR_NAMES = ("_u", "_v", "_u0", "_v0", "_u1", "_v1", "_sigma", "_sigmas")


def _bsn_then_sn(model):
    """BSN on the first conv, SN (2 power iterations) on the second, scaled SN on the linear."""
    bsn_cuda.bidirectional_spectral_norm(model[0])
    bsn_cuda.spectral_norm(model[2], n_power_iterations=2)
    bsn_cuda.spectral_norm(model[5], scale=1.5)


def _model(kind):
    return build_discriminator(_bsn_then_sn if kind == "mixed" else kind, dtype=torch.float64)


def _batches():
    gen = torch.Generator().manual_seed(1)
    n = BATCH_PER_RANK * WORLD_SIZE
    return [
        (torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64))
        for _ in range(STEPS)
    ]


def _train(run, module, rank=None):
    """GAN discriminator steps on the whole batch (rank None) or on rank's shard."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    records = []
    for real, fake in _batches():
        if rank is not None:
            real, fake = (t[rank * BATCH_PER_RANK : (rank + 1) * BATCH_PER_RANK] for t in (real, fake))
        loss = nn.functional.softplus(-run(real)).mean() + nn.functional.softplus(run(fake)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        records.append(
            {
                "loss": loss.detach().clone(),
                "params": {k: p.detach().clone() for k, p in module.named_parameters()},
                "vectors": {k: b.detach().clone() for k, b in module.named_buffers() if k.rsplit(".", 1)[-1] in VECTOR_NAMES},
            }
        )
    return records


def _worker(rank, world_size, store, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results = {}
        for name, kind, broadcast_buffers, compiled in SCENARIOS:
            module = _model(kind)
            ddp = DistributedDataParallel(module, broadcast_buffers=broadcast_buffers)
            run = torch.compile(ddp, backend="aot_eager") if compiled else ddp
            results[name] = _train(run, module, rank)
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# The tests (parent process)

if __name__ != "__main__":
    import pytest
    from conftest import requires_ops
    from rank_processes import assert_matches_single_process, assert_ranks_in_sync, run_ranks

    pytestmark = pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="needs torch.distributed with gloo",
    )

    @pytest.fixture(scope="module")
    def ddp_results(tmp_path_factory):
        return run_ranks(__file__, WORLD_SIZE, tmp_path_factory.mktemp("ddp"))

    NAMES = [name for name, *_ in SCENARIOS]

    @requires_ops
    @pytest.mark.parametrize("name", NAMES)
    def test_ranks_stay_bitwise_in_sync(ddp_results, name):
        assert_ranks_in_sync([results[name] for results in ddp_results])

    @requires_ops
    @pytest.mark.parametrize("name", NAMES)
    def test_ddp_matches_single_process_on_the_whole_batch(ddp_results, name):
        kind = dict((n, k) for n, k, *_ in SCENARIOS)[name]
        module = _model(kind)
        expected = _train(module, module)
        per_rank = [results[name] for results in ddp_results]
        assert_matches_single_process(per_rank, expected)
        # Training moved the vectors (the test would be vacuous otherwise).
        first, last = per_rank[0][0]["vectors"], per_rank[0][-1]["vectors"]
        assert any(not torch.equal(first[k], last[k]) for k in first)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
