"""The report page's sections about the builds: overview, score distribution, chosen vs rejected length, calls,
tokens, time and cost per stage and run, and the held-out win rates.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import timezone
from typing import Any

from factory.report.data import (
    MARGINS_SQL,
    PAIR_LENGTHS_SQL,
    POLICIES_SQL,
    RUNS_SQL,
    SCORE_LENGTHS_SQL,
    SCORES_SQL,
    WIN_RATES_SQL,
    Data,
    mean,
    pct,
    pearson,
)
from factory.report.html import esc, label, short
from factory.report.plots import (
    bars_height,
    group_by,
    grouped_bars,
    legend_below,
    new_figure,
    overlaid_histograms,
    reference_line,
    rows_top_down,
    stacked,
)
from factory.report.section import Section, empty
from factory.report.style import COLORS, MAX_GROUPS, RUNS_LISTED, RUNS_PLOTTED, STAGE_MIN_SECONDS, WIDTH


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
    policies = d.rows(POLICIES_SQL)
    s.table(
        ["recipe", "policy or import source", "samples", "chosen", "rejected", "mean score", "mean length"],
        [
            [p["recipe"], p["policy"], p["samples"], p["chosen"], p["rejected"], p["mean_score"], p["mean_length"]]
            for p in policies
        ],
        caption="per policy: how often its sample is chosen and rejected, its mean score and length (characters)",
    )
    if len(groups) > MAX_GROUPS:
        s.note(
            f"The histograms show the {MAX_GROUPS} largest of {len(groups)} recipe · labeler groups; the table has all."
        )
    return s


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
