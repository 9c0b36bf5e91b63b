"""How long the extension takes to build: per translation unit, and the default build's wall time.

Two builds of a copy of this checkout's tracked files (`setup.py build_ext
--inplace`, CUDA ops on):

* ``per_file``: one arch (``9.0``), ``MAX_JOBS=1``: ninja's log gives each
  translation unit's compile time with one job at a time (``nvcc`` itself may
  still use a second thread for a second target; with one arch it has none);
* ``default``: the settings a user gets with no variables set (the default
  arch list when no GPU is visible, ``MAX_JOBS`` = the cores): its wall time.

``python -m bsn_cuda.benchmark.build_time --json benchmarks/results/build.json
--markdown-into docs/performance.md``; ``--from-json`` rewrites the block from a
saved run (``python -m bsn_cuda.benchmark.docs`` too). Needs a git checkout, the CUDA toolkit and the build tools; no network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from . import markers
from .environment import cpu_model, git_commit
from .readme import duration, short_commit

__all__ = ["run_builds", "build_blocks", "markdown_into"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLOWEST_FILE_GOAL_S = 40.0  # no translation unit above this, one arch on one core (issue: one call per model)


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True).stdout


def _copy_checkout(dst):
    for rel in _git("ls-files", "-z").split("\0"):
        if rel:
            os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(REPO_ROOT, rel), os.path.join(dst, rel))


def _ninja_times(tree):
    """{source path relative to the tree: seconds} from the build's .ninja_log."""
    times = {}
    for dirpath, _, files in os.walk(os.path.join(tree, "build")):
        if ".ninja_log" not in files:
            continue
        with open(os.path.join(dirpath, ".ninja_log")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if line.startswith("#") or len(parts) < 4:
                    continue
                start_ms, end_ms, target = int(parts[0]), int(parts[1]), parts[3]
                # objects mirror the sources' paths under the build folder: <build>/<...>/csrc/x.o
                rel = os.path.relpath(target, dirpath).replace(os.sep, "/")
                if "csrc/" not in rel or not rel.endswith(".o"):
                    continue
                stem = rel[rel.index("csrc/"):-2].removesuffix(".cuda")
                for ext in (".cu", ".cpp"):
                    if os.path.exists(os.path.join(tree, stem + ext)):
                        times[stem + ext] = (end_ms - start_ms) / 1000.0
    return times


def _build(tree, env_overrides, unset=()):
    env = dict(os.environ, BSN_CUDA_BUILD="1", **env_overrides)
    for name in unset:
        env.pop(name, None)
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"build_time: the build in {tree} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-3000:]}")
    settings = next((line for line in proc.stdout.splitlines() if line.startswith("bsn_cuda: building")), "")
    return {"wall_s": wall, "files_s": _ninja_times(tree), "settings": settings}


def run_builds(write=print):
    """Both builds, each in a fresh copy; returns the result dict."""
    import torch

    result = {
        "env": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "nvcc": subprocess.run([os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                                    "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:],
        },
    }
    for name, overrides, unset in (("per_file", {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "1"}, ()),
                                   ("default", {}, ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS"))):
        with tempfile.TemporaryDirectory(prefix=f"bsn_build_{name}_") as tree:
            _copy_checkout(tree)
            write(f"== build '{name}' in {tree}")
            result[name] = _build(tree, overrides, unset)
            write(f"   {result[name]['wall_s']:.0f} s wall; {result[name]['settings']}")
    return result


def build_blocks(result):
    """{"build-time": markdown} for docs/performance.md."""
    env, per_file, default = result["env"], result["per_file"], result["default"]
    files = sorted(per_file["files_s"].items(), key=lambda kv: -kv[1])
    cuda = [(f, s) for f, s in files if f.endswith(".cu")]
    slowest_file, slowest = files[0]
    verdict = "under" if slowest <= SLOWEST_FILE_GOAL_S else "OVER"
    commit = short_commit(env["git_commit"])
    found = re.search(r"TORCH_CUDA_ARCH_LIST=(\S+?);? ", default["settings"])  # setup.py's "... LIST=a;b; CXX=..."
    archs = found.group(1) if found else "?"
    lines = [
        f"Measured at commit {commit}, {env['date'][:10]}, on {env['cpu_model']} "
        f"({env['cpu_count']} cores), torch {env['torch']}, {' '.join(env['nvcc'])}.",
        f"- Default build (no variables set: archs {archs}, MAX_JOBS unset): "
        f"**{duration(default['wall_s'])}** wall.",
        f"- One arch (9.0), one job at a time: {duration(per_file['wall_s'])} wall; the slowest translation "
        f"unit is `{slowest_file}`, {slowest:.0f} s ({verdict} the {SLOWEST_FILE_GOAL_S:.0f} s goal); "
        "the CUDA files: " + ", ".join(f"`{os.path.basename(f)}` {s:.0f} s" for f, s in cuda) + ".",
    ]
    return {"build-time": "\n".join(lines)}


def markdown_into(path, result):
    with open(path) as f:
        text = f.read()
    new, missing = markers.fill(text, build_blocks(result))
    if missing:
        raise SystemExit(f"{path}: no region {missing} (expected {markers.OPEN.format(missing[0])})")
    if new != text:
        with open(path, "w") as f:
            f.write(new)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bsn_cuda.benchmark.build_time", description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the result here")
    p.add_argument("--from-json", help="read a saved result instead of building")
    p.add_argument("--markdown-into", help="rewrite this markdown file's build-time block")
    args = p.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        result = run_builds()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(build_blocks(result)["build-time"])
    if args.markdown_into:
        markdown_into(args.markdown_into, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
