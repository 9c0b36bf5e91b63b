"""Host overhead of one SN call: tiny weights, where the arithmetic costs nothing.

What a call costs in Python, dispatcher and autograd work, measured on weights
so small that the kernels take well under a microsecond (Linear(4, 4), a 3x3
Conv2d(2, 2), BSN on the same conv). On a GPU this fixed cost is all that an
SNGAN layer shows. Compared, interleaved on the same layer and mode:

* ``identity``: a parametrization that returns its input: the floor any
  parametrization pays (property getter, ParametrizationList, module calls);
* ``torch_sn``: ``torch.nn.utils.parametrizations.spectral_norm``;
* ``fused``: bsn_cuda's module API (``spectral_norm`` / ``bidirectional_spectral_norm``);
* ``functional``: ``bsn_cuda.functional.spectral_norm`` / ``bidirectional_spectral_norm``
  on a plain weight tensor with caller-held vectors (no parametrization).

Modes: ``train`` (training forward, grad enabled), ``fwd_bwd`` (that forward
plus ``W_sn.backward(G)``), ``eval`` (eval forward, grad enabled),
``eval_nograd`` (eval forward under ``torch.no_grad()``, recomputed every call)
and ``eval_cached`` (the same inside ``bsn_cuda.cached()``, opened around the
timing: the weight does not change between calls, so bsn_cuda's opt-in eval
cache answers; torch's SN and the identity are unaffected by it).

Run alone with ``python -m bsn_cuda.benchmark.host_overhead``; ``python -m
bsn_cuda.benchmark`` includes it (``--no-host`` skips it); :mod:`.report` puts
its tables into the full report.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn.utils import parametrize

from .summary import ratio_band, verdict
from .tables import goal_numbers, md_table, status_text, text_table
from .timing import Budget, time_cpu_interleaved, warm_up_cpu

__all__ = ["KINDS", "IMPLS", "MODES", "GOALS", "Identity", "run_host_overhead", "judge_host_goals", "host_index",
           "us_per_call", "host_table", "host_goals_text"]

KINDS = {
    "linear": ("Linear(4, 4)", lambda: nn.Linear(4, 4, bias=False)),
    "conv3x3": ("Conv2d(2, 2, 3)", lambda: nn.Conv2d(2, 2, 3, bias=False)),
    "bsn_conv3x3": ("BSN Conv2d(2, 2, 3)", lambda: nn.Conv2d(2, 2, 3, bias=False)),
}
IMPLS = ["identity", "torch_sn", "fused", "functional"]
MODES = ["train", "fwd_bwd", "eval", "eval_nograd", "eval_cached"]

# (id, text, mode, metric, op, threshold). Metrics: "vs_torch" = time(torch_sn) /
# time(fused); "vs_identity" = time(fused) / time(identity). Module API, every kind.
GOALS = [
    ("host_train_8x", "tiny weights, training forward: fused >= 8x torch SN", "train", "vs_torch", ">=", 8.0),
    ("host_train_3id", "tiny weights, training forward: fused <= 3x the identity parametrization",
     "train", "vs_identity", "<=", 3.0),
    ("host_fwd_bwd_5x", "tiny weights, training fwd+bwd: fused >= 5x torch SN", "fwd_bwd", "vs_torch", ">=", 5.0),
    ("host_eval_1.5id", "tiny weights, eval under no_grad inside bsn_cuda.cached() (unchanged weight): "
     "fused <= 1.5x the identity parametrization", "eval_cached", "vs_identity", "<=", 1.5),
]


class Identity(nn.Module):
    """The identity parametrization: the floor any parametrization pays."""

    def forward(self, weight):
        return weight


def _module_case(kind, impl):
    import bsn_cuda

    torch.manual_seed(0)
    m = KINDS[kind][1]()
    if impl == "identity":
        parametrize.register_parametrization(m, "weight", Identity())
    elif impl == "torch_sn":
        torch.nn.utils.parametrizations.spectral_norm(m)
    elif kind == "bsn_conv3x3":
        bsn_cuda.bidirectional_spectral_norm(m)
    else:
        bsn_cuda.spectral_norm(m)
    return m, (lambda: m.weight), [p for p in m.parameters()]


def _functional_case(kind):
    from bsn_cuda import functional

    torch.manual_seed(0)
    m = KINDS[kind][1]()
    w = m.weight
    if kind == "bsn_conv3x3":
        vectors = functional.init_bsn_vectors(w.detach())
        return m, (lambda: functional.bidirectional_spectral_norm(w, *vectors, training=m.training)), [w]
    u, v = functional.init_sn_vectors(w.detach())
    return m, (lambda: functional.spectral_norm(w, u, v, training=m.training)), [w]


def _case(kind, impl, mode):
    """(call, reset) for one kind, implementation and mode."""
    m, get, params = _functional_case(kind) if impl == "functional" else _module_case(kind, impl)
    m.train(mode in ("train", "fwd_bwd"))
    if mode in ("eval_nograd", "eval_cached"):

        def call():
            with torch.no_grad():
                return get()

        return call, lambda: None, m
    if mode == "fwd_bwd":
        grad = torch.ones_like(m.weight)

        def call():
            get().backward(grad)

        def reset():
            for p in params:
                p.grad = None

        return call, reset, m
    return get, lambda: None, m


def _eval_cache(enabled):
    import contextlib

    import bsn_cuda

    return bsn_cuda.cached() if enabled else contextlib.nullcontext()


def run_host_overhead(budget=None, write=print):
    """Measure every kind x mode x implementation; returns a list of records."""
    budget = budget or Budget(warmup=50, min_reps=300, max_reps=4000, min_time=0.1, max_time=0.6)
    records = []
    for kind in KINDS:
        for mode in MODES:
            cases, keep = {}, []
            with _eval_cache(mode == "eval_cached"):
                for impl in IMPLS:
                    call, reset, m = _case(kind, impl, mode)
                    warm_up_cpu(call, reset, budget)
                    cases[impl] = (call, reset)
                    keep.append(m)
                timed = time_cpu_interleaved(cases, budget)
            for impl, st in timed.items():
                records.append(dict(st, kind=kind, mode=mode, impl=impl, title=KINDS[kind][0]))
    return records


def host_index(records):
    return {(r["kind"], r["mode"], r["impl"]): r for r in records}


def us_per_call(rec):
    return rec["median_s"] * 1e6


def judge_host_goals(records, native=True):
    """The host goals per kind, each with its value, the band from the per-call
    quartiles and the verdict of :func:`.summary.verdict`."""
    idx = host_index(records)
    goals = []
    for gid, text, mode, metric, op, thr in GOALS:
        for kind in KINDS:
            fused, torch_sn, ident = (idx.get((kind, mode, i)) for i in ("fused", "torch_sn", "identity"))
            g = {"id": gid, "goal": f"{text} [{KINDS[kind][0]}]", "device": "cpu", "op": op, "threshold": thr}
            if fused is None or torch_sn is None or ident is None:
                # a saved run from before this mode existed: the goal shows, unjudged
                goals.append(dict(g, value=None, band=None, caveat="", status=f"not measured (no {mode} records)"))
                continue
            num, den = (torch_sn, fused) if metric == "vs_torch" else (fused, ident)
            val = us_per_call(num) / us_per_call(den)
            g.update(value=val, band=ratio_band(num, den),
                     caveat="contended" if fused.get("contended") or torch_sn.get("contended") else "")
            if native:
                g.update(verdict(val, op, thr, g["band"]))
            else:
                g["status"] = "not judged (reference fallback, no fused ops)"
            goals.append(g)
    return goals


def host_table(records, markdown=False):
    """µs per call (median) for each kind and mode, with the ratios the host goals use."""
    idx = host_index(records)
    us = us_per_call
    head = ["weight", "mode", "identity", "torch SN", "fused", "functional", "fused vs torch", "fused / identity"]
    rows = []
    # kinds and modes in the records' order: a saved run may have modes this version does not
    for kind, mode in dict.fromkeys((r["kind"], r["mode"]) for r in records):
        r = {impl: idx.get((kind, mode, impl)) for impl in IMPLS}
        if any(v is None for v in r.values()):
            continue
        rows.append([r["fused"].get("title", kind), mode] + [f"{us(r[i]):.1f}" for i in IMPLS] + [
            f"{us(r['torch_sn']) / us(r['fused']):.2f}x", f"{us(r['fused']) / us(r['identity']):.2f}"])
    if markdown:
        return md_table(head, rows)
    return text_table(head, rows, aligns=["<", "<"] + [">"] * (len(head) - 2))


def host_goals_text(goals):
    return "\n".join(f"  {status_text(g)}: {g['goal']}: {goal_numbers(g)}"
                     + (f" [{g['caveat']}]" if g["caveat"] else "") for g in goals)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bsn_cuda.benchmark.host_overhead", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads(N) [1]")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = run_host_overhead()
    print(f"== host overhead: µs per call (median), {args.threads} thread(s), torch {torch.__version__} ==")
    print(host_table(records))
    print("\n== host-overhead goals (reported, never asserted) ==")
    print(host_goals_text(judge_host_goals(records)))


if __name__ == "__main__":
    main()
