"""SN cost per discriminator training step, whole models: what one call per model must beat.

A step is ``k`` training forwards of every SN layer of a model (``k`` = 1, 2,
3: D(real), D(fake), D(gradient penalty)), then one backward. Each layer runs
on one input of the smallest size its weight accepts (a conv on a
``kh x kw`` patch, a linear on one row, an embedding on one index), so the
step is SN and its machinery plus near-free layer arithmetic. The same step
with plain weights (``no_sn``) is subtracted: **SN cost = step - no_sn**.

Rows, timed interleaved on the same model:

* ``torch_sn`` / ``torch_legacy``: torch's parametrized and hook-based SN;
* ``fused_sn`` / ``fused_legacy``: bsn_cuda's, one fused op per layer;
* ``grouped_forward`` / ``grouped_once`` / ``grouped_never``: bsn_cuda's SN with
  ``bsn_cuda.group_spectral_norm(model, update=...)``: one op call per forward
  of the model. ``once`` steps u/v once per step: the untimed reset between
  steps signals an optimizer step (what a training loop's ``opt.step()`` does
  through torch's optimizer hook), so each timed step is one update and one
  shared W_sn; ``never`` does not update (``power_iteration_step`` not called);
* ``torch_sn_compiled`` (``--compiled``): torch's parametrized SN under
  ``torch.compile`` (inductor), the whole step's forward compiled;
* ``identity``: a parametrization that returns its input (the floor any
  parametrization pays);
* ``no_sn``: plain weights;
* ``kernel floor`` (computed, not a row of steps): the sum over layers of the
  fused ops alone on preallocated tensors (``k`` forwards through the C++
  entry point under ``no_grad``, one ``sn_backward``), no module or autograd
  machinery.

``python -m bsn_cuda.benchmark.model_step [--suite ...] [--forwards 1,2,3]``;
float32, CPU, 1 thread by default.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .environment import environment
from .host_overhead import Identity
from .impls import make_layer
from .suites import SUITES
from .timing import Budget, time_cpu_interleaved, warm_up_cpu

__all__ = ["MODEL_SUITES", "IMPLS", "build_model", "run_model_steps", "kernel_floor", "model_step_table",
           "model_step_grouped_table"]


def _bert_layers():
    # BERT-base: 12 encoder layers of q, k, v, o (768x768), FFN in (3072x768) and out
    # (768x3072), plus the pooler and a 768x768 head: 74 SN Linear layers (SNGP-style).
    per_layer = [("attn.qkvo", "linear", (768, 768), 4), ("ffn.in", "linear", (3072, 768), 1),
                 ("ffn.out", "linear", (768, 3072), 1)]
    layers = [(name, kind, shape, count * 12) for name, kind, shape, count in per_layer]
    return layers + [("pooler+head", "linear", (768, 768), 2)]


MODEL_SUITES = {
    "sngan_cnn": SUITES["sngan_cnn"]["layers"],
    "sngan_resnet": SUITES["sngan_resnet"]["layers"],
    "biggan_d": SUITES["biggan_d"]["layers"],
    "biggan_g_linear": SUITES["biggan_g_linear"]["layers"],
    "bert_linear": _bert_layers(),
    # Tiny stacks: where per-call machinery is all there is (36 layers, batch 1).
    "tiny_linear16": [("linear16", "linear", (16, 16), 36)],
    "linear148": [("linear148x96", "linear", (96, 148), 36)],
}
IMPLS = ["no_sn", "identity", "torch_sn", "torch_legacy", "fused_sn", "fused_legacy", "grouped_forward",
         "grouped_once", "grouped_never"]
COMPILED_IMPLS = ["torch_sn_compiled"]


class _Layers(nn.Module):
    """Every SN layer of a model, each applied to its own minimal input; the outputs summed."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        inputs = []
        for m in layers:
            if isinstance(m, nn.Conv2d):
                inputs.append(torch.randn(1, m.in_channels, *m.kernel_size))
            elif isinstance(m, nn.Linear):
                inputs.append(torch.randn(1, m.in_features))
            else:
                inputs.append(torch.zeros(1, dtype=torch.long))
        self.inputs = inputs

    def forward(self):
        return sum(m(x).sum() for m, x in zip(self.layers, self.inputs))


