"""Terminal output with rich: per-stage progress while building, tables and the build summary.

Everything that comes from data (values, names, paths, messages) is printed as `factory.core.text.text`: rich
would otherwise obey markup in a plain string (`[link=...]`) and pass escape sequences to the terminal.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import click
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from factory.core.errors import UserInputError
from factory.core.text import CONTROL, VISIBLE, clean, json_escape_controls, text
from factory.pipeline.calls import Reporter
from factory.pipeline.stage import PlannedStage, StageStats
from factory.warehouse.store import Warehouse

console = Console(stderr=True)
out = Console()


class RichReporter(Reporter):
    """A progress bar per model-calling stage: calls done, and tokens per second."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description:<11}", markup=False),  # a stage label can hold a data set's name
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        self.tasks: dict[str, TaskID] = {}
        self.totals: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.live = False

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.live:
            self.progress.__exit__(kind, exc, tb)

    def stage_started(self, stage: str, total_calls: int) -> None:
        if total_calls and stage in self.tasks:  # the stage's next shard: its calls join the same bar
            self.totals[stage] += total_calls
            self.progress.update(self.tasks[stage], total=self.totals[stage])
        elif total_calls:
            if not self.live:
                # Started on the first model call, not on entry: a build that fails before any call (bad
                # input) or needs none then prints no empty progress display, only its one error line.
                self.progress.start()
                self.live = True
            self.tasks[stage] = self.progress.add_task(clean(stage), total=total_calls, rate="")
            self.totals[stage] = total_calls
            self.started[stage], self.tokens[stage] = time.perf_counter(), 0

    def calls_done(self, stage: str, n: int, tokens_out: int) -> None:
        self.tokens[stage] += tokens_out
        rate = self.tokens[stage] / max(time.perf_counter() - self.started[stage], 1e-9)
        self.progress.update(self.tasks[stage], advance=n, rate=f"{rate:6.1f} tok/s")

    def warn(self, message: str) -> None:
        # soft_wrap: a path must stay whole when stderr is a file or a pipe (rich wraps at 80 columns there).
        console.print(text("warning: ", "yellow") + text(message), highlight=False, soft_wrap=True)

    def stage_finished(self, stats: StageStats) -> None:
        if self.quiet:
            return
        what = "reused" if stats.skipped else f"{stats.model_calls} calls ({stats.cached_calls} cached)"
        line = f"  {clean(stats.stage):<11} {stats.rows:>6} rows  {what}  {stats.seconds:.1f}s"
        self.progress.console.print(text(line), highlight=False)


def print_table(table: pa.Table, limit: int, total: int | None = None) -> None:
    """An Arrow table as a rich table on stdout (first `limit` rows; `total` rows in all, default: the table's)."""
    t = Table(show_header=True, header_style="bold")
    for name in table.column_names:
        t.add_column(text(name))
    # Rows as lists, not dicts: a query may name two columns alike (SELECT 1 AS a, 2 AS a).
    columns = [column.to_pylist() for column in table.slice(0, limit).columns]
    for row in zip(*columns, strict=True):
        t.add_row(*(text(v) for v in row))
    out.print(t)
    total = table.num_rows if total is None else total
    if total > limit:
        out.print(f"({total - limit} more rows; use --limit or --format csv)")


def print_csv(table: pa.Table) -> None:
    """The table as CSV on stdout; lists and structs (CSV has no nested values) as JSON text.

    CSV is data for files and pipes, so values are written exactly, control characters included. Only when
    stdout is a terminal are control characters made visible (in values and names), since a terminal would
    obey them; a script that needs the exact bytes writes to a file or a pipe, where they are kept.
    """
    import pyarrow.csv as pacsv

    table = _csv_ready(table, terminal=sys.stdout.isatty())
    _check_csv(table)  # a column the writer refuses is named before the header is printed
    sys.stdout.flush()
    pacsv.write_csv(table, sys.stdout.buffer)


def _csv_ready(table: pa.Table, terminal: bool) -> pa.Table:
    import pyarrow.compute as pc

    names, columns = [], []
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_nested(column.type):
            dumped = [None if v is None else json.dumps(_json_value(v), default=str) for v in column.to_pylist()]
            column = pa.chunked_array([pa.array(dumped, pa.string())])
        if terminal and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = pc.replace_substring_regex(column, pattern=CONTROL.pattern, replacement=VISIBLE)
        names.append(clean(name) if terminal else name)
        columns.append(column)
    return pa.Table.from_arrays(columns, names=names)


def _check_csv(table: pa.Table) -> None:
    import pyarrow.csv as pacsv

    for i, field in enumerate(table.schema):
        try:
            pacsv.write_csv(table.select([i]).slice(0, 1), io.BytesIO())
        except pa.ArrowException as exc:
            raise UserInputError(
                f"column '{clean(field.name)}' of type {field.type} cannot be written as CSV ({exc}); cast it in the "
                "query, e.g. CAST(x AS VARCHAR)"
            ) from None


def print_json(table: pa.Table) -> None:
    """One JSON object per row (JSON Lines) on stdout.

    JSON has no NaN or infinity: they are written as the strings "NaN", "Infinity", "-Infinity". Decimals
    with a fraction are strings (exact), whole ones (HUGEINT) numbers; dates and times are text. json.dumps
    escapes C0 controls, `json_escape_controls` DEL and C1 ones: no raw control character reaches stdout.
    """
    names = table.column_names
    for batch in table.to_batches(max_chunksize=1000):
        for row in zip(*(column.to_pylist() for column in batch.columns), strict=True):
            record = {name: _json_value(v) for name, v in zip(names, row, strict=True)}
            click.echo(json_escape_controls(json.dumps(record, default=str, ensure_ascii=False)))


