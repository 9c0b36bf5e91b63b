"""FSDP2 (``fully_shard``) with the fused SN/BSN: 2 processes, gloo, CPU, loopback only.

The same checks as the DDP test (test_distributed.py, whose model,
batches and sizes this file reuses): each rank trains on its half of the
batch, FSDP2 shards the weights (``parametrizations.weight.original`` becomes
a sharded DTensor, gathered before each forward) and reduce-scatters the
averaged gradients. The power iteration depends only on the (gathered) weight
and the vectors, which FSDP leaves as plain replicated buffers, so:

* ranks agree bit for bit (vectors, sigma buffers, full weights) after every step;
* they equal a single-process run on the concatenated batch (losses averaged
  over ranks, weights, vectors) up to the rounding of the gradient reduction
  (float64, tolerance 1e-10);
* with the GAN pattern (two forwards, real and fake, per backward), with and
  without resharding after forward;
* grouped (``bsn_cuda.group_spectral_norm``, update="forward" and "once"),
  the single-process run grouped too: a layer under an FSDP2 unit runs per
  layer (a unit reshards its weights and reduce-scatters their gradients when
  its own backward ends, before a group's node would have computed them; with
  resharding off, the second forward's gathered weights are plain tensors, and
  grouping them crashed on freed storage before the group learned to step
  aside).

The workers are this file run as a script (``python test_fsdp.py RANK WORLD
STORE OUT``), as in the DDP test.
"""

import os
import sys

import torch
from torch import nn

from test_distributed import BATCH_PER_RANK, VECTOR_NAMES, WORLD_SIZE, _batches, _model

# (name, kind, reshard_after_forward, group update mode or None: not grouped)
SCENARIOS = [
    ("sn", "sn", True, None),
    ("bsn", "bsn", True, None),
    ("mixed-no-reshard", "mixed", False, None),
    ("sn-grouped", "sn", True, "forward"),
    ("mixed-grouped-no-reshard", "mixed", False, "forward"),
    ("sn-grouped-once-no-reshard", "sn", False, "once"),
]


def _grouped(module, update):
    if update is not None:
        import bsn_cuda

        bsn_cuda.group_spectral_norm(module, update=update)
    return module


def _fully_shard():
    """``torch.distributed.fsdp.fully_shard`` (public from torch 2.6) or None. The
    private one before it (torch.distributed._composable.fsdp) initializes CUDA
    even for CPU tensors on torch 2.4.1, so it cannot run these CPU tests."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    return fully_shard


def _full(tensor):
    # A sharded parameter is a DTensor: gather it (a collective; every rank calls it in the same order).
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else tensor).detach().clone()


def _train(module, rank=None):
    """GAN discriminator steps on the whole batch (rank None) or on rank's shard; full tensors recorded."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    records = []
    for real, fake in _batches():
        if rank is not None:
            real, fake = (t[rank * BATCH_PER_RANK : (rank + 1) * BATCH_PER_RANK] for t in (real, fake))
        loss = nn.functional.softplus(-module(real)).mean() + nn.functional.softplus(module(fake)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        records.append(
            {
                "loss": loss.detach().clone(),
                "params": {k: _full(p) for k, p in module.named_parameters()},
                "vectors": {k: b.detach().clone() for k, b in module.named_buffers() if k.rsplit(".", 1)[-1] in VECTOR_NAMES},
            }
        )
    return records


def _worker(rank, world_size, store, out_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        results = {}
        for name, kind, reshard, update in SCENARIOS:
            module = _model(kind)
            for layer in module:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
            _grouped(module, update)
            sharded = type(module[0].parametrizations.weight.original).__name__
            assert sharded == "DTensor", f"expected a sharded DTensor weight, got {sharded}"
            results[name] = _train(module, rank)
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

    pytestmark = [
        pytest.mark.skipif(
            not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
            reason="needs torch.distributed with gloo",
        ),
        pytest.mark.skipif(
            _fully_shard() is None,
            reason=f"FSDP2 on the CPU needs torch.distributed.fsdp.fully_shard (torch >= 2.6), got torch "
            f"{torch.__version__}",
        ),
    ]

    @pytest.fixture(scope="module")
    def fsdp_results(tmp_path_factory):
        return run_ranks(__file__, WORLD_SIZE, tmp_path_factory.mktemp("fsdp"))

    NAMES = [name for name, *_ in SCENARIOS]

    @requires_ops
    @pytest.mark.parametrize("name", NAMES)
    def test_ranks_stay_bitwise_in_sync(fsdp_results, name):
        assert_ranks_in_sync([results[name] for results in fsdp_results])

    @requires_ops
    @pytest.mark.parametrize("name", NAMES)
    def test_fsdp_matches_single_process_on_the_whole_batch(fsdp_results, name):
        kind, update = {n: (k, upd) for n, k, _, upd in SCENARIOS}[name]
        module = _grouped(_model(kind), update)
        expected = _train(module)
        per_rank = [results[name] for results in fsdp_results]
        assert_matches_single_process(per_rank, expected)
        # Training moved the vectors and the weights (the test would be vacuous otherwise).
        first, last = per_rank[0][0], per_rank[0][-1]
        assert any(not torch.equal(first["vectors"][k], last["vectors"][k]) for k in first["vectors"])
        assert any(not torch.equal(first["params"][k], last["params"][k]) for k in first["params"])


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
