"""The report page's figure helpers: a figure on an Agg canvas (never pyplot, see `factory.report.page`), its
PNG bytes, and the bar, histogram, heatmap and stacked-bar drawings the sections share.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from factory.report.html import short
from factory.report.style import COLORS, DPI, MAX_GROUPS, WIDTH

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def new_figure(height: float, cols: int = 1, width: float = WIDTH, sharey: bool = False) -> tuple[Figure, list[Axes]]:
    """A figure with `cols` panels side by side, laid out so long labels are not cut."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, list(fig.subplots(1, cols, squeeze=False, sharey=sharey)[0])


def rows_top_down(ax: Axes, names: Sequence[str]) -> None:
    """Name the rows of a horizontal bar chart, first at the top. Set as limits, not by `invert_yaxis` (a
    toggle), so panels sharing the axis can each call it."""
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.grid(axis="y", visible=False)


def png(fig: Figure) -> bytes:
    """Render on an Agg canvas (no pyplot: nothing global to close) to PNG bytes without a timestamp."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def bars_height(n: int) -> float:
    """Inches for a horizontal bar chart of `n` rows."""
    return min(1.4 + 0.32 * n, 16.0)


def legend_below(ax: Axes) -> None:
    """The legend under the plot, outside it: bars that fill the width leave no room inside."""
    handles, labels = ax.get_legend_handles_labels()
    ax.figure.legend(handles, labels, loc="outside lower center", ncols=len(labels))


def reference_line(ax: Axes, x: float, text: str) -> None:
    ax.axvline(x, color="#444444", linestyle="--", linewidth=0.8)
    ax.text(x, 1.0, f" {text}", transform=ax.get_xaxis_transform(), va="bottom", fontsize=7, color="#444444")


def group_by(
    rows: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable], value: Callable[[dict[str, Any]], Any]
) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(value(r))
    return dict(out)


def overlaid_histograms(ax: Axes, groups: dict[str, list[float]], xlabel: str, ylabel: str) -> None:
    """Step-filled histograms on shared bins; the largest groups only, so the panel stays legible."""
    biggest = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:MAX_GROUPS]
    values = [v for _, vs in biggest for v in vs]
    lo, hi = min(values), max(values)
    if lo == hi:  # every value equal: one visible bin around it
        lo, hi = lo - 0.5, hi + 0.5
    bins = [lo + (hi - lo) * i / 20 for i in range(21)]
    for i, (name, vs) in enumerate(biggest):
        color = COLORS[i % len(COLORS)]
        ax.hist(vs, bins=bins, histtype="stepfilled", alpha=0.35, color=color, label=short(name))
        ax.hist(vs, bins=bins, histtype="step", color=color)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()


def grouped_bars(ax: Axes, names: list[str], series: dict[str, list[float | None]], legend: bool = True) -> None:
    """Horizontal bars, one group per name (top to bottom), one bar per series; None draws no bar."""
    k = len(series)
    height = 0.8 / k
    for i, (name, values) in enumerate(series.items()):
        ys = [n + (i - (k - 1) / 2) * height for n in range(len(names))]
        xs = [math.nan if v is None else v for v in values]
        ax.barh(ys, xs, height=height, color=COLORS[i % len(COLORS)], label=name)
    rows_top_down(ax, names)
    if legend:
        ax.legend(loc="best")


def heatmap(raters: list[str], cells: dict[tuple[int, int], tuple[int, int]], title: str) -> Figure:
    """Agreement (%) between every two raters, each cell annotated with its rate and n; the diagonal blank."""
    n = len(raters)
    size = min(2.4 + 0.7 * n, 12.0)
    fig, (ax,) = new_figure(size * 0.8, width=size + 2.5)
    grid = [[math.nan] * n for _ in range(n)]
    for (i, j), (same, total) in cells.items():
        if i != j and total:
            grid[i][j] = 100 * same / total
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for (i, j), (_, total) in cells.items():
        if i != j and total:
            value = grid[i][j]
            ax.text(j, i, f"{value:.0f}%\nn={total}", ha="center", va="center", fontsize=7,
                    color="white" if value < 60 else "black")  # fmt: skip
    names = [short(r, 32) for r in raters]
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    ax.grid(False)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="same verdict (%)", shrink=0.8)
    return fig


def stacked(ax: Axes, names: list[str], series: dict[str, list[float]]) -> None:
    """Horizontal stacked bars, top to bottom in the order of `names`."""
    left = [0.0] * len(names)
    for i, (name, values) in enumerate(series.items()):
        ax.barh(range(len(names)), values, left=left, color=COLORS[i % len(COLORS)], label=name)
        left = [a + b for a, b in zip(left, values, strict=True)]
    rows_top_down(ax, names)
    ax.legend(loc="best")
