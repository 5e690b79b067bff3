"""Compaction of the call cache: many small calls parts merged into a few large compacted files.

Every batch of model calls lands as its own part file, so a large build leaves thousands of them, and every
reader (the views, `cached_calls`, the damage checks) pays per file. A build ends by merging them, with the
warehouse lock held, into `compact-<run>-<seq>.parquet` files of bounded row count.

Crash safety rests on one rule: a compacted file names, in its own footer, every file whose rows it holds
(`covers`), and readers ignore a file that any compacted file covers. The compacted file is written in full
under a temporary name and renamed into place first; only then are the files it covers removed. A kill between
the two leaves both, and readers still count each row once.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"
COMPACT_GLOB = "compact-*.parquet"
COVERS_KEY = b"factory.covers"  # footer metadata: a JSON list of the file names whose rows the file holds
ROWS_PER_FILE = 250_000  # a compacted file is closed once it holds this many rows (at a source file's end)
ROW_GROUP_ROWS = 65_536  # rows buffered before a row group is written: bounds the memory compaction takes
MIN_FILES = 16  # compaction runs once a table has this many small files; fewer cost readers little


@dataclass(frozen=True)
class Source:
    """A file to merge: its path and the names it covers itself (a compacted file being merged again)."""

    path: Path
    covers: frozenset[str]


def read_footer(path: Path) -> tuple[frozenset[str], int]:
    """The file names a compacted file covers and its row count, from its footer; nothing and 0 for an
    unreadable footer (such a file is skipped or set aside, so the files it would cover stay visible)."""
    try:
        footer = pq.read_metadata(path)
        return frozenset(json.loads((footer.metadata or {}).get(COVERS_KEY, b"[]"))), footer.num_rows
    except (OSError, ValueError, TypeError, pa.ArrowException):
        return frozenset(), 0


def fits(schema: pa.Schema, target: pa.Schema) -> bool:
    """Whether a file's columns are all target columns of the same type (missing ones become nulls). A file
    with any other column is left as it is rather than have a column dropped."""
    return all(target.get_field_index(f.name) >= 0 and target.field(f.name).type == f.type for f in schema)


def _conformed(table: pa.Table, target: pa.Schema) -> pa.Table:
    columns = [
        table.column(f.name) if f.name in table.schema.names else pa.nulls(table.num_rows, f.type) for f in target
    ]
    return pa.Table.from_arrays(columns, schema=target)


def _pieces(path: Path, target: pa.Schema) -> list[pa.Table] | Iterator[pa.Table] | None:
    """A file's rows in the target columns (missing ones as nulls), or None when a page does not read or a
    column does not fit: such a file stays where it is, for the readers' own damage handling (skipped, or
    set aside by a build), and is never merged. A small file is read whole; a larger one (a compacted file
    merged again) is read through once to check it, then streamed, so memory stays bounded."""
    try:
        source = pq.ParquetFile(path)
        if not fits(source.schema_arrow, target):
            return None
        if source.metadata.num_rows <= ROW_GROUP_ROWS:
            return [_conformed(source.read(), target)]
        for _ in source.iter_batches(batch_size=ROW_GROUP_ROWS):
            pass
    except (OSError, ValueError, pa.ArrowException):
        return None
    batches = source.iter_batches(batch_size=ROW_GROUP_ROWS)
    return (_conformed(pa.Table.from_batches([b]), target) for b in batches)


class _Output:
    """One compacted file being written: a temporary file, renamed into place by `close`."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        fd, self.tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.rows = 0
        self.covers: set[str] = set()

    def add(self, source: Source, pieces: Iterable[pa.Table]) -> None:
        for table in pieces:
            self.buffer.append(table)
            self.buffered += table.num_rows
            self.rows += table.num_rows
            if self.buffered >= ROW_GROUP_ROWS:
                self._flush()
        self.covers |= {source.path.name, *source.covers}

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.concat_tables(self.buffer), row_group_size=ROW_GROUP_ROWS)
            self.buffer, self.buffered = [], 0

    def close(self) -> None:
        """Finish the file, with what it covers in its footer, fsync it and rename it into place."""
        self._flush()
        self.writer.add_key_value_metadata({COVERS_KEY: json.dumps(sorted(self.covers)).encode()})
        self.writer.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def _names(folder: Path, prefix: str, taken: set[str]) -> Iterator[Path]:
    """New file names: never one that exists or that a compacted file covers (a file of a covered name would
    be ignored by every reader), whatever the prefix."""
    n = 0
    while True:
        n += 1
        path = folder / f"{prefix}-{n:06d}.parquet"
        if path.name not in taken and not path.exists():
            yield path


def merge(folder: Path, prefix: str, sources: Sequence[Source], schema: pa.Schema, covered: set[str]) -> list[Path]:
    """Write the rows of `sources` into new compacted files of about ROWS_PER_FILE rows each (`prefix` names
    them; `covered`: the names compacted files cover already), then remove the files they cover; returns the
    new files. Sources that do not read in full or do not fit `schema` are left as they are."""
    if len(sources) < 2:
        return []  # nothing to gain: one file merged alone is the same number of files
    names = _names(folder, prefix, covered | {n for s in sources for n in (s.path.name, *s.covers)})
    written: list[Path] = []
    removable: set[str] = set()
    out: _Output | None = None
    try:
        for source in sources:
            pieces = _pieces(source.path, schema)
            if pieces is None:
                continue
            if out is None:
                out = _Output(next(names), schema)
            out.add(source, pieces)
            if out.rows >= ROWS_PER_FILE:
                out.close()
                written.append(out.path)
                removable |= out.covers
                out = None
        if out is not None:
            out.close()
            written.append(out.path)
            removable |= out.covers
            out = None
    finally:
        if out is not None:
            out.discard()
    _sync_folder(folder)  # the renames are on disk before any covered file goes
    for name in sorted(removable):
        (folder / name).unlink(missing_ok=True)
    return written


def remove_covered(folder: Path, covered: set[str]) -> list[str]:
    """Remove files that a compacted file covers but that a killed compaction left behind; returns their names."""
    gone: list[str] = []
    if not covered or not folder.is_dir():
        return gone
    # One listing of the folder, not a stat per covered name: the covered names of a large warehouse run to
    # thousands, and this runs at the end of every build.
    with os.scandir(folder) as entries:
        left = sorted(e.name for e in entries if e.name in covered and e.is_file(follow_symlinks=False))
    for name in left:
        (folder / name).unlink()
        gone.append(name)
    return gone


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
