"""The call cache: every model call, appended as one calls/<table>/part-<run>-<seq>.parquet per batch and
merged by builds into compact-<run>-<seq>.parquet files (compaction.py), and the newest successful result per
request key read back from the readable files that no compacted file covers."""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from factory.core.errors import FactoryError
from factory.core.text import first_line
from factory.warehouse import compaction
from factory.warehouse.compaction import COMPACT_GLOB, PART_GLOB, ROWS_PER_FILE, Source, merge, read_footer
from factory.warehouse.damage import DamageChecks
from factory.warehouse.parquet import arrow, atomic_write_parquet, to_table
from factory.warehouse.tables import CALL_TABLES


class CallCache(DamageChecks):
    """The calls/ tables of a warehouse."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._seq = 0  # parts this instance wrote, numbering the next one
        # Footers of compacted files read (what each covers, its rows), keyed by (path, size, mtime) as `_checked`.
        self._footers: dict[tuple[str, int, int], tuple[frozenset[str], int]] = {}
        # Per table, the parts this instance wrote and the `hash()` of each of their request keys (8 bytes a
        # call): a lookup reads only those of its own parts that may hold a wanted key, not every part a
        # build has written so far (a build of 60K prompts writes thousands, and looks up 60 shards).
        self._mine: dict[str, list[tuple[str, pa.Array]]] = {}

    @property
    def parts_written(self) -> int:
        """How many calls parts this instance has written."""
        return self._seq

    def append_calls(self, table: str, run_id: str, rows: Sequence[dict[str, Any]]) -> None:
        """Flush a batch of model-call rows as one new part file."""
        if not rows:
            return
        self._check_root()
        self._seq += 1
        path = self.root / "calls" / table / f"part-{run_id}-{self._seq:06d}.parquet"
        atomic_write_parquet(path, to_table(rows, CALL_TABLES[table]))
        hashes = pa.array([hash(r["request_key"]) for r in rows], pa.int64())
        self._mine.setdefault(table, []).append((str(path), hashes))

    def _worth_reading(self, table: str, parts: list[str], keys: list[str]) -> list[str]:
        """The parts that may hold one of `keys`: every part this instance did not write, and those it wrote
        whose key hashes meet the keys' (a hash collision only adds a part; the query matches whole keys).
        One of its own parts always stays in, so the result has the columns it would have with them all."""
        listed = set(parts)
        # A part merged into a compacted file (docs/DESIGN.md, "Compaction") is no longer listed: forget it.
        mine = self._mine[table] = [(path, hashes) for path, hashes in self._mine.get(table, []) if path in listed]
        if not mine:
            return parts
        wanted = pa.array([hash(k) for k in keys], pa.int64())
        # One lookup over all of them (the wanted set is built once), then the part of each hit.
        hits = pc.is_in(pa.concat_arrays([hashes for _, hashes in mine]), value_set=wanted)
        ends = list(accumulate(len(hashes) for _, hashes in mine))
        holding = {mine[bisect_right(ends, i)][0] for i in pc.indices_nonzero(hits).to_pylist()}
        own = {path for path, _ in mine}
        kept = [p for p in parts if p not in own or p in holding]
        if not holding and len(kept) < len(parts):
            if not kept:
                return []  # only this instance's parts, none holding a wanted key: nothing to read
            kept.append(next(p for p in parts if p in own))
        return kept

    def _footer(self, path: Path) -> tuple[frozenset[str], int]:
        """What a compacted file covers and its rows (read from its footer once per version of the file)."""
        key = self._stat_key(path)
        if key is None:
            return frozenset(), 0
        if key not in self._footers:
            self._footers[key] = read_footer(path)
        return self._footers[key]

    def _listing(self, table: str) -> tuple[list[str], set[str]]:
        """The files of a calls table that readers use (compacted files and the parts no compacted file
        covers, readable or not), and the names of the covered ones.

        The compacted files are listed before and after the parts, again until both lists agree: a compaction
        renames its file into place before it removes what it covers, so when no compacted file appeared
        meanwhile, every part it covers was still there when the parts were listed. A file that goes after
        this listing makes the read fail and list again (`_call_files`, and the retries of every reader).
        """
        folder = self.root / "calls" / table
        if not folder.is_dir():
            return [], set()
        compacted = sorted(p.name for p in folder.glob(COMPACT_GLOB))
        while True:
            parts = sorted(p.name for p in folder.glob(PART_GLOB))
            again = sorted(p.name for p in folder.glob(COMPACT_GLOB))
            if again == compacted:
                break
            compacted = again
        covered = {name for c in compacted for name in self._footer(folder / c)[0]}
        return [str(folder / n) for n in sorted({*parts, *compacted} - covered)], covered

    def _parts(self, table: str) -> list[str]:
        """The files of a calls table that readers use, readable or not (see `_listing`)."""
        return self._listing(table)[0]

    def _call_files(self, table: str, keep: Callable[[list[str]], list[str]] | None = None) -> list[str]:
        """The readable files of a calls table (unreadable ones skipped, or set aside under the lock), listed
        again while some listed file vanished before it was checked (a concurrent compaction removed it).
        With `keep`, only the listed files it keeps are checked and returned."""
        while True:
            start = len(self.set_aside)
            listed, _ = self._listing(table)
            if keep is not None:
                listed = keep(listed)
            usable = self._usable(listed)
            moved = set(map(str, self.set_aside[start:]))
            if all(p in moved or os.path.lexists(p) for p in listed):
                return usable

    def cached_calls(self, table: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The newest successful call for each request key that has one; failures never count.

        Unreadable parts are left out (their calls count as not cached): skipped and named in
        `skipped_parts`, or moved to corrupt/ while this instance holds the lock.
        """
        unique = sorted(set(keys))
        wanted = pa.table({"request_key": pa.array(unique, pa.string())})
        if wanted.num_rows == 0:
            return {}
        while True:  # each retry leaves out at least one more part, so this ends
            # Only the parts worth reading are checked: a build's lookups would otherwise check every part it
            # wrote so far (a stat each, a footer read once each) to read none of them.
            parts = self._call_files(table, lambda listed: self._worth_reading(table, listed, unique))
            if not parts:
                return {}
            try:
                return self._read_cached(parts, wanted)
            except duckdb.Error as exc:
                if not self._vanished(parts) and not self._set_aside_named(str(exc), parts):
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

    def compact_calls(self, run_id: str, min_files: int = compaction.MIN_FILES) -> list[Path]:
        """Merge each calls table's small files (parts, and compacted files under half of ROWS_PER_FILE
        rows) into compacted files, once a table has `min_files` of them; returns the new files.

        Call it with the warehouse lock held (a build does, at its end), so nothing else writes or removes
        calls files meanwhile. Files a killed compaction left covered are removed first. Every row is kept,
        failed calls included; a file that does not read in full is left for the damage checks.
        """
        self._check_root()
        if not self._holding_lock:
            raise FactoryError(f"{self.root}: compacting the call cache needs the warehouse lock")
        written: list[Path] = []
        for table in CALL_TABLES:
            folder = self.root / "calls" / table
            listed, covered = self._listing(table)
            compaction.remove_covered(folder, covered)
            small = []
            for p in map(Path, self._usable(listed)):
                if not p.name.startswith("compact-"):
                    small.append(Source(p, frozenset()))
                elif (footer := self._footer(p))[1] < ROWS_PER_FILE // 2:
                    small.append(Source(p, footer[0]))
            if len(small) >= min_files:
                try:
                    written += merge(folder, f"compact-{run_id}", small, CALL_TABLES[table], covered)
                except (OSError, pa.ArrowException) as exc:  # e.g. a full disk: the parts are all still there
                    raise FactoryError(f"{folder}: cannot compact the call cache: {first_line(exc)}") from None
        return written
