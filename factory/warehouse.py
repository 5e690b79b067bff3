"""The warehouse: the only module that touches files and SQL.

Layout under the root (default `warehouse/`):

    calls/<generation_calls|judge_calls>/part-<run>-<seq>.parquet   every model call, appended as it arrives
    tables/<table>/<recipe>/<stage_key>.parquet                     one materialised version of a stage
    tables/<table>/<recipe>/CURRENT.json                             which version the views show
    runs/<run_id>.parquet                                            one row per build
    factory.duckdb                                                   a view per table, for any DuckDB client

Every file is written to a temporary name in the same folder and renamed into place, so a reader (or a
resumed build) never sees half a file. Like sqlmesh, each stage version is its own physical file and the
views point at the current one, so going back to an earlier recipe is a pointer change, not a recompute.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from factory.errors import FactoryError, UserInputError
from factory.tables import ALL_TABLES, CALL_TABLES, RUNS, STAGE_TABLES

DB_FILE = "factory.duckdb"
READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.PRAGMA}


def _arrow(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    """A query result as Arrow (DuckDB 2 renamed `arrow()` to `to_arrow_table()`)."""
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    """Parquet written under a temporary name, fsynced, then renamed into place."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def to_table(rows: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows as an Arrow table of exactly `schema` (missing keys become nulls, extra keys are errors)."""
    names = set(schema.names)
    for row in rows[:1]:
        extra = set(row) - names
        if extra:
            raise ValueError(f"columns not in the schema: {sorted(extra)}")
    return pa.Table.from_pylist(list(rows), schema=schema)


@dataclass(frozen=True)
class Current:
    """The version of one stage table that the views show."""

    stage_key: str
    complete: bool
    run_id: str


