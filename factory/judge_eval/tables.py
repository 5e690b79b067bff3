"""Judge-eval's tables: Table 1's layout, the metric and bias columns, values as shown, CSV and Markdown, and
the `Report` that holds them all with the files it writes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from factory.judge_eval.metrics import agreement, bias, metrics
from factory.judge_eval.variants import Unparsed, variants

AVERAGE = "Avg."
UNPARSED_COLUMN = "unparsed"
"""Table 1's last column: the parse-failure rate (%), averaged like the accuracies."""


def table1(metric_rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The paper's Table 1 layout: one row per judge × protocol, data sets as columns, the average last.

    Cells are accuracy in percent; the average is the unweighted mean over the data sets a row has. When the
    metrics carry parse-failure rates, the column `unparsed` follows: their mean over the same data sets, in
    percent (accuracy is never shown without it). With several judges, rows `mean over judges` follow.
    Returns (columns, rows).
    """
    datasets = list(dict.fromkeys(m["dataset"] for m in metric_rows))
    judges = list(dict.fromkeys(m["judge"] for m in metric_rows))
    protocols = list(dict.fromkeys(m["protocol"] for m in metric_rows))
    acc = {(m["judge"], m["protocol"], m["dataset"]): m["accuracy"] for m in metric_rows}
    with_failures = any("parse_failure_rate" in m for m in metric_rows)
    fails = {(m["judge"], m["protocol"], m["dataset"]): m.get("parse_failure_rate") for m in metric_rows}
    columns = ["judge", "protocol", *datasets, AVERAGE] + ([UNPARSED_COLUMN] if with_failures else [])
    rows = []

    def pct(x: float | None) -> float | None:
        return None if x is None else round(100 * x, 1)

    def row(judge: str, protocol: str, values: dict[str, float | None], failed: list[float]) -> dict[str, Any]:
        present = [x for x in values.values() if x is not None]
        avg = sum(present) / len(present) if present else None
        out = {"judge": judge, "protocol": protocol, **{d: pct(values.get(d)) for d in datasets}, AVERAGE: pct(avg)}
        if with_failures:
            out[UNPARSED_COLUMN] = pct(sum(failed) / len(failed)) if failed else None
        return out

    def failures(keys: list[tuple[str, str, str]]) -> list[float]:
        return [f for k in keys if (f := fails.get(k)) is not None]

    for judge in judges:
        for protocol in protocols:
            values = {d: acc.get((judge, protocol, d)) for d in datasets}
            if any(x is not None for x in values.values()):
                rows.append(row(judge, protocol, values, failures([(judge, protocol, d) for d in datasets])))
    if len(judges) > 1:
        for protocol in protocols:
            values: dict[str, float | None] = {}
            for d in datasets:
                xs = [acc[(j, protocol, d)] for j in judges if acc.get((j, protocol, d)) is not None]
                values[d] = sum(xs) / len(xs) if xs else None
            keys = [(j, protocol, d) for j in judges for d in datasets]
            rows.append(row("mean over judges", protocol, values, failures(keys)))
    return columns, rows


PERCENT = (
    "accuracy",
    "ci_low",
    "ci_high",
    "acc_forward",
    "acc_swapped",
    "acc_soft",
    "acc_soft_exact",
    "consistency",
    "first_position_rate",
    "parse_failure_rate",
    "agreement",
    "position_first_rate",
    "letter_a_rate",
)
"""Metrics stored as fractions and shown as percentages."""

METRIC_COLUMNS = (
    "dataset",
    "judge",
    "protocol",
    "cases",
    "accuracy",
    "ci_low",
    "ci_high",
    "parse_failure_rate",
    "acc_forward",
    "acc_swapped",
    "acc_soft",
    "acc_soft_exact",
    "soft_unscored",
    "consistency",
    "first_position_rate",
    "call_errors",
    "len_preferred",
    "len_other",
    "len_human_preferred",
    "len_human_other",
    "judgments",
    "tokens_in",
    "tokens_out",
    "unparsed",
    "swap",
    "prefill",
    "markers",
    "top_logprobs",
)
BIAS_COLUMNS = ("dataset", "judge", "protocol", "cases", "position_first_rate", "letter_a_rate", "first_position_rate")


def shown(column: str, value: Any) -> str:
    """A value as the report shows it: rates in percent (1 decimal), lengths rounded, counts as is."""
    if value is None:
        return ""
    if column in PERCENT:
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _cell(value: Any) -> str:
    return "" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))


def to_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """Rows as CSV text (floats at full precision; missing values empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
    return buf.getvalue()


def to_markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]], percent: bool = False) -> str:
    """Rows as a GitHub Markdown table; with `percent`, rate columns are shown as percentages."""

    def cell(column: str, value: Any) -> str:
        text = shown(column, value) if percent else _cell(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class Report:
    """Everything judge-eval reports about a set of eval rows."""

    metrics: list[dict[str, Any]]
    table1_columns: list[str]
    table1: list[dict[str, Any]]
    agreement: list[dict[str, Any]]
    bias: list[dict[str, Any]] = field(default_factory=list)
    rule: Unparsed = field(default_factory=Unparsed)
    preset: str | None = None
    """The judge-eval preset the judgments were made and read with (None: the options one by one)."""

    @property
    def caption(self) -> str:
        """The rules every accuracy in the report was computed with, in one line."""
        text = f"Accuracy (%), both orders averaged; {self.rule.describe()}; `unparsed` is the parse-failure rate (%)."
        return text + (f" Preset: {self.preset}." if self.preset else "")

    def files(self) -> dict[str, str]:
        """File name → content: Table 1 and the full metrics as CSV and Markdown, judge agreement, and position vs
        letter bias. The Markdown files open with the rules; the CSV files carry them in columns."""
        head = self.caption + "\n\n"
        # With a preset, table1.csv names it in a last column (the Markdown files in their caption).
        t1_columns = [*self.table1_columns, "preset"] if self.preset else self.table1_columns
        t1_rows = [{**r, "preset": self.preset} for r in self.table1] if self.preset else self.table1
        out = {
            "table1.csv": to_csv(t1_columns, t1_rows),
            "table1.md": head + to_markdown(self.table1_columns, self.table1),
            "metrics.csv": to_csv(METRIC_COLUMNS, self.metrics),
            "metrics.md": head + to_markdown(METRIC_COLUMNS, self.metrics, percent=True),
        }
        if self.agreement:
            columns = list(self.agreement[0])
            out["agreement.csv"] = to_csv(columns, self.agreement)
            out["agreement.md"] = to_markdown(columns, self.agreement, percent=True)
        if self.bias:
            out["bias.csv"] = to_csv(BIAS_COLUMNS, self.bias)
            out["bias.md"] = to_markdown(BIAS_COLUMNS, self.bias, percent=True)
        return out


def build_report(
    rows: Iterable[dict[str, Any]],
    resamples: int = 1000,
    seed: int = 0,
    unparsed: str = "random",
    preset: str | None = None,
) -> Report:
    """Metrics per judge × protocol variant × data set, Table 1, agreement between judges, and position vs
    letter bias where both kinds of second order were judged. `preset` names the judge-eval preset the rows
    were made with, for the captions and table1.csv."""
    rule = Unparsed(unparsed, seed)
    vs = variants(rows)
    metric_rows = [metrics(v, resamples, seed, unparsed) for v in vs]
    columns, t1 = table1(metric_rows)
    return Report(metric_rows, columns, t1, agreement(vs), bias(vs), rule, preset)
