"""The command line: ``python -m bsn_cuda.benchmark`` (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import host_overhead
from .e2e import E2E_VARIANTS, e2e_layer_estimates, run_e2e
from .environment import environment, tune_malloc
from .measure import run_suite
from .plot import plot
from .readme import markdown_into
from .report import (FALLBACK_WARNING, disturbed, e2e_table, env_text, host_table, load_note, print_goals_and_summary,
                     suite_tables, to_markdown)
from .suites import (ALL_SUITES, DEFAULT_IMPLS, DTYPES, E2E, FUSED, IMPLS, MODES, QUICK_IMPLS, QUICK_SUITES, SUITES,
                     VARIANT_SUITES, merge_layers)
from .summary import judge_goals, summarize
from .timing import CONTENTION_LIMIT, CONTENTION_RETRIES, Budget, WaitBudget, contention, cpu_ticks, wait_for_quiet

__all__ = ["Progress", "build_parser", "run", "main"]


class Progress:
    """tqdm if installed and stderr is a terminal, else a plain bar (terminal)
    or a line now and then (log file), on stderr."""

    def __init__(self, total, enabled=True):
        self.total, self.n, self.enabled = total, 0, enabled
        self.bar = None
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self._last = 0.0
        self._last_frac = 0.0
        if enabled and self.tty:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False,
                                desc="bsn_cuda.benchmark")
            except ImportError:
                self.bar = None

    def update(self, desc, k=1):
        self.n += k
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(desc[:60], refresh=False)
            self.bar.update(k)
            return
        now = time.time()
        frac = self.n / max(self.total, 1)
        if not self.tty:
            if frac - self._last_frac >= 0.1 or now - self._last >= 60 or self.n == self.total:
                self._last, self._last_frac = now, frac
                sys.stderr.write(f"[progress] {self.n}/{self.total} ({100 * frac:.0f}%) {now - self.t0:.0f}s {desc}\n")
                sys.stderr.flush()
            return
        if now - self._last < 0.2 and self.n < self.total:
            return
        self._last = now
        width = 30
        fill = int(width * frac)
        line = f"\r[{'#' * fill}{'.' * (width - fill)}] {self.n}/{self.total} {now - self.t0:5.0f}s {desc[:50]:<50}"
        sys.stderr.write(line)
        sys.stderr.flush()

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
            return
        if self.enabled and self.tty:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()
        print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()




def _parse_list(value, allowed, what):
    if value in (None, "all"):
        return list(allowed)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)} or all)")
    return items


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bsn_cuda.benchmark",
        description="Speed of bsn_cuda's fused SN/BSN against torch's spectral norm on real models' layer shapes.",
    )
    p.add_argument("--device", default="all", help="cpu, cuda or all (cpu, plus cuda when present) [all]")
    p.add_argument("--suite", default=None,
                   help=f"comma list of {', '.join(ALL_SUITES)}, or all [all; --quick: {','.join(QUICK_SUITES)}]")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--mode", default="all", help="comma list of train, eval, fwd_bwd, or all [all]")
    p.add_argument("--impls", default=None,
                   help=f"comma list of {', '.join(IMPLS)} or all "
                        f"[{','.join(DEFAULT_IMPLS)}; --quick: without torch_compiled]")
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions, sngan_cnn suite and a small end-to-end step only (< 1 min on 2 CPU cores)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before measuring")
    p.add_argument("--e2e-batch", type=int, default=None,
                   help="real (and fake) batch of the end-to-end step [64; --quick: 8]")
    p.add_argument("--e2e-reps", type=int, default=None,
                   help="timed steps per end-to-end variant [CPU 5, CUDA 20; --quick: CPU 3]")
    p.add_argument("--json", metavar="PATH", help="write every measurement and the environment")
    p.add_argument("--plot", metavar="PREFIX",
                   help="write the figures as PNGs named PREFIX_<figure>.png (a trailing .png is dropped): "
                        "speedup (training fwd+bwd over torch SN per layer), bsn_cost (BSN / SN per layer), "
                        "host (tiny weights), gpu_bandwidth (CUDA records only) and all_points; with several "
                        "devices, one file per device: PREFIX_<figure>_<device>.png")
    p.add_argument("--markdown", metavar="PATH", help="write markdown tables of the whole run (benchmarks/results/cpu.md)")
    p.add_argument("--retries", type=int, default=None,
                   help=f"CPU: measure a case again up to N times when other processes disturbed it "
                        f"[{CONTENTION_RETRIES}; --quick: 1]")
    p.add_argument("--max-wait", type=float, default=None,
                   help="CPU: seconds the whole run may spend waiting for other processes to go quiet "
                        "before a retry [900; --quick: 5]")
    p.add_argument("--malloc-tune", action="store_true",
                   help="CPU (glibc): stop malloc from returning freed memory to the OS between calls "
                        "(no heap trimming, mmap threshold 32 MiB), as in a long-running training process; "
                        "where page faults are expensive (VMs) the default allocator adds them to every call")
    p.add_argument("--no-flush", action="store_true", help="CUDA: do not flush L2 before each timed call")
    p.add_argument("--no-host", action="store_true",
                   help="skip the host-overhead section (tiny weights, see bsn_cuda.benchmark.host_overhead)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--markdown-into", metavar="PATH",
                   help="rewrite the speed regions of a markdown file (<!-- bsn_cuda:generated speed-... --> "
                        "markers in README.md and docs/performance.md) from this result; "
                        "python -m bsn_cuda.benchmark.docs rewrites every region of both from the committed results")
    p.add_argument("--from-json", metavar="PATH",
                   help="measure nothing: redraw --plot, --markdown and --markdown-into from a result written by "
                        "--json (summary and goals are recomputed from its records)")
    return p


def _devices(arg):
    cuda = torch.cuda.is_available()
    if arg == "all":
        return [torch.device("cpu")] + ([torch.device("cuda", torch.cuda.current_device())] if cuda else [])
    if arg == "cpu":
        return [torch.device("cpu")]
    if arg.startswith("cuda"):
        if not cuda:
            raise SystemExit("--device cuda: CUDA is not available on this machine")
        d = torch.device(arg)
        return [torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())]
    raise SystemExit(f"unknown device {arg!r} (cpu, cuda or all)")


def run(args):
    """Run the benchmark for parsed arguments; returns the result dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = tune_malloc() if args.malloc_tune else None
    if args.malloc_tune and malloc is None:
        print("--malloc-tune: not a glibc system, allocator left as it is", flush=True)
    devices = _devices(args.device)
    suites = _parse_list(args.suite, ALL_SUITES + list(VARIANT_SUITES), "suite") if args.suite else (
        QUICK_SUITES if args.quick else list(ALL_SUITES))
    modes = _parse_list(args.mode, MODES, "mode")
    impls = _parse_list(args.impls, IMPLS, "implementation") if args.impls else (
        QUICK_IMPLS if args.quick else list(DEFAULT_IMPLS))
    dtype = DTYPES[args.dtype]
    retries = args.retries if args.retries is not None else (1 if args.quick else CONTENTION_RETRIES)
    WaitBudget.left = float(args.max_wait if args.max_wait is not None else (5 if args.quick else 900))
    if args.quick:
        budget = Budget(warmup=3, min_reps=10, max_reps=100, min_time=0.05, max_time=0.3)
        e2e_batch, e2e_warmup, e2e_reps = args.e2e_batch or 8, 1, args.e2e_reps or 3
    else:
        budget = Budget(warmup=3, min_reps=10, max_reps=300, min_time=0.25, max_time=3.0)
        e2e_batch, e2e_warmup, e2e_reps = args.e2e_batch or 64, 2, args.e2e_reps or 5
    cuda_budget = Budget(warmup=5, min_reps=20 if args.quick else 50, max_reps=200 if args.quick else 1000,
                         min_time=0.02 if args.quick else 0.1, max_time=1.0)

    env = environment(devices)
    env["malloc"] = malloc or "default"
    result = {
        "schema": "bsn_cuda.benchmark/1",
        "env": env,
        "config": {
            "suites": suites, "modes": modes, "impls": impls, "dtype": args.dtype, "quick": bool(args.quick),
            "devices": [str(d) for d in devices], "budget_cpu": budget.as_dict(), "budget_cuda": cuda_budget.as_dict(),
            "e2e": {"batch": e2e_batch, "warmup_cpu": e2e_warmup, "reps_cpu": e2e_reps,
                    "warmup_cuda": 3, "reps_cuda": args.e2e_reps or 20},
            "cuda_l2_flush": not args.no_flush, "contention_retries": retries,
            "contention_limit": CONTENTION_LIMIT, "max_wait_s": WaitBudget.left,
        },
        "measurements": [], "summary": [], "models": [], "goals": [], "e2e": [],
    }
    bar_total = 0
    for _ in devices:
        for s in suites:
            if s == E2E:
                bar_total += len(E2E_VARIANTS)
            else:
                bar_total += len(merge_layers(SUITES[s]["layers"])) * len(impls) * len(modes)
    print(env_text(result), flush=True)
    if load_note(env):
        print(f"note: {load_note(env)}", flush=True)
    for d in devices:
        native = env["devices"][str(d)]["fused_native"]
        if not native and any(i in FUSED for i in impls):
            print(FALLBACK_WARNING.format(dev=d, has=env.get("has_extension")), flush=True)
    if E2E in suites:
        print(f"end-to-end step: batch {e2e_batch} real + {e2e_batch} fake, {e2e_reps} reps"
              + (" (--quick: small batch)" if args.quick and not args.e2e_batch else ""), flush=True)
    wait_budget0 = WaitBudget.left
    if any(d.type == "cpu" for d in devices) and not args.quick and WaitBudget.left > 0:
        a, w = cpu_ticks(), time.perf_counter()
        time.sleep(0.5)
        c = contention(a, cpu_ticks(), time.perf_counter() - w)
        if c is not None and c > CONTENTION_LIMIT:
            print(f"other processes use {100 * c:.0f}% of the CPU: waiting up to 60 s for them to go quiet", flush=True)
            wait_for_quiet(60.0)
    progress = Progress(bar_total, enabled=not args.no_progress)
    memo = {}
    t_start = time.time()
    try:
        for d in devices:
            native = env["devices"][str(d)]["fused_native"]
            for suite in suites:
                if suite == E2E:
                    b = e2e_batch
                    result["e2e"] += run_e2e(d, dtype, b, e2e_warmup if d.type == "cpu" else 3,
                                             e2e_reps if d.type == "cpu" else (args.e2e_reps or 20), progress, native,
                                             retries=retries)
                    continue
                result["measurements"] += run_suite(
                    suite, d, dtype, modes, impls, cuda_budget if d.type == "cuda" else budget,
                    progress, memo, native, flush=not args.no_flush, retries=retries)
                result["summary"], result["models"] = summarize(result["measurements"])
                progress.write("\n" + suite_tables(result, str(d), suite))
    finally:
        progress.close()
    if not args.no_host and any(d.type == "cpu" for d in devices):
        print("\n== host overhead: µs per call (median) on tiny weights, module and functional API ==", flush=True)
        result["host"] = host_overhead.run_host_overhead(
            None if not args.quick else Budget(warmup=20, min_reps=100, max_reps=2000, min_time=0.03, max_time=0.2))
        print(host_table(result["host"]), flush=True)
    conclude(result)
    result["elapsed_s"] = time.time() - t_start
    result["waited_for_quiet_s"] = wait_budget0 - WaitBudget.left
    try:
        env["loadavg_end"] = os.getloadavg()
    except OSError:
        env["loadavg_end"] = None
    if result["e2e"]:
        e2e_layer_estimates(result)
        print("\n== end-to-end: SNGAN ResNet D (ch=128) training step (hinge, Adam) ==")
        print(e2e_table(result))
    if result["summary"]:
        print_goals_and_summary(result, print)
    for d in devices:
        if not env["devices"][str(d)]["fused_native"] and any(i in FUSED for i in impls):
            print("\n" + FALLBACK_WARNING.format(dev=d, has=env.get("has_extension")))
    n_cpu, retried, bad = disturbed(result)
    result["contended_cases"] = bad
    if retried:
        print(f"\n{retried} of {n_cpu} CPU cases were disturbed by other processes and measured again; "
              f"{bad} stayed disturbed (marked '!' in the tables: treat them with suspicion).")
    print(f"\nelapsed {result['elapsed_s']:.1f} s", flush=True)
    return result


def conclude(result):
    """Summary, model totals and goals from a result's records, in place: a run's,
    or a saved one's (an older JSON then gets this version's verdicts)."""
    native_by_device = {k: v["fused_native"] for k, v in result["env"]["devices"].items()}
    result["summary"], result["models"] = summarize(result["measurements"])
    if result.get("host"):
        result["host_goals"] = host_overhead.judge_host_goals(result["host"], native_by_device.get("cpu", False))
    result["goals"] = judge_goals(result["summary"], native_by_device, result["config"]["dtype"],
                                  result["env"]["torch_num_threads"])
    return result


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = conclude(json.load(f))
        args.json = None
    else:
        result = run(args)
    for path in (args.json, args.plot, args.markdown):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=_json_default, allow_nan=True)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(result))
        print(f"wrote {args.markdown}")
    if args.plot:
        for path in plot(result, args.plot):
            print(f"wrote {path}")
    if args.markdown_into:
        missing = markdown_into(args.markdown_into, result, args.from_json or args.json)
        print(f"updated the generated regions of {args.markdown_into}")
        if missing:
            print(f"note: {args.markdown_into} has no region for {', '.join(missing)}")
    return 0
