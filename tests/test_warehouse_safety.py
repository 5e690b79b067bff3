"""The warehouse under hostile queries, damaged files, odd paths and a second process (real files, no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_warehouse import gen_call, prompt_row

from factory.errors import FactoryError, UserInputError
from factory.warehouse import DB_FILE, Warehouse, atomic_write_bytes, folder_lock

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was written or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def site(tmp_path: Path) -> Warehouse:
    """A small warehouse, and a sibling folder `outside/` of files a query must never reach."""
    wh = Warehouse(tmp_path / "wh")
    wh.write_stage("prompts", "r", "k1", "run1", [prompt_row(i) for i in range(3)], complete=True)
    wh.append_calls("generation_calls", "run1", [gen_call("k1", "t")])
    wh.write_run({"run_id": "run1", "recipe": "r", "status": "ok"})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret\n")
    (outside / "secret.csv").write_text("a,b\n1,2\n")
    (outside / "secret.json").write_text('{"a": 1}\n')
    pq.write_table(pa.table({"a": [1]}), outside / "secret.parquet")
    # What PRAGMA import_database would run: it must never get that far.
    (outside / "schema.sql").write_text("CREATE TABLE pwned (a INTEGER);\n")
    (outside / "load.sql").write_text(f"COPY pwned TO '{outside / 'pwned.csv'}';\n")
    return wh


def part_of(wh: Warehouse, table: str = "generation_calls") -> Path:
    return Path(wh._parts(table)[0])


# ----------------------------------------------------------------------------------- read-only factory sql

REFUSED = [
    "INSERT INTO generation_calls (request_key) VALUES ('x')",
    "DROP VIEW prompts",
    "COPY prompts TO '{outside}/leak.csv'",
    "COPY prompts TO '{part}' (FORMAT parquet, USE_TMP_FILE false)",  # an allowed file: only the filter stops it
    "COPY prompts FROM '{outside}/secret.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{part}'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{outside}/leak.csv'",
    "EXPLAIN (FORMAT json, ANALYZE) SELECT 1",
    "/* comment */ EXPLAIN ANALYSE SELECT 1",
    "EXPLAIN COPY (SELECT 1) TO '{part}'",
    "ATTACH '{outside}/other.duckdb' AS other",
    "DETACH memory",
    "INSTALL httpfs",
    "LOAD httpfs",
    "UPDATE EXTENSIONS",
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "SET VARIABLE x = 1",
    "USE memory",
    "PRAGMA import_database('{outside}')",
    "PRAGMA enable_profiling",
    "PRAGMA profiling_output = '{outside}/profile.txt'",
    "CHECKPOINT",
    "CALL checkpoint()",
    "EXPORT DATABASE '{outside}/export'",
    "CREATE TABLE t AS SELECT 1",
    "CREATE MACRO m() AS 1",
    "CREATE SECRET (TYPE s3, KEY_ID 'x', SECRET 'y')",
    "SELECT 1; SELECT 2",
]

CONFINED = [
    "SELECT * FROM read_csv('{outside}/secret.csv')",
    "SELECT * FROM read_text('{outside}/secret.txt')",
    "SELECT * FROM read_blob('{outside}/secret.txt')",
    "SELECT * FROM read_parquet('{outside}/secret.parquet')",
    "SELECT * FROM read_json('{outside}/secret.json')",
    "SELECT * FROM read_text('{outside}/*')",
    "SELECT * FROM glob('{outside}/*')",
    "SELECT * FROM read_parquet('{wh}/calls/*/*.parquet')",  # a glob inside the warehouse is still a glob
    "SELECT * FROM read_text('{wh}/tables/prompts/r/CURRENT.json')",  # in the warehouse, but no view's file
]


@pytest.mark.parametrize("sql", REFUSED)
def test_writing_or_configuring_statements_are_refused(site: Warehouse, tmp_path: Path, sql: str) -> None:
    before = snapshot(tmp_path)
    query = sql.format(outside=tmp_path / "outside", part=part_of(site), wh=site.root)
    with pytest.raises(UserInputError, match=r"^factory sql runs one") as err:
        site.query(query)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("sql", CONFINED)
def test_files_other_than_the_views_cannot_be_read(site: Warehouse, tmp_path: Path, sql: str) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(UserInputError, match=r"^factory sql reads only the warehouse's tables: ") as err:
        site.query(sql.format(outside=tmp_path / "outside", wh=site.root))
    assert "\n" not in str(err.value) and "secret" not in str(err.value).split("Cannot access file")[0]
    assert snapshot(tmp_path) == before


def test_the_refusal_names_what_was_refused(site: Warehouse, tmp_path: Path) -> None:
    cases = {
        "INSERT INTO prompts SELECT * FROM prompts": "got INSERT",
        f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{part_of(site)}'": "got EXPLAIN ANALYZE",
        f"PRAGMA import_database('{tmp_path}')": "got PRAGMA import_database",
        "INSTALL httpfs": "got INSTALL",
    }
    for sql, words in cases.items():
        with pytest.raises(UserInputError) as err:
            site.query(sql)
        assert str(err.value).endswith(words)


def test_read_only_statements_still_work(site: Warehouse) -> None:
    assert site.query("SELECT count(*) AS n FROM prompts").to_pylist() == [{"n": 3}]
    assert "instruction" in site.query("DESCRIBE prompts").column("column_name").to_pylist()
    assert "instruction" in site.query("SUMMARIZE prompts").column("column_name").to_pylist()
    assert {"prompts", "runs", "generation_calls"} <= set(site.query("SHOW TABLES").column("name").to_pylist())
    assert "prompt_id" in site.query("PRAGMA table_info('prompts')").column("name").to_pylist()
    assert "prompt_id" in site.query("CALL pragma_table_info('prompts')").column("name").to_pylist()
    assert site.query("PRAGMA version").num_rows == 1
    assert site.query("PRAGMA show_tables").num_rows >= 3
    plan = site.query("EXPLAIN SELECT * FROM generation_calls WHERE status = 'ok'")
    assert "physical_plan" in plan.column(0).to_pylist()
    assert site.query("EXPLAIN (FORMAT json) SELECT 1").num_rows == 1
    # The views' own files may be named directly: they are exactly what the views read.
    part = part_of(site)
    assert site.query(f"SELECT count(*) AS n FROM read_parquet('{part}')").to_pylist() == [{"n": 1}]
    assert site.query("SELECT status FROM runs").to_pylist() == [{"status": "ok"}]


def test_connect_is_locked_down(site: Warehouse, tmp_path: Path) -> None:
    con = site.connect()
    try:
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.PermissionException):
            con.execute("SELECT * FROM read_text(?)", [str(tmp_path / "outside" / "secret.txt")])
        with pytest.raises(duckdb.Error):
            con.execute(f"ATTACH '{tmp_path / 'outside' / 'x.duckdb'}' AS x")
        settings = dict(
            con.execute(
                "SELECT name, value FROM duckdb_settings() WHERE name IN ('enable_external_access', "
                "'autoload_known_extensions', 'autoinstall_known_extensions', 'lock_configuration')"
            ).fetchall()
        )
        assert settings == {
            "enable_external_access": "false",
            "autoload_known_extensions": "false",
            "autoinstall_known_extensions": "false",
            "lock_configuration": "true",
        }
        assert con.execute("SELECT count(*) FROM prompts").fetchone() == (3,)
    finally:
        con.close()
    assert not (tmp_path / "outside" / "x.duckdb").exists()


def test_an_empty_warehouse_is_locked_down_too(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    wh.root.mkdir()
    (tmp_path / "secret.txt").write_text("s")
    assert wh.query("SELECT count(*) AS n FROM prompts").to_pylist() == [{"n": 0}]
    with pytest.raises(UserInputError, match="reads only the warehouse's tables"):
        wh.query(f"SELECT * FROM read_text('{tmp_path / 'secret.txt'}')")


# --------------------------------------------------------------------------------------- damaged parts


def three_parts(tmp_path: Path) -> tuple[Warehouse, list[Path]]:
    wh = Warehouse(tmp_path / "wh")
    for i in (1, 2, 3):
        wh.append_calls("generation_calls", f"run{i}", [gen_call(f"k{i}", f"text {i}", run_id=f"run{i}")])
    return wh, [Path(p) for p in wh._parts("generation_calls")]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not parquet at all " * 20)


def corrupt_pages(path: Path) -> None:
    """Overwrite every column chunk's pages; the footer stays valid, so only reading the data finds it."""
    data = bytearray(path.read_bytes())
    meta = pq.read_metadata(path)
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(rg).column(c)
            start = chunk.dictionary_page_offset or chunk.data_page_offset
            data[start : start + chunk.total_compressed_size] = b"\xab" * chunk.total_compressed_size
    path.write_bytes(bytes(data))
    assert pq.read_metadata(path).num_rows == 1


