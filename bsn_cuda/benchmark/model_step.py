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
* ``kernel floor`` (computed, not a row of steps): the fused ops alone on
  preallocated tensors over the model's layers (``k`` forwards through the C++
  entry point under ``no_grad`` and ``k`` ``sn_backward`` calls, as
  update="forward" runs them), no module or autograd machinery.

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

__all__ = ["MODEL_SUITES", "IMPLS", "MODEL_GOALS", "build_model", "run_model_steps", "kernel_floor",
           "kernel_floor_hot", "grouped_breakdown", "breakdown_rows", "breakdown_table", "model_step_table",
           "model_step_grouped_table", "judge_model_goals", "model_goals_table", "headline", "render"]


def _bert_layers():
    # BERT-base: 12 encoder layers of q, k, v, o (768x768), FFN in (3072x768) and out
    # (768x3072), plus the pooler and a 768x768 head: 74 SN Linear layers (SNGP-style).
    per_layer = [("attn.qkvo", "linear", (768, 768), 4), ("ffn.in", "linear", (3072, 768), 1),
                 ("ffn.out", "linear", (768, 3072), 1)]
    layers = [(name, kind, shape, count * 12) for name, kind, shape, count in per_layer]
    return layers + [("pooler+head", "linear", (768, 768), 2)]


