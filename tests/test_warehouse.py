"""The warehouse on real Parquet and DuckDB files: atomic writes, the call cache, views and read-only SQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pytest

from factory.core.errors import UserInputError
from factory.core.files import atomic_write_bytes
from factory.warehouse.parquet import to_table
from factory.warehouse.store import Warehouse
from factory.warehouse.tables import ALL_TABLES
from factory.warehouse.views import DB_FILE, arrow_columns, duckdb_type, empty_columns

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def prompt_row(i: int, recipe: str = "r", stage_key: str = "k1") -> dict[str, Any]:
    return {
        "recipe": recipe,
        "run_id": "run1",
        "stage_key": stage_key,
        "round": None,
        "prompt_id": f"p{i}",
        "messages": f'[{{"role": "user", "content": "q{i}"}}]',
        "instruction": f"q{i}",
        "source": "inline",
        "source_row": i,
        "source_id": None,
        "reference_fields": "{}",
    }


def gen_call(key: str, text: str, status: str = "ok", minutes: int = 0, run_id: str = "run1") -> dict[str, Any]:
    return {
        "request_key": key,
        "recipe": "r",
        "run_id": run_id,
        "model": "smol",
        "text": text if status == "ok" else None,
        "finish_reason": "stop" if status == "ok" else None,
        "tokens_in": 10,
        "tokens_out": 3,
        "latency_s": 0.1,
        "status": status,
        "error": None if status == "ok" else "RuntimeError: boom",
        "created_at": T0 + timedelta(minutes=minutes),
    }


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ atomic writes


def test_stage_version_written_then_read_back_without_temp_files(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    rows = [prompt_row(i) for i in range(3)]
    wh.write_stage("prompts", "r", "k1", "run1", rows, complete=True)
    assert wh.read_stage("prompts", "r", "k1") == rows
    assert wh.has_version("prompts", "r", "k1")
    current = wh.current("prompts", "r")
    assert current is not None and (current.stage_key, current.complete) == ("k1", True)
    assert all_files(wh.root) == [
        "tables/prompts/r/CURRENT.json",
        "tables/prompts/r/k1.complete",
        "tables/prompts/r/k1.parquet",
    ]


def test_incomplete_version_is_current_but_not_reusable(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    wh.write_stage("prompts", "r", "k1", "run1", [prompt_row(0)], complete=True)
    wh.write_stage("prompts", "r", "k1", "run2", [prompt_row(0)], complete=False)
    assert not wh.has_version("prompts", "r", "k1")
    current = wh.current("prompts", "r")
    assert current is not None and not current.complete and current.run_id == "run2"


def test_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]  # fails after the temp file exists
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_rows_must_fit_the_table_schema(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not_a_column"):
        to_table([{**prompt_row(0), "not_a_column": 1}], ALL_TABLES["prompts"])
    table = to_table([{"prompt_id": "p0"}], ALL_TABLES["prompts"])  # missing keys become nulls
    assert table.schema == ALL_TABLES["prompts"] and table.column("instruction").to_pylist() == [None]


# ------------------------------------------------------------------------------------------- call cache


def test_cached_calls_returns_the_newest_success_per_key(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    # The newest row of k1 is in the first part file: recency comes from created_at, not file order.
    wh.append_calls("generation_calls", "run1", [gen_call("k1", "newest", minutes=5), gen_call("k2", "x", "error")])
    wh.append_calls(
        "generation_calls",
        "run2",
        [
            gen_call("k1", "older", minutes=1),
            gen_call("k3", "ok before failing", minutes=1),
            gen_call("k3", "", "error", minutes=9),  # a later failure does not hide the success
            gen_call("k4", "not asked for"),
        ],
    )
    cached = wh.cached_calls("generation_calls", ["k1", "k2", "k3", "k5"])
    assert set(cached) == {"k1", "k3"}
    assert cached["k1"]["text"] == "newest"
    assert cached["k3"]["text"] == "ok before failing"
    assert all(row["status"] == "ok" for row in cached.values())


def test_failed_calls_never_count_as_cached(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    wh.append_calls("generation_calls", "run1", [gen_call("k1", "", "error", minutes=m) for m in range(3)])
    assert wh.cached_calls("generation_calls", ["k1"]) == {}


def test_cached_calls_on_empty_inputs(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    assert wh.cached_calls("judge_calls", ["k1"]) == {}
    wh.append_calls("generation_calls", "run1", [gen_call("k1", "t")])
    assert wh.cached_calls("generation_calls", []) == {}
    wh.append_calls("generation_calls", "run1", [])  # an empty batch writes no file
    assert len(all_files(wh.root / "calls")) == 1


def test_judge_call_logprobs_round_trip(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    top = [[{"token": "a", "logprob": -0.1}, {"token": " b", "logprob": -2.5}], [{"token": ")", "logprob": 0.0}]]
    row = {
        "request_key": "j1",
        "recipe": "r",
        "run_id": "run1",
        "model": "smol",
        "text": "a)",
        "tokens": ["a", ")"],
        "top_logprobs": top,
        "tokens_in": 100,
        "tokens_out": 2,
        "latency_s": 0.2,
        "status": "ok",
        "error": None,
        "created_at": T0,
    }
    wh.append_calls("judge_calls", "run1", [row])
    cached = wh.cached_calls("judge_calls", ["j1"])["j1"]
    assert cached["tokens"] == ["a", ")"]
    assert cached["top_logprobs"] == top
    assert not [f for f in all_files(wh.root) if ".tmp" in f]


# ------------------------------------------------------------------------------------------------- SQL


@pytest.fixture
def filled(tmp_path: Path) -> Warehouse:
    wh = Warehouse(tmp_path / "wh")
    wh.write_stage("prompts", "r", "k1", "run1", [prompt_row(i) for i in range(3)], complete=True)
    wh.append_calls("generation_calls", "run1", [gen_call("k1", "t")])
    return wh


@pytest.mark.parametrize(
    "sql",
    [
        "COPY prompts TO '{out}'",
        "CREATE TABLE t AS SELECT 1",
        "ATTACH '{out}' AS other",
        "INSERT INTO generation_calls (request_key) VALUES ('x')",
        "SELECT 1; SELECT 2",
        "",
    ],
)
def test_query_rejects_anything_but_one_read_only_statement(filled: Warehouse, tmp_path: Path, sql: str) -> None:
    out = tmp_path / "leak.out"
    with pytest.raises(UserInputError, match="factory sql"):
        filled.query(sql.format(out=out))
    assert not out.exists()


def test_query_runs_select_and_describe(filled: Warehouse) -> None:
    result = filled.query("SELECT prompt_id, instruction FROM prompts ORDER BY prompt_id")
    assert result.to_pylist() == [{"prompt_id": f"p{i}", "instruction": f"q{i}"} for i in range(3)]
    described = filled.query("DESCRIBE judgments")
    assert described.column("column_name").to_pylist() == ALL_TABLES["judgments"].names
    assert filled.query("SELECT count(*) AS n FROM generation_calls").to_pylist() == [{"n": 1}]


def test_query_errors_are_user_errors(filled: Warehouse, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="SQL error"):
        filled.query("SELECT no_such_column FROM prompts")
    with pytest.raises(UserInputError, match="no warehouse here"):
        Warehouse(tmp_path / "nowhere").query("SELECT 1")


def test_views_follow_the_current_version(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    wh.write_stage("prompts", "r", "old", "run1", [prompt_row(0, stage_key="old")], complete=True)
    wh.write_stage("prompts", "r", "new", "run2", [prompt_row(i, stage_key="new") for i in range(2)], complete=True)
    wh.write_stage("prompts", "other", "x", "run3", [prompt_row(9, recipe="other", stage_key="x")], complete=True)
    count = "SELECT stage_key, count(*) AS n FROM prompts GROUP BY ALL ORDER BY stage_key"
    assert wh.query(count).to_pylist() == [{"stage_key": "new", "n": 2}, {"stage_key": "x", "n": 1}]
    wh.set_current("prompts", "r", "old", "run4", True)
    assert wh.query(count).to_pylist() == [{"stage_key": "old", "n": 1}, {"stage_key": "x", "n": 1}]


def test_refresh_database_is_readable_by_plain_duckdb(filled: Warehouse, tmp_path: Path, monkeypatch: Any) -> None:
    path = filled.refresh_database()
    assert path == filled.root / DB_FILE
    assert not [f for f in all_files(filled.root) if f.startswith(".factory-")]
    monkeypatch.chdir(tmp_path)  # views use absolute paths: they work from any folder
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM prompts").fetchone() == (3,)
        assert con.execute("SELECT text FROM generation_calls").fetchall() == [("t",)]
        assert con.execute("SELECT count(*) FROM judgments").fetchone() == (0,)
    finally:
        con.close()


def test_empty_warehouse_views_have_the_right_columns(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "empty")
    path = wh.refresh_database()
    con = duckdb.connect(str(path), read_only=True)
    try:
        for table, schema in ALL_TABLES.items():
            columns = [r[0] for r in con.execute(f'DESCRIBE "{table}"').fetchall()]
            assert columns == schema.names, table
            assert con.execute(f'SELECT count(*) FROM "{table}"').fetchone() == (0,)
    finally:
        con.close()
    assert wh.row_counts() == dict.fromkeys(ALL_TABLES, 0)


@pytest.mark.parametrize("table", sorted(ALL_TABLES))
def test_an_empty_table_has_the_columns_duckdb_gives_its_arrow_schema(table: str) -> None:
    """The empty tables of a new warehouse are created from a type mapping, not from Arrow: it must know every
    type the tables use and give each column the type DuckDB's own conversion of the Arrow schema gives."""
    assert all(duckdb_type(field.type) is not None for field in ALL_TABLES[table])
    con = duckdb.connect()
    try:
        con.execute(f'CREATE TABLE "{table}" ({empty_columns(table)})')
        made = [(name, kind) for name, kind, *_ in con.execute(f'DESCRIBE "{table}"').fetchall()]
    finally:
        con.close()
    assert made == arrow_columns(table)