@pytest.mark.parametrize("damage", [truncate, garbage])
def test_a_damaged_part_is_skipped_and_named_by_queries(tmp_path: Path, damage: Any) -> None:
    wh, parts = three_parts(tmp_path)
    damage(parts[1])
    before = snapshot(tmp_path)
    keys = wh.query("SELECT request_key FROM generation_calls ORDER BY 1").column(0).to_pylist()
    assert keys == ["k1", "k3"]
    assert wh.skipped_parts == [parts[1]]
    warning = wh.skipped_warning()
    assert warning is not None and str(parts[1]) in warning and "\n" not in warning
    assert wh.row_counts()["generation_calls"] == 2
    assert snapshot(tmp_path) == before  # factory sql never moves files


@pytest.mark.parametrize("damage", [truncate, garbage, corrupt_pages])
def test_cached_calls_skips_a_damaged_part(tmp_path: Path, damage: Any) -> None:
    wh, parts = three_parts(tmp_path)
    damage(parts[1])
    before = snapshot(tmp_path)
    cached = wh.cached_calls("generation_calls", ["k1", "k2", "k3"])
    assert {k: r["text"] for k, r in cached.items()} == {"k1": "text 1", "k3": "text 3"}
    assert wh.skipped_parts == [parts[1]]
    assert snapshot(tmp_path) == before
    # Remembered: the same instance does not fail on it again, and a fresh one finds it again.
    assert set(wh.cached_calls("generation_calls", ["k1", "k2", "k3"])) == {"k1", "k3"}
    assert set(Warehouse(wh.root).cached_calls("generation_calls", ["k2", "k3"])) == {"k3"}


