"""Plain-text and markdown tables, and how a judged goal is written: shared by every report."""

from __future__ import annotations

__all__ = ["text_table", "md_table", "status_text", "goal_numbers"]


def text_table(headers, rows, aligns=None):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    aligns = aligns or ["<"] + [">"] * (len(headers) - 1)
    def line(cells):
        return "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(cells, aligns, widths))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def md_table(headers, rows, n_left=2):
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join(["---"] * n_left + ["---:"] * (len(headers) - n_left)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def status_text(goal):
    """A goal's verdict as the reports write it (MET / NOT MET stand out)."""
    st = goal["status"]
    return st.upper() if st in ("met", "NOT met") else st


def goal_numbers(goal):
    """'value (op threshold; margin, spread)' of a judged goal."""
    if goal["value"] is None:
        return "-"
    thr = "-" if goal["threshold"] is None else f"{goal['threshold']:.3g}"
    out = f"{goal['value']:.2f} ({goal['op']} {thr}"
    if goal.get("margin") is not None:
        out += f"; margin {goal['margin']:+.2f}"
        out += "" if goal.get("spread") is None else f", spread {goal['spread']:.2f}"
    return out + ")"
