"""The user-facing pages stay usable: every relative link (and its #anchor)
leads somewhere, the README stays short, and the pages describe the project
rather than how it was developed."""

import glob
import os
import re

import pytest
from conftest import REPO_ROOT

# Every markdown page a user may read; the README links into all of them.
PAGES = sorted(
    os.path.relpath(p, REPO_ROOT)
    for p in [os.path.join(REPO_ROOT, name) for name in
              ("README.md", "CHANGELOG.md", "CONTRIBUTING.md", "benchmarks/README.md", "examples/README.md")]
    + glob.glob(os.path.join(REPO_ROOT, "docs", "*.md"))
    if os.path.exists(p)
)
README_MAX_LINES = 250
# Development-log words: a page says what is, not which attempt measured it.
BANNED = re.compile(r"\b(rounds?|sessions?|this VM|previous runs?)\b", re.I)

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _read(rel):
    with open(os.path.join(REPO_ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _text(rel):
    """The page without code blocks and inline code (no links live there)."""
    return INLINE_CODE.sub("", FENCE.sub("", _read(rel)))


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(rel):
    seen, out = {}, set()
    for h in HEADING.findall(FENCE.sub("", _read(rel))):
        s = slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def links(rel):
    return [m.group(1) for m in LINK.finditer(_text(rel))]


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    dead = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(REPO_ROOT, resolved)):
            dead.append(f"{target} (no file {resolved})")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            dead.append(f"{target} (no heading #{anchor} in {resolved})")
    assert not dead, f"{page} has dead links:\n" + "\n".join(dead)


def test_the_link_walk_sees_links_and_anchors():
    assert slug("Model-level step: grouped SN and update modes") == "model-level-step-grouped-sn-and-update-modes"
    assert slug("`cached()` and the eval cache") == "cached-and-the-eval-cache"
    assert "docs/performance.md" in links("README.md") and "docs/guarantees.md" in links("README.md")


@pytest.mark.parametrize("page", PAGES)
def test_pages_have_no_development_log_words(page):
    hits = [f"line {i}: {line.strip()}" for i, line in enumerate(_read(page).splitlines(), 1) if BANNED.search(line)]
    assert not hits, f"{page} narrates development ({BANNED.pattern}); say what is instead:\n" + "\n".join(hits)


def test_banned_words_are_whole_words():
    assert BANNED.search("this round of tests") and BANNED.search("in this session")
    assert BANNED.search("on this VM") and BANNED.search("the previous run")
    assert not BANNED.search("equal to rounding") and not BANNED.search("a shared VM drifts")


def test_readme_is_short():
    n = len(_read("README.md").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move details to docs/"
