"""Running one `factory sql` query: its limits (time, memory), interruption by Ctrl-C or the time limit, every
column converted to a printable type, the rows kept for printing, and DuckDB's errors as one line."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from factory.core.errors import UserInputError
from factory.core.text import first_line

# Errors that come from the query, not from a file: after one of these, only files the message names are read
# in full to look for damage (reading every file on every typo would make mistakes slow on a big warehouse).
QUERY_ERRORS = (
    duckdb.ParserException,
    duckdb.BinderException,
    duckdb.CatalogException,
    duckdb.ConversionException,
    duckdb.OutOfRangeException,
    duckdb.ConstraintException,
    duckdb.InvalidInputException,
    duckdb.NotImplementedException,
    duckdb.TypeMismatchException,
    duckdb.OutOfMemoryException,
    duckdb.InterruptException,
)
_T = TypeVar("_T")

_BATCH_ROWS = 10_000
_STOP_PATIENCE_S = 10.0  # how long an interrupted query may take to return before it is left to the process's exit


@dataclass(frozen=True)
class SqlLimits:
    """What one `factory sql` query may use (None: no limit): wall-clock seconds, and memory in bytes, which caps
    DuckDB's working memory and, separately, the rows kept for printing. `memory_text` is the size as given."""

    seconds: float | None = None
    memory: int | None = None
    memory_text: str = ""


@dataclass(frozen=True)
class SqlResult:
    """A query's rows as printable Arrow columns (all of them, or the first ones kept) and how many it returned."""

    table: pa.Table
    rows: int


def interruptible(
    con: duckdb.DuckDBPyConnection, work: Callable[[duckdb.DuckDBPyConnection], _T], limits: SqlLimits | None
) -> _T:
    """`work(con)` in a worker thread while this thread waits, so that Ctrl-C (KeyboardInterrupt here) and the
    time limit stop the query at once through `con.interrupt()`: a query running in the main thread notices a
    signal only when DuckDB happens to check for one, which can be never."""
    outcome: list[tuple[bool, Any]] = []
    # An Event, not Thread.join: before Python 3.13 a join that Ctrl-C interrupts marks the thread as stopped
    # while it still runs, and the connection would be closed under it.
    done = threading.Event()

    def target() -> None:
        try:
            outcome.append((True, work(con)))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome.append((False, exc))
        finally:
            done.set()

    seconds = limits.seconds if limits is not None else None
    deadline = None if seconds is None else time.monotonic() + seconds
    worker = threading.Thread(target=target, name="factory-query", daemon=True)
    try:
        worker.start()
        while not done.wait(0.1):
            if deadline is not None and time.monotonic() >= deadline:
                _stop(con, done)
                raise UserInputError(
                    f"the query was stopped after {seconds:g} s (the --timeout limit); raise it with --timeout "
                    "SECONDS (0: no limit)"
                )
    except KeyboardInterrupt:
        if worker.ident is not None:  # it started: wait for its query to stop
            _stop(con, done)
        raise KeyboardInterrupt("the query was stopped") from None
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _stop(con: duckdb.DuckDBPyConnection, done: threading.Event) -> None:
    """Interrupt the worker's query until it returns: an interrupt sent before the query has started is lost."""
    give_up = time.monotonic() + _STOP_PATIENCE_S
    while not done.is_set() and time.monotonic() < give_up:
        con.interrupt()
        done.wait(0.05)


def sql_error(exc: duckdb.Error, sql: str, limits: SqlLimits | None) -> UserInputError:
    """A query's DuckDB error as one line that says what happened and what to change."""
    if isinstance(exc, duckdb.PermissionException):
        short = re.sub(r"^Permission Error:\s*", "", first_line(exc))
        return UserInputError(f"factory sql reads only the warehouse's tables: {short}")
    if isinstance(exc, duckdb.OutOfMemoryException) and limits is not None and limits.memory is not None:
        return UserInputError(
            f"out of memory under the --memory-limit {limits.memory_text} ({first_line(exc)}); raise it with "
            "--memory-limit, e.g. --memory-limit 8GB"
        )
    hint = ""
    if isinstance(exc, duckdb.ParserException) and re.search(r'(?<!")\breferences\b(?!")', sql, re.I):
        hint = ' (REFERENCES is an SQL keyword: quote the table name, FROM "references")'
    return UserInputError(f"SQL error: {first_line(exc)}{hint}")


# DuckDB types whose Arrow form the table, CSV and JSON outputs all show as the value itself. Any other column
# (INTERVAL, BLOB, BIT, UUID, ENUM, UNION, MAP, TIME WITH TIME ZONE, BIGNUM, a type added later, or a list or
# struct holding one) is cast to DuckDB's own text for it before anything runs: the CSV writer cannot write an
# interval, a union or binary data, and Python's renderings of them (MonthDayNano, b'...') are not DuckDB's.
_SHOWN_AS_IS = frozenset(
    {
        *("boolean", "tinyint", "smallint", "integer", "bigint", "hugeint", "float", "double", "decimal"),
        *("utinyint", "usmallint", "uinteger", "ubigint", "uhugeint", "varchar", "null"),
        *("date", "time", "timestamp", "timestamp_s", "timestamp_ms", "timestamp_ns", "timestamp with time zone"),
    }
)
_NESTED = frozenset({"list", "array", "struct"})  # written as JSON (csv) or JSON values (json), when their parts are


def _shown_as_is(kind: Any) -> bool:
    if kind.id in _NESTED:
        return all(_shown_as_is(child) for _, child in kind.children if hasattr(child, "id"))
    return kind.id in _SHOWN_AS_IS


def printable(relation: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """The relation with each column that `_shown_as_is` refuses cast to VARCHAR (by position: two columns may
    share a name)."""
    if all(_shown_as_is(kind) for kind in relation.types):
        return relation
    columns = []
    for i, (name, kind) in enumerate(zip(relation.columns, relation.types, strict=True), start=1):
        quoted = '"' + name.replace('"', '""') + '"'
        columns.append(f"#{i} AS {quoted}" if _shown_as_is(kind) else f"CAST(#{i} AS VARCHAR) AS {quoted}")
    return relation.project(", ".join(columns))


def collect(relation: duckdb.DuckDBPyRelation, keep: int | None, limits: SqlLimits) -> SqlResult:
    """The result batch by batch: the first `keep` rows (all when None) are kept and every row is counted; the
    kept rows may not outgrow the memory limit (DuckDB's own limit does not cover them)."""
    # DuckDB 2 names it to_arrow_reader; 1.x fetch_arrow_reader.
    stream = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
    reader = stream(_BATCH_ROWS)
    kept: list[pa.RecordBatch] = []
    rows = size = 0
    for batch in reader:
        if keep is None or rows < keep:
            part = batch if keep is None else batch.slice(0, keep - rows)
            kept.append(part)
            size += part.nbytes
            if limits.memory is not None and size > limits.memory:
                raise UserInputError(
                    f"the query returns more than the --memory-limit {limits.memory_text} of rows; narrow it "
                    "(LIMIT, fewer columns) or raise --memory-limit"
                )
        rows += batch.num_rows
    return SqlResult(pa.Table.from_batches(kept, schema=reader.schema), rows)
