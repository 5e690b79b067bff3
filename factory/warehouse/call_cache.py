"""The call cache: every model call, appended as one calls/<table>/part-<run>-<seq>.parquet per batch, and the
newest successful result per request key read back from the readable parts."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from factory.core.errors import FactoryError
from factory.core.text import first_line
from factory.warehouse.damage import DamageChecks
from factory.warehouse.parquet import arrow, atomic_write_parquet, to_table
from factory.warehouse.tables import CALL_TABLES


class CallCache(DamageChecks):
    """The calls/ tables of a warehouse."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._seq = 0  # parts this instance wrote, numbering the next one

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
            result = arrow(relation)
        finally:
            con.close()
        return {row["request_key"]: row for row in result.to_pylist()}

    def missing_calls(self, keys: Iterable[str]) -> set[str]:
        """The request keys that no calls table holds a successful result for."""
        wanted = set(keys)
        for table in CALL_TABLES:
            if not wanted:
                break
            wanted -= set(self.cached_calls(table, wanted))
        return wanted

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
