"""Generated regions of a markdown file: the text between
``<!-- bsn_cuda:generated NAME -->`` and ``<!-- /bsn_cuda:generated -->``
belongs to a generator (the benchmark's README blocks, the examples' BSN
evidence) and is rewritten by it; everything else is written by hand."""

from __future__ import annotations

import re

__all__ = ["OPEN", "CLOSE", "regions", "fill", "prose"]

OPEN = "<!-- bsn_cuda:generated {} -->"
CLOSE = "<!-- /bsn_cuda:generated -->"
_MARK = re.compile(r"<!-- (/?)bsn_cuda:generated(?: ([\w.-]+))? -->")


def _spans(text):
    """[(name, start of content, end of content)] in order; ValueError on a
    region that is not closed, closed twice, nested or has no name."""
    spans, open_ = [], None
    for m in _MARK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group(1):  # a closing marker
            if open_ is None:
                raise ValueError(f"line {line}: {CLOSE} without an opening marker")
            spans.append((open_[0], open_[1], m.start()))
            open_ = None
        else:
            if open_ is not None:
                raise ValueError(f"line {line}: region {m.group(2)!r} opens inside region {open_[0]!r} "
                                 f"(expected {CLOSE} first)")
            if not m.group(2):
                raise ValueError(f"line {line}: an opening marker needs a name, got {m.group(0)!r}")
            open_ = (m.group(2), m.end())
    if open_ is not None:
        raise ValueError(f"region {open_[0]!r} is not closed (expected {CLOSE})")
    return spans


def regions(text):
    """{name: content} of the generated regions (content without the blank
    lines around it); ValueError if a name occurs twice."""
    out = {}
    for name, a, b in _spans(text):
        if name in out:
            raise ValueError(f"region {name!r} occurs twice")
        out[name] = text[a:b].strip("\n")
    return out


def fill(text, blocks):
    """(text with each region named in `blocks` holding that block, names in
    `blocks` that have no region). Regions of other generators stay as they are."""
    parts, pos, found = [], 0, set()
    for name, a, b in _spans(text):
        if name in blocks:
            parts += [text[pos:a], "\n", blocks[name].strip("\n"), "\n"]
            pos = b
            found.add(name)
    parts.append(text[pos:])
    return "".join(parts), [n for n in blocks if n not in found]


def prose(text):
    """The hand-written text: `text` without the generated regions' contents."""
    parts, pos = [], 0
    for _, a, b in _spans(text):
        parts.append(text[pos:a])
        pos = b
    parts.append(text[pos:])
    return "".join(parts)
