"""Terminal output with rich: per-stage progress while building, tables and the build summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from factory.calls import Reporter
from factory.pipeline import PlannedStage, StageStats
from factory.warehouse import Warehouse

console = Console(stderr=True)
out = Console()


class RichReporter(Reporter):
    """A progress bar per model-calling stage: calls done, and tokens per second."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        self.tasks: dict[str, TaskID] = {}
        self.started: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.live = False

    def __enter__(self) -> RichReporter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.live:
            self.progress.__exit__(kind, exc, tb)

    def stage_started(self, stage: str, total_calls: int) -> None:
        if total_calls and stage not in self.tasks:
            if not self.live:
                # Started on the first model call, not on entry: a build that fails before any call (bad
                # input) or needs none then prints no empty progress display, only its one error line.
                self.progress.start()
                self.live = True
            self.tasks[stage] = self.progress.add_task(stage, total=total_calls, rate="")
            self.started[stage], self.tokens[stage] = time.perf_counter(), 0

    def calls_done(self, stage: str, n: int, tokens_out: int) -> None:
        self.tokens[stage] += tokens_out
        rate = self.tokens[stage] / max(time.perf_counter() - self.started[stage], 1e-9)
        self.progress.update(self.tasks[stage], advance=n, rate=f"{rate:6.1f} tok/s")

    def warn(self, message: str) -> None:
        # soft_wrap: a path must stay whole when stderr is a file or a pipe (rich wraps at 80 columns there).
        console.print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False, soft_wrap=True)

    def stage_finished(self, stats: StageStats) -> None:
        if self.quiet:
            return
        what = "reused" if stats.skipped else f"{stats.model_calls} calls ({stats.cached_calls} cached)"
        self.progress.console.print(f"  {stats.stage:<11} {stats.rows:>6} rows  {what}  {stats.seconds:.1f}s")


def print_table(table: pa.Table, limit: int) -> None:
    """An Arrow table as a rich table on stdout (first `limit` rows)."""
    t = Table(show_header=True, header_style="bold")
    for name in table.column_names:
        t.add_column(name)
    for row in table.slice(0, limit).to_pylist():
        t.add_row(*("" if v is None else str(v) for v in row.values()))
    out.print(t)
    if table.num_rows > limit:
        out.print(f"({table.num_rows - limit} more rows; use --limit or --format csv)")


def print_plan(name: str, n_prompts: int | None, planned: list[PlannedStage]) -> None:
    """`factory build --dry-run`: calls and tokens per stage, before any cache is consulted."""

    def fmt(x: int | None) -> str:
        return "unknown" if x is None else f"{x:,}"

    t = Table(title=f"plan for {name}: {fmt(n_prompts)} prompts", header_style="bold")
    for col in ("stage", "model", "calls", "max output tokens", "input tokens (est. ≤)", "note"):
        t.add_column(col)
    for p in planned:
        t.add_row(p.stage, p.model or "", fmt(p.calls), fmt(p.max_output_tokens), fmt(p.approx_input_tokens), p.note)
    out.print(t)
    total = None if any(p.calls is None for p in planned) else sum(p.calls or 0 for p in planned)
    out.print(f"model calls in all: {fmt(total)} (an existing warehouse serves cached ones for free)")


def print_summary(run: dict[str, Any], stats: list[StageStats], export_path: Path | None, wh: Warehouse) -> None:
    """The end-of-build summary: per stage rows, calls and time; then totals and where things are."""
    t = Table(title=f"build {run['run_id']} — {run['status']}", header_style="bold")
    for col in ("stage", "rows", "model calls", "cached", "failed", "tokens out", "seconds", "notes"):
        t.add_column(col)
    for s in stats:
        notes = json.dumps(s.notes) if s.notes and not s.skipped else ("reused" if s.skipped else "")
        t.add_row(
            s.stage,
            str(s.rows),
            str(s.model_calls),
            str(s.cached_calls),
            str(s.failed_calls),
            str(s.tokens_out),
            f"{s.seconds:.1f}",
            notes[:80],
        )
    out.print(t)
    reused = sum(s.skipped for s in stats)
    out.print(
        f"model calls: {run['model_calls']}  cached: {run['cached_calls']}  failed: {run['failed_calls']}  "
        f"stages reused: {reused}/{len(stats)}  "
        f"tokens in/out: {run['tokens_in']}/{run['tokens_out']}  time: {run['seconds']:.1f}s"
        + (f"  retries: {run['retries']}" if run.get("retries") else "")
        + (f"  cost: ${run['cost_usd']:.4f}" if run.get("cost_usd") is not None else "")
    )
    out.print(f'warehouse: {wh.root}  (factory sql "SELECT * FROM judgments LIMIT 5")')
    if export_path is not None:
        out.print(f"dataset: {export_path}")
    if run["status"] == "incomplete":
        out.print("[yellow]some calls failed; run the same command again to retry them[/yellow]")


def _pct(value: float | None, low: float | None = None, high: float | None = None) -> str:
    if value is None:
        return "n/a"
    shown = f"{value:.1f}"
    return shown if low is None or high is None else f"{shown} [{low:.1f}, {high:.1f}]"


def print_eval(results: list[dict[str, Any]]) -> None:
    """Win rates of each evaluated policy against its baseline, with bootstrap intervals."""
    if not results:
        return
    first = results[0]
    t = Table(
        title=f"win rate vs {first['baseline']} (judge {first['judge']}, {first['protocol']}, both orders)",
        header_style="bold",
    )
    for col in ("policy", "win rate [95% CI]", "LC win rate [95% CI]", "W/L/T", "scored", "unparsed", "avg len"):
        t.add_column(col)
    for r in results:
        t.add_row(
            r["contender"],
            _pct(r["win_rate"], r["win_rate_low"], r["win_rate_high"]),
            _pct(r["lc_win_rate"], r["lc_win_rate_low"], r["lc_win_rate_high"]),
            f"{r['wins']}/{r['losses']}/{r['ties']}",
            f"{r['scored']}/{r['prompts']}",
            str(r["unparsed_judgments"]),
            f"{r['avg_len_policy']:.0f} vs {r['avg_len_baseline']:.0f}" if r["avg_len_policy"] is not None else "",
        )
    out.print(t)


def print_loop(steps: list[Any], wh: Warehouse) -> None:
    """One line per step of a self-improvement loop: round, what ran, its status, calls and time."""
    t = Table(title="rounds", header_style="bold")
    for col in ("round", "step", "status", "model calls", "cached", "failed", "seconds", "output"):
        t.add_column(col)
    for s in steps:
        row = s.row
        if s.kind in ("sft", "dpo"):
            status = f"{row['steps']} steps, loss {row['final_train_loss']:.4f}"
            t.add_row(str(s.round), s.kind, status, "", "", "", f"{row['seconds']:.1f}", s.detail)
            continue
        t.add_row(
            str(s.round),
            s.kind,
            row["status"],
            str(row.get("model_calls", "")),
            str(row.get("cached_calls", "")),
            str(row.get("failed_calls", "")),
            f"{row.get('seconds') or 0:.1f}",
            s.detail,
        )
    out.print(t)
    out.print(f'warehouse: {wh.root}  (factory sql "SELECT run_id, round, recipe, status FROM runs")')
