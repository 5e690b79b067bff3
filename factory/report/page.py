"""`factory report`: one self-contained HTML page of plots and tables about everything in a warehouse.

Sections: score distribution, chosen vs rejected length, position bias and consistency, agreement between
judges, protocols and references, parse failures, calls, tokens, time and cost per stage and run, the
judge-eval Table 1 and the held-out win rates. Each is shown only when its data exists; otherwise one line
says what is missing and which command writes it.

Every number comes from `Warehouse.query` (read-only SQL over the views), and the judge-eval figures from
`evalstats`, so the page says what `factory sql` and `factory judge-eval` say. The page needs nothing
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

import base64
import html
import io
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.core.errors import UserInputError
from factory.core.files import atomic_write_bytes
from factory.core.owned import check_output_file, head
from factory.labelers.judge import position_consistency
from factory.warehouse.store import Warehouse

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from factory.judge_eval.metrics import Report as EvalReport

DPI = 150  # PNG pixels per inch; the page shows each figure at 96 CSS px per inch, so it stays sharp on HiDPI
CSS_PER_INCH = 96
WIDTH = 10.0  # inches: 960 CSS px, the page's text width
MAX_LABEL = 46  # characters of a label in a figure before it is cut with …
MAX_GROUPS = 10  # histograms overlaid in one panel
MAX_RATERS = 12  # rows and columns of an agreement heatmap
RUNS_LISTED = 30  # rows of the runs table
RUNS_PLOTTED = 6  # runs whose stages are drawn
STAGE_MIN_SECONDS = 0.5  # stages without model calls are drawn only when they took at least this long
EXAMPLES = 5  # unparsed answers quoted
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974")
GENERATOR_META = '<meta name="generator" content="factory report">'
"""Written in every page's head: how `factory report` recognises a page it may replace."""
STATUS_COLORS = {"ok": "#55A868", "no_match": "#DD8452", "invalid_marker": "#C44E52", "error": "#8C8C8C"}
STYLE = {
    "text.parse_math": False,  # data text is never math: `$` is a dollar sign, not a formula delimiter
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
}

# ---------------------------------------------------------------------------------------------------- SQL
# Read through `Warehouse.query`, so the report sees exactly the views `factory sql` sees.
RUNS_SQL = """
SELECT run_id, recipe, status, started_at, seconds, model_calls, cached_calls, failed_calls, tokens_in,
       tokens_out, retries, cost_usd, stages
FROM runs ORDER BY started_at DESC NULLS LAST, run_id DESC
"""
SCORES_SQL = "SELECT recipe, labeler, score FROM scores WHERE score IS NOT NULL"
MARGINS_SQL = "SELECT recipe, margin FROM pairs WHERE margin IS NOT NULL"
PAIR_LENGTHS_SQL = """
SELECT p.recipe, length(c.text) AS chosen_len, length(r.text) AS rejected_len
FROM pairs p
JOIN samples c ON c.recipe = p.recipe AND c.sample_id = p.chosen_sample_id
JOIN samples r ON r.recipe = p.recipe AND r.sample_id = p.rejected_sample_id
WHERE c.text IS NOT NULL AND r.text IS NOT NULL
"""
SCORE_LENGTHS_SQL = """
SELECT s.recipe, s.labeler, s.score, length(x.text) AS len
FROM scores s JOIN samples x ON x.recipe = s.recipe AND x.sample_id = s.sample_id
WHERE s.score IS NOT NULL AND x.text IS NOT NULL
"""
JUDGMENTS_SQL = """
SELECT recipe, judge, protocol, reference_name, prompt_id, sample_a, sample_b, "order", verdict, p_a, parse_status
FROM judgments
"""
EVAL_JUDGMENTS_SQL = "SELECT * FROM eval_judgments"
PARSE_SQL = """
SELECT 'build' AS source, judge, protocol, coalesce(parse_status, 'null') AS status, count(*) AS n
FROM judgments GROUP BY judge, protocol, status
UNION ALL
SELECT 'judge-eval', judge, protocol, coalesce(parse_status, 'null'), count(*)
FROM eval_judgments GROUP BY judge, protocol, parse_status
UNION ALL
SELECT 'eval', judge, protocol, coalesce(parse_status, 'null'), count(*)
FROM eval GROUP BY judge, protocol, parse_status
ORDER BY 1, 2, 3, 4
"""
# One answer per source × judge × protocol × status, so the examples show the different ways of failing.
UNPARSED_EXAMPLES_SQL = f"""
SELECT source, judge, protocol, status, raw_output FROM (
    SELECT 'build' AS source, judge, protocol, parse_status AS status, raw_output, request_key FROM judgments
    UNION ALL SELECT 'judge-eval', judge, protocol, parse_status, raw_output, request_key FROM eval_judgments
    UNION ALL SELECT 'eval', judge, protocol, parse_status, raw_output, request_key FROM eval
) WHERE status IS DISTINCT FROM 'ok'
QUALIFY row_number() OVER (PARTITION BY source, judge, protocol, status ORDER BY request_key) = 1
ORDER BY source, judge, protocol, status LIMIT {EXAMPLES}
"""
WIN_RATES_SQL = "SELECT * FROM eval_results ORDER BY recipe, contender, baseline, judge, protocol"
RUN_COUNT_SQL = "SELECT count(*) AS n FROM runs"