def _json_value(value: Any) -> Any:
    """A value as JSON can hold it (see `print_json`), lists and dicts element by element."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        return int(value) if isinstance(exponent, int) and exponent >= 0 else str(value)
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def print_plan(name: str, n_prompts: int | None, planned: list[PlannedStage]) -> None:
    """`factory build --dry-run`: calls and tokens per stage, before any cache is consulted."""

    def fmt(x: int | None) -> str:
        return "unknown" if x is None else f"{x:,}"

    t = Table(title=text(f"plan for {name}: {fmt(n_prompts)} prompts"), header_style="bold")
    for col in ("stage", "model", "calls", "max output tokens", "input tokens (est. ≤)", "note"):
        t.add_column(col)
    for p in planned:
        cells = (p.stage, p.model, fmt(p.calls), fmt(p.max_output_tokens), fmt(p.approx_input_tokens), p.note)
        t.add_row(*map(text, cells))
    out.print(t)
    total = None if any(p.calls is None for p in planned) else sum(p.calls or 0 for p in planned)
    out.print(f"model calls in all: {fmt(total)} (an existing warehouse serves cached ones for free)")


def print_summary(run: dict[str, Any], stats: list[StageStats], export_path: Path | None, wh: Warehouse) -> None:
    """The end-of-build summary: per stage rows, calls and time; then totals and where things are."""
    t = Table(title=text(f"build {run['run_id']} — {run['status']}"), header_style="bold")
    for col in ("stage", "rows", "model calls", "cached", "failed", "tokens out", "seconds", "notes"):
        t.add_column(col)
    for s in stats:
        notes = json.dumps(s.notes) if s.notes and not s.skipped else ("reused" if s.skipped else "")
        cells = (s.stage, s.rows, s.model_calls, s.cached_calls, s.failed_calls, s.tokens_out, f"{s.seconds:.1f}")
        t.add_row(*map(text, cells), text(notes[:80]))
    out.print(t)
    reused = sum(s.skipped for s in stats)
    out.print(
        f"model calls: {run['model_calls']}  cached: {run['cached_calls']}  failed: {run['failed_calls']}  "
        f"stages reused: {reused}/{len(stats)}  "
        f"tokens in/out: {run['tokens_in']}/{run['tokens_out']}  time: {run['seconds']:.1f}s"
        + (f"  retries: {run['retries']}" if run.get("retries") else "")
        + (f"  cost: ${run['cost_usd']:.4f}" if run.get("cost_usd") is not None else "")
    )
    out.print(text(f'warehouse: {wh.root}  (factory sql "SELECT * FROM judgments LIMIT 5")'))
    if export_path is not None:
        out.print(text(f"dataset: {export_path}"))
    if run["status"] == "incomplete":
        out.print(text("some calls failed; run the same command again to retry them", "yellow"))


def _pct(value: float | None, low: float | None = None, high: float | None = None) -> str:
    if value is None:
        return "n/a"
    shown = f"{value:.1f}"
    return shown if low is None or high is None else f"{shown} [{low:.1f}, {high:.1f}]"


def print_eval(results: list[dict[str, Any]]) -> None:
    """Win rates of each evaluated policy against its baseline, with bootstrap intervals."""
    from factory.policy_eval.winrate import LC_MIN_PROMPTS

    if not results:
        return
    first = results[0]
    t = Table(
        title=text(f"win rate vs {first['baseline']} (judge {first['judge']}, {first['protocol']}, both orders)"),
        header_style="bold",
    )
    for col in ("policy", "win rate [95% CI]", "LC win rate [95% CI]", "W/L/T", "scored", "unparsed", "avg len"):
        t.add_column(col)
    for r in results:
        t.add_row(
            text(r["contender"]),
            _pct(r["win_rate"], r["win_rate_low"], r["win_rate_high"]),
            _pct(r["lc_win_rate"], r["lc_win_rate_low"], r["lc_win_rate_high"])
            + (" unstable*" if _lc_unstable(r, LC_MIN_PROMPTS) else ""),
            f"{r['wins']}/{r['losses']}/{r['ties']}",
            f"{r['scored']}/{r['prompts']}",
            str(r["unparsed_judgments"]),
            f"{r['avg_len_policy']:.0f} vs {r['avg_len_baseline']:.0f}" if r["avg_len_policy"] is not None else "",
        )
    out.print(t)
    if any(_lc_unstable(r, LC_MIN_PROMPTS) for r in results):
        out.print(
            f"* LC win rate on fewer than {LC_MIN_PROMPTS} scored prompts: the length fit is unstable there "
            "(docs/FIDELITY.md); read the raw win rate"
        )


def _lc_unstable(result: dict[str, Any], min_prompts: int) -> bool:
    return result["lc_win_rate"] is not None and result["scored"] < min_prompts


def print_loop(steps: list[Any], wh: Warehouse) -> None:
    """One line per step of a self-improvement loop: round, what ran, its status, calls and time."""
    t = Table(title="rounds", header_style="bold")
    for col in ("round", "step", "status", "model calls", "cached", "failed", "seconds", "output"):
        t.add_column(col)
    for s in steps:
        row = s.row
        if s.kind in ("sft", "dpo"):
            status = f"{row['steps']} steps, loss {row['final_train_loss']:.4f}"
            t.add_row(*map(text, (s.round, s.kind, status, "", "", "", f"{row['seconds']:.1f}", s.detail)))
            continue
        counts = (row.get("model_calls", ""), row.get("cached_calls", ""), row.get("failed_calls", ""))
        t.add_row(*map(text, (s.round, s.kind, row["status"], *counts, f"{row.get('seconds') or 0:.1f}", s.detail)))
    out.print(t)
    out.print(text(f'warehouse: {wh.root}  (factory sql "SELECT run_id, round, recipe, status FROM runs")'))