def build_model(suite, impl, seed=0):
    """The suite's layers (each shape as often as the model has it) with ``impl``'s SN."""
    import bsn_cuda

    layers = []
    for i, (_, kind, shape, count) in enumerate(MODEL_SUITES[suite]):
        for j in range(count):
            m = make_layer(kind, shape, seed=seed + 100 * i + j)
            if impl == "identity":
                parametrize.register_parametrization(m, "weight", Identity())
            elif impl in ("torch_sn", "torch_sn_compiled"):
                torch.nn.utils.parametrizations.spectral_norm(m)
            elif impl == "torch_legacy":
                torch.nn.utils.spectral_norm(m)
            elif impl == "fused_sn" or impl.startswith("grouped_"):
                bsn_cuda.spectral_norm(m)
            elif impl == "fused_legacy":
                bsn_cuda.nn.utils.spectral_norm(m)
            elif impl != "no_sn":
                raise ValueError(f"build_model: expected one of {IMPLS + COMPILED_IMPLS}, got {impl!r}")
            layers.append(m)
    model = _Layers(layers).train()
    if impl.startswith("grouped_"):
        bsn_cuda.group_spectral_norm(model, update=impl[len("grouped_"):])
    return model


def _step(model, forwards, impl=""):
    run = torch.compile(model) if impl == "torch_sn_compiled" else model

    def call():
        loss = run()
        for _ in range(forwards - 1):
            loss = loss + run()
        loss.backward()

    params = list(model.parameters())
    # update="once": the end of a training step, as an optimizer step signals it (torch's global
    # optimizer step hook, which bsn_cuda.nn.grouping listens to), without the optimizer's work.
    from ..nn import grouping

    step_done = None
    if impl == "grouped_once":
        holder = type("StepSignal", (), {"param_groups": [{"params": params}]})()

        def step_done():
            grouping._on_optimizer_step(holder, (), {})

    def reset():
        for p in params:
            p.grad = None
        if step_done is not None:
            step_done()

    return call, reset


def kernel_floor(suite, forwards, budget):
    """Seconds per step of the fused ops alone: ``forwards`` SN forwards and one backward per layer.

    Preallocated weight, vectors and gradient; the forward through the C++
    entry point under no_grad (no autograd node), the backward through
    ``torch.ops.bsn_cuda.sn_backward``. Each layer is timed on its own
    (median), and the floors are summed over the model's layers.
    """
    from .. import _ops

    total = 0.0
    for _, kind, shape, count in MODEL_SUITES[suite]:
        w = make_layer(kind, shape).weight.detach()
        u = F.normalize(torch.randn(w.shape[0]), dim=0)
        v = F.normalize(torch.randn(w[0].numel()), dim=0)
        g = torch.ones_like(w)
        state = [None]

        def call():
            with torch.no_grad():
                for _ in range(forwards):
                    out, state[0] = _ops.sn_forward(w, u, v, 0, 1, 1e-12, 1.0, True)
            _ops.sn_backward(g, w, state[0], 0, 1.0)

        warm_up_cpu(call, lambda: None, budget)
        st = time_cpu_interleaved({"floor": (call, lambda: None)}, budget)["floor"]
        total += st["median_s"] * count
    return total


def run_model_steps(suites, forwards_list, budget=None, write=print, compiled=False):
    """Records ``{suite, forwards, impl, median_s, ...}`` plus one ``kernel_floor`` record per suite and k."""
    budget = budget or Budget(warmup=2, min_reps=6, max_reps=60, min_time=0.3, max_time=2.0)
    impls = IMPLS + (COMPILED_IMPLS if compiled else [])
    records = []
    for suite in suites:
        base = {impl: build_model(suite, impl) for impl in impls}
        for forwards in forwards_list:
            t0 = time.perf_counter()
            cases, keep = {}, []
            for impl in impls:
                model = copy.deepcopy(base[impl])  # fresh vectors for every k
                call, reset = _step(model, forwards, impl)
                warm_up_cpu(call, reset, budget)
                cases[impl] = (call, reset)
                keep.append(model)
            for impl, st in time_cpu_interleaved(cases, budget).items():
                records.append(dict(st, suite=suite, forwards=forwards, impl=impl))
            floor = kernel_floor(suite, forwards, Budget(warmup=2, min_reps=10, max_reps=200, min_time=0.05,
                                                         max_time=0.3))
            records.append({"suite": suite, "forwards": forwards, "impl": "kernel_floor", "median_s": floor})
            write(f"  {suite}, {forwards} forward(s): {time.perf_counter() - t0:.1f} s")
    return records


