"""The report page's HTML pieces: escaping, labels cut to size, numbers as shown, tables, and the inline style
sheet with the Content-Security-Policy that keeps the page self-contained.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

from factory.core.text import one_line
from factory.report.style import MAX_LABEL


def esc(value: Any) -> str:
    """Text from the data as HTML text (None is empty): never trusted, always escaped."""
    return "" if value is None else html.escape(str(value), quote=True)


def short(text: Any, limit: int = MAX_LABEL) -> str:
    """A label that fits a figure's axis: one line, cut with … past `limit` characters."""
    return one_line(str(text), limit)


def label(*parts: Any) -> str:
    """`judge · protocol · ...` from the non-empty parts."""
    return " · ".join(str(p) for p in parts if p not in (None, ""))


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: counts with thousands separators, floats rounded, None empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def html_table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None, digits: int = 2
) -> str:
    """An HTML table; every header and cell is escaped (cells may be data), numbers right-aligned."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            text = esc(fmt(value, digits))
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; }
header, main { max-width: 1100px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 20px; }
h1 { margin: 0 0 4px; font-size: 24px; }
h2 { margin: 0 0 10px; font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
section { background: #fff; border: 1px solid #e4e4e4; border-radius: 6px; padding: 16px 20px; margin: 16px 0; }
.meta { color: #666; margin: 0 0 8px; }
nav ul { list-style: none; padding: 0; margin: 8px 0 0; display: flex; flex-wrap: wrap; gap: 4px 14px; }
nav a { color: #2f5d9e; text-decoration: none; }
nav a.absent { color: #999; }
figure { margin: 8px 0; }
img.plot { max-width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; margin: 8px 0; }
table { border-collapse: collapse; font-size: 12.5px; }
caption { text-align: left; color: #555; padding: 2px 0 4px; font-style: italic; }
th, td { border-bottom: 1px solid #eee; padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
th { border-bottom: 1px solid #bbb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.missing { color: #8a6d3b; background: #fcf8e3; padding: 6px 10px; border-radius: 4px; margin: 0; }
.note { color: #666; font-size: 12.5px; }
ul.counts { list-style: none; padding: 0; margin: 6px 0; display: flex; flex-wrap: wrap; gap: 4px 18px; }
code { font-size: 12.5px; }
"""