# ------------------------------------------------------------------------------------------------ helpers
def esc(value: Any) -> str:
    """Text from the data as HTML text (None is empty): never trusted, always escaped."""
    return "" if value is None else html.escape(str(value), quote=True)


def short(text: Any, limit: int = MAX_LABEL) -> str:
    """A label that fits a figure's axis: one line, cut with … past `limit` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


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


def pct(part: float, whole: float) -> float | None:
    """`part` of `whole` in percent; None when the whole is empty."""
    return 100.0 * part / whole if whole else None


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r; None with fewer than three points or no spread."""
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


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


# ---------------------------------------------------------------------------------------------- figures
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


# ---------------------------------------------------------------------------------------------- sections
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


class Data:
    """The warehouse's rows, each query run once (several sections read the same rows)."""

    def __init__(self, wh: Warehouse) -> None:
        self.wh = wh
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._eval_report: EvalReport | None = None

    def rows(self, sql: str) -> list[dict[str, Any]]:
        if sql not in self._rows:
            self._rows[sql] = self.wh.query(sql).to_pylist()
        return self._rows[sql]

    def eval_report(self) -> EvalReport | None:
        """judge-eval's metrics over every stored eval judgment, with its default rules (1000 resamples,
        seed 0, unparsed verdicts get a random winner), so the numbers match a default `factory judge-eval`."""
        rows = self.rows(EVAL_JUDGMENTS_SQL)
        if rows and self._eval_report is None:
            from factory.judge_eval.metrics import build_report

            self._eval_report = build_report(rows)
        return self._eval_report


# ------------------------------------------------------------------------------------------------ overview
def overview(d: Data) -> Section:
    s = Section("overview", "Overview")
    counts = {t: n for t, n in d.wh.row_counts().items() if n}
    runs = d.rows(RUNS_SQL)
    status = Counter(r["status"] for r in runs)
    s.text(f"{len(runs)} run(s): " + ", ".join(f"{n} {k}" for k, n in sorted(status.items(), key=str)))
    items = "".join(f"<li><b>{n:,}</b> {esc(t)}</li>" for t, n in sorted(counts.items()))
    s.parts.append(f'<ul class="counts">{items}</ul>')
    s.note("Rows per table in the current views (`factory ls`); every table can be queried with `factory sql`.")
    return s


