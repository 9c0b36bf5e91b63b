"""Timing: repetition budgets, robust statistics, CPU timing interleaved across
implementations with a guard against other processes, CUDA event timing with a
cold L2, and the bytes-moved model against the GPU's peak bandwidth.

CPU: one ``time.perf_counter`` interval per call, after warm-up, with the
garbage collector off; median, IQR and min of the calls. The implementations of
one layer and mode run interleaved, in ``CPU_ROUNDS`` rounds of rotating order,
so that drifts in the speed of a shared machine affect them alike; slices
during which other processes used the CPU are measured again after a pause.
CUDA: CUDA events around each call with the L2 cache flushed before it (cold
weights, as in a training step), plus a host wall-clock throughput over
back-to-back calls (``wall_s``, includes launch overhead) and peak extra memory.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time

import torch

__all__ = ["Budget", "CONTENTION_LIMIT", "CONTENTION_RETRIES", "CPU_ROUNDS", "WaitBudget", "gc_off", "stats",
           "cpu_ticks", "contention", "wait_for_quiet", "warm_up_cpu", "time_cpu_interleaved", "time_cuda",
           "bytes_moved", "peak_bandwidth"]


@contextlib.contextmanager
def gc_off():
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _quantile(sorted_xs, q):
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def stats(times):
    xs = sorted(times)
    return {
        "median_s": _quantile(xs, 0.5),
        "q1_s": _quantile(xs, 0.25),
        "q3_s": _quantile(xs, 0.75),
        "iqr_s": _quantile(xs, 0.75) - _quantile(xs, 0.25),
        "min_s": xs[0],
        "mean_s": sum(xs) / len(xs),
        "reps": len(xs),
    }


class Budget:
    """Repetition policy: warm-up calls, then at least min_reps and min_time
    of timed calls, at most max_reps (and max_time once min_reps are done)."""

    def __init__(self, warmup=3, min_reps=10, max_reps=200, min_time=0.2, max_time=2.0):
        self.warmup, self.min_reps, self.max_reps = warmup, min_reps, max_reps
        self.min_time, self.max_time = min_time, max_time

    def as_dict(self):
        return dict(vars(self))


def cpu_ticks():
    """(busy ticks of the whole machine, ticks of this process) or None (no /proc)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle, iowait
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime, stime (all threads)
        return busy, own
    except (OSError, ValueError, IndexError):
        return None


def contention(before, after, wall_s):
    """Share of the machine's CPU capacity used by other processes in an interval,
    from /proc tick counters (None if unknown or the interval is too short)."""
    if before is None or after is None:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    capacity = wall_s * hz * (os.cpu_count() or 1)
    if capacity < 10:  # under 10 ticks: too coarse to say
        return None
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, min(1.0, other / capacity))


def warm_up_cpu(call, reset, budget):
    """Run the warm-up calls; returns the time of the first call."""
    first = time.perf_counter()
    call()
    first = time.perf_counter() - first
    reset()
    for _ in range(max(budget.warmup - 1, 0)):
        call()
        reset()
    return first


def _timed_calls_cpu(call, reset, budget):
    """(per-call times, contention during them) for one slice of `budget`."""
    times = []
    total = 0.0
    perf = time.perf_counter
    ticks0, wall0 = cpu_ticks(), time.perf_counter()
    with gc_off():
        while True:
            t0 = perf()
            call()
            t1 = perf()
            reset()
            times.append(t1 - t0)
            total += t1 - t0
            n = len(times)
            if n >= budget.max_reps:
                break
            if n >= budget.min_reps and (total >= budget.min_time or total >= budget.max_time):
                break
    return times, contention(ticks0, cpu_ticks(), time.perf_counter() - wall0)


CONTENTION_LIMIT = 0.15  # share of the CPU used by other processes that makes a CPU case suspect
CONTENTION_RETRIES = 3

# CPU cases of one layer and mode run in rounds, each implementation a slice of
# its budget per round, in rotating order: the speed of a shared VM drifts by
# tens of percent within seconds, and interleaving lets every implementation
# see the same drift, so the ratios are steadier than the absolute times.
CPU_ROUNDS = 4