@pytest.mark.parametrize("damage", [truncate, garbage])
def test_quarantine_sets_damaged_parts_aside_and_the_calls_are_made_again(tmp_path: Path, damage: Any) -> None:
    wh, parts = three_parts(tmp_path)
    damage(parts[1])
    damaged = parts[1].read_bytes()
    assert wh.query("SELECT count(*) AS n FROM generation_calls").to_pylist() == [{"n": 2}]
    with wh.lock():
        moved = wh.quarantine_corrupt_parts()
        expected = parts[1].parent / "corrupt" / parts[1].name
        assert moved == [expected]
        assert expected.read_bytes() == damaged and not parts[1].exists()
        assert wh.skipped_parts == []
        assert wh.quarantine_corrupt_parts() == []  # nothing left to move
        assert set(wh.cached_calls("generation_calls", ["k1", "k2", "k3"])) == {"k1", "k3"}
        wh.append_calls("generation_calls", "run4", [gen_call("k2", "made again", run_id="run4")])
        cached = wh.cached_calls("generation_calls", ["k1", "k2", "k3"])
    assert cached["k2"]["text"] == "made again" and set(cached) == {"k1", "k2", "k3"}
    fresh = Warehouse(wh.root)
    assert fresh.query("SELECT count(*) AS n FROM generation_calls").to_pylist() == [{"n": 3}]
    assert fresh.skipped_parts == []
    assert fresh.row_counts()["generation_calls"] == 3


def test_parts_with_corrupt_pages_are_found_by_reading_and_set_aside_while_building(tmp_path: Path) -> None:
    wh, parts = three_parts(tmp_path)
    corrupt_pages(parts[0])
    with wh.lock():
        assert wh.quarantine_corrupt_parts() == []  # the footer is fine: only reading finds it
        assert set(wh.cached_calls("generation_calls", ["k1", "k2", "k3"])) == {"k2", "k3"}
    assert not parts[0].exists()
    assert (parts[0].parent / "corrupt" / parts[0].name).is_file()
    assert Warehouse(wh.root).query("SELECT count(*) AS n FROM generation_calls").to_pylist() == [{"n": 2}]