# -------------------------------------------------------------------------------------------------- scores
def scores(d: Data) -> Section:
    key, title = "scores", "Score distribution"
    rows = d.rows(SCORES_SQL)
    if not rows:
        return empty(key, title, "No scores yet: a build whose recipe has `samples` and a labeler writes them.")
    margins = d.rows(MARGINS_SQL)
    groups = group_by(rows, lambda r: (r["recipe"], r["labeler"]), lambda r: r["score"])
    s = Section(key, title)
    fig, axes = new_figure(3.4, 2 if margins else 1)
    overlaid_histograms(axes[0], {label(*k): v for k, v in groups.items()}, "score", "samples")
    axes[0].set_title("sample scores by recipe · labeler")
    if margins:
        by_recipe = group_by(margins, lambda r: r["recipe"], lambda r: r["margin"])
        overlaid_histograms(axes[1], by_recipe, "margin (chosen − rejected score)", "pairs")
        axes[1].set_title("pair margins by recipe")
    s.figure(fig, "histograms of sample scores and pair margins")
    margin_of = group_by(margins, lambda r: r["recipe"], lambda r: r["margin"])
    table = []
    for (recipe, labeler), values in groups.items():
        m = margin_of.get(recipe, [])
        table.append([recipe, labeler, len(values), mean(values), min(values), max(values), len(m), mean(m)])
    s.table(["recipe", "labeler", "samples", "mean", "min", "max", "pairs", "mean margin"], table)
    if len(groups) > MAX_GROUPS:
        s.note(
            f"The histograms show the {MAX_GROUPS} largest of {len(groups)} recipe · labeler groups; the table has all."
        )
    return s


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


# -------------------------------------------------------------------------------------------- length bias
def length_bias(d: Data) -> Section:
    key, title = "length", "Chosen vs rejected length (length bias)"
    pairs = d.rows(PAIR_LENGTHS_SQL)
    if not pairs:
        return empty(key, title, "No preference pairs with sample texts yet: a build with `samples` writes them.")
    scored = d.rows(SCORE_LENGTHS_SQL)
    s = Section(key, title)
    fig, axes = new_figure(3.8, 2)
    by_recipe = group_by(pairs, lambda r: r["recipe"], lambda r: (r["rejected_len"], r["chosen_len"]))
    top = max(max(p["chosen_len"], p["rejected_len"]) for p in pairs) or 1
    for i, (recipe, points) in enumerate(by_recipe.items()):
        xs, ys = zip(*points, strict=True)
        axes[0].scatter(xs, ys, s=14, alpha=0.7, color=COLORS[i % len(COLORS)], label=short(recipe))
    axes[0].plot([0, top], [0, top], color="#444444", linestyle="--", linewidth=0.8, label="equal length")
    axes[0].set(xlabel="rejected sample (characters)", ylabel="chosen sample (characters)")
    axes[0].set_title("one dot per pair: above the line, the longer one was chosen")
    axes[0].legend()
    by_scores = group_by(scored, lambda r: (r["recipe"], r["labeler"]), lambda r: (r["len"], r["score"]))
    for i, (name, points) in enumerate(by_scores.items()):
        xs, ys = zip(*points, strict=True)
        axes[1].scatter(xs, ys, s=10, alpha=0.6, color=COLORS[i % len(COLORS)], label=short(label(*name)))
    axes[1].set(xlabel="sample length (characters)", ylabel="score")
    axes[1].set_title("score vs length, every scored sample")
    if by_scores:
        axes[1].legend()
    s.figure(fig, "scatter plots of chosen vs rejected length and of score vs length")
    r_of = {k: pearson([x for x, _ in v], [y for _, y in v]) for k, v in by_scores.items()}
    table = []
    for recipe, points in by_recipe.items():
        longer = sum(c > r for r, c in points)
        rs = [r for (rec, _), r in r_of.items() if rec == recipe and r is not None]
        table.append(
            [
                recipe,
                len(points),
                mean([c for _, c in points]),
                mean([r for r, _ in points]),
                pct(longer, len(points)),
                rs[0] if len(rs) == 1 else None,
            ]
        )
    s.table(
        ["recipe", "pairs", "mean chosen chars", "mean rejected chars", "chosen longer (%)", "r(score, length)"], table
    )
    s.note("A chosen share far above 50 % or a strongly positive r says the labeler rewards length as such.")
    return s


# --------------------------------------------------------------------------------------------- position
@dataclass
class PositionRow:
    """Position bias of one judge × protocol (× data set for judge-eval), in percent."""

    source: str
    name: str
    judgments: int
    first: float | None  # parsed verdicts that chose the output shown first
    consistent: float | None  # pairs (cases) with the same winner in both orders
    pairs: int
    mean_p_a: float | None = None


