"""Every benchmark-generated region of README.md and docs/performance.md, from
the committed results, in one command (run from the repository root):

    python -m bsn_cuda.benchmark.docs            # rewrite the regions
    python -m bsn_cuda.benchmark.docs --check    # only say which differ (exit 1)

Sources: ``benchmarks/results/cpu.json`` (the ``speed-*`` blocks, see
:mod:`.readme`), ``benchmarks/results/build.json`` (``build-time``, see
:mod:`.build_time`) and ``benchmarks/results/model_step_cpu.json``, which
``python -m bsn_cuda.benchmark.model_step --json`` writes: its page
(``model-step``, what ``--markdown`` writes, less its title) and its headline
(``model-step-headline``); ``model_step_cpu_keep_memory.json``, the same with
glibc keeping freed memory (``model-step-keep-memory``). The BSN evidence's
regions (``bsn-*``) belong to ``python examples/evidence.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import build_time, markers, model_step
from .cli import conclude
from .readme import speed_blocks

__all__ = ["PAGES", "CPU_JSON", "BUILD_JSON", "MODEL_STEP_JSON", "MODEL_STEP_MD", "MODEL_STEP_KEEP_JSON", "included",
           "without_title",
           "page_blocks", "regenerate"]

PAGES = ("README.md", os.path.join("docs", "performance.md"))
CPU_JSON = os.path.join("benchmarks", "results", "cpu.json")
BUILD_JSON = os.path.join("benchmarks", "results", "build.json")
MODEL_STEP_JSON = os.path.join("benchmarks", "results", "model_step_cpu.json")
MODEL_STEP_MD = os.path.join("benchmarks", "results", "model_step_cpu.md")
# The same step with glibc told to keep freed memory (GLIBC_TUNABLES): how much of the SN cost above the
# kernel floor is the allocator returning large blocks to the OS and faulting them back in.
MODEL_STEP_KEEP_JSON = os.path.join("benchmarks", "results", "model_step_cpu_keep_memory.json")


def without_title(text):
    """Markdown for inclusion in another page: without its leading ``# title``
    line (the page has its own heading)."""
    lines = text.strip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).strip("\n")


def included(path):
    """A markdown file's text for inclusion in another page (:func:`without_title`)."""
    with open(path, encoding="utf-8") as f:
        return without_title(f.read())


def page_blocks(root, page):
    """{region name: markdown} for `page` (a path relative to `root`): links to
    the results are written relative to the page."""
    source = os.path.relpath(os.path.join(root, CPU_JSON), os.path.dirname(os.path.join(root, page)))
    with open(os.path.join(root, CPU_JSON)) as f:
        blocks = speed_blocks(conclude(json.load(f)), source)
    with open(os.path.join(root, BUILD_JSON)) as f:
        blocks.update(build_time.build_blocks(json.load(f)))
    with open(os.path.join(root, MODEL_STEP_JSON)) as f:
        steps = json.load(f)
    blocks["model-step"] = without_title(model_step.render(steps))
    blocks["model-step-headline"] = model_step.headline(steps)
    with open(os.path.join(root, MODEL_STEP_KEEP_JSON)) as f:
        blocks["model-step-keep-memory"] = without_title(model_step.render(json.load(f)))
    return blocks


def regenerate(root=".", write=True):
    """{page: [names of its regions that differ from the committed results]};
    with `write`, the pages are rewritten."""
    changed = {}
    for page in PAGES:
        path = os.path.join(root, page)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        blocks = page_blocks(root, page)
        have = markers.regions(text)
        changed[page] = [n for n in blocks if n in have and have[n] != blocks[n].strip("\n")]
        new, _ = markers.fill(text, blocks)
        if write and new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
    return changed


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bsn_cuda.benchmark.docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=".", help="the repository root [.]")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a region differs")
    args = p.parse_args(argv)
    changed = regenerate(args.root, write=not args.check)
    for page, names in changed.items():
        print(f"{page}: " + (f"{'differs' if args.check else 'rewrote'}: {', '.join(names)}" if names else "up to date"))
    return 1 if args.check and any(changed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