def test_queries_skip_parts_with_corrupt_pages(tmp_path: Path) -> None:
    wh, parts = three_parts(tmp_path)
    corrupt_pages(parts[2])
    rows = wh.query("SELECT request_key, text FROM generation_calls ORDER BY 1").to_pylist()
    assert rows == [{"request_key": "k1", "text": "text 1"}, {"request_key": "k2", "text": "text 2"}]
    assert wh.skipped_parts == [parts[2]]


def test_a_part_missing_the_cache_columns_is_bad(tmp_path: Path) -> None:
    wh, parts = three_parts(tmp_path)
    pq.write_table(pa.table({"request_key": ["k9"]}), parts[0])  # readable, but no status or created_at
    assert set(wh.cached_calls("generation_calls", ["k1", "k2", "k9"])) == {"k2"}
    assert wh.skipped_parts == [parts[0]] and "status" in wh.skip_reasons[parts[0]]


def test_a_repaired_part_is_checked_again(tmp_path: Path) -> None:
    wh, parts = three_parts(tmp_path)
    good = parts[1].read_bytes()
    garbage(parts[1])
    assert set(wh.cached_calls("generation_calls", ["k1", "k2"])) == {"k1"}
    parts[1].write_bytes(good)  # a new size and mtime: the remembered verdict no longer applies
    assert set(wh.cached_calls("generation_calls", ["k1", "k2"])) == {"k1", "k2"}


def test_refresh_database_leaves_out_damaged_parts(tmp_path: Path) -> None:
    wh, parts = three_parts(tmp_path)
    truncate(parts[0])
    path = wh.refresh_database()
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM generation_calls").fetchone() == (2,)
    finally:
        con.close()
    assert wh.skipped_parts == [parts[0]]


def test_a_stage_file_duckdb_cannot_read_is_skipped(tmp_path: Path) -> None:
    wh, _ = three_parts(tmp_path)
    wh.write_run({"run_id": "run1", "recipe": "r", "status": "ok"})
    empty = wh.root / "runs" / "broken.parquet"
    pq.write_table(pa.table({}), empty)  # a valid footer, but DuckDB refuses a file without columns
    assert wh.query("SELECT count(*) AS n FROM runs").to_pylist() == [{"n": 1}]
    assert wh.skipped_parts == [empty]
    wh.refresh_database()
    assert not [p for p in wh.root.iterdir() if p.name.startswith(".factory-")]


# ------------------------------------------------------------------------------------ refresh_database


def leftovers(wh: Warehouse) -> list[str]:
    return [p.name for p in wh.root.iterdir() if p.name.startswith(".factory-")]


def test_a_failing_view_leaves_no_temporary_database(tmp_path: Path) -> None:
    wh, _ = three_parts(tmp_path)
    wh.write_stage("prompts", "r", "k1", "run1", [prompt_row(0)], complete=True)
    pointer = wh.root / "tables" / "prompts" / "r" / "CURRENT.json"
    pointer.write_text("{not json")  # the prompts view cannot be defined
    with pytest.raises(FactoryError, match=r"CURRENT\.json") as err:
        wh.refresh_database()
    assert str(pointer) in str(err.value) and "\n" not in str(err.value)
    assert leftovers(wh) == [] and not (wh.root / DB_FILE).exists()


def test_a_failing_rename_leaves_no_temporary_database(tmp_path: Path) -> None:
    wh, _ = three_parts(tmp_path)
    (wh.root / DB_FILE).mkdir()  # something in the way of the final rename
    (wh.root / DB_FILE / "keep").write_text("x")
    with pytest.raises(FactoryError, match="cannot be replaced"):
        wh.refresh_database()
    assert leftovers(wh) == []


# ---------------------------------------------------------------------------------- roots that are files