def build_position(rows: list[dict[str, Any]]) -> list[PositionRow]:
    """Per judge × protocol over the build judgments; consistency is counted recipe by recipe (a recipe's
    pair of orders is one comparison) and pooled."""
    out = []
    for (judge, protocol), group in group_by(rows, lambda r: (r["judge"], r["protocol"]), lambda r: r).items():
        parsed = [r for r in group if r["parse_status"] == "ok" and r["verdict"] in ("a", "b")]
        consistent = n_pairs = 0.0
        for recipe_rows in group_by(group, lambda r: r["recipe"], lambda r: r).values():
            rate, n = position_consistency(recipe_rows)
            consistent += (rate or 0.0) * n
            n_pairs += n
        ps = [r["p_a"] for r in group if r["p_a"] is not None]
        out.append(
            PositionRow(
                "build",
                label(judge, protocol),
                len(group),
                pct(sum(r["verdict"] == "a" for r in parsed), len(parsed)),
                pct(consistent, n_pairs),
                int(n_pairs),
                None if not ps else 100 * sum(ps) / len(ps),
            )
        )
    return out


def eval_position(report: EvalReport | None) -> list[PositionRow]:
    """Per judge-eval variant, from the metrics judge-eval itself reports."""
    if report is None:
        return []
    out = []
    for m in report.metrics:
        first, consistent = m["first_position_rate"], m["consistency"]
        out.append(
            PositionRow(
                "judge-eval",
                label(m["judge"], m["protocol"], m["dataset"]),
                m["judgments"],
                None if first is None else 100 * first,
                None if consistent is None else 100 * consistent,
                m["cases"],
            )
        )
    return out


def position(d: Data) -> Section:
    key, title = "position", "Position bias and consistency"
    rows = build_position(d.rows(JUDGMENTS_SQL)) + eval_position(d.eval_report())
    if not rows:
        return empty(key, title, "No judgments yet: a build with `judgments:` or `factory judge-eval` writes them.")
    s = Section(key, title)
    fig, axes = new_figure(bars_height(len(rows)))
    names = [short(f"{r.name} ({r.source})") for r in rows]
    grouped_bars(
        axes[0],
        names,
        {
            "chose the output shown first": [r.first for r in rows],
            "same winner in both orders": [r.consistent for r in rows],
        },
        legend=False,
    )
    legend_below(axes[0])
    reference_line(axes[0], 50, "50 %: no position preference")
    axes[0].set(xlim=(0, 100), xlabel="%")
    s.figure(fig, "bar chart of first-position rate and order consistency per judge and protocol")
    s.table(
        [
            "source",
            "judge · protocol",
            "judgments",
            "chose first (%)",
            "consistent (%)",
            "pairs or cases",
            "mean p(a) (%)",
        ],
        [[r.source, r.name, r.judgments, r.first, r.consistent, r.pairs, r.mean_p_a] for r in rows],
        digits=1,
    )
    s.note(
        "An unbiased judge chooses the first-shown output half the time over both orders and names the same "
        "winner in both orders; unparsed verdicts count in neither rate. For judge-eval, the rows are "
        "judge-eval's own `first pos.` and `consistent` metrics per variant and data set."
    )
    return s


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


# -------------------------------------------------------------------------------------------- agreement
Rater = tuple[Any, ...]


def agreement_matrix(
    rows: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable], rater: Callable[[dict[str, Any]], Rater]
) -> tuple[list[Rater], dict[tuple[int, int], tuple[int, int]]]:
    """Raters (the largest MAX_RATERS) and, per pair of them, (same verdicts, judgments both made).

    As in judge-eval's judge agreement, a judgment that either rater left unparsed counts as a disagreement,
    so a rater that often fails to parse agrees less. A rater seen twice on one key (the same judge in two
    recipes) keeps its first verdict: both are the same cached call.
    """
    verdicts: dict[Rater, dict[Hashable, str | None]] = defaultdict(dict)
    for r in rows:
        verdict = r["verdict"] if r["parse_status"] == "ok" and r["verdict"] in ("a", "b") else None
        verdicts[rater(r)].setdefault(key(r), verdict)
    raters = sorted(verdicts, key=lambda x: (-len(verdicts[x]), str(x)))[:MAX_RATERS]
    cells = {}
    for i, x in enumerate(raters):
        for j, y in enumerate(raters):
            common = verdicts[x].keys() & verdicts[y].keys()
            same = sum(1 for k in common if verdicts[x][k] is not None and verdicts[x][k] == verdicts[y][k])
            cells[(i, j)] = (same, len(common))
    return raters, cells


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


