"""The run's environment: software versions, CPU and GPU, git commit, and the
allocator setting that keeps freed memory in the process."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch

from .impls import bsn_package, fused_native
from .timing import peak_bandwidth

__all__ = ["REPO_ROOT", "cpu_model", "git_commit", "environment", "tune_malloc"]

# The checkout this package sits in (bsn_cuda/benchmark/ -> the repository root).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:
        commit = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(devices):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "git_commit": git_commit(),
        "argv": ["python -m bsn_cuda.benchmark" if a.endswith(os.path.join("bsn_cuda", "benchmark", "__main__.py"))
                 else a for a in sys.argv],
    }
    # The C allocator's settings: large CPU tensors are fresh allocations, and whether freed memory
    # goes back to the OS (page faults on the next step) shows in every step time.
    env["allocator_env"] = {k: os.environ[k] for k in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX")
                            if k in os.environ}
    try:
        env["loadavg"] = os.getloadavg()
    except OSError:
        env["loadavg"] = None
    try:
        bsn = bsn_package()
        env["bsn_cuda_version"] = getattr(bsn, "__version__", None)
        env["bsn_cuda_file"] = getattr(bsn, "__file__", None)
        env["has_extension"] = bool(getattr(bsn, "HAS_EXTENSION", False))
    except Exception as e:  # noqa: BLE001
        env["has_extension"] = False
        env["bsn_cuda_import_error"] = f"{type(e).__name__}: {e}"
    env["devices"] = {}
    for d in devices:
        info = {"fused_native": fused_native(d.type)}
        if d.type == "cuda":
            p = torch.cuda.get_device_properties(d)
            info.update({
                "name": p.name,
                "total_memory_bytes": p.total_memory,
                "capability": f"{p.major}.{p.minor}",
                "multi_processor_count": p.multi_processor_count,
                "l2_cache_bytes": getattr(p, "L2_cache_size", None),
                "peak_bw_gbps": (peak_bandwidth(p.name, p.total_memory) or 0) / 1e9 or None,
            })
        else:
            info["name"] = cpu_model()
        env["devices"][str(d)] = info
    return env



def tune_malloc():
    """glibc: keep freed memory in the process (no heap trimming, allocations up
    to 32 MiB from the heap) so that repeated calls do not page-fault fresh
    memory in. Returns a description, or None where it does not apply."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = mallopt(M_MMAP_THRESHOLD, 32 * 2**20) == 1 and mallopt(M_TRIM_THRESHOLD, 2**30) == 1
    return "glibc mallopt: M_MMAP_THRESHOLD=32MiB, M_TRIM_THRESHOLD=1GiB" if ok else None