@pytest.mark.parametrize("where", ["file/wh", "file"])
def test_a_warehouse_under_a_file_is_a_user_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    wh = Warehouse(tmp_path / where)
    calls: dict[str, Any] = {
        "lock": lambda: wh.lock().__enter__(),
        "connect": wh.connect,
        "query": lambda: wh.query("SELECT 1"),
        "row_counts": wh.row_counts,
        "refresh_database": wh.refresh_database,
        "append_calls": lambda: wh.append_calls("generation_calls", "run1", [gen_call("k1", "t")]),
        "write_stage": lambda: wh.write_stage("prompts", "r", "k1", "run1", [prompt_row(0)], complete=True),
        "set_current": lambda: wh.set_current("prompts", "r", "k1", "run1", True),
        "write_run": lambda: wh.write_run({"run_id": "run1"}),
        "quarantine": wh.quarantine_corrupt_parts,
    }
    for name, call in calls.items():
        with pytest.raises(UserInputError, match="is not a folder") as err:
            call()
        assert str(wh.root) in str(err.value), name
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_report_folder_under_a_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="is not a folder"):
        atomic_write_bytes(tmp_path / "file" / "out" / "a.md", b"x")


# --------------------------------------------------------------------------------------------- locking

HOLDER = """
import sys
from pathlib import Path
from factory.warehouse import Warehouse, folder_lock

kind, path = sys.argv[1], Path(sys.argv[2])
held = Warehouse(path).lock() if kind == "warehouse" else folder_lock(path, "export folder")
with held:
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


@pytest.fixture
def holder() -> Iterator[Any]:
    """Start another process that holds a lock until told to let go."""
    procs: list[subprocess.Popen[str]] = []

    def start(kind: str, path: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(HOLDER), kind, str(path)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def release(proc: subprocess.Popen[str]) -> None:
    out, _ = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0 and out.strip() == "released"


def test_a_second_process_cannot_take_the_warehouse(tmp_path: Path, holder: Any) -> None:
    wh = Warehouse(tmp_path / "wh")
    wh.write_stage("prompts", "r", "k1", "run1", [prompt_row(i) for i in range(3)], complete=True)
    wh.append_calls("generation_calls", "run1", [gen_call("k1", "t")])
    tables = snapshot(wh.root / "tables")
    proc = holder("warehouse", wh.root)
    with pytest.raises(FactoryError, match="another build is using this warehouse") as err, wh.lock():
        pytest.fail("the lock was taken twice")
    message = str(err.value)
    assert message.startswith(f"{wh.root}: ") and f"pid {proc.pid}" in message and "started " in message
    assert message.endswith("wait for it to finish") and "\n" not in message
    assert not isinstance(err.value, UserInputError)
    # Readers do not need the lock.
    assert wh.query("SELECT count(*) AS n FROM prompts").to_pylist() == [{"n": 3}]
    release(proc)
    with wh.lock():
        wh.append_calls("generation_calls", "run2", [gen_call("k2", "u")])
    assert snapshot(wh.root / "tables") == tables
    assert set(wh.cached_calls("generation_calls", ["k1", "k2"])) == {"k1", "k2"}


def test_an_unreadable_holder_note_still_gives_the_clear_error(tmp_path: Path, holder: Any) -> None:
    wh = Warehouse(tmp_path / "wh")
    proc = holder("warehouse", wh.root)
    (wh.root / ".lock").write_bytes(b"\xff\x00 garbage")  # writing the file does not need the lock
    with pytest.raises(FactoryError, match="another build is using this warehouse"), wh.lock():
        pass
    release(proc)
    with wh.lock():
        note = json.loads((wh.root / ".lock").read_text())
        assert set(note) == {"pid", "started"}


def test_folder_lock_keeps_out_a_second_process(tmp_path: Path, holder: Any) -> None:
    export = tmp_path / "new" / "exports" / "run1"
    proc = holder("folder", export)
    lock_file = export.parent / ".run1.lock"
    assert lock_file.is_file() and not export.exists()  # beside the folder, not in it
    busy = "another process is writing this export folder"
    with pytest.raises(FactoryError, match=busy) as err, folder_lock(export, "export folder"):
        pass
    assert str(export) in str(err.value) and f"pid {proc.pid}" in str(err.value)
    release(proc)
    with folder_lock(export, "export folder"):
        export.mkdir()
        (export / "data.jsonl").write_text("{}\n")
    assert (export / "data.jsonl").read_text() == "{}\n"


def test_folder_lock_under_a_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="is not a folder"), folder_lock(tmp_path / "file" / "exports", "x"):
        pass
