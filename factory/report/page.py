"""`factory report`: one self-contained HTML page of plots and tables about everything in a warehouse.

Sections: score distribution, chosen vs rejected length, position bias and consistency, agreement between
judges, protocols and references, parse failures, calls, tokens, time and cost per stage and run, the
judge-eval Table 1 and the held-out win rates. Each is shown only when its data exists; otherwise one line
says what is missing and which command writes it.

Every number comes from `Warehouse.query` (read-only SQL over the views), and the judge-eval figures from
`factory.judge_eval.tables`, so the page says what `factory sql` and `factory judge-eval` say. The page needs nothing
outside itself: plots are inline base64 PNGs, the style sheet is inline, and a Content-Security-Policy
allows nothing else (no script, no request), so it can be attached to a pull request, mailed or opened
offline. Every text that comes from the data is escaped with `html.escape` (in the figures it is only
pixels, and math parsing is off so a `$` in a judge name is just a `$`).

Why matplotlib: it is already in nearly every ML environment (and a base dependency of factory), it renders
offline straight to PNG or SVG with its Agg backend, and it needs no JavaScript runtime, browser or server
to draw, unlike plotly, Bokeh or Vega. Figures are made with the object-oriented `Figure` API on an Agg
canvas, never pyplot: pyplot keeps a process-wide backend and a registry of open figures that must be
closed, while a bare `Figure` is freed with its last reference (matplotlib's advice for servers).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from factory.core.errors import UserInputError
from factory.core.files import atomic_write_bytes
from factory.core.owned import check_output_file, head
from factory.report.build_sections import costs, length_bias, overview, scores, win_rates
from factory.report.data import RUN_COUNT_SQL, Data
from factory.report.html import CSP, CSS, esc
from factory.report.judge_sections import agreement, judge_eval, parse_failures, position
from factory.report.section import Section
from factory.report.style import GENERATOR_META, STYLE
from factory.warehouse.store import Warehouse

SECTIONS: tuple[Callable[[Data], Section], ...] = (
    overview,
    scores,
    length_bias,
    position,
    agreement,
    parse_failures,
    costs,
    judge_eval,
    win_rates,
)
# No script may run and nothing may be fetched: the page is data, and stays that way even if a string
# from the data escaped its escaping.


@dataclass
class Report:
    """The report's sections, and the page made of them."""

    root: Path
    sections: list[Section]
    generated: datetime

    @property
    def plots(self) -> int:
        return sum(s.plots for s in self.sections)

    @property
    def missing(self) -> list[Section]:
        return [s for s in self.sections if s.missing]

    def html(self) -> str:
        nav = "".join(
            f'<li><a href="#{esc(s.key)}"{" class=absent" if s.missing else ""}>{esc(s.title)}</a></li>'
            for s in self.sections
        )
        stamp = self.generated.strftime("%Y-%m-%d %H:%M UTC")
        return (
            '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'{GENERATOR_META}\n<meta name="factory-plots" content="{self.plots}">\n'
            f"<title>factory report: {esc(self.root.name)}</title>\n<style>{CSS}</style>\n</head>\n"
            f'<body data-plots="{self.plots}">\n<header>\n<h1>factory report</h1>\n'
            f'<p class="meta">warehouse <code>{esc(_shown(self.root))}</code> · {stamp} · {self.plots} plots</p>\n'
            f"<nav><ul>{nav}</ul></nav>\n</header>\n<main>\n"
            + "\n".join(s.html() for s in self.sections)
            + "\n</main>\n</body>\n</html>\n"
        )


def check_has_runs(wh: Warehouse) -> None:
    """A warehouse with no run has nothing to report: say so in one line rather than write an empty page."""
    wh.require()
    if wh.query(RUN_COUNT_SQL).column("n")[0].as_py() == 0:
        raise UserInputError(
            f"{wh.root}: no runs in this warehouse yet; `factory build RECIPE` or `factory judge-eval` writes them"
        )


def build_report(wh: Warehouse) -> Report:
    """Every section, each from the warehouse's current views."""
    import matplotlib

    check_has_runs(wh)
    data = Data(wh)
    with matplotlib.rc_context(STYLE):  # set for this report only, not for the caller's process
        sections = [make(data) for make in SECTIONS]
    return Report(wh.root, sections, datetime.now(timezone.utc))


def is_report_page(path: Path) -> bool:
    """Whether `path` is a page `factory report` wrote (its head names factory; earlier releases' named plots)."""
    start = head(path)
    return GENERATOR_META.encode() in start or b'<meta name="factory-plots"' in start


def write_report(wh: Warehouse, out: Path) -> Report:
    """Build the report and write it to `out` atomically (a reader never sees half a page). Only a new file or
    an earlier report is replaced, and never a file among the warehouse's own."""
    check_output_file(Path(out), "--out", is_report_page, wh.root)
    report = build_report(wh)
    check_output_file(Path(out), "--out", is_report_page, wh.root)  # again: it may have appeared meanwhile
    atomic_write_bytes(Path(out), report.html().encode("utf-8"))
    # The temporary file behind the atomic write is private (0600); a report is meant to be shared, so it
    # gets the mode a plain new file would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)
    return report


def _shown(root: Path) -> str:
    """The warehouse as a user would name it: relative to the working folder when it lies inside it (a report
    shared with others should not carry the author's folder layout)."""
    try:
        return str(root.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(root)