def agreement(d: Data) -> Section:
    key, title = "agreement", "Agreement between judges, protocols and references"
    sources = [
        (
            "build judgments",
            "the same ordered pair of samples",
            d.rows(JUDGMENTS_SQL),
            lambda r: (r["prompt_id"], r["sample_a"], r["sample_b"]),
        ),
        (
            "judge-eval",
            "the same case in the same order",
            d.rows(EVAL_JUDGMENTS_SQL),
            lambda r: (r["dataset"], r["case_id"], r["order"]),
        ),
    ]
    s = Section(key, title)
    for name, unit, rows, keyed in sources:
        if not rows:
            continue
        raters, cells = agreement_matrix(rows, keyed, lambda r: (r["judge"], r["protocol"], r["reference_name"]))
        if len(raters) < 2:
            s.note(f"{name}: one judge × protocol × reference only; nothing to compare.")
            continue
        names = [label(j, p, ref or "no reference") for j, p, ref in raters]
        s.figure(heatmap(names, cells, name), f"heatmap of verdict agreement in {name}")
        table = [
            [names[i], names[j], total, pct(same, total)]
            for (i, j), (same, total) in sorted(cells.items())
            if i < j and total
        ]
        s.table(
            ["judge · protocol · reference", "vs", "judgments", "same verdict (%)"],
            table,
            caption=f"{name}: verdicts on {unit}",
            digits=1,
        )
    if not s.plots:
        return empty(
            key,
            title,
            "Nothing to compare: every set of judgments has one judge × protocol × reference. Judge with several "
            "references (`judgments.reference: [a, b]`), or run `factory judge-eval` with several --judge or "
            "--protocol.",
        )
    s.note("A judgment that either side left unparsed counts as a disagreement (as in judge-eval).")
    return s


# ---------------------------------------------------------------------------------------- parse failures
def parse_failures(d: Data) -> Section:
    key, title = "parsing", "Parse failures"
    rows = d.rows(PARSE_SQL)
    if not rows:
        return empty(key, title, "No judgments yet: builds, `factory judge-eval` and `factory eval` write them.")
    counts: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for r in rows:
        counts[(r["source"], r["judge"], r["protocol"])][r["status"]] += r["n"]
    statuses = sorted({r["status"] for r in rows}, key=lambda x: (x != "ok", x))
    groups = list(counts)
    s = Section(key, title)
    total = sum(r["n"] for r in rows)
    failed = sum(r["n"] for r in rows if r["status"] != "ok")
    s.text(f"{failed:,} of {total:,} judgments have no verdict ({fmt(pct(failed, total), 1)} %).")
    fig, (ax,) = new_figure(bars_height(len(groups)))
    left = [0.0] * len(groups)
    for i, status in enumerate(statuses):
        shares = [pct(counts[g][status], sum(counts[g].values())) or 0.0 for g in groups]
        color = STATUS_COLORS.get(status, COLORS[(i + 4) % len(COLORS)])
        ax.barh(range(len(groups)), shares, left=left, color=color, label=short(status, 24))
        left = [a + b for a, b in zip(left, shares, strict=True)]
    rows_top_down(ax, [short(f"{label(j, p)} ({src})") for src, j, p in groups])
    ax.set(xlim=(0, 100), xlabel="share of judgments (%)")
    legend_below(ax)
    s.figure(fig, "stacked bars of parse status shares per judge and protocol")
    table = [
        [
            src,
            judge,
            protocol,
            sum(c.values()),
            *(c[x] for x in statuses),
            pct(sum(c.values()) - c["ok"], sum(c.values())),
        ]
        for (src, judge, protocol), c in counts.items()
    ]
    s.table(["source", "judge", "protocol", "judgments", *statuses, "no verdict (%)"], table, digits=1)
    examples = d.rows(UNPARSED_EXAMPLES_SQL)
    if examples:
        s.table(
            ["source", "judge", "protocol", "parse_status", "answer (first 200 characters)"],
            [
                [e["source"], e["judge"], e["protocol"], e["status"], short(e["raw_output"] or "", 200)]
                for e in examples
            ],
            caption="some answers without a verdict",
        )
    return s


