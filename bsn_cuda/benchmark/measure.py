"""Running the suites: every unique layer of a suite, each implementation and
mode, into one record per (layer, implementation, mode)."""

from __future__ import annotations

import gc
import math

import torch

from .impls import impl_title, make_case, make_layer, record_failure
from .suites import FUSED, SUITES, bsn_effective, merge_layers
from .timing import CONTENTION_RETRIES, bytes_moved, peak_bandwidth, time_cpu_interleaved, time_cuda, warm_up_cpu

__all__ = ["measure_case", "measure_cases_cpu", "run_suite"]


def measure_case(impl, base, mode, device, budget, flush=True):
    """One CUDA measurement record (without the layer fields)."""
    rec = {"impl": impl, "mode": mode}
    try:
        call, reset, module, note = make_case(impl, base, mode)
        rec["note"] = note
        rec.update(time_cuda(call, reset, budget, device, flush=flush))
        del call, reset, module
    except Exception as e:  # noqa: BLE001 - record and carry on
        record_failure(rec, impl, e)
    return rec


def measure_cases_cpu(impls, base, mode, budget, retries=CONTENTION_RETRIES):
    """{impl: record} for the implementations of one layer and mode on the CPU,
    timed interleaved (see time_cpu_interleaved). An implementation that cannot
    be set up or fails on its warm-up calls gets a skipped/error record."""
    recs, cases, first, modules = {}, {}, {}, []
    for impl in impls:
        rec = recs[impl] = {"impl": impl, "mode": mode}
        try:
            call, reset, module, note = make_case(impl, base, mode)
            rec["note"] = note
            first[impl] = warm_up_cpu(call, reset, budget)
            cases[impl] = (call, reset)
            modules.append(module)
        except Exception as e:  # noqa: BLE001 - record and carry on
            record_failure(rec, impl, e)
    if cases:
        for impl, st in time_cpu_interleaved(cases, budget, retries=retries).items():
            recs[impl].update(st, first_call_s=first[impl])
    del cases, modules
    return recs


def run_suite(suite, device, dtype, modes, impls, budget, progress, memo, native, flush=True,
              retries=CONTENTION_RETRIES):
    """Measure every unique layer of a suite. Returns the records."""
    records = []
    elem = torch.empty((), dtype=dtype).element_size()
    peak = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak = peak_bandwidth(props.name, props.total_memory)
    for layer in merge_layers(SUITES[suite]["layers"]):
        kind, shape = layer["kind"], layer["shape"]
        numel = math.prod(shape)
        base = None
        for mode in [m for m in ("train", "fwd_bwd", "eval") if m in modes]:
            keys = {impl: (str(device), str(dtype), kind, shape, impl, mode) for impl in impls}
            todo = [impl for impl in impls if keys[impl] not in memo]
            if todo:
                if base is None:
                    base = make_layer(kind, shape, dtype, device)
                if device.type == "cuda":
                    for impl in todo:
                        memo[keys[impl]] = measure_case(impl, base, mode, device, budget, flush=flush)
                else:
                    measured = measure_cases_cpu(todo, base, mode, budget, retries)
                    memo.update({keys[impl]: rec for impl, rec in measured.items()})
            for impl in impls:
                desc = f"{suite} {layer['name']} {impl} {mode}"
                rec = dict(memo[keys[impl]], reused=True) if impl not in todo else memo[keys[impl]]
                rec = dict(rec)
                bidir = impl in ("torch_bsn", "fused_bsn") and bsn_effective(shape)
                rec.update({
                    "suite": suite, "layer": layer["name"], "kind": kind, "shape": list(shape),
                    "count": layer["count"], "numel": numel, "device": str(device),
                    "dtype": str(dtype).replace("torch.", ""),
                    "label": impl_title(impl, native),
                    "fused_native": native if impl in FUSED else None,
                    "bytes_model": bytes_moved(mode, bidir, numel, elem),
                })
                if device.type == "cuda" and "median_s" in rec:
                    rec["gbps"] = rec["bytes_model"] / rec["median_s"] / 1e9
                    rec["peak_bw_gbps"] = peak / 1e9 if peak else None
                    rec["pct_peak_bw"] = 100 * rec["gbps"] * 1e9 / peak if peak else None
                records.append(rec)
                progress.update(desc)
        del base
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records

