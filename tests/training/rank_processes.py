"""Running a test file as WORLD_SIZE gloo processes (test_distributed.py, test_fsdp.py).

Each rank runs ``python <test file> rank world_size store_path out_dir`` and
saves its records to ``out_dir/rank{rank}.pt``: per step the loss, the
parameters and the vectors.
"""

import os
import subprocess
import sys

import torch
from conftest import REPO_ROOT as ROOT


def run_ranks(script, world_size, tmp):
    """Start the ranks, wait for them (failing with a rank's output), return their records."""
    # The repository (bsn_cuda) and tests/ (conftest and the shared helpers the workers import).
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    store = tmp / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(script), str(rank), str(world_size), str(store), str(tmp)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out}\n{err[-5000:]}"
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def assert_ranks_in_sync(per_rank):
    """Every rank's vectors and parameters equal rank 0's, bit for bit, at every step."""
    rank0, *others = per_rank
    for other in others:
        for step, (a, b) in enumerate(zip(rank0, other)):
            for part in ("vectors", "params"):
                assert a[part].keys() == b[part].keys()
                for key in a[part]:
                    assert torch.equal(a[part][key], b[part][key]), f"step {step}: {key} differs between ranks"


def assert_matches_single_process(per_rank, expected):
    """Losses averaged over the ranks, rank 0's parameters and vectors equal a
    single-process run on the whole batch, step by step, up to the rounding of
    the gradient reduction (float64, 1e-10)."""
    tol = dict(rtol=1e-10, atol=1e-12)
    for step, want in enumerate(expected):
        loss = sum(records[step]["loss"] for records in per_rank) / len(per_rank)
        torch.testing.assert_close(loss, want["loss"], **tol, msg=f"step {step}: loss")
        got = per_rank[0][step]
        for part in ("params", "vectors"):
            assert got[part].keys() == want[part].keys()
            for key in want[part]:
                torch.testing.assert_close(got[part][key], want[part][key], **tol, msg=f"step {step}: {key}")