# ------------------------------------------------------------------------------------------------- costs
def stage_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stages worth drawing of the latest RUNS_PLOTTED runs, oldest run first."""
    out = []
    for run in reversed(runs[:RUNS_PLOTTED]):
        seen: Counter[str] = Counter()
        for st in run["stages"] or []:
            # A stage name can repeat within a run (judge-eval names its units by data set and protocol, not
            # by judge): number the repeats so every bar has its own label.
            seen[st["stage"]] += 1
            calls = (st["model_calls"] or 0) + (st["cached_calls"] or 0) + (st["failed_calls"] or 0)
            if calls or (st["seconds"] or 0) >= STAGE_MIN_SECONDS:
                repeat = f" #{seen[st['stage']]}" if seen[st["stage"]] > 1 else ""
                out.append({**st, "name": f"{run['recipe']} / {st['stage']}{repeat} ({run['run_id'][-6:]})"})
    return out


def costs(d: Data) -> Section:
    key, title = "costs", "Calls, tokens, time and cost per stage and run"
    runs = d.rows(RUNS_SQL)
    s = Section(key, title)
    stages = stage_rows(runs)
    if stages:
        priced = any(st["cost_usd"] is not None for st in stages)
        fig, axes = new_figure(bars_height(len(stages)), 4 if priced else 3, width=WIDTH + 2, sharey=True)
        names = [short(st["name"], 56) for st in stages]
        stacked(axes[0], names, {k: [st[f"{k}_calls"] or 0 for st in stages] for k in ("model", "cached", "failed")})
        axes[0].set_title("calls (model = new)")
        grouped_bars(
            axes[1], names, {"in": [st["tokens_in"] for st in stages], "out": [st["tokens_out"] for st in stages]}
        )
        axes[1].set_title("tokens")
        axes[2].barh(range(len(stages)), [st["seconds"] or 0 for st in stages], color=COLORS[2])
        axes[2].set_title("seconds")
        if priced:
            axes[3].barh(range(len(stages)), [st["cost_usd"] or 0 for st in stages], color=COLORS[3])
            axes[3].set_title("cost (USD)")
        for ax in axes:
            rows_top_down(ax, names)
        s.figure(fig, "bar charts of calls, tokens and seconds per stage of the latest runs")
        s.note(
            f"The latest {min(len(runs), RUNS_PLOTTED)} run(s); stages without model calls that took under "
            f"{STAGE_MIN_SECONDS} s are left out." + ("" if priced else " No call had a known price, so no cost.")
        )
    columns = ["run", "recipe", "status", "started (UTC)", "seconds", "model calls", "cached", "failed"]
    columns += ["tokens in", "tokens out", "retries", "cost (USD)"]
    table = [
        [
            r["run_id"],
            r["recipe"],
            r["status"],
            r["started_at"].astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M") if r["started_at"] else None,
            r["seconds"],
            r["model_calls"],
            r["cached_calls"],
            r["failed_calls"],
            r["tokens_in"],
            r["tokens_out"],
            r["retries"],
            r["cost_usd"],
        ]
        for r in runs[:RUNS_LISTED]
    ]
    s.table(columns, table, caption=f"runs, newest first ({min(len(runs), RUNS_LISTED)} of {len(runs)})")
    return s


def stacked(ax: Axes, names: list[str], series: dict[str, list[float]]) -> None:
    """Horizontal stacked bars, top to bottom in the order of `names`."""
    left = [0.0] * len(names)
    for i, (name, values) in enumerate(series.items()):
        ax.barh(range(len(names)), values, left=left, color=COLORS[i % len(COLORS)], label=name)
        left = [a + b for a, b in zip(left, values, strict=True)]
    rows_top_down(ax, names)
    ax.legend(loc="best")


# -------------------------------------------------------------------------------------------- judge-eval
def judge_eval(d: Data) -> Section:
    key, title = "judge-eval", "Judge meta-evaluation (Table 1)"
    report = d.eval_report()
    if report is None:
        return empty(key, title, "No judge-eval judgments: `factory judge-eval --data FILE` writes them.")
    s = Section(key, title)
    s.table(report.table1_columns, [[r.get(c) for c in report.table1_columns] for r in report.table1], digits=1)
    s.note(report.caption.replace("`", ""))
    metrics = report.metrics
    fig, (ax,) = new_figure(bars_height(len(metrics)))
    names = [short(label(m["judge"], m["protocol"], m["dataset"])) for m in metrics]
    acc = [100 * (m["accuracy"] or 0) for m in metrics]
    low = [a - 100 * m["ci_low"] if m["ci_low"] is not None else 0 for a, m in zip(acc, metrics, strict=True)]
    high = [100 * m["ci_high"] - a if m["ci_high"] is not None else 0 for a, m in zip(acc, metrics, strict=True)]
    ax.barh(range(len(metrics)), acc, xerr=[low, high], color=COLORS[0], capsize=3)
    rows_top_down(ax, names)
    reference_line(ax, 50, "50 %: chance")
    ax.set(xlim=(0, 100), xlabel="accuracy (%), both orders, with 95 % bootstrap interval")
    s.figure(fig, "bar chart of judge accuracy per judge, protocol and data set")
    if report.bias:
        from factory.judge_eval.metrics import BIAS_COLUMNS, shown

        s.table(
            BIAS_COLUMNS,
            [[shown(c, b.get(c)) for c in BIAS_COLUMNS] for b in report.bias],
            "position vs letter bias (%)",
        )
    return s


# --------------------------------------------------------------------------------------------- win rates
def win_rates(d: Data) -> Section:
    key, title = "win-rates", "Held-out win rates"
    rows = d.rows(WIN_RATES_SQL)
    if not rows:
        return empty(key, title, "No win rates: `factory eval RECIPE` or a recipe's `eval:` section writes them.")
    s = Section(key, title)
    names = [short(f"{r['contender']} vs {r['baseline']} ({label(r['judge'], r['protocol'])})", 56) for r in rows]
    fig, (ax,) = new_figure(bars_height(2 * len(rows)))
    for i, (name, prefix) in enumerate((("win rate", "win_rate"), ("length-controlled", "lc_win_rate"))):
        ys = [n + (i - 0.5) * 0.4 for n in range(len(rows))]
        xs = [r[prefix] if r[prefix] is not None else math.nan for r in rows]
        err = [
            [x - r[f"{prefix}_low"] if r[f"{prefix}_low"] is not None else 0 for x, r in zip(xs, rows, strict=True)],
            [r[f"{prefix}_high"] - x if r[f"{prefix}_high"] is not None else 0 for x, r in zip(xs, rows, strict=True)],
        ]
        ax.barh(ys, xs, height=0.4, xerr=err, capsize=3, color=COLORS[i], label=name)
    rows_top_down(ax, names)
    reference_line(ax, 50, "50 %: as good as the baseline")
    ax.set(xlim=(0, 100), xlabel="% of held-out prompts, 95 % bootstrap interval")
    legend_below(ax)
    s.figure(fig, "bar chart of win rates and length-controlled win rates per policy")
    columns = ["recipe", "policy", "baseline", "judge", "protocol", "prompts", "scored", "unparsed", "win rate (%)"]
    columns += ["95 % CI", "LC win rate (%)", "95 % CI", "W/L/T", "avg chars policy", "avg chars baseline"]
    table = [
        [
            r["recipe"],
            r["contender"],
            r["baseline"],
            r["judge"],
            r["protocol"],
            r["prompts"],
            r["scored"],
            r["unparsed_judgments"],
            r["win_rate"],
            interval(r["win_rate_low"], r["win_rate_high"]),
            r["lc_win_rate"],
            interval(r["lc_win_rate_low"], r["lc_win_rate_high"]),
            f"{r['wins']}/{r['losses']}/{r['ties']}",
            r["avg_len_policy"],
            r["avg_len_baseline"],
        ]
        for r in rows
    ]
    s.table(columns, table, digits=1)
    return s


def interval(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f"{low:.1f}–{high:.1f}"


# -------------------------------------------------------------------------------------------------- page
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
