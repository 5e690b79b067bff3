"""Parquet files of the warehouse: writing them atomically, rows as Arrow tables, and the two checks that
tell a damaged file from a good one (its footer and schema, then every page)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from factory.core.files import atomic_write_bytes
from factory.core.text import first_line


def arrow(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    """A query result as Arrow (DuckDB 2 renamed `arrow()` to `to_arrow_table()`)."""
    fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
    return fetch()


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


def footer_problem(path: Path, required: Sequence[str]) -> str | None:
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


def data_problem(path: Path) -> str | None:
    """What goes wrong reading every page of a Parquet file (slower than the footer check); None if fine."""
    try:
        pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return first_line(exc)
    try:  # pyarrow and DuckDB have different readers: a file only DuckDB chokes on is just as unusable
        con = duckdb.connect(config={"threads": 1, "autoload_known_extensions": False})
        try:
            arrow(con.sql("SELECT * FROM read_parquet(?)", params=[str(path)]))
        finally:
            con.close()
    except duckdb.Error as exc:
        return first_line(exc)
    return None