class Warehouse:
    """Parquet tables and DuckDB views under one root folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self._seq = 0

    # ------------------------------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the warehouse for one build, so two builds never interleave their writes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FactoryError(f"{self.root}: another build holds this warehouse") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------------------------------- calls
    def append_calls(self, table: str, run_id: str, rows: Sequence[dict[str, Any]]) -> None:
        """Flush a batch of model-call rows as one new part file."""
        if not rows:
            return
        self._seq += 1
        path = self.root / "calls" / table / f"part-{run_id}-{self._seq:06d}.parquet"
        atomic_write_parquet(path, to_table(rows, CALL_TABLES[table]))

    def _parts(self, table: str) -> list[str]:
        folder = self.root / "calls" / table
        return sorted(str(p) for p in folder.glob("part-*.parquet")) if folder.is_dir() else []

    def cached_calls(self, table: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The newest successful call for each request key that has one; failures never count."""
        parts = self._parts(table)
        wanted = pa.table({"request_key": pa.array(sorted(set(keys)), pa.string())})
        if not parts or wanted.num_rows == 0:
            return {}
        con = duckdb.connect()
        con.register("wanted", wanted)
        relation = con.sql(
            "SELECT c.* FROM read_parquet(?, union_by_name=true) c "
            "JOIN wanted USING (request_key) WHERE c.status = 'ok' "
            "QUALIFY row_number() OVER (PARTITION BY c.request_key ORDER BY c.created_at DESC) = 1",
            params=[parts],
        )
        result = _arrow(relation)
        con.close()
        return {row["request_key"]: row for row in result.to_pylist()}

    # ------------------------------------------------------------------------------------ stage tables
    def _folder(self, table: str, recipe: str) -> Path:
        return self.root / "tables" / table / recipe

    def current(self, table: str, recipe: str) -> Current | None:
        """The version of `table` the views show for `recipe`, if any."""
        path = self._folder(table, recipe) / "CURRENT.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return Current(data["stage_key"], data["complete"], data["run_id"])

    def has_version(self, table: str, recipe: str, stage_key: str) -> bool:
        """Whether a complete version of this stage exists (it may be an older, not current, one)."""
        marker = self._folder(table, recipe) / f"{stage_key}.complete"
        return marker.is_file() and (self._folder(table, recipe) / f"{stage_key}.parquet").is_file()

    def write_stage(
        self, table: str, recipe: str, stage_key: str, run_id: str, rows: Sequence[dict[str, Any]], complete: bool
    ) -> None:
        """Materialise a stage version and make it current. Incomplete versions are shown but redone."""
        folder = self._folder(table, recipe)
        atomic_write_parquet(folder / f"{stage_key}.parquet", to_table(rows, STAGE_TABLES[table]))
        marker = folder / f"{stage_key}.complete"
        if complete:
            atomic_write_bytes(marker, b"")
        else:
            marker.unlink(missing_ok=True)
        self.set_current(table, recipe, stage_key, run_id, complete)

    def set_current(self, table: str, recipe: str, stage_key: str, run_id: str, complete: bool) -> None:
        """Point the views at one version of a stage table."""
        data = {"stage_key": stage_key, "complete": complete, "run_id": run_id}
        atomic_write_bytes(self._folder(table, recipe) / "CURRENT.json", json.dumps(data).encode())

    def read_stage(self, table: str, recipe: str, stage_key: str) -> list[dict[str, Any]]:
        """All rows of one stage version."""
        return pq.read_table(self._folder(table, recipe) / f"{stage_key}.parquet").to_pylist()

    def _current_files(self, table: str) -> list[str]:
        base = self.root / "tables" / table
        files = []
        for pointer in sorted(base.glob("*/CURRENT.json")) if base.is_dir() else []:
            key = json.loads(pointer.read_text())["stage_key"]
            path = pointer.parent / f"{key}.parquet"
            if path.is_file():
                files.append(str(path))
        return files

    # -------------------------------------------------------------------------------------------- runs
    def write_run(self, row: dict[str, Any]) -> None:
        """Record (or update) one build's row in the runs table."""
        atomic_write_parquet(self.root / "runs" / f"{row['run_id']}.parquet", to_table([row], RUNS))

    # --------------------------------------------------------------------------------------------- SQL
    def _sources(self) -> dict[str, list[str]]:
        files = {t: self._current_files(t) for t in STAGE_TABLES}
        files.update({t: self._parts(t) for t in CALL_TABLES})
        runs = self.root / "runs"
        files["runs"] = sorted(str(p) for p in runs.glob("*.parquet")) if runs.is_dir() else []
        return files

    def _define_views(self, con: duckdb.DuckDBPyConnection) -> None:
        for table, paths in self._sources().items():
            if paths:
                listing = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
                con.execute(
                    f'CREATE OR REPLACE VIEW "{table}" AS SELECT * FROM read_parquet([{listing}], union_by_name=true)'
                )
            else:
                # An empty table with the right columns, so queries over a new warehouse still type-check.
                con.register("_empty", ALL_TABLES[table].empty_table())
                con.execute(f'CREATE OR REPLACE TABLE "{table}" AS SELECT * FROM _empty')
                con.unregister("_empty")

    def refresh_database(self) -> Path:
        """Rewrite factory.duckdb: one view per table over the current Parquet files (absolute paths)."""
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / DB_FILE
        fd, tmp = tempfile.mkstemp(prefix=".factory-", suffix=".duckdb", dir=self.root)
        os.close(fd)
        os.unlink(tmp)  # DuckDB wants to create the file itself
        con = duckdb.connect(tmp)
        try:
            self._define_views(con)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, target)
        return target

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with the views defined afresh; files cannot be written through it."""
        if not self.root.is_dir():
            raise UserInputError(f"{self.root}: no warehouse here (run `factory build RECIPE` first)")
        con = duckdb.connect(config={"threads": 2})
        self._define_views(con)
        return con

    def query(self, sql: str) -> pa.Table:
        """Run one read-only SQL query over the warehouse's views."""
        con = self.connect()
        try:
            statements = con.extract_statements(sql)
            kinds = {s.type for s in statements}
            if not statements or not kinds <= READ_ONLY:
                names = sorted(k.name for k in kinds - READ_ONLY) or ["nothing"]
                raise UserInputError(f"factory sql runs one read-only query (SELECT, DESCRIBE, ...), got {names}")
            if len(statements) > 1:
                raise UserInputError("factory sql runs one query at a time")
            relation = con.sql(sql)
            return pa.table({}) if relation is None else _arrow(relation)
        except duckdb.Error as exc:
            hint = ""
            if isinstance(exc, duckdb.ParserException) and re.search(r'(?<!")\breferences\b(?!")', sql, re.I):
                hint = ' (REFERENCES is an SQL keyword: quote the table name, FROM "references")'
            raise UserInputError(f"SQL error: {str(exc).splitlines()[0]}{hint}") from None
        finally:
            con.close()

    def row_counts(self) -> dict[str, int]:
        """Rows per table in the current views."""
        con = self.connect()
        try:
            return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in ALL_TABLES}
        finally:
            con.close()

    # ------------------------------------------------------------------------- judge-eval (new helpers)
    def current_rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of the current versions of a stage table (all recipes or units), as dicts."""
        if table not in STAGE_TABLES:
            raise ValueError(f"not a stage table: {table}")
        files = self._current_files(table)
        if not files:
            return []
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pylist()

    def write_report(self, folder: str | Path, files: dict[str, str]) -> list[Path]:
        """Write report files (CSV, Markdown) atomically into `folder`, which may lie outside the root."""
        out = []
        for name, text in files.items():
            path = Path(folder) / name
            atomic_write_bytes(path, text.encode("utf-8"))
            out.append(path)
        return out