def time_cpu_interleaved(cases, budget, rounds=CPU_ROUNDS, retries=CONTENTION_RETRIES):
    """{impl: stats} for warmed-up cases {impl: (call, reset)} timed in interleaved rounds.

    A slice during which other processes used more than CONTENTION_LIMIT of
    the machine is measured again after a pause (at most `retries` times per
    implementation); the statistics are over all kept slices."""
    impls = list(cases)
    slice_budget = Budget(
        warmup=0,
        min_reps=max(1, -(-budget.min_reps // rounds)),
        max_reps=max(1, budget.max_reps // rounds),
        min_time=budget.min_time / rounds,
        max_time=budget.max_time / rounds,
    )
    times = {impl: [] for impl in impls}
    worst = {impl: None for impl in impls}
    tries = {impl: 1 for impl in impls}
    for r in range(rounds):
        for impl in impls[r % len(impls):] + impls[: r % len(impls)]:
            got, cont = _timed_calls_cpu(*cases[impl], slice_budget)
            while (cont or 0) > CONTENTION_LIMIT and tries[impl] <= retries:
                wait_for_quiet(20.0)
                got, cont = _timed_calls_cpu(*cases[impl], slice_budget)
                tries[impl] += 1
            times[impl] += got
            if cont is not None:
                worst[impl] = max(worst[impl] or 0.0, cont)
    out = {}
    for impl in impls:
        st = stats(times[impl])
        st.update(contention=worst[impl], tries=tries[impl], rounds=rounds)
        st["contended"] = _suspect(st)
        out[impl] = st
    return out


class WaitBudget:
    """Total seconds the run may spend waiting for other processes to go quiet."""

    left = 0.0


def wait_for_quiet(max_wait, sample_s=0.5):
    """Sleep until other processes use under CONTENTION_LIMIT of the CPU (sampled
    over `sample_s`), at most `max_wait` seconds from the run's wait budget, at
    least one sample. Returns the seconds waited."""
    t0 = time.perf_counter()
    limit = min(max_wait, WaitBudget.left)
    while True:
        a, w = cpu_ticks(), time.perf_counter()
        time.sleep(sample_s)
        c = contention(a, cpu_ticks(), time.perf_counter() - w)
        waited = time.perf_counter() - t0
        if c is None or c <= CONTENTION_LIMIT or waited >= limit:
            break
    WaitBudget.left = max(0.0, WaitBudget.left - max(0.0, waited - sample_s))
    return waited


def _suspect(st):
    """A CPU measurement disturbed by other processes: they used a noticeable
    share of the CPU, or the calls split into fast ones and ones that waited
    for a scheduler time slice (milliseconds) while the median went with the slow."""
    if (st.get("contention") or 0) > CONTENTION_LIMIT:
        return True
    return st["median_s"] > 3 * st["min_s"] and st["median_s"] - st["min_s"] > 3e-3


_FLUSH = {}


def _l2_flush_buffer(device):
    key = str(device)
    if key not in _FLUSH:
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
        nbytes = max(256 * 2**20, 4 * l2)
        _FLUSH[key] = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


def time_cuda(call, reset, budget, device, flush=True):
    sync = torch.cuda.synchronize
    sync(device)
    t = time.perf_counter()
    call()
    sync(device)
    first = time.perf_counter() - t
    reset()
    for _ in range(max(budget.warmup - 1, 0)):
        call()
        reset()
    sync(device)
    # estimate one call to size the runs
    t = time.perf_counter()
    for _ in range(3):
        call()
        reset()
    sync(device)
    est = max((time.perf_counter() - t) / 3, 1e-6)
    reps = int(min(max(budget.min_reps, budget.min_time / est), budget.max_reps))
    reps = max(reps, 1)
    buf = _l2_flush_buffer(device) if flush else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    with gc_off():
        for i in range(reps):
            if buf is not None:
                buf.zero_()
            starts[i].record()
            call()
            ends[i].record()
            reset()
        sync(device)
    out = stats([s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)])
    out["first_call_s"] = first
    out["l2_flushed"] = bool(flush)
    # host wall-clock throughput of back-to-back calls (warm L2, launch overhead included)
    n = max(reps, 10)
    with gc_off():
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            call()
            reset()
        sync(device)
        out["wall_s"] = (time.perf_counter() - t) / n
    # peak memory of one call above what is allocated before it
    sync(device)
    torch.cuda.reset_peak_memorystats(device)
    base_mem = torch.cuda.memory_allocated(device)
    call()
    sync(device)
    out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    out["peak_extra_mem_bytes"] = out["peak_mem_bytes"] - base_mem
    reset()
    return out


def bytes_moved(mode, bidirectional, numel, elem_size):
    """Bytes that must move (the model of the issue).

    train: W read for the power iteration (BSN: twice) + W read + W_sn written;
    eval: W read twice + write; fwd_bwd: train + G and W read for <G, W> +
    G read and dW written."""
    it = 2 if bidirectional else 1
    passes = {"train": it + 2, "eval": 3, "fwd_bwd": it + 2 + 4}[mode]
    return passes * numel * elem_size


# Peak DRAM bandwidth in bytes/s by device-name fragment (first match wins).
_PEAK_BW = [
    ("gh200", None),  # decided by memory size below
    ("h200", 4.8e12),
    ("h100 nvl", 3.9e12),
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),
    ("h800 pcie", 2.0e12),
    ("h800", 3.35e12),
    ("b200", 8.0e12),
    ("a100-pcie", None),
    ("a100 pcie", None),
    ("a100", None),
    ("a800", 2.039e12),
    ("l40s", 0.864e12),
    ("l40", 0.864e12),
    ("l4", 0.3e12),
    ("a10g", 0.6e12),
    ("a10", 0.6e12),
    ("a6000", 0.768e12),
    ("t4", 0.32e12),
    ("v100", 0.9e12),
    ("4090", 1.008e12),
    ("3090", 0.936e12),
    ("mi300x", 5.3e12),
    ("mi250", 3.2e12),
]


def peak_bandwidth(name, total_memory):
    """Peak DRAM bandwidth (bytes/s) of a GPU from its name, or None."""
    low = name.lower()
    gib = total_memory / 2**30
    for frag, bw in _PEAK_BW:
        if frag in low:
            if bw is not None:
                return bw
            if frag == "gh200":
                return 4.9e12 if gib > 100 else 4.0e12
            # A100: 80 GB SXM 2.039, 80 GB PCIe 1.935, 40 GB 1.555 TB/s
            if gib < 50:
                return 1.555e12
            return 1.935e12 if "pcie" in low else 2.039e12
    return None
