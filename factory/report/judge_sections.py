"""The report page's sections about the judges: position bias and consistency, agreement between judges,
protocols and references, parse failures, and judge-eval's Table 1.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from factory.judge_eval.tables import BIAS_COLUMNS, shown
from factory.labelers.judge import position_consistency
from factory.report.data import EVAL_JUDGMENTS_SQL, JUDGMENTS_SQL, PARSE_SQL, UNPARSED_EXAMPLES_SQL, Data, pct
from factory.report.html import fmt, label, short
from factory.report.plots import (
    bars_height,
    group_by,
    grouped_bars,
    heatmap,
    legend_below,
    new_figure,
    reference_line,
    rows_top_down,
)
from factory.report.section import Section, empty
from factory.report.style import COLORS, MAX_RATERS, STATUS_COLORS

if TYPE_CHECKING:
    from factory.judge_eval.tables import Report as EvalReport


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
        s.table(
            BIAS_COLUMNS,
            [[shown(c, b.get(c)) for c in BIAS_COLUMNS] for b in report.bias],
            "position vs letter bias (%)",
        )
    return s
