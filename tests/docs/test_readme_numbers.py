"""README.md and docs/why_bsn.md say what the committed results show.

The regions between ``bsn_cuda:generated`` markers must be exactly what the
generators write from the committed results (benchmarks/results/cpu.json for
the speed section, examples/results/*.json for the BSN evidence), and the
hand-written text around them may quote a measured quantity (a number with
x, times, µs, ms, s or %, or a ratio with two or more decimals) only if the
generated text gives the same one.
"""

import json
import os
import re
import shutil
import sys

import pytest
from conftest import REPO_ROOT

from bsn_cuda.benchmark import build_time, markers
from bsn_cuda.benchmark.cli import conclude, main
from bsn_cuda.benchmark.readme import speed_blocks

sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))

import evidence  # noqa: E402

README = os.path.join(REPO_ROOT, "README.md")
WHY_BSN = os.path.join(REPO_ROOT, "docs", "why_bsn.md")
CPU_JSON = os.path.join("benchmarks", "results", "cpu.json")
BUILD_JSON = os.path.join("benchmarks", "results", "build.json")
BUILD_COMMAND = f"python -m bsn_cuda.benchmark.build_time --from-json {BUILD_JSON} --markdown-into README.md"
SPEED_COMMAND = f"python -m bsn_cuda.benchmark --from-json {CPU_JSON} --markdown-into README.md"
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
    with open(os.path.join(REPO_ROOT, CPU_JSON)) as f:
        return speed_blocks(conclude(json.load(f)), CPU_JSON)


@pytest.fixture(scope="module")
def bsn():
    return evidence.evidence_blocks()


@pytest.fixture(scope="module")
def build():
    with open(os.path.join(REPO_ROOT, BUILD_JSON)) as f:
        return build_time.build_blocks(json.load(f))


def _differing(path, blocks):
    """The names of the generated regions of `path` whose content is not blocks[name]."""
    have = markers.regions(_read(path))
    return [name for name in blocks if name in have and have[name] != blocks[name].strip("\n")]


def test_speed_section_is_regenerated_from_the_committed_run(tmp_path):
    """--markdown-into on a copy of the checkout's README and result reproduces README.md."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(os.path.join(REPO_ROOT, CPU_JSON), tmp_path / CPU_JSON)
    shutil.copy(README, tmp_path / "README.md")
    assert main(["--from-json", str(tmp_path / CPU_JSON), "--markdown-into", str(tmp_path / "README.md")]) == 0
    got, want = (tmp_path / "README.md").read_text(encoding="utf-8"), _read(README)
    if got != want:
        changed = [n for n, c in markers.regions(got).items() if markers.regions(want).get(n) != c]
        pytest.fail(f"README.md's generated regions {changed} are not what {CPU_JSON} gives; run: {SPEED_COMMAND}")


@pytest.mark.parametrize("path", [README, WHY_BSN], ids=["README", "why_bsn"])
def test_bsn_evidence_is_regenerated_from_the_committed_runs(path, bsn):
    changed = _differing(path, bsn)
    assert not changed, (f"{os.path.relpath(path, REPO_ROOT)}: regions {changed} are not what "
                         f"examples/results/*.json give; run: {EVIDENCE_COMMAND}")


def test_build_time_is_regenerated_from_the_committed_run(build):
    changed = _differing(README, build)
    assert not changed and set(build) <= set(markers.regions(_read(README))), \
        f"README.md: regions {changed or list(build)} are not what {BUILD_JSON} gives; run: {BUILD_COMMAND}"


def test_every_region_has_a_generator(speed, bsn, build):
    readme, why = markers.regions(_read(README)), markers.regions(_read(WHY_BSN))
    assert set(readme) - set(speed) - set(bsn) - set(build) == set(), "README.md has regions no generator writes"
    assert set(why) - set(bsn) == set(), "docs/why_bsn.md has regions no generator writes"
    assert set(speed) <= set(readme), f"README.md lacks speed regions: expected {sorted(speed)}, got {sorted(readme)}"
    assert {"bsn-probe-compare", "bsn-sweep"} <= set(readme) & set(why), \
        "the BSN evidence (the runs' comparison and the sweep) must be generated on both pages"


@pytest.mark.parametrize("path", [README, WHY_BSN], ids=["README", "why_bsn"])
def test_prose_quotes_only_generated_quantities(path, speed, bsn, build):
    page = _read(path)
    generated = "\n".join(list(speed.values()) + list(bsn.values()) + list(build.values()))
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
