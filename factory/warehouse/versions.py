"""Stage versions: each materialised version of a stage table is its own file under
tables/<table>/<recipe>/<stage_key>.parquet, and CURRENT.json points the views at one of them, so going back to
an earlier recipe is a pointer change, not a recompute.

A build cut into shards (docs/DESIGN.md, "Shards") writes one version file per shard, each under its own
shard key, and its CURRENT.json lists them under `shards`; the views read them all. A pointer without that
list names one file, its `stage_key`."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from factory.core.files import atomic_write_bytes
from factory.core.text import first_line
from factory.warehouse.damage import DamageChecks
from factory.warehouse.parquet import atomic_write_parquet, to_table
from factory.warehouse.tables import STAGE_TABLES

# What a CURRENT.json may name: a version file in its own folder (stage keys are hex hashes).
_VERSION_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Current:
    """The version of one stage table that the views show."""

    stage_key: str
    complete: bool
    run_id: str
    shards: tuple[str, ...] = ()
    """The shard keys whose files make up the version (empty: the one file `stage_key`)."""

    @property
    def files(self) -> tuple[str, ...]:
        """The version names whose files hold the rows."""
        return self.shards or (self.stage_key,)


class StageVersions(DamageChecks):
    """The tables/ folder of a warehouse."""

    def _folder(self, table: str, recipe: str) -> Path:
        return self.root / "tables" / table / recipe

    @staticmethod
    def _read_pointer(path: Path) -> dict[str, Any]:
        """A CURRENT.json's content; OSError or ValueError when it is unreadable or names no version file."""
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("stage_key"), str):
            raise ValueError("no stage_key")
        names = [data["stage_key"], *data.get("shards", [])]
        # A path would make the views read outside the folder.
        if not isinstance(data.get("shards", []), list) or not all(
            isinstance(n, str) and _VERSION_NAME.fullmatch(n) for n in names
        ):
            raise ValueError("its stage_key or shards are not version names")
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
        shards = tuple(data.get("shards", ()))
        return Current(data["stage_key"], bool(data.get("complete")), str(data.get("run_id")), shards)

    def has_version(self, table: str, recipe: str, stage_key: str) -> bool:
        """Whether a complete version of this stage exists (it may be an older, not current, one)."""
        marker = self._folder(table, recipe) / f"{stage_key}.complete"
        return marker.is_file() and (self._folder(table, recipe) / f"{stage_key}.parquet").is_file()

    def write_stage(
        self, table: str, recipe: str, stage_key: str, run_id: str, rows: Sequence[dict[str, Any]], complete: bool
    ) -> None:
        """Materialise a stage version and make it current. Incomplete versions are shown but redone."""
        self.write_version(table, recipe, stage_key, rows, complete)
        self.set_current(table, recipe, stage_key, run_id, complete)

    def write_version(
        self, table: str, recipe: str, stage_key: str, rows: Sequence[dict[str, Any]], complete: bool
    ) -> None:
        """Materialise one version file (a stage's, or one shard's) without pointing the views at it."""
        self._check_root()
        folder = self._folder(table, recipe)
        atomic_write_parquet(folder / f"{stage_key}.parquet", to_table(rows, STAGE_TABLES[table]))
        marker = folder / f"{stage_key}.complete"
        if complete:
            atomic_write_bytes(marker, b"")
        else:
            marker.unlink(missing_ok=True)

    def set_current(
        self, table: str, recipe: str, stage_key: str, run_id: str, complete: bool, shards: Sequence[str] = ()
    ) -> None:
        """Point the views at one version of a stage table (made of the files `shards`, when given)."""
        self._check_root()
        data: dict[str, Any] = {"stage_key": stage_key, "complete": complete, "run_id": run_id}
        if shards:
            data["shards"] = list(shards)
        atomic_write_bytes(self._folder(table, recipe) / "CURRENT.json", json.dumps(data).encode())

    def read_stage(self, table: str, recipe: str, stage_key: str) -> list[dict[str, Any]]:
        """All rows of one stage version."""
        return pq.read_table(self._folder(table, recipe) / f"{stage_key}.parquet").to_pylist()

    def version_rows(self, table: str, unit: str, stage_key: str) -> int:
        """How many rows a version file holds, from its footer (a reused shard is counted without reading it)."""
        return int(pq.ParquetFile(self._folder(table, unit) / f"{stage_key}.parquet").metadata.num_rows)

    def read_version(
        self,
        table: str,
        unit: str,
        stage_key: str,
        columns: Sequence[str] | None = None,
        *,
        complete: bool = True,
    ) -> list[dict[str, Any]] | None:
        """Rows of the complete version `stage_key` of a stage (only `columns`, when given; any version with
        `complete=False`), or None when there is none to reuse.

        A version that cannot be read is derived data, not an error: while a build holds the lock it is moved
        to corrupt/ beside it (and named in `set_aside`), so the caller recomputes the stage from its inputs and
        the call cache; otherwise it is skipped and named in `skipped_parts`.
        """
        found = self.read_version_table(table, unit, stage_key, columns, complete=complete)
        return None if found is None else found.to_pylist()

    def read_version_table(
        self,
        table: str,
        unit: str,
        stage_key: str,
        columns: Sequence[str] | None = None,
        *,
        complete: bool = True,
    ) -> pa.Table | None:
        """`read_version` as an Arrow table."""
        path = self._folder(table, unit) / f"{stage_key}.parquet"
        if not (self.has_version(table, unit, stage_key) if complete else path.is_file()):
            return None
        try:
            return pq.read_table(path, columns=None if columns is None else list(columns))
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
            names = (data.get("shards") or [data["stage_key"]]) if data else []
            for name in names:
                path = pointer.parent / f"{name}.parquet"
                if path.is_file():
                    files.append(str(path))
        return files

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