def _suite_rows(records):
    """(suite, forwards, layers, µs per step by impl, SN cost by impl) for each suite and forward count."""
    idx = {(r["suite"], r["forwards"], r["impl"]): r["median_s"] for r in records}
    names = IMPLS + COMPILED_IMPLS
    for suite in dict.fromkeys(r["suite"] for r in records):
        n_layers = sum(count for *_, count in MODEL_SUITES[suite])
        for k in sorted({r["forwards"] for r in records if r["suite"] == suite}):
            us = {impl: idx.get((suite, k, impl), float("nan")) * 1e6 for impl in names + ["kernel_floor"]}
            yield suite, k, n_layers, us, {impl: us[impl] - us["no_sn"] for impl in names}


def model_step_table(records):
    """Markdown: per suite and forward count, µs per step, SN cost (step - no_sn) and ratios, per layer."""
    lines = ["| suite | layers | forwards | no SN | identity | torch SN | torch legacy | fused SN | fused legacy "
             "| kernel floor | SN cost: torch / fused | fused cost / floor | fused - identity per layer |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for suite, k, n_layers, us, cost in _suite_rows(records):
        lines.append(
            f"| {suite} | {n_layers} | {k} | {us['no_sn']:.0f} | {us['identity']:.0f} | {us['torch_sn']:.0f} | "
            f"{us['torch_legacy']:.0f} | {us['fused_sn']:.0f} | {us['fused_legacy']:.0f} | "
            f"{us['kernel_floor']:.0f} | {cost['torch_sn'] / cost['fused_sn']:.2f}x | "
            f"{cost['fused_sn'] / us['kernel_floor']:.2f} | "
            f"{(us['fused_sn'] - us['identity']) / n_layers:.1f} µs |")
    return "\n".join(lines)


def model_step_grouped_table(records):
    """Markdown: the grouped rows per suite and forward count (SN cost = step - no_sn)."""
    lines = ["| suite | forwards | compiled torch SN | grouped forward | grouped once | grouped never "
             "| SN cost: torch / grouped | grouped cost / floor | once / forward (SN cost) "
             "| grouped - identity per layer |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for suite, k, n_layers, us, cost in _suite_rows(records):
        lines.append(
            f"| {suite} | {k} | {us['torch_sn_compiled']:.0f} | {us['grouped_forward']:.0f} | "
            f"{us['grouped_once']:.0f} | {us['grouped_never']:.0f} | "
            f"{cost['torch_sn'] / cost['grouped_forward']:.2f}x | "
            f"{cost['grouped_forward'] / us['kernel_floor']:.2f} | "
            f"{cost['grouped_once'] / cost['grouped_forward']:.2f} | "
            f"{(us['grouped_forward'] - us['identity']) / n_layers:.1f} µs |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bsn_cuda.benchmark.model_step", description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="sngan_cnn,sngan_resnet,biggan_g_linear,bert_linear",
                   help=f"comma-separated, from {','.join(MODEL_SUITES)} or all")
    p.add_argument("--forwards", default="1,2,3", help="training forwards per step [1,2,3]")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads(N) [1]")
    p.add_argument("--compiled", action="store_true", help="add torch SN under torch.compile (slow to compile)")
    p.add_argument("--json", help="write the records and the environment here")
    p.add_argument("--markdown", help="write the run's environment and both tables here")
    args = p.parse_args(argv)
    suites = list(MODEL_SUITES) if args.suite == "all" else args.suite.split(",")
    for s in suites:
        if s not in MODEL_SUITES:
            p.error(f"--suite: expected names from {', '.join(MODEL_SUITES)}, got {s!r}")
    torch.set_num_threads(args.threads)
    records = run_model_steps(suites, [int(k) for k in args.forwards.split(",")], compiled=args.compiled)
    env = environment([torch.device("cpu")])
    tables = f"{model_step_table(records)}\n\n{model_step_grouped_table(records)}\n"
    print(f"\n== SN cost per training step, µs (median), {args.threads} thread(s), torch {torch.__version__} ==")
    print(tables)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "records": records}, f, indent=1)
    if args.markdown:
        load = env.get("loadavg")
        with open(args.markdown, "w") as f:
            f.write(f"# SN cost per discriminator step (`python -m bsn_cuda.benchmark.model_step`)\n\n"
                    f"Run: `{' '.join(env['argv'])}` at commit {(env['git_commit'] or 'unknown')[:7]}, "
                    f"{env['date'][:10]}; {env['cpu_model']}, {env['cpu_count']} cores, {args.threads} torch "
                    f"thread(s); torch {env['torch']}; 1-minute load average at the start "
                    f"{load[0] if load else 'unknown'}. µs per step, medians of interleaved runs "
                    "(see the module's docstring for what a step is).\n\n" + tables)


if __name__ == "__main__":
    main()
