"""One section of the report page: its escaped HTML parts and plot count, or the line saying why it is empty."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from factory.report.html import esc, html_table
from factory.report.plots import png
from factory.report.style import CSS_PER_INCH

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class Section:
    """One part of the page: its HTML (already escaped) and how many plots it holds, or why it is empty."""

    key: str
    title: str
    parts: list[str] = field(default_factory=list)
    plots: int = 0
    missing: str | None = None

    def text(self, line: str) -> None:
        self.parts.append(f"<p>{esc(line)}</p>")

    def note(self, line: str) -> None:
        self.parts.append(f'<p class="note">{esc(line)}</p>')

    def table(
        self, columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None, digits: int = 2
    ) -> None:
        self.parts.append(html_table(columns, rows, caption, digits))

    def figure(self, fig: Figure, alt: str) -> None:
        """Embed a figure as a base64 PNG shown at its size in inches (CSS px), shrinking with the window."""
        data = base64.b64encode(png(fig)).decode("ascii")
        width = round(fig.get_figwidth() * CSS_PER_INCH)
        self.parts.append(
            f'<figure><img class="plot" width="{width}" alt="{esc(alt)}" src="data:image/png;base64,{data}"></figure>'
        )
        self.plots += 1

    def html(self) -> str:
        body = f'<p class="missing">{esc(self.missing)}</p>' if self.missing else "\n".join(self.parts)
        return f'<section id="{esc(self.key)}">\n<h2>{esc(self.title)}</h2>\n{body}\n</section>'


def empty(key: str, title: str, missing: str) -> Section:
    return Section(key, title, missing=missing)
