"""Grouped SN with the tools around it: torch.compile, activation checkpointing, torch.func, DDP.

Oracle: the same model ungrouped (per layer), bitwise, unless a test says
otherwise. DDP runs this file as 2 gloo worker processes (as
test_distributed.py does): grouped and per-layer models, broadcast_buffers on
and off, update modes "forward" and "once", two forwards per backward.
"""

import copy
import os
import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bsn_cuda

DDP_SCENARIOS = [(grouped, broadcast, mode) for mode in ("forward", "once") for broadcast in (True, False)
                 for grouped in (False, True)]


def _ddp_name(grouped, broadcast, mode):
    return f"{'grouped' if grouped else 'per_layer'}-{'broadcast' if broadcast else 'no_broadcast'}-{mode}"


def _ddp_model(grouped, mode):
    from grouping_models import build

    model, _ = build("sngan_resnet")
    model.double()
    if grouped:
        bsn_cuda.group_spectral_norm(model, update=mode)
    else:
        bsn_cuda.set_update_mode(model, mode)
    return model


def _ddp_worker(rank, world_size, store, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        results = {}
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64),
                    torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64)) for _ in range(3)]
        for grouped, broadcast, mode in DDP_SCENARIOS:
            module = _ddp_model(grouped, mode)
            ddp = DistributedDataParallel(module, broadcast_buffers=broadcast)
            opt = torch.optim.SGD(module.parameters(), lr=0.1)
            records = []
            for real, fake in batches:
                real, fake = real[2 * rank:2 * rank + 2], fake[2 * rank:2 * rank + 2]
                loss = nn.functional.softplus(-ddp(real)) + nn.functional.softplus(ddp(fake))
                opt.zero_grad()
                loss.backward()
                opt.step()
                records.append({"loss": loss.detach(), "state": {k: v.clone() for k, v in module.state_dict().items()}})
            results[_ddp_name(grouped, broadcast, mode)] = records
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ != "__main__":
    import pytest
    from grouping_models import build
    from rank_processes import run_ranks

    pytestmark = pytest.mark.skipif(not bsn_cuda.HAS_EXTENSION, reason="needs the compiled ops")

    def _pair(name="sngan_resnet", mode="forward"):
        model, inputs = build(name)
        grouped = copy.deepcopy(model)
        bsn_cuda.set_update_mode(model, mode)
        bsn_cuda.group_spectral_norm(grouped, update=mode)
        return model, grouped, inputs

    def _grads(model):
        return [p.grad.clone() for p in model.parameters()]

    @pytest.mark.parametrize("name", ["sngan_cnn", "conditional_d"])
    def test_compile_fullgraph_of_a_grouped_model_equals_eager(name):
        # Compiled, a grouped model runs per layer (the group's pre-hook steps aside while dynamo traces).
        model, grouped, inputs = _pair(name)
        compiled = torch.compile(grouped, fullgraph=True, backend="aot_eager")
        for _ in range(2):
            model(*inputs).backward()
            compiled(*inputs).backward()
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(_grads(model), _grads(grouped)))
        for (n, a), (_, b) in zip(model.named_buffers(), grouped.named_buffers()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True), n

    def test_never_mode_compiles_fullgraph():
        model, grouped, inputs = _pair("sngan_cnn", "never")
        compiled = torch.compile(grouped, fullgraph=True, backend="aot_eager")
        vectors = [b for n, b in grouped.named_buffers() if n.endswith(("_u", "_v"))]
        before = [b.clone() for b in vectors]
        compiled(*inputs).backward()
        model(*inputs).backward()
        assert all(torch.equal(a, b) for a, b in zip(before, vectors))
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(_grads(model), _grads(grouped)))

    @pytest.mark.parametrize("mode", ["forward", "once"])
    def test_non_reentrant_checkpoint_of_a_block_gives_the_unchekpointed_gradients(mode):
        # The block takes the group's tensors in the forward and again in the recomputation:
        # bitwise the run without checkpointing, vectors updated once.
        plain, grouped, (x,) = _pair("sngan_resnet", mode)
        bsn_cuda.group_spectral_norm(plain, update=mode)
        block = grouped.blocks[1]
        grouped.blocks[1] = nn.Module()
        grouped.blocks[1].forward = lambda h: checkpoint(block, h, use_reentrant=False)
        grouped.blocks[1].inner = block
        plain(x).backward()
        if not hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks"):
            # torch < 2.5 cannot tell the recomputation apart: the layers take their own path there,
            # and torch's checkpoint refuses the mismatch rather than computing a wrong gradient.
            with pytest.raises(torch.utils.checkpoint.CheckpointError):
                grouped(x).backward()
            return
        grouped(x).backward()
        assert all(torch.equal(a, b) for a, b in zip(_grads(plain), _grads(grouped)))
        assert all(torch.equal(a, b) for a, b in zip(plain.buffers(), grouped.buffers()))

    def test_reentrant_checkpoint_equals_the_per_layer_path():
        model, grouped, (x,) = _pair("sngan_resnet")
        for m in (model, grouped):
            block = m.blocks[1]
            m.blocks[1] = nn.Module()
            m.blocks[1].forward = lambda h, b=block: checkpoint(b, h, use_reentrant=True)
            m.blocks[1].inner = block
        x = x.requires_grad_(True)
        model(x).backward()
        grouped(x).backward()
        assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(grouped)))
        assert all(torch.equal(a, b) for a, b in zip(model.buffers(), grouped.buffers()))

    @pytest.mark.parametrize("use_reentrant", [False, True])
    def test_checkpoint_of_the_whole_model_equals_the_per_layer_path(use_reentrant):
        model, grouped, (x,) = _pair("sngan_cnn")
        x = x.requires_grad_(True)
        checkpoint(model, x, use_reentrant=use_reentrant).backward()
        checkpoint(grouped, x, use_reentrant=use_reentrant).backward()
        assert all(torch.equal(a, b) for a, b in zip(model.buffers(), grouped.buffers()))
        assert all(torch.equal(a, b) for a, b in zip(_grads(model), _grads(grouped)))

    def test_torch_func_grad_runs_per_layer():
        model, grouped, inputs = _pair("conditional_d")
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(m):
            return lambda p: torch.func.functional_call(m, p, inputs)

        want = torch.func.grad(loss(model))(params)
        got = torch.func.grad(loss(grouped))(params)
        assert all(torch.equal(want[k], got[k]) for k in want)

    @pytest.fixture(scope="module")
    def ddp_results(tmp_path_factory):
        if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
            pytest.skip("needs torch.distributed with gloo")
        return run_ranks(__file__, 2, tmp_path_factory.mktemp("ddp_group"))

    @pytest.mark.parametrize("broadcast", [True, False])
    @pytest.mark.parametrize("mode", ["forward", "once"])
    def test_ddp_grouped_equals_per_layer_and_ranks_agree(ddp_results, broadcast, mode):
        per_layer = [r[_ddp_name(False, broadcast, mode)] for r in ddp_results]
        grouped = [r[_ddp_name(True, broadcast, mode)] for r in ddp_results]
        for rank in range(2):
            for a, b in zip(per_layer[rank], grouped[rank]):
                assert torch.equal(a["loss"], b["loss"])
                assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        for a, b in zip(grouped[0], grouped[1]):
            assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        first, last = grouped[0][0]["state"], grouped[0][-1]["state"]
        assert any(not torch.equal(first[k], last[k]) for k in first if k.endswith("_u"))


if __name__ == "__main__":
    _ddp_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
