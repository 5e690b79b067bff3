"""judge-eval's tables printed in the terminal: short headers, rates in percent, names printed literally."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from factory.core.text import text
from factory.judge_eval.settings import EvalSettings
from factory.judge_eval.tables import BIAS_COLUMNS, METRIC_COLUMNS, Report, shown


def console() -> Console:
    """A rich console on stdout; when output goes to a file or pipe, wide enough that no number is cut."""
    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, 200))
    return out


SHORT = {
    "acc_forward": "fwd",
    "acc_swapped": "swapped",
    "acc_soft": "soft",
    "acc_soft_exact": "soft (exact)",
    "soft_unscored": "soft unscored",
    "position_first_rate": "position: first shown",
    "letter_a_rate": "letter: (a)",
    "top_logprobs": "top-k",
    "consistency": "consistent",
    "first_position_rate": "first pos.",
    "parse_failure_rate": "unparsed",
    "call_errors": "errors",
    "len_preferred": "len pref.",
    "len_other": "len other",
    "len_human_preferred": "len human pref.",
    "len_human_other": "len human other",
    "ci_low": "CI low",
    "ci_high": "CI high",
}
TEXT_COLUMNS = ("dataset", "judge", "protocol", "judge_1", "judge_2")
DECODING_COLUMNS = ("prefill", "markers", "top_logprobs")
SECOND_ORDER = {"outputs": "swapped", "blocks": "blocks-swapped", "both": "2nd order"}
"""The header of `acc_swapped` by --swap (with both, a protocol's +blocks row is blocks-swapped)."""


def print_rows(
    title: str, columns: list[str], rows: list[dict[str, Any]], percent: bool, labels: dict[str, str] | None = None
) -> None:
    """Rows as a rich table; with `percent`, rate columns are shown in percent; `labels` rename headers. Cells
    and the title are rich Text: a judge's or data set's name is printed literally, never as markup."""
    names = {**SHORT, **(labels or {})}
    table = Table(title=text(title), header_style="bold")
    for c in columns:
        table.add_column(
            text(names.get(c, c)), justify="left" if c in TEXT_COLUMNS else "right", no_wrap=c not in TEXT_COLUMNS
        )
    for r in rows:
        cells = [shown(c, r.get(c)) if percent else ("" if r.get(c) is None else str(r.get(c))) for c in columns]
        table.add_row(*map(text, cells))
    console().print(table)


def print_report(report: Report, settings: EvalSettings) -> None:
    """What `factory judge-eval` prints: Table 1, accuracies with their intervals, the other metrics, position vs
    letter bias and agreement between judges, each where the report has it."""
    rule = report.rule.describe()
    table1_title = f"judge accuracy (%), both orders averaged; {rule}; unparsed: parse-failure rate (%)"
    if settings.preset:
        table1_title += f"; preset {settings.preset}"
    print_rows(table1_title, report.table1_columns, report.table1, percent=False)
    accuracy = ["dataset", "judge", "protocol", "cases", "accuracy", "ci_low", "ci_high", "parse_failure_rate"]
    accuracy += ["acc_forward", "acc_swapped", "acc_soft", "acc_soft_exact"]
    decoding = f"prefill {settings.prefill}, top-{settings.top_logprobs}, swap {settings.swap}"
    print_rows(
        f"accuracy (%) with bootstrap 95% CI; {rule}; soft accuracy under both marker rules; {decoding}",
        accuracy,
        report.metrics,
        percent=True,
        labels={"acc_swapped": SECOND_ORDER[settings.swap], "acc_soft": f"soft ({settings.markers})"},
    )
    rest = [c for c in METRIC_COLUMNS if c not in accuracy and c not in ("unparsed", "swap", *DECODING_COLUMNS)]
    print_rows("bias, parsing, lengths (chars) and cost", ["protocol", *rest], report.metrics, percent=True)
    if report.bias:
        print_rows(
            "position bias vs letter bias (%; 50 = none): first-shown block chosen (forward vs blocks-swapped), "
            "(a) chosen (outputs-swapped vs blocks-swapped); first pos.: the outputs-swapped rate, which mixes both",
            list(BIAS_COLUMNS),
            report.bias,
            percent=True,
        )
    if report.agreement:
        print_rows("agreement between judges (%)", list(report.agreement[0]), report.agreement, percent=True)
