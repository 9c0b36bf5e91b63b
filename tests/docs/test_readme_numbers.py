"""README.md, docs/performance.md and docs/why_bsn.md say what the committed
results show.

The regions between ``bsn_cuda:generated`` markers must be exactly what the
generators write from the committed results (benchmarks/results/cpu.json,
build.json and model_step_cpu.md through ``python -m bsn_cuda.benchmark.docs``;
examples/results/*.json through examples/evidence.py), and the hand-written
text around them may quote a measured quantity (a number with x, times, µs,
ms, s or %, or a ratio with two or more decimals) only if the generated text
gives the same one.
"""

import json
import os
import re
import shutil
import sys

import pytest
from conftest import REPO_ROOT

from bsn_cuda.benchmark import build_time, docs, markers
from bsn_cuda.benchmark.cli import conclude, main
from bsn_cuda.benchmark.readme import speed_blocks

sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))

import evidence  # noqa: E402

README = os.path.join(REPO_ROOT, "README.md")
PERFORMANCE = os.path.join(REPO_ROOT, "docs", "performance.md")
WHY_BSN = os.path.join(REPO_ROOT, "docs", "why_bsn.md")
CPU_JSON = docs.CPU_JSON
DOCS_COMMAND = "python -m bsn_cuda.benchmark.docs"
EVIDENCE_COMMAND = "python examples/evidence.py"

# Numbers in hand-written text that are not measurements. Each needs a reason.
NOT_MEASURED = {
    "1x": "Figure 1's dashed parity line",
    "4-9%": "Guarantees (the lead's section): the EMA model's scale-up that tests/training/test_ema.py provokes, "
            "a test's observation, not a benchmark result",
    "2009.02773": "the paper's arXiv id",
    "3.10": "a Python version (Platforms)",
    "3.12": "a Python version (Platforms)",
    "3.13": "a Python version (Platforms)",
    "2.11": "the GPU image's torch version (Platforms)",
    "0.999": "Adam's beta2, a setting of the examples",
}

# a number, or a range "a-b" / "a to b", followed by a unit; "3x3" and "2x64" are shapes, not quantities
QUANTITY = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s?(?:-|–|to)\s?(\d+(?:\.\d+)?))?\s?(x|×|times|µs|us|ms|s|%)(?!\w)")
UNIT = {"×": "x", "times": "x", "us": "µs"}
# a ratio without a unit ("BSN/SN 1.34"): two or more decimals, not part of a version like 2.14.1
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d{2,}(?!\w)(?!\.\d)")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def quantities(text):
    """{(number as written, unit)} for each number (each end of a range) with a unit in
    `text`; as written, so that a rounded "2.6x" is not taken for a table's "2.60x"."""
    out = set()
    for m in QUANTITY.finditer(text):
        unit = UNIT.get(m.group(3), m.group(3))
        out |= {(n, unit) for n in m.group(1, 2) if n is not None}
    return out


def unsupported(page, generated):
    """The quantities and unitless ratios in the prose of `page` (code blocks and
    generated regions left out) that the generated text does not give, as written."""
    prose = FENCE.sub("", markers.prose(page))
    with_unit, numbers = quantities(generated), set(NUMBER.findall(generated))
    bad, spans = [], []
    for m in QUANTITY.finditer(prose):
        spans.append(m.span())
        if " ".join(m.group(0).split()) not in NOT_MEASURED and not quantities(m.group(0)) <= with_unit:
            bad.append(m)
    for m in DECIMAL.finditer(prose):
        inside = any(a <= m.start() < b for a, b in spans)
        if not inside and m.group(0) not in NOT_MEASURED and m.group(0) not in numbers:
            bad.append(m)
    lines = prose.splitlines()
    return [f"{m.group(0)!r} in: {lines[prose.count(chr(10), 0, m.start())].strip()}"
            for m in sorted(bad, key=lambda m: m.start())]


@pytest.fixture(scope="module")
def speed():
    """{page: {region: markdown}}: what `python -m bsn_cuda.benchmark.docs` writes."""
    return {page: docs.page_blocks(REPO_ROOT, os.path.relpath(page, REPO_ROOT)) for page in (README, PERFORMANCE)}


@pytest.fixture(scope="module")
def bsn():
    return evidence.evidence_blocks()