def _biggan_g_layers():
    # BigGAN-128's generator (ch=96): the SN linears of z and the conditional BNs (biggan_g_linear),
    # then five up-blocks of two 3x3 convs and a 1x1 shortcut, self-attention at 64x64, the output conv.
    ch = 96
    layers = list(SUITES["biggan_g_linear"]["layers"])
    for b, (cin, cout) in enumerate(zip([16, 16, 8, 4, 2], [16, 8, 4, 2, 1])):
        cin, cout = cin * ch, cout * ch
        layers += [(f"b{b + 1}.c1", "conv", (cout, cin, 3, 3), 1), (f"b{b + 1}.c2", "conv", (cout, cout, 3, 3), 1),
                   (f"b{b + 1}.sc", "conv", (cout, cin, 1, 1), 1)]
    return layers + [("attn.theta/phi", "conv", (2 * ch // 8, 2 * ch, 1, 1), 2),
                     ("attn.g", "conv", (ch, 2 * ch, 1, 1), 1), ("attn.o", "conv", (2 * ch, ch, 1, 1), 1),
                     ("out", "conv", (3, ch, 3, 3), 1)]


MODEL_SUITES = {
    "sngan_cnn": SUITES["sngan_cnn"]["layers"],
    "sngan_resnet": SUITES["sngan_resnet"]["layers"],
    "biggan_d": SUITES["biggan_d"]["layers"],
    "biggan_g_linear": SUITES["biggan_g_linear"]["layers"],
    "biggan_g": _biggan_g_layers(),
    "bert_linear": _bert_layers(),
    # Tiny stacks: where per-call machinery is all there is (36 layers, batch 1).
    "tiny_linear16": [("linear16", "linear", (16, 16), 36)],
    "linear148": [("linear148x96", "linear", (96, 148), 36)],
}
TINY_SUITES = ("tiny_linear16", "linear148")
IMPLS = ["no_sn", "identity", "torch_sn", "torch_legacy", "fused_sn", "fused_legacy", "grouped_forward",
         "grouped_once", "grouped_never"]
COMPILED_IMPLS = ["torch_sn_compiled"]
IMPL_TITLES = {"torch_sn_compiled": "torch's SN under torch.compile"}


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


def _step(model, forwards, impl="", compiled_runs=None):
    run = model
    if impl == "torch_sn_compiled":
        compiled_runs = {} if compiled_runs is None else compiled_runs
        if id(model) not in compiled_runs:
            compiled_runs[id(model)] = torch.compile(model)
        run = compiled_runs[id(model)]

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


def _floor_tensors(kind, shape, seed=0):
    """Preallocated (weight, u, v, grad_out) of one SN layer, for the ops alone."""
    w = make_layer(kind, shape, seed=seed).weight.detach()
    u = F.normalize(torch.randn(w.shape[0]), dim=0)
    v = F.normalize(torch.randn(w[0].numel()), dim=0)
    return w, u, v, torch.ones_like(w)


def _ops_step(layers, forwards):
    """A step of the fused ops alone over ``layers`` (``_floor_tensors``): ``forwards`` passes of SN
    forwards over all of them (the C++ entry point under no_grad: no autograd node), then
    ``forwards`` ``bsn_cuda::sn_backward`` calls per layer in reverse order."""
    from .. import _ops

    states = [[None] * forwards for _ in layers]

    def step():
        with torch.no_grad():
            for k in range(forwards):
                for i, (w, u, v, _) in enumerate(layers):
                    states[i][k] = _ops.sn_forward(w, u, v, 0, 1, 1e-12, 1.0, True)[1]
        for i in reversed(range(len(layers))):
            w, _, _, g = layers[i]
            for k in reversed(range(forwards)):
                _ops.sn_backward(g, w, states[i][k], 0, 1.0)

    return step


def _time_ops_step(layers, forwards, budget):
    step = _ops_step(layers, forwards)
    warm_up_cpu(step, lambda: None, budget)
    return time_cpu_interleaved({"floor": (step, lambda: None)}, budget)["floor"]


def kernel_floor(suite, forwards, budget):
    """Seconds per step (stats) of the fused ops alone, as one sequence over the model's layers.

    Every layer has its own preallocated weight, vectors and gradient; a step
    runs ``forwards`` SN forwards and as many backwards per layer, as a training
    step with update="forward" runs them (each forward's W_sn has its own graph,
    so each gets its own backward), with no module, parametrization or autograd
    machinery (:func:`_ops_step`). Timing the layers as one sequence makes the
    floor pay the same cache misses as a step (a model's weights, outputs and
    gradients together outgrow the L2); :func:`kernel_floor_hot` times each
    layer alone, its tensors hot in cache.
    """
    layers = [_floor_tensors(kind, shape, seed=100 * i + j)
              for i, (_, kind, shape, count) in enumerate(MODEL_SUITES[suite]) for j in range(count)]
    return _time_ops_step(layers, forwards, budget)


def kernel_floor_hot(suite, forwards, budget):
    """Seconds per step: each distinct layer shape's ops (as in :func:`kernel_floor`) timed alone, hot in
    cache, times its count, summed."""
    return sum(_time_ops_step([_floor_tensors(kind, shape)], forwards, budget)["median_s"] * count
               for _, kind, shape, count in MODEL_SUITES[suite])


def run_model_steps(suites, forwards_list, budget=None, write=print, compiled=False):
    """Records ``{suite, forwards, impl, median_s, ...}`` plus one ``kernel_floor`` record per suite and k."""
    budget = budget or Budget(warmup=2, min_reps=6, max_reps=60, min_time=0.3, max_time=2.0)
    impls = IMPLS + (COMPILED_IMPLS if compiled else [])
    records = []
    for suite in suites:
        base = {impl: build_model(suite, impl) for impl in impls}
        compiled_runs = {}  # one compiled module per suite, reused for every k (compiling takes a while)
        for forwards in forwards_list:
            t0 = time.perf_counter()
            cases, keep = {}, []
            for impl in impls:
                # Fresh vectors for every k, except under torch.compile (a new module would recompile).
                model = base[impl] if impl in COMPILED_IMPLS else copy.deepcopy(base[impl])
                call, reset = _step(model, forwards, impl, compiled_runs)
                try:
                    warm_up_cpu(call, reset, budget)
                except RuntimeError as exc:
                    if impl not in COMPILED_IMPLS:
                        raise
                    # torch's own SN under torch.compile: recorded, not timed (the run goes on).
                    reset()
                    records.append({"suite": suite, "forwards": forwards, "impl": impl, "median_s": float("nan"),
                                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0].split('. Hint')[0]}"})
                    continue
                cases[impl] = (call, reset)
                keep.append(model)
            for impl, st in time_cpu_interleaved(cases, budget).items():
                records.append(dict(st, suite=suite, forwards=forwards, impl=impl))
            floor_budget = Budget(warmup=2, min_reps=10, max_reps=200, min_time=0.1, max_time=0.6)
            floor = kernel_floor(suite, forwards, floor_budget)
            records.append(dict(floor, suite=suite, forwards=forwards, impl="kernel_floor"))
            records.append({"suite": suite, "forwards": forwards, "impl": "kernel_floor_hot",
                            "median_s": kernel_floor_hot(suite, forwards, floor_budget)})
            write(f"  {suite}, {forwards} forward(s): {time.perf_counter() - t0:.1f} s")
    return records


def _captured_group_call(model):
    """The arguments of the group_forward call a training forward of ``model`` makes."""
    from .. import _ops

    captured = []
    real = _ops.group_forward

    def spy(*args):
        captured.append(args)
        return real(*args)

    _ops.group_forward = spy
    try:
        model.__dict__["_bsn_spectral_norm_group"].compute()
    finally:
        _ops.group_forward = real
    return captured[0]


def grouped_breakdown(suite, budget=None):
    """Where a grouped training step's host time goes, above an identity parametrization (1 forward).

    Timed interleaved, each on its own model: the forward alone and the step
    (forward + backward) of the identity and the grouped (update="forward")
    models; the group's pre-hook work alone (``SpectralNormGroup.compute``);
    the op alone on the same arguments (``bsn_cuda._C.group_forward``, with its
    autograd node); ``bsn_cuda::group_backward`` alone on preallocated
    gradients. Returns ``{part: stats}``; :func:`breakdown_table` derives the
    per-layer parts from them.
    """
    from .. import _ops

    budget = budget or Budget(warmup=3, min_reps=20, max_reps=400, min_time=0.4, max_time=2.0)
    identity, grouped = build_model(suite, "identity"), build_model(suite, "grouped_forward")
    group = grouped.__dict__["_bsn_spectral_norm_group"]
    args = _captured_group_call(grouped)
    weights, _, kinds, dims, _, _, scales, _, _ = args
    _, states = _ops.group_forward(*args)
    detached = [w.detach() for w in weights]
    grads = [torch.ones_like(w) for w in detached]
    params = {m: list(m.parameters()) for m in (identity, grouped)}

    def step(model):
        def call():
            for p in params[model]:
                p.grad = None
            model().backward()
        return call

    def forward(model):
        return lambda: model()

    nothing = lambda: None  # noqa: E731
    cases = {
        "identity_forward": (forward(identity), nothing),
        "identity_step": (step(identity), nothing),
        "grouped_forward": (forward(grouped), nothing),
        "grouped_step": (step(grouped), nothing),
        "group_compute": (group.compute, nothing),
        "group_op_forward": (lambda: _ops.group_forward(*args), nothing),
        "group_op_backward": (lambda: _ops.group_backward(grads, detached, states, kinds, dims, scales), nothing),
    }
    for call, reset in cases.values():
        warm_up_cpu(call, reset, budget)
    return time_cpu_interleaved(cases, budget)


def breakdown_rows(stats_by_part, n_layers):
    """``[(part, µs per layer)]``: the grouped step's time above identity's, split by where it goes."""
    us = {k: v["median_s"] * 1e6 / n_layers for k, v in stats_by_part.items()}
    forward_extra = us["grouped_forward"] - us["identity_forward"]
    backward_extra = ((us["grouped_step"] - us["grouped_forward"])
                      - (us["identity_step"] - us["identity_forward"]))
    return [
        ("group op forward (C++: checks, allocations, kernels, autograd node)", us["group_op_forward"]),
        ("group pre-hook in Python (reading each layer's tensors and settings)",
         us["group_compute"] - us["group_op_forward"]),
        ("rest of the forward (the model's hooks, the hand-off to each layer, the outputs' Python objects)",
         forward_extra - us["group_compute"]),
        ("group op backward (C++: checks, allocations, kernels)", us["group_op_backward"]),
        ("backward node and engine (one node, an edge per layer)", backward_extra - us["group_op_backward"]),
        ("total above identity, forward + backward", forward_extra + backward_extra),
    ]


def breakdown_table(stats_by_part, suite):
    n_layers = sum(count for *_, count in MODEL_SUITES[suite])
    lines = [f"| grouped step, {suite} ({n_layers} layers), 1 forward | µs per layer |", "|---|---:|"]
    lines += [f"| {part} | {value:.1f} |" for part, value in breakdown_rows(stats_by_part, n_layers)]
    return "\n".join(lines)


def _errors(records):
    return {(r["suite"], r["forwards"], r["impl"]): r["error"] for r in records if r.get("error")}


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
    errors = _errors(records)
    for suite, k, n_layers, us, cost in _suite_rows(records):
        compiled = "error" if (suite, k, "torch_sn_compiled") in errors else f"{us['torch_sn_compiled']:.0f}"
        lines.append(
            f"| {suite} | {k} | {compiled} | {us['grouped_forward']:.0f} | "
            f"{us['grouped_once']:.0f} | {us['grouped_never']:.0f} | "
            f"{cost['torch_sn'] / cost['grouped_forward']:.2f}x | "
            f"{cost['grouped_forward'] / us['kernel_floor']:.2f} | "
            f"{cost['grouped_once'] / cost['grouped_forward']:.2f} | "
            f"{(us['grouped_forward'] - us['identity']) / n_layers:.1f} µs |")
    return "\n".join(lines)


def _cost_band(records, suite, k, impl, base="no_sn", per=1.0):
    """(value, [low, high]) of (time(impl) - time(base)) / per, from medians and quartiles."""
    idx = {(r["suite"], r["forwards"], r["impl"]): r for r in records}
    a, b = idx.get((suite, k, impl)), idx.get((suite, k, base))
    if a is None or b is None:
        return None, None
    value = (a["median_s"] - b["median_s"]) / per
    if "q1_s" not in a or "q1_s" not in b:
        return value, None
    return value, [(a["q1_s"] - b["q3_s"]) / per, (a["q3_s"] - b["q1_s"]) / per]


def _quotient(num, den):
    """(value, band) of num / den, each given as (value, band) of positive quantities."""
    (n, nb), (d, db) = num, den
    if n is None or d is None or d <= 0:
        return None, None
    if nb is None or db is None or db[0] <= 0:
        return n / d, None
    return n / d, [nb[0] / db[1], nb[1] / db[0]]


#: (goal, suite or None for each suite, forwards, threshold): the issue's goals for one call per model.
MODEL_GOALS = [
    ("grouped SN cost / kernel floor <= 1.2", None, None, 1.2),
    ("grouped - identity <= 3 µs per layer, fwd+bwd", "tiny_linear16", 1, 3.0),
    ("update='once' / 'forward' SN cost <= 0.6, 2 forwards", None, 2, 0.6),
]


def judge_model_goals(records):
    """``[(goal, suite, forwards, value, band, verdict)]`` for :data:`MODEL_GOALS` (``summary.verdict``'s rule:
    met only with a margin larger than the spread of the quartile bands)."""
    from .summary import verdict

    have = {(r["suite"], r["forwards"]) for r in records}
    rows = []
    for goal, suite, k, threshold in MODEL_GOALS:
        for s_, k_ in sorted(have, key=lambda sk: (list(MODEL_SUITES).index(sk[0]), sk[1])):
            if (suite is not None and s_ != suite) or (k is not None and k_ != k):
                continue
            n_layers = sum(count for *_, count in MODEL_SUITES[s_])
            if goal.startswith("grouped SN cost"):
                idx = {(r["suite"], r["forwards"], r["impl"]): r for r in records}
                floor = idx.get((s_, k_, "kernel_floor"))
                if floor is None:
                    continue
                fb = [floor["q1_s"], floor["q3_s"]] if "q1_s" in floor else None
                value, band = _quotient(_cost_band(records, s_, k_, "grouped_forward"), (floor["median_s"], fb))
            elif goal.startswith("grouped - identity"):
                value, band = _cost_band(records, s_, k_, "grouped_forward", "identity", n_layers / 1e6)
            else:
                value, band = _quotient(_cost_band(records, s_, k_, "grouped_once"),
                                        _cost_band(records, s_, k_, "grouped_forward"))
            if value is None:
                continue
            rows.append((goal, s_, k_, value, band, verdict(value, "<=", threshold, band)["status"]))
    return rows


def model_goals_table(records):
    lines = ["| goal | suite | forwards | value | band (quartiles) | verdict |", "|---|---|---:|---:|---|---|"]
    for goal, suite, k, value, band, status in judge_model_goals(records):
        shown = f"{band[0]:.2f} .. {band[1]:.2f}" if band else "not recorded"
        lines.append(f"| {goal} | {suite} | {k} | {value:.2f} | {shown} | {status} |")
    return "\n".join(lines)


SUITE_TITLES = {"sngan_cnn": "SNGAN CNN D", "sngan_resnet": "SNGAN ResNet D", "biggan_d": "BigGAN D",
                "biggan_g_linear": "BigGAN G's linears", "biggan_g": "BigGAN G", "bert_linear": "BERT-base stack",
                "tiny_linear16": "36 Linear(16, 16)", "linear148": "36 Linear(148, 96)"}


def headline(result, forwards=2):
    """A few markdown bullets for the README: grouped against torch per suite, the goals, the breakdown."""
    records = result["records"]
    lines = []
    ratios = []
    for suite in MODEL_SUITES:
        torch_cost = _cost_band(records, suite, forwards, "torch_sn")[0]
        grouped_cost = _cost_band(records, suite, forwards, "grouped_forward")[0]
        once_cost = _cost_band(records, suite, forwards, "grouped_once")[0]
        if torch_cost is None or grouped_cost is None or grouped_cost <= 0:
            continue
        once = f", {torch_cost / once_cost:.1f}x with update='once'" if once_cost and once_cost > 0 else ""
        ratios.append(f"{SUITE_TITLES.get(suite, suite)} {torch_cost / grouped_cost:.1f}x{once}")
    if ratios:
        lines.append(f"- SN cost per discriminator step ({forwards} training forwards and a backward, CPU, "
                     f"{result.get('threads', 1)} thread), torch's SN over grouped fused SN: " + "; ".join(ratios) + ".")
    verdicts = {}
    for goal, _, _, value, _, status in judge_model_goals(records):
        verdicts.setdefault(goal, []).append((value, status.split(" (")[0]))
    for goal, items in verdicts.items():
        counts = {st: sum(1 for _, s_ in items if s_ == st) for st in ("met", "NOT met", "within noise")}
        values = sorted(v for v, _ in items)
        shown = f"value {values[0]:.2f}" if len(values) == 1 else f"values {values[0]:.2f} to {values[-1]:.2f}"
        lines.append(f"- Goal {goal}: " + ", ".join(f"{st} in {n}" for st, n in counts.items() if n)
                     + f" of {len(items)} (suite, forwards) case{'s' if len(items) > 1 else ''} ({shown}).")
    if result.get("breakdown"):
        n_layers = sum(count for *_, count in MODEL_SUITES[result["breakdown_suite"]])
        rows = breakdown_rows(result["breakdown"], n_layers)
        parts = ", ".join(f"{name.split(' (')[0]} {value:.1f}" for name, value in rows[:-1])
        lines.append(f"- Where a grouped step's time goes above an identity parametrization, µs per layer on "
                     f"{SUITE_TITLES.get(result['breakdown_suite'])}: {parts}; total {rows[-1][1]:.1f}.")
    return "\n".join(lines)


def render(result):
    """The markdown of a run (``{"env", "records", "breakdown_suite", "breakdown", "threads"}``, as --json writes it)."""
    env, records = result["env"], result["records"]
    load = env.get("loadavg")
    argv = ["python -m bsn_cuda.benchmark.model_step"] + env["argv"][1:]
    allocator = env.get("allocator_env") or {}
    allocator = ", ".join(f"{k}={v}" for k, v in allocator.items()) or "default settings"
    given = dict(zip(env["argv"], env["argv"][1:]))
    json_path = given.get("--json", "benchmarks/results/model_step_cpu.json")
    md_path = given.get("--markdown", "benchmarks/results/model_step_cpu.md")
    text = (f"# SN cost per discriminator step (`python -m bsn_cuda.benchmark.model_step`)\n\n"
            f"Run: `{' '.join(argv)}` at commit {(env.get('git_commit') or 'unknown')[:7]}, "
            f"{env['date'][:10]}; {env['cpu_model']}, {env['cpu_count']} cores, {result.get('threads', 1)} torch "
            f"thread(s); torch {env['torch']}; allocator: {allocator}; 1-minute load average at the start "
            f"{load[0] if load else 'unknown'}. µs per step, medians of interleaved runs "
            "(see the module's docstring for what a step is). Regenerate this page from the JSON with "
            f"`python -m bsn_cuda.benchmark.model_step --from-json {json_path} --markdown {md_path}`.\n\n"
            f"{model_step_table(records)}\n\n{model_step_grouped_table(records)}\n\n"
            + "".join(f"{IMPL_TITLES.get(impl, impl)} raised in {suite}, {k} forward(s): `{err}`\n\n"
                      for (suite, k, impl), err in _errors(records).items()) +
            "Goals (met only with a margin larger than the quartile band's spread):\n\n"
            f"{model_goals_table(records)}\n")
    if result.get("breakdown"):
        text += ("\nWhere the grouped step's time goes, above an identity parametrization:\n\n"
                 f"{breakdown_table(result['breakdown'], result['breakdown_suite'])}\n")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bsn_cuda.benchmark.model_step", description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="all", help=f"comma-separated, from {','.join(MODEL_SUITES)}, or all [all]")
    p.add_argument("--forwards", default="1,2,3", help="training forwards per step [1,2,3]")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads(N) [1]")
    p.add_argument("--compiled", action="store_true", help="add torch SN under torch.compile (slow to compile)")
    p.add_argument("--breakdown", default="tiny_linear16",
                   help="suite whose grouped step is split by where its time goes ('' for none) [tiny_linear16]")
    p.add_argument("--json", help="write the records and the environment here")
    p.add_argument("--markdown", help="write the run's environment and its tables here")
    p.add_argument("--from-json", help="render --markdown from this JSON instead of measuring")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        # "all": the tiny stacks first, for the same reason as the breakdown.
        suites = sorted(MODEL_SUITES, key=lambda n: n not in TINY_SUITES) if args.suite == "all" else \
            args.suite.split(",")
        for s in suites:
            if s not in MODEL_SUITES:
                p.error(f"--suite: expected names from {', '.join(MODEL_SUITES)}, got {s!r}")
        if args.breakdown and args.breakdown not in MODEL_SUITES:
            p.error(f"--breakdown: expected one of {', '.join(MODEL_SUITES)}, got {args.breakdown!r}")
        torch.set_num_threads(args.threads)
        # The breakdown first, in a fresh process: run after the large suites, a tiny step's host time
        # per layer measured about half again what a fresh process measures.
        breakdown = grouped_breakdown(args.breakdown) if args.breakdown else None
        records = run_model_steps(suites, [int(k) for k in args.forwards.split(",")], compiled=args.compiled)
        result = {"env": environment([torch.device("cpu")]), "threads": args.threads, "records": records,
                  "breakdown_suite": args.breakdown or None, "breakdown": breakdown}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    text = render(result)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
