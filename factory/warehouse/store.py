"""The warehouse: the only module that touches files and SQL.

Layout under the root (default `warehouse/`):

    calls/<generation_calls|judge_calls>/part-<run>-<seq>.parquet   every model call, appended as it arrives
    calls/<table>/corrupt/part-*.parquet                              unreadable parts, set aside by a build
    tables/<table>/<recipe>/<stage_key>.parquet                     one materialised version of a stage
    tables/<table>/<recipe>/CURRENT.json                             which version the views show
    tables/<table>/<recipe>/corrupt/                                 unreadable versions and pointers, set aside
    runs/<run_id>.parquet                                            one row per build
    runs/corrupt/<run_id>.parquet                                    unreadable runs rows, set aside by a build
    factory.duckdb                                                   a view per table, for any DuckDB client
    .lock                                                            held (flock) by the build writing here

Every file is written to a temporary name in the same folder and renamed into place, so a reader (or a
resumed build) never sees half a file. Like sqlmesh, each stage version is its own physical file and the
views point at the current one, so going back to an earlier recipe is a pointer change, not a recompute.

A part that is unreadable anyway (a disk filled up, a copy cut short, a file edited by hand) is skipped by
every reader and named in `Warehouse.skipped_parts`; a build moves it to `corrupt/` so its calls are made
again. Stage versions and their CURRENT.json pointers are derived data: a build sets an unreadable one aside
the same way and recomputes the stage (from the call cache); an unreadable runs row goes to runs/corrupt/.
`factory sql` runs in a DuckDB that can read only the files its views read, and only read-only statements
reach it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from factory.core.errors import FactoryError, UserInputError
from factory.core.files import atomic_write_bytes, check_folder, exclusive_lock, make_folder
from factory.core.text import clean, first_line
from factory.warehouse.tables import ALL_TABLES, CALL_TABLES, RUNS, STAGE_TABLES

DB_FILE = "factory.duckdb"
READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.PRAGMA}
# PRAGMAs that only describe the catalog or the engine. Every other one is refused: some read or write files
# (import_database, profiling_output) and some change settings.
SAFE_PRAGMAS = frozenset(
    {
        "table_info",
        "show_tables",
        "show_tables_expanded",
        "show_databases",
        "database_list",
        "database_size",
        "storage_info",
        "version",
        "platform",
        "functions",
        "collations",
        "show",
    }
)
# The columns `cached_calls` relies on; a calls part without them cannot be a cache entry.
CALL_KEY_COLUMNS = ("request_key", "status", "created_at")
CORRUPT_FOLDER = "corrupt"
# What a CURRENT.json may name: a version file in its own folder (stage keys are hex hashes).
_VERSION_NAME = re.compile(r"[A-Za-z0-9_-]+")
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


def _arrow(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    """A query result as Arrow (DuckDB 2 renamed `arrow()` to `to_arrow_table()`)."""
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


def _sql_list(paths: Sequence[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


# ------------------------------------------------------------------------------------------ arrow files
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


# ------------------------------------------------------------------------------------------ parquet checks
def _footer_problem(path: Path, required: Sequence[str]) -> str | None:
    """What is wrong with a Parquet file's footer and schema, read without reading its data; None if fine."""
    if not path.is_file():
        return "not a file"
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return first_line(exc)
    if not schema.names:
        return "no columns"
    missing = [c for c in required if c not in schema.names]
    if missing:
        return f"no column {', '.join(missing)}"
    for name in required:
        kind = schema.field(name).type
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if not (pa.types.is_timestamp(kind) if name == "created_at" else text):
            return f"column {name} has type {kind}"
    return None