def _differing(path, blocks):
    """The names of the generated regions of `path` whose content is not blocks[name]."""
    have = markers.regions(_read(path))
    return [name for name in blocks if name in have and have[name] != blocks[name].strip("\n")]


def test_benchmark_regions_are_regenerated_from_the_committed_results():
    """README.md and docs/performance.md hold what the committed results give."""
    changed = {page: names for page, names in docs.regenerate(REPO_ROOT, write=False).items() if names}
    assert not changed, f"generated regions differ from the committed results: {changed}; run: {DOCS_COMMAND}"


@pytest.mark.parametrize("page", ["README.md", os.path.join("docs", "performance.md")])
def test_benchmark_cli_writes_the_same_speed_regions(tmp_path, page):
    """`python -m bsn_cuda.benchmark --from-json ... --markdown-into PAGE` on a copy
    of the checkout writes the speed regions as the docs command does."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    shutil.copy(os.path.join(REPO_ROOT, CPU_JSON), tmp_path / CPU_JSON)
    shutil.copy(os.path.join(REPO_ROOT, page), tmp_path / page)
    assert main(["--from-json", str(tmp_path / CPU_JSON), "--markdown-into", str(tmp_path / page)]) == 0
    got, want = (tmp_path / page).read_text(encoding="utf-8"), _read(os.path.join(REPO_ROOT, page))
    if got != want:
        changed = [n for n, c in markers.regions(got).items() if markers.regions(want).get(n) != c]
        pytest.fail(f"{page}: generated regions {changed} are not what {CPU_JSON} gives; run: {DOCS_COMMAND}")


@pytest.mark.parametrize("path", [README, WHY_BSN], ids=["README", "why_bsn"])
def test_bsn_evidence_is_regenerated_from_the_committed_runs(path, bsn):
    changed = _differing(path, bsn)
    assert not changed, (f"{os.path.relpath(path, REPO_ROOT)}: regions {changed} are not what "
                         f"examples/results/*.json give; run: {EVIDENCE_COMMAND}")


def test_every_region_has_a_generator(speed, bsn):
    readme, perf, why = (markers.regions(_read(p)) for p in (README, PERFORMANCE, WHY_BSN))
    assert set(readme) - set(speed[README]) - set(bsn) == set(), "README.md has regions no generator writes"
    assert set(perf) - set(speed[PERFORMANCE]) == set(), "docs/performance.md has regions no generator writes"
    assert set(why) - set(bsn) == set(), "docs/why_bsn.md has regions no generator writes"
    missing = set(speed[PERFORMANCE]) - set(readme) - set(perf)
    assert not missing, f"no page holds the generated blocks {sorted(missing)}"
    assert {"speed-headline-table", "speed-headline", "bsn-probe-compare", "model-step-headline"} <= set(readme), \
        "the README's headline table, ranges, grouping results and BSN comparison must be generated"
    assert {"speed-goals", "build-time", "model-step"} <= set(perf), \
        "docs/performance.md must hold the goals, the build time and the model-level step"
    assert {"bsn-probe-compare", "bsn-sweep"} <= set(why), "docs/why_bsn.md must hold the runs' comparison and the sweep"


def test_model_step_pages_come_from_the_committed_json():
    """The model-level step's page (benchmarks/results/model_step_cpu.md) and its block in
    docs/performance.md are what its JSON renders to."""
    from bsn_cuda.benchmark import model_step

    with open(os.path.join(REPO_ROOT, docs.MODEL_STEP_JSON)) as f:
        page = model_step.render(json.load(f))
    assert _read(os.path.join(REPO_ROOT, docs.MODEL_STEP_MD)) == page, (
        "benchmarks/results/model_step_cpu.md differs from its JSON: python -m bsn_cuda.benchmark.model_step "
        "--from-json benchmarks/results/model_step_cpu.json --markdown benchmarks/results/model_step_cpu.md")
    block = markers.regions(_read(PERFORMANCE))["model-step"]
    assert block == docs.included(os.path.join(REPO_ROOT, docs.MODEL_STEP_MD))
    assert not block.startswith("# "), "the included file's title is left out (the page has its own heading)"


@pytest.mark.parametrize("path", [README, PERFORMANCE, WHY_BSN], ids=["README", "performance", "why_bsn"])
def test_prose_quotes_only_generated_quantities(path, speed, bsn):
    page = _read(path)
    generated = "\n".join([b for blocks in speed.values() for b in blocks.values()] + list(bsn.values()))
    bad = unsupported(page, generated)
    assert not bad, (f"{os.path.relpath(path, REPO_ROOT)} quotes quantities that no generated block gives "
                     "(move them into a block, or remove them):\n" + "\n".join(bad))


def test_quantities_are_found_as_written():
    """The scan reads ranges and units, and leaves shapes and names alone."""
    assert quantities("2.6x to 3.5x, 0.1-0.4% of a 1.5 s step, 25 µs, 13.6 times") == {
        ("2.6", "x"), ("3.5", "x"), ("0.1", "%"), ("0.4", "%"), ("1.5", "s"), ("25", "µs"), ("13.6", "x")}
    assert quantities("3x3 kernels, batch 2x64, 2 seeds, 800 steps, v1.5") == set()
    assert unsupported("a 3.76x gain, 2.6x, and 25 µs", "| 3.76x | 2.60x | 25 |") == [
        "'2.6x' in: a 3.76x gain, 2.6x, and 25 µs", "'25 µs' in: a 3.76x gain, 2.6x, and 25 µs"]
    # unitless ratios: checked against any number of the generated text; versions are not ratios
    assert unsupported("BSN/SN 1.38, module-level 1.34, torch 2.14.1.", "| 1.38 (1.41) |") == [
        "'1.34' in: BSN/SN 1.38, module-level 1.34, torch 2.14.1."]


def test_markers_reject_broken_regions():
    with pytest.raises(ValueError, match="not closed"):
        markers.regions(markers.OPEN.format("a") + "\ntext\n")
    with pytest.raises(ValueError, match="opens inside"):
        markers.regions(markers.OPEN.format("a") + markers.OPEN.format("b") + markers.CLOSE)
    text, missing = markers.fill(f"x\n{markers.OPEN.format('a')}\nold\n{markers.CLOSE}\ny", {"a": "new", "b": "?"})
    assert markers.regions(text) == {"a": "new"} and missing == ["b"]
    assert markers.prose(text) == f"x\n{markers.OPEN.format('a')}{markers.CLOSE}\ny"


def test_generator_takes_modes_it_does_not_know():
    """A later run may time modes this version lacks (e.g. an opt-in eval cache): they appear in the tables."""
    with open(os.path.join(REPO_ROOT, CPU_JSON)) as f:
        result = json.load(f)
    result["measurements"] += [dict(r, mode="eval_new") for r in result["measurements"] if r["mode"] == "eval"]
    result["host"] += [dict(r, mode="eval_new") for r in result["host"] if r["mode"] == "eval"]
    blocks = speed_blocks(conclude(result), CPU_JSON)
    assert "| cpu | sngan_cnn | eval_new |" in blocks["speed-summary"]
    assert "| Linear(4, 4) | eval_new |" in blocks["speed-host"]


def test_build_time_reads_ninja_logs_and_judges_the_slowest_file(tmp_path):
    tree = tmp_path / "tree"
    for rel in ("csrc/cuda/forward_float.cu", "csrc/host.cpp"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("")
    log_dir = tree / "build" / "temp"
    log_dir.mkdir(parents=True)
    (log_dir / ".ninja_log").write_text(
        f"# ninja log v5\n0\t13500\t0\t{log_dir}/csrc/cuda/forward_float.cuda.o\t1\n"
        f"100\t41100\t0\t{log_dir}/csrc/host.o\t2\n100\t200\t0\t{log_dir}/other.so\t3\n")
    assert build_time._ninja_times(str(tree)) == {"csrc/cuda/forward_float.cu": 13.5, "csrc/host.cpp": 41.0}
    result = {"env": {"git_commit": "abcdef0123", "date": "2026-12-07T00:00:00", "cpu_model": "CPU", "cpu_count": 2,
                      "torch": "2.x", "nvcc": ["Build cuda_13.0"]},
              "per_file": {"wall_s": 300, "settings": "", "files_s": {"csrc/cuda/forward_float.cu": 13.5,
                                                                       "csrc/host.cpp": 41.0}},
              "default": {"wall_s": 250, "settings": "bsn_cuda: building CPU + CUDA ops (archs)", "files_s": {}}}
    text = build_time.build_blocks(result)["build-time"]
    assert "**4m10s** wall" in text and "`csrc/host.cpp`, 41 s (OVER the 40 s goal)" in text
    assert "`forward_float.cu` 14 s" in text
