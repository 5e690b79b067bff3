"""The views: one per table over the readable current files, written to factory.duckdb for any DuckDB client,
or defined afresh in a confined in-memory DuckDB for `factory sql`, the report and `factory show`."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import duckdb
import pyarrow as pa

from factory.core.errors import FactoryError, UserInputError
from factory.core.files import make_folder
from factory.core.text import first_line
from factory.warehouse.call_cache import CallCache
from factory.warehouse.parquet import arrow
from factory.warehouse.read_only import check_read_only
from factory.warehouse.sql_run import QUERY_ERRORS, SqlLimits, SqlResult, collect, interruptible, printable, sql_error
from factory.warehouse.tables import ALL_TABLES, CALL_TABLES, STAGE_TABLES
from factory.warehouse.versions import StageVersions

DB_FILE = "factory.duckdb"
_T = TypeVar("_T")


def sql_list(paths: Sequence[str]) -> str:
    """File paths as a DuckDB list literal."""
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


_EMPTY_COLUMNS: dict[str, str] = {}
_DUCKDB_TYPES: dict[pa.DataType, str] = {
    pa.bool_(): "BOOLEAN",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.string(): "VARCHAR",
    pa.timestamp("us", tz="UTC"): "TIMESTAMP WITH TIME ZONE",
}


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def duckdb_type(kind: pa.DataType) -> str | None:
    """The type DuckDB gives a column of Arrow type `kind`, for the types of the warehouse's tables (None for
    any other: the caller then asks DuckDB itself)."""
    if kind in _DUCKDB_TYPES:
        return _DUCKDB_TYPES[kind]
    if pa.types.is_list(kind):
        inner = duckdb_type(kind.value_type)
        return None if inner is None else inner + "[]"
    if pa.types.is_struct(kind):
        fields = [(field.name, duckdb_type(field.type)) for field in kind]
        if any(t is None for _, t in fields):
            return None
        return "STRUCT(" + ", ".join(f"{_quoted(name)} {t}" for name, t in fields) + ")"
    return None


def empty_columns(table: str) -> str:
    """The column list of `table` for `CREATE TABLE`, in the types DuckDB gives its Arrow schema.

    Worked out once per process, from the schema alone where every type is known: every connection creates
    each table that has no file yet (most of them, in a small warehouse), converting an empty Arrow table costs
    several times the plain statement, and building one makes pyarrow import pandas, a third of the start-up of
    a `factory sql` process."""
    columns = _EMPTY_COLUMNS.get(table)
    if columns is None:
        kinds = [(field.name, duckdb_type(field.type)) for field in ALL_TABLES[table]]
        if all(kind is not None for _, kind in kinds):
            columns = ", ".join(f"{_quoted(name)} {kind}" for name, kind in kinds)
        else:
            columns = ", ".join(f"{_quoted(name)} {kind}" for name, kind in arrow_columns(table))
        _EMPTY_COLUMNS[table] = columns
    return columns


def arrow_columns(table: str) -> list[tuple[str, str]]:
    """(name, DuckDB type) of each column of `table`, as DuckDB converts its empty Arrow table."""
    con = duckdb.connect()
    try:
        con.register("_empty", ALL_TABLES[table].empty_table())
        return [(name, kind) for name, kind, *_ in con.execute("DESCRIBE SELECT * FROM _empty").fetchall()]
    finally:
        con.close()


class Views(CallCache, StageVersions):
    """The views over a warehouse's tables, and the read-only queries that run on them."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._view_files: list[str] = []  # every file the views last defined read

    def _sources(self) -> dict[str, list[str]]:
        """The readable files behind each view (unreadable ones are skipped and named in skipped_parts)."""
        files = {t: self._usable(self._current_files(t)) for t in STAGE_TABLES}
        files.update({t: self._call_files(t) for t in CALL_TABLES})
        runs = self.root / "runs"
        files["runs"] = self._usable(sorted(str(p) for p in runs.glob("*.parquet")) if runs.is_dir() else [])
        return files

    def _define_views(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        """Create one view per table in `con`; returns every file the views read."""
        sources = self._sources()
        # Known before any view is created, so a failure part-way can be traced to one of these files.
        self._view_files = [p for paths in sources.values() for p in paths]
        for table, paths in sources.items():
            if paths:
                con.execute(
                    f'CREATE OR REPLACE VIEW "{table}" AS SELECT * FROM read_parquet({sql_list(paths)}, '
                    "union_by_name=true)"
                )
            else:
                # An empty table with the right columns, so queries over a new warehouse still type-check.
                con.execute(f'CREATE OR REPLACE TABLE "{table}" ({empty_columns(table)})')
        return self._view_files

    def refresh_database(self) -> Path:
        """Rewrite factory.duckdb: one view per table over the current Parquet files (absolute paths).

        Built under a temporary name and renamed into place. A file the views cannot read is skipped (see
        `skipped_parts`); any other failure removes the temporary database and its write-ahead log, and
        raises FactoryError saying why.
        """
        make_folder(self.root)
        target = self.root / DB_FILE
        while True:  # each retry leaves out at least one more unreadable file, so this ends
            fd, tmp = tempfile.mkstemp(prefix=".factory-", suffix=".duckdb", dir=self.root)
            os.close(fd)
            os.unlink(tmp)  # DuckDB wants to create the file itself
            try:
                try:
                    con = duckdb.connect(tmp)
                    try:
                        self._define_views(con)
                        con.execute("CHECKPOINT")
                    finally:
                        con.close()
                except duckdb.Error as exc:
                    if self._vanished(self._view_files) or self._set_aside_named(str(exc), self._view_files):
                        continue
                    raise FactoryError(f"{target}: cannot write the views: {first_line(exc)}") from None
                try:
                    os.replace(tmp, target)
                except OSError as exc:
                    raise FactoryError(f"{target}: cannot be replaced ({exc.strerror or exc})") from None
                return target
            finally:
                # Nothing of a failed attempt stays behind (after a successful rename there is nothing left).
                for leftover in (tmp, tmp + ".wal"):
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)

    def connect(self, memory_limit: int | None = None) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with the views defined afresh, confined to the files those views read.

        Once the views exist, DuckDB's own settings forbid any other file access (reads included), extension
        loading and installing, and further setting changes. Writing statements must still be kept away
        from it (see `query`): DuckDB would let COPY overwrite one of the allowed files. `memory_limit`
        (bytes) caps what a query may use; nothing spills to disk, so it is a hard cap.
        """
        self._check_root()
        if not self.root.is_dir():
            raise UserInputError(f"{self.root}: no warehouse here (run `factory build RECIPE` first)")
        while True:
            con = duckdb.connect(
                config={
                    "threads": 2,
                    "autoinstall_known_extensions": False,
                    "autoload_known_extensions": False,
                    "allow_community_extensions": False,
                    "python_enable_replacements": False,  # no reading the caller's Python variables
                    "temp_directory": "",  # no spilling: an in-memory DuckDB would write ./.tmp in the working dir
                }
            )
            try:
                files = self._define_views(con)
                # allowed_paths must be set before external access is turned off, and locked after.
                con.execute(f"SET allowed_paths = {sql_list(files)}")
                con.execute("SET enable_external_access = false")
                if memory_limit is not None:  # after the views: the limit is for the query, not for reading footers
                    con.execute(f"SET memory_limit = '{int(memory_limit)}B'")
                con.execute("SET lock_configuration = true")
                return con
            except duckdb.Error as exc:
                con.close()
                if not self._vanished(self._view_files) and not self._set_aside_named(str(exc), self._view_files):
                    raise FactoryError(f"{self.root}: cannot define the table views: {first_line(exc)}") from None
            except BaseException:
                con.close()
                raise

    def _with_views(self, work: Callable[[duckdb.DuckDBPyConnection], _T], limits: SqlLimits | None = None) -> _T:
        """Run `work` on a fresh confined connection, again without any part that turns out unreadable.

        It runs in a worker thread, so that Ctrl-C and the time limit stop it at once (`interruptible`)."""
        while True:
            con = self.connect(limits.memory if limits else None)
            try:
                return interruptible(con, work, limits)
            except duckdb.Error as exc:
                if self._vanished(self._view_files):
                    continue  # a build compacted the call cache meanwhile: the same query, on its new files
                if isinstance(exc, duckdb.ParserException | duckdb.PermissionException):
                    raise
                if not self._set_aside_named(str(exc), self._view_files, not isinstance(exc, QUERY_ERRORS)):
                    raise
            finally:
                with contextlib.suppress(duckdb.Error):  # a query that did not stop in time still holds it
                    con.close()

    def query(self, sql: str) -> pa.Table:
        """Run one read-only SQL query over the warehouse's views.

        Refused with UserInputError: several statements, anything that writes or changes settings, EXPLAIN
        ANALYZE (it runs the statement), PRAGMAs outside SAFE_PRAGMAS, and any file access beyond the views.
        """

        def run(con: duckdb.DuckDBPyConnection) -> pa.Table:
            check_read_only(con, sql)
            relation = con.sql(sql)
            return pa.table({}) if relation is None else arrow(relation)

        try:
            return self._with_views(run)
        except duckdb.Error as exc:
            raise sql_error(exc, sql, None) from None

    def run_sql(self, sql: str, limits: SqlLimits, keep: int | None = None) -> SqlResult:
        """`factory sql`: one read-only query, as `query`, under `limits`, with every column in a type that
        each output format shows (`printable`), keeping only the first `keep` rows (all are counted)."""

        def run(con: duckdb.DuckDBPyConnection) -> SqlResult:
            check_read_only(con, sql)
            relation = con.sql(sql)
            return SqlResult(pa.table({}), 0) if relation is None else collect(printable(relation), keep, limits)

        try:
            return self._with_views(run, limits)
        except duckdb.Error as exc:
            raise sql_error(exc, sql, limits) from None

    def row_counts(self) -> dict[str, int]:
        """Rows per table in the current views."""
        counts = self.overview(0)[0]
        return dict(zip(counts["table"].to_pylist(), counts["rows"].to_pylist(), strict=True))

    def overview(self, runs: int = 10) -> tuple[pa.Table, pa.Table]:
        """(rows per table, the latest `runs` runs), from one connection: `factory ls`. Arrow straight from
        DuckDB, so listing never imports pandas (pyarrow does to build a table from Python lists)."""
        counts = " UNION ALL ".join(f'SELECT \'{t}\' AS "table", count(*) AS "rows" FROM "{t}"' for t in ALL_TABLES)
        latest = (
            "SELECT run_id, recipe, status, model_calls, cached_calls, failed_calls, tokens_out, "
            f"round(seconds, 1) AS seconds FROM runs ORDER BY started_at DESC LIMIT {int(runs)}"
        )

        def both(con: duckdb.DuckDBPyConnection) -> tuple[pa.Table, pa.Table]:
            return arrow(con.sql(counts)), arrow(con.sql(latest))

        try:
            return self._with_views(both)
        except duckdb.Error as exc:
            raise FactoryError(f"{self.root}: cannot count rows: {first_line(exc)}") from None

    def quarantine_damaged_tables(self) -> list[Path]:
        """Move every unreadable CURRENT.json, current stage version and runs row to the corrupt/ folder beside
        it, and return where each was.

        Call it with the warehouse lock held (a build does, at its start). Stage tables are derived data: a
        stage whose version is gone is recomputed from its inputs and the call cache. The check reads footers
        only; a stage version whose pages turn out corrupt is set aside by `read_version` when it fails.
        """
        self._check_root()
        start = len(self.set_aside)
        self._sources()  # under the lock, every file the views would skip is set aside instead
        return self.set_aside[start:]