def _data_problem(path: Path) -> str | None:
    """What goes wrong reading every page of a Parquet file (slower than the footer check); None if fine."""
    try:
        pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return first_line(exc)
    try:  # pyarrow and DuckDB have different readers: a file only DuckDB chokes on is just as unusable
        con = duckdb.connect(config={"threads": 1, "autoload_known_extensions": False})
        try:
            _arrow(con.sql("SELECT * FROM read_parquet(?)", params=[str(path)]))
        finally:
            con.close()
    except duckdb.Error as exc:
        return first_line(exc)
    return None


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
        # Unreadable files this instance skipped (read-only paths never move files): the CLI names them in a
        # warning. A build moves them to corrupt/ instead (see quarantine_corrupt_parts, quarantine_damaged_tables).
        self.skipped_parts: list[Path] = []
        self.skip_reasons: dict[Path, str] = {}
        # Where each file this instance moved to corrupt/ used to be, in order, so a run can name them.
        self.set_aside: list[Path] = []
        # Checks already made, keyed by (path, size, mtime_ns): a file that changes is checked again.
        self._checked: dict[tuple[str, int, int], str | None] = {}
        self._holding_lock = False
        self._view_files: list[str] = []

    def _check_root(self) -> None:
        check_folder(self.root)

    # ------------------------------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the warehouse for one build, so two builds never interleave their writes (non-blocking)."""
        make_folder(self.root)

        def busy(holder: str) -> str:
            return f"{self.root}: another build is using this warehouse ({holder}); wait for it to finish"

        with exclusive_lock(self.root / ".lock", busy):
            self._holding_lock = True
            try:
                yield
            finally:
                self._holding_lock = False

    # ------------------------------------------------------------------------------------ file checks
    def _stat_key(self, path: Path) -> tuple[str, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (str(path), st.st_size, st.st_mtime_ns)

    def _is_call_part(self, path: Path) -> bool:
        return path.parent.parent == self.root / "calls"

    def _is_stage_file(self, path: Path) -> bool:
        """A stage version or its CURRENT.json (tables/<table>/<unit>/...)."""
        return path.parent.parent.parent == self.root / "tables"

    def _may_set_aside(self, path: Path) -> bool:
        """Whether a build may move this file to corrupt/: what it held is made again (calls, stage versions,
        pointers) or was only a record (a runs row). Anything else is skipped, never moved."""
        return self._is_call_part(path) or self._is_stage_file(path) or path.parent == self.root / "runs"

    def _problem(self, path: Path) -> str | None:
        """The cached footer check of one file (calls parts need the cache's columns); None if it looks fine."""
        key = self._stat_key(path)
        if key is None:
            return "cannot be read"
        if key not in self._checked:
            self._checked[key] = _footer_problem(path, CALL_KEY_COLUMNS if self._is_call_part(path) else ())
        return self._checked[key]

    def _mark_bad(self, path: Path, problem: str) -> None:
        """Remember a file as unusable until it changes (a deeper check found what the footer hid)."""
        key = self._stat_key(path)
        if key is not None:
            self._checked[key] = problem

    def _reject(self, path: Path, problem: str) -> None:
        """A file a full read found bad: skip it, or set it aside while a build holds the lock (`_usable`)."""
        self._mark_bad(path, problem)
        self._usable([str(path)])

    def _skip(self, path: Path, problem: str) -> None:
        if path not in self.skip_reasons:
            self.skipped_parts.append(path)
        self.skip_reasons[path] = problem

    def _usable(self, paths: Iterable[str]) -> list[str]:
        """The files that pass the footer check; the others are skipped (or set aside while building)."""
        good = []
        for p in paths:
            path = Path(p)
            problem = self._problem(path)
            if problem is not None and not os.path.lexists(path):
                continue  # removed since it was listed: nothing to read, skip or move
            if problem is None:
                good.append(p)
            elif self._holding_lock and self._may_set_aside(path):
                self._quarantine(path)
            else:
                self._skip(path, problem)
        return good

    def _quarantine(self, part: Path) -> Path:
        """Move a damaged file to the corrupt/ folder beside it, where no reader's glob looks (calls parts,
        stage versions and pointers, runs rows); the file is kept, never deleted."""
        folder = part.parent / CORRUPT_FOLDER
        folder.mkdir(exist_ok=True)
        target, n = folder / part.name, 1
        while target.exists():  # the same name set aside before: keep both
            target, n = folder / f"{part.stem}.{n}{part.suffix}", n + 1
        os.replace(part, target)
        self.set_aside.append(part)
        if self._is_stage_file(part) and part.suffix == ".parquet":
            # The empty marker would claim a complete version that is no longer there.
            part.with_suffix(".complete").unlink(missing_ok=True)
        if part in self.skip_reasons:
            del self.skip_reasons[part]
            self.skipped_parts.remove(part)
        return target

    def quarantine_corrupt_parts(self) -> list[Path]:
        """Move every unreadable calls part to calls/<table>/corrupt/ and return where each went.

        Call it with the warehouse lock held (a build does, at its start): those calls then count as not
        cached and are made again. The check reads footers only; a part whose pages turn out corrupt later
        is set aside by `cached_calls` when it fails.
        """
        self._check_root()
        moved = []
        for table in CALL_TABLES:
            for part in map(Path, self._parts(table)):
                if self._problem(part) is not None and os.path.lexists(part):
                    moved.append(self._quarantine(part))
        return moved

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

    def require(self) -> None:
        """For read-only commands: the root must be a warehouse (a folder that a build or judge-eval wrote),
        so a mistyped `--warehouse` is an error rather than a quietly empty answer."""
        check_folder(self.root)
        if not self.root.is_dir():
            raise UserInputError(f"{self.root}: no warehouse here (run `factory build RECIPE` first)")
        if not any((self.root / name).exists() for name in ("runs", "tables", "calls", DB_FILE)):
            raise UserInputError(f"{self.root}: not a factory warehouse (no runs, tables or calls in it)")

    def sweep_temporary(self) -> list[Path]:
        """Remove the temporary files of writes that were killed before their rename (SIGKILL skips every
        `finally`). Call it with the warehouse lock held: then no write is in flight. Readers never saw them."""
        self._check_root()
        swept = []
        for folder in ("calls", "tables", "runs"):
            base = self.root / folder
            for tmp in base.rglob(".*.tmp") if base.is_dir() else []:
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink(missing_ok=True)
                    swept.append(tmp)
        for tmp in self.root.glob(".factory-*.duckdb*") if self.root.is_dir() else []:
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                swept.append(tmp)
        return swept

    def missing_calls(self, keys: Iterable[str]) -> set[str]:
        """The request keys that no calls table holds a successful result for."""
        wanted = set(keys)
        for table in CALL_TABLES:
            if not wanted:
                break
            wanted -= set(self.cached_calls(table, wanted))
        return wanted

    def skipped_warning(self) -> str | None:
        """One line naming the unreadable files that reads skipped, or None when there were none."""
        if not self.skipped_parts:
            return None
        names = ", ".join(clean(p) for p in self.skipped_parts)  # a file name can hold anything: made printable
        # Say what the answer lacks: a skipped stage version or CURRENT.json leaves its table short, not empty.
        return (
            f"warning: skipped {len(self.skipped_parts)} unreadable file(s), so their rows are missing here (the "
            f"next build sets them aside and remakes the stage tables and calls among them): {names}"
        )

    def _set_aside_named(self, message: str, files: Sequence[str], search_all: bool = True) -> bool:
        """After a DuckDB read error: find the bad files among `files`, skip or set them aside; any found?

        Files the message names are read in full first; if none of them is bad and `search_all`, every file
        is (one by one), since DuckDB does not always say which file it was reading.
        """
        named = [f for f in files if f in message]
        rest = [f for f in files if f not in named] if search_all else []
        for candidates in (named, rest):
            found = False
            for f in candidates:
                problem = _data_problem(Path(f))
                if problem is not None:
                    found = True
                    self._reject(Path(f), problem)
            if found:
                return True
        return False

    # ------------------------------------------------------------------------------------------- calls
    def append_calls(self, table: str, run_id: str, rows: Sequence[dict[str, Any]]) -> None:
        """Flush a batch of model-call rows as one new part file."""
        if not rows:
            return
        self._check_root()
        self._seq += 1
        path = self.root / "calls" / table / f"part-{run_id}-{self._seq:06d}.parquet"
        atomic_write_parquet(path, to_table(rows, CALL_TABLES[table]))

    def _parts(self, table: str) -> list[str]:
        folder = self.root / "calls" / table
        return sorted(str(p) for p in folder.glob("part-*.parquet")) if folder.is_dir() else []

    def cached_calls(self, table: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The newest successful call for each request key that has one; failures never count.

        Unreadable parts are left out (their calls count as not cached): skipped and named in
        `skipped_parts`, or moved to corrupt/ while this instance holds the lock.
        """
        wanted = pa.table({"request_key": pa.array(sorted(set(keys)), pa.string())})
        if wanted.num_rows == 0:
            return {}
        while True:  # each retry leaves out at least one more part, so this ends
            parts = self._usable(self._parts(table))
            if not parts:
                return {}
            try:
                return self._read_cached(parts, wanted)
            except duckdb.Error as exc:
                if not self._set_aside_named(str(exc), parts):
                    folder = self.root / "calls" / table
                    raise FactoryError(f"{folder}: cannot read the call cache: {first_line(exc)}") from None

    @staticmethod
    def _read_cached(parts: list[str], wanted: pa.Table) -> dict[str, dict[str, Any]]:
        con = duckdb.connect(config={"autoload_known_extensions": False, "python_enable_replacements": False})
        try:
            con.register("wanted", wanted)
            relation = con.sql(
                "SELECT c.* FROM read_parquet(?, union_by_name=true) c "
                "JOIN wanted USING (request_key) WHERE c.status = 'ok' "
                "QUALIFY row_number() OVER (PARTITION BY c.request_key ORDER BY c.created_at DESC) = 1",
                params=[parts],
            )
            result = _arrow(relation)
        finally:
            con.close()
        return {row["request_key"]: row for row in result.to_pylist()}

    # ------------------------------------------------------------------------------------ stage tables
    def _folder(self, table: str, recipe: str) -> Path:
        return self.root / "tables" / table / recipe

    @staticmethod
    def _read_pointer(path: Path) -> dict[str, Any]:
        """A CURRENT.json's content; OSError or ValueError when it is unreadable or names no version file."""
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("stage_key"), str):
            raise ValueError("no stage_key")
        if not _VERSION_NAME.fullmatch(data["stage_key"]):  # a path would make the views read outside the folder
            raise ValueError("its stage_key is not a version name")
        return data

    def _pointer(self, path: Path) -> dict[str, Any] | None:
        """A CURRENT.json's content, or None when there is none to use. A damaged one is set aside while a
        build holds the lock (the stage is then reused or recomputed by key), else skipped and named."""
        if not path.is_file():
            return None
        try:
            return self._read_pointer(path)
        except (OSError, ValueError) as exc:
            self._reject(path, f"not a readable CURRENT.json ({first_line(exc)})")
        return None

    def current(self, table: str, recipe: str) -> Current | None:
        """The version of `table` the views show for `recipe`, if any."""
        data = self._pointer(self._folder(table, recipe) / "CURRENT.json")
        if data is None:
            return None
        return Current(data["stage_key"], bool(data.get("complete")), str(data.get("run_id")))

    def has_version(self, table: str, recipe: str, stage_key: str) -> bool:
        """Whether a complete version of this stage exists (it may be an older, not current, one)."""
        marker = self._folder(table, recipe) / f"{stage_key}.complete"
        return marker.is_file() and (self._folder(table, recipe) / f"{stage_key}.parquet").is_file()

    def write_stage(
        self, table: str, recipe: str, stage_key: str, run_id: str, rows: Sequence[dict[str, Any]], complete: bool
    ) -> None:
        """Materialise a stage version and make it current. Incomplete versions are shown but redone."""
        self._check_root()
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
        self._check_root()
        data = {"stage_key": stage_key, "complete": complete, "run_id": run_id}
        atomic_write_bytes(self._folder(table, recipe) / "CURRENT.json", json.dumps(data).encode())

    def read_stage(self, table: str, recipe: str, stage_key: str) -> list[dict[str, Any]]:
        """All rows of one stage version."""
        return pq.read_table(self._folder(table, recipe) / f"{stage_key}.parquet").to_pylist()

    def read_version(self, table: str, unit: str, stage_key: str) -> list[dict[str, Any]] | None:
        """Rows of the complete version `stage_key` of a stage, or None when there is none to reuse.

        A version that cannot be read is derived data, not an error: while a build holds the lock it is moved
        to corrupt/ beside it (and named in `set_aside`), so the caller recomputes the stage from its inputs and
        the call cache; otherwise it is skipped and named in `skipped_parts`.
        """
        if not self.has_version(table, unit, stage_key):
            return None
        path = self._folder(table, unit) / f"{stage_key}.parquet"
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError, pa.ArrowException) as exc:
            self._reject(path, first_line(exc))
        return None

    def set_aside_in(self, table: str, unit: str, since: int = 0) -> list[Path]:
        """The files of one stage's folder that this instance moved to corrupt/ (from `set_aside[since]` on),
        where each was."""
        folder = self._folder(table, unit)
        return [p for p in self.set_aside[since:] if p.parent == folder]

    def _current_files(self, table: str) -> list[str]:
        base = self.root / "tables" / table
        files = []
        for pointer in sorted(base.glob("*/CURRENT.json")) if base.is_dir() else []:
            data = self._pointer(pointer)
            path = pointer.parent / f"{data['stage_key']}.parquet" if data else None
            if path is not None and path.is_file():
                files.append(str(path))
        return files

    # -------------------------------------------------------------------------------------------- runs
    def write_run(self, row: dict[str, Any]) -> None:
        """Record (or update) one build's row in the runs table."""
        self._check_root()
        atomic_write_parquet(self.root / "runs" / f"{row['run_id']}.parquet", to_table([row], RUNS))

    # --------------------------------------------------------------------------------------------- SQL
    def _sources(self) -> dict[str, list[str]]:
        """The readable files behind each view (unreadable ones are skipped and named in skipped_parts)."""
        files = {t: self._usable(self._current_files(t)) for t in STAGE_TABLES}
        files.update({t: self._usable(self._parts(t)) for t in CALL_TABLES})
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
                    f'CREATE OR REPLACE VIEW "{table}" AS SELECT * FROM read_parquet({_sql_list(paths)}, '
                    "union_by_name=true)"
                )
            else:
                # An empty table with the right columns, so queries over a new warehouse still type-check.
                con.register("_empty", ALL_TABLES[table].empty_table())
                con.execute(f'CREATE OR REPLACE TABLE "{table}" AS SELECT * FROM _empty')
                con.unregister("_empty")
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
                    if self._set_aside_named(str(exc), self._view_files):
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
                con.execute(f"SET allowed_paths = {_sql_list(files)}")
                con.execute("SET enable_external_access = false")
                if memory_limit is not None:  # after the views: the limit is for the query, not for reading footers
                    con.execute(f"SET memory_limit = '{int(memory_limit)}B'")
                con.execute("SET lock_configuration = true")
                return con
            except duckdb.Error as exc:
                con.close()
                if not self._set_aside_named(str(exc), self._view_files):
                    raise FactoryError(f"{self.root}: cannot define the table views: {first_line(exc)}") from None
            except BaseException:
                con.close()
                raise

    def _with_views(self, work: Callable[[duckdb.DuckDBPyConnection], _T], limits: SqlLimits | None = None) -> _T:
        """Run `work` on a fresh confined connection, again without any part that turns out unreadable.

        It runs in a worker thread, so that Ctrl-C and the time limit stop it at once (`_interruptible`)."""
        while True:
            con = self.connect(limits.memory if limits else None)
            try:
                return _interruptible(con, work, limits)
            except duckdb.Error as exc:
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
            _check_read_only(con, sql)
            relation = con.sql(sql)
            return pa.table({}) if relation is None else _arrow(relation)

        try:
            return self._with_views(run)
        except duckdb.Error as exc:
            raise _sql_error(exc, sql, None) from None

    def run_sql(self, sql: str, limits: SqlLimits, keep: int | None = None) -> SqlResult:
        """`factory sql`: one read-only query, as `query`, under `limits`, with every column in a type that
        each output format shows (`_printable`), keeping only the first `keep` rows (all are counted)."""

        def run(con: duckdb.DuckDBPyConnection) -> SqlResult:
            _check_read_only(con, sql)
            relation = con.sql(sql)
            return SqlResult(pa.table({}), 0) if relation is None else _collect(_printable(relation), keep, limits)

        try:
            return self._with_views(run, limits)
        except duckdb.Error as exc:
            raise _sql_error(exc, sql, limits) from None

    def row_counts(self) -> dict[str, int]:
        """Rows per table in the current views."""

        def count(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
            return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in ALL_TABLES}

        try:
            return self._with_views(count)
        except duckdb.Error as exc:
            raise FactoryError(f"{self.root}: cannot count rows: {first_line(exc)}") from None

    # ------------------------------------------------------------------------- judge-eval (new helpers)
    def current_rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of the current versions of a stage table (all recipes or units), as dicts."""
        if table not in STAGE_TABLES:
            raise ValueError(f"not a stage table: {table}")
        tables = []
        for f in self._usable(self._current_files(table)):
            try:
                tables.append(pq.read_table(f))
            except (OSError, ValueError, pa.ArrowException) as exc:  # skipped and named, like the views do
                self._reject(Path(f), first_line(exc))
        if not tables:
            return []
        return pa.concat_tables(tables, promote_options="default").to_pylist()


# ------------------------------------------------------------------------------------- read-only statements
_REFUSAL = "factory sql runs one read-only query (SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN, a few PRAGMAs)"
_COMMENTS = re.compile(r"/\*.*?\*/|--[^\n]*", re.S)
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:(ANALY[SZ]E)\b\s*)?(?:\(([^)]*)\)\s*)?(.*)$", re.S | re.I)


def _refuse(what: str) -> UserInputError:
    return UserInputError(f"{_REFUSAL}: got {what}")


def _check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but one statement that only reads: SELECT-like statements, EXPLAIN of a SELECT without
    ANALYZE (which would run the statement, a COPY TO included), PRAGMAs in SAFE_PRAGMAS and their CALL form.

    DuckDB's settings confine file access too, but a COPY TO a file the views read is allowed by them, so
    this check is what keeps the warehouse unwritable through `factory sql`.
    """
    try:
        statements = con.extract_statements(sql)
    except ValueError:  # a statement type the Python API cannot name (e.g. UPDATE EXTENSIONS)
        raise _refuse(" ".join(_COMMENTS.sub(" ", sql).split()[:2]).upper() or "nothing") from None
    if not statements:
        raise _refuse("nothing (an empty query)")
    if len(statements) != 1:
        raise _refuse(f"{len(statements)} statements")
    statement = statements[0]
    try:
        kind = statement.type
    except ValueError:
        raise _refuse(" ".join(_COMMENTS.sub(" ", statement.query).split()[:2]).upper()) from None
    text = _COMMENTS.sub(" ", statement.query).strip()
    if kind == duckdb.StatementType.SELECT:
        return
    if kind == duckdb.StatementType.EXPLAIN:
        match = _EXPLAIN.match(text)
        if match is None:
            raise _refuse("EXPLAIN")
        analyze, options, inner = match.groups()
        if analyze or (options and re.search(r"\bANALY[SZ]E\b", options, re.I)):
            raise _refuse("EXPLAIN ANALYZE")
        try:
            inner_kinds = [s.type for s in con.extract_statements(inner)]
        except (ValueError, duckdb.Error):
            raise _refuse("EXPLAIN of a statement that is not a query") from None
        if inner_kinds != [duckdb.StatementType.SELECT]:
            raise _refuse(f"EXPLAIN {' '.join(k.name for k in inner_kinds)}")
        return
    if kind == duckdb.StatementType.PRAGMA:
        match = re.match(r"PRAGMA\s+([A-Za-z_][A-Za-z0-9_]*)", text, re.I)
        name = match.group(1).lower() if match else "?"
        if name in SAFE_PRAGMAS and "=" not in text:
            return
        raise _refuse(f"PRAGMA {name}")
    if kind == duckdb.StatementType.CALL:
        match = re.match(r"CALL\s+pragma_([A-Za-z_][A-Za-z0-9_]*)\s*\(", text, re.I)
        if match and match.group(1).lower() in SAFE_PRAGMAS:
            return
        raise _refuse("CALL")
    # The statement's own first word reads better than DuckDB's type name (INSTALL is of type LOAD).
    raise _refuse(text.split()[0].upper() if text else kind.name)


# ------------------------------------------------------------------------- factory sql: limits and results
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


def _interruptible(
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


def _sql_error(exc: duckdb.Error, sql: str, limits: SqlLimits | None) -> UserInputError:
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


def _printable(relation: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """The relation with each column that `_shown_as_is` refuses cast to VARCHAR (by position: two columns may
    share a name)."""
    if all(_shown_as_is(kind) for kind in relation.types):
        return relation
    columns = []
    for i, (name, kind) in enumerate(zip(relation.columns, relation.types, strict=True), start=1):
        quoted = '"' + name.replace('"', '""') + '"'
        columns.append(f"#{i} AS {quoted}" if _shown_as_is(kind) else f"CAST(#{i} AS VARCHAR) AS {quoted}")
    return relation.project(", ".join(columns))


def _collect(relation: duckdb.DuckDBPyRelation, keep: int | None, limits: SqlLimits) -> SqlResult:
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
