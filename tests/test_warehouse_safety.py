"""The warehouse under hostile queries, damaged files, odd paths and a second process (real files, no mocks)."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_warehouse import gen_call, prompt_row

from factory.core.errors import FactoryError, UserInputError
from factory.core.files import atomic_write_bytes, folder_lock
from factory.warehouse.store import Warehouse
from factory.warehouse.views import DB_FILE

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was written or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_site(folder: Path) -> Warehouse:
    """A small warehouse in `folder`, and a sibling folder `outside/` of files a query must never reach."""
    wh = Warehouse(folder / "wh")
    wh.write_stage("prompts", "r", "k1", "run1", [prompt_row(i) for i in range(3)], complete=True)
    wh.append_calls("generation_calls", "run1", [gen_call("k1", "t")])
    wh.write_run({"run_id": "run1", "recipe": "r", "status": "ok"})
    outside = folder / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret\n")
    (outside / "secret.csv").write_text("a,b\n1,2\n")
    (outside / "secret.json").write_text('{"a": 1}\n')
    pq.write_table(pa.table({"a": [1]}), outside / "secret.parquet")
    # What PRAGMA import_database would run: it must never get that far.
    (outside / "schema.sql").write_text("CREATE TABLE pwned (a INTEGER);\n")
    (outside / "load.sql").write_text(f"COPY pwned TO '{outside / 'pwned.csv'}';\n")
    return wh


@pytest.fixture
def site(tmp_path: Path) -> Warehouse:
    """A small warehouse of this test's own, and a sibling folder `outside/` of files a query must never reach."""
    return make_site(tmp_path)


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory: pytest.TempPathFactory) -> Warehouse:
    """`site`, made once for the refusal tests: each checks that nothing under its folder was written."""
    return make_site(tmp_path_factory.mktemp("site"))


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
def test_writing_or_configuring_statements_are_refused(shared_site: Warehouse, sql: str) -> None:
    site, folder = shared_site, shared_site.root.parent
    before = snapshot(folder)
    query = sql.format(outside=folder / "outside", part=part_of(site), wh=site.root)
    with pytest.raises(UserInputError, match=r"^factory sql runs one") as err:
        site.query(query)
    assert "\n" not in str(err.value)
    assert snapshot(folder) == before


@pytest.mark.parametrize("sql", CONFINED)
def test_files_other_than_the_views_cannot_be_read(shared_site: Warehouse, sql: str) -> None:
    site, folder = shared_site, shared_site.root.parent
    before = snapshot(folder)
    with pytest.raises(UserInputError, match=r"^factory sql reads only the warehouse's tables: ") as err:
        site.query(sql.format(outside=folder / "outside", wh=site.root))
    assert "\n" not in str(err.value) and "secret" not in str(err.value).split("Cannot access file")[0]
    assert snapshot(folder) == before


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
    assert pq.read_metadata(path).num_rows  # the footer still reads


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


def test_a_failing_view_leaves_no_temporary_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wh, _ = three_parts(tmp_path)
    wh.write_stage("prompts", "r", "k1", "run1", [prompt_row(0)], complete=True)
    define = Warehouse._define_views

    # DuckDB defers reading files until a query, and a damaged file or CURRENT.json is skipped, so no file
    # on disk makes defining the views fail: the failure is injected after the views exist in the new file.
    def failing(self: Warehouse, con: duckdb.DuckDBPyConnection) -> list[str]:
        define(self, con)
        raise duckdb.IOException("simulated failure while writing the views")

    monkeypatch.setattr(Warehouse, "_define_views", failing)
    with pytest.raises(FactoryError, match=r"cannot write the views: .*simulated failure") as err:
        wh.refresh_database()
    assert "\n" not in str(err.value)
    assert leftovers(wh) == [] and not (wh.root / DB_FILE).exists()


def test_a_damaged_current_json_is_skipped_by_the_views(tmp_path: Path) -> None:
    wh, _ = three_parts(tmp_path)
    wh.write_stage("prompts", "r", "k1", "run1", [prompt_row(0)], complete=True)
    pointer = wh.root / "tables" / "prompts" / "r" / "CURRENT.json"
    pointer.write_text("{not json")
    before = snapshot(tmp_path)
    assert wh.row_counts()["prompts"] == 0
    assert wh.skipped_parts == [pointer]
    assert wh.current("prompts", "r") is None
    assert snapshot(tmp_path) == before  # read-only: skipped and named, never moved
    wh.refresh_database()  # without the lock too: the pointer stays where it is
    assert pointer.read_text() == "{not json" and not (pointer.parent / "corrupt").exists()


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
from factory.core.files import folder_lock
from factory.warehouse.store import Warehouse

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
    with wh.lock():  # locked all the same; bytes factory did not write are never overwritten or truncated
        assert (wh.root / ".lock").read_bytes() == b"\xff\x00 garbage"
    (wh.root / ".lock").write_bytes(b"")
    with wh.lock():  # an empty lock file gets the holder's note, written in place
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


# ------------------------------------------------------------------ printing data: literally, never obeyed

# Markup rich would obey, escape sequences a terminal would obey (window title OSC 0, clear screen CSI 2J,
# clipboard write OSC 52, a one-character C1 CSI), DEL, and an :emoji: code rich would replace.
HOSTILE = (
    "[bold red]x[/] [link=file:///etc/passwd]click[/link] \x1b]0;pwned\x07 \x1b[2J \x1b]52;c;aGk=\x07 "
    "\x9b31m \x7f :thumbs_up:"
)
LITERAL = ("[bold red]x[/]", "[link=file:///etc/passwd]click[/link]", ":thumbs_up:")
# The data's sequences as they would reach a terminal, and a rich hyperlink (OSC 8) made from its markup.
DATA_ESCAPES = ("\x1b]0;", "\x1b[2J", "\x1b]52;", "\x1b]8;", "\x9b", "\x07", "\x7f")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Terminal settings that change how rich styles its own output; none may change how data is shown.
TERMINALS = {"plain": {"NO_COLOR": "1", "TERM": "dumb"}, "colour": {"TERM": "xterm-256color"}}
RICH_ENV = ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE", "COLUMNS", "TERM")


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A warehouse whose first prompt's text and whose run's recipe name are HOSTILE."""
    wh = Warehouse(tmp_path / "wh")
    rows = [prompt_row(i) for i in range(2)]
    rows[0]["instruction"] = HOSTILE
    wh.write_stage("prompts", "r", "k1", "run1", rows, complete=True)
    wh.write_run({"run_id": "run1", "recipe": HOSTILE, "status": "ok"})
    return wh.root


def cli_env(terminal: str = "plain") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RICH_ENV}
    return {**env, **TERMINALS[terminal], "COLUMNS": "400"}


def factory_cli(*args: str, terminal: str = "plain", tty: bool = False) -> subprocess.CompletedProcess[str]:
    """`python -m factory.cli.main ARGS` in its own process: stdout a pipe, or with `tty` a pseudo-terminal."""
    cmd = [sys.executable, "-m", "factory.cli.main", *args]
    if not tty:
        return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(terminal), timeout=120)
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=child_fd, stderr=subprocess.PIPE, env=cli_env(terminal))
    os.close(child_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # EIO: the process has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    _, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(
        cmd, proc.returncode, b"".join(chunks).decode("utf-8", "replace"), stderr.decode()
    )


def assert_literal(output: str) -> None:
    for piece in LITERAL:
        assert piece in output, f"{piece!r} is not printed as itself: {output[:600]!r}"
    found = CONTROL.search(output)
    assert found is None, f"control character {found.group()!r} printed: {output[:600]!r}"


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output and len(lines) == 1 and lines[0].startswith("error:"), output[-2000:]
    return lines[0]


@pytest.mark.parametrize("terminal", sorted(TERMINALS))
@pytest.mark.parametrize("fmt", ["table", "json"])
def test_sql_prints_values_and_names_literally(hostile: Path, fmt: str, terminal: str) -> None:
    """Markup in a value or a column name is shown, and escapes are made visible, whatever NO_COLOR and TERM."""
    query = f'SELECT instruction, 1 AS "{HOSTILE}" FROM prompts ORDER BY prompt_id'
    result = factory_cli("sql", query, "-w", str(hostile), "--format", fmt, terminal=terminal)
    assert result.returncode == 0, result.stderr
    assert_literal(result.stdout + result.stderr)
    if fmt == "json":  # escaped as JSON, so the value itself is intact
        assert json.loads(result.stdout.splitlines()[0]) == {"instruction": HOSTILE, HOSTILE: 1}
    else:
        assert result.stdout.count("[bold red]x[/] [link=file:///etc/passwd]click[/link] \ufffd]0;pwned\ufffd") == 2


def test_sql_csv_keeps_values_exact_for_files_and_pipes(hostile: Path) -> None:
    result = factory_cli(
        "sql", "SELECT instruction FROM prompts ORDER BY prompt_id", "-w", str(hostile), "--format", "csv"
    )
    assert result.returncode == 0, result.stderr
    assert list(csv.reader(io.StringIO(result.stdout)))[:2] == [["instruction"], [HOSTILE]]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_sql_on_a_terminal_lets_no_escape_from_the_data_through(hostile: Path, fmt: str) -> None:
    """On a real (pseudo-)terminal rich styles its own output, but nothing of the data's sequences gets out."""
    query = f'SELECT instruction AS "{HOSTILE}" FROM prompts ORDER BY prompt_id'
    result = factory_cli("sql", query, "-w", str(hostile), "--format", fmt, terminal="colour", tty=True)
    assert result.returncode == 0, result.stderr
    for piece in LITERAL:
        assert piece in result.stdout
    for sequence in DATA_ESCAPES:
        assert sequence not in result.stdout, f"{sequence!r} reached the terminal: {result.stdout[:600]!r}"
    if fmt == "csv":  # not styled: on a terminal its controls are made visible, in values and names
        assert "\x1b" not in result.stdout and "\ufffd]52;c;aGk=\ufffd" in result.stdout


@pytest.mark.parametrize("terminal", sorted(TERMINALS))
def test_ls_prints_a_recipe_name_literally(hostile: Path, terminal: str) -> None:
    result = factory_cli("ls", "-w", str(hostile), terminal=terminal)
    assert result.returncode == 0, result.stderr
    assert_literal(result.stdout + result.stderr)


@pytest.mark.parametrize("case", ["sql error", "unknown command", "bad option value", "warehouse path"])
def test_error_lines_quote_data_literally(hostile: Path, tmp_path: Path, case: str) -> None:
    args = {
        "sql error": ["sql", f"SELECT CAST('{HOSTILE}' AS INTEGER)", "-w", str(hostile)],
        "unknown command": [HOSTILE],
        "bad option value": ["sql", "SELECT 1", "-w", str(hostile), "--format", HOSTILE],
        "warehouse path": ["ls", "-w", str(tmp_path / HOSTILE)],
    }[case]
    result = factory_cli(*args, terminal="colour")
    line = one_error_line(result)
    assert result.returncode == 2, line
    assert "[bold red]x[/]" in line and not CONTROL.search(line), repr(line)


def test_only_a_recorded_run_is_said_to_be_recorded(capsys: pytest.CaptureFixture[str]) -> None:
    """`factory sql` records no run: its failures and Ctrl-C must not claim one (only a Run marks one)."""
    from factory.cli.options import friendly
    from factory.core.errors import mark_recorded

    def fail(exc: BaseException, recorded: bool) -> None:
        if recorded:
            mark_recorded(exc, "run-7")
        raise exc

    for recorded in (False, True):
        with pytest.raises(SystemExit) as failed:
            friendly(fail)(RuntimeError("boom"), recorded)
        err = capsys.readouterr().err
        assert failed.value.code == 1 and "internal or backend failure" in err
        assert ("recorded as failed" in err) is recorded and ("run run-7 is recorded as failed" in err) is recorded
        with pytest.raises(SystemExit) as stopped:
            friendly(fail)(KeyboardInterrupt("the query was stopped"), recorded)
        err = capsys.readouterr().err
        assert stopped.value.code == 130
        assert err == (
            "interrupted: finished calls are saved; run the same command again to resume\n"
            if recorded
            else "interrupted: the query was stopped\n"
        )


# ------------------------------------------------------------------------------ factory sql: limits
RUNAWAY = "SELECT count(*) FROM range(1000000) a, range(1000000) b"  # 10^12 rows: hours


def test_a_runaway_query_stops_at_the_timeout(site: Warehouse) -> None:
    result = factory_cli("sql", RUNAWAY, "-w", str(site.root), "--timeout", "1")
    line = one_error_line(result)
    assert result.returncode == 2
    assert line.startswith("error: the query was stopped after 1 s (the --timeout limit)") and "--timeout" in line


def test_a_memory_hungry_query_is_refused_under_the_memory_limit(site: Warehouse, tmp_path: Path) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    query = "SELECT count(*) FROM (SELECT DISTINCT range FROM range(50000000))"  # a hash table of ~1 GB
    result = subprocess.run(
        [sys.executable, "-m", "factory.cli.main", "sql", query, "-w", str(site.root), "--memory-limit", "30MB"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=work,
        timeout=120,
    )
    line = one_error_line(result)
    assert result.returncode == 2 and line.startswith("error: out of memory under the --memory-limit 30MB"), line
    assert list(work.iterdir()) == []  # nothing spilled to ./.tmp: the limit is a hard cap, and no file is written


def test_rows_beyond_the_memory_limit_are_refused_but_a_table_keeps_only_the_rows_shown(site: Warehouse) -> None:
    query = "SELECT range, repeat('x', 100) AS pad FROM range(2000000)"  # ~200 MB of rows
    refused = factory_cli("sql", query, "-w", str(site.root), "--format", "csv", "--memory-limit", "20MB")
    line = one_error_line(refused)
    assert refused.returncode == 2 and "more than the --memory-limit 20MB" in line
    assert refused.stdout == ""  # refused before a header was printed
    shown = factory_cli("sql", query, "-w", str(site.root), "--memory-limit", "20MB", "--limit", "3")
    assert shown.returncode == 0, shown.stderr
    assert "(1999997 more rows; use --limit or --format csv)" in shown.stdout


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_up_cpu_seconds(root: Path) -> float:
    """The CPU time `factory sql` takes on this machine to start, run a trivial query on `root` and exit."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = factory_cli("sql", "SELECT 1", "-w", str(root))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stderr
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see that the query runs")
def test_ctrl_c_stops_a_query_every_time(site: Warehouse) -> None:
    """Ctrl-C once failed to stop a runaway query in 1 of 4 tries: each try must exit 130 with one line."""
    cmd = [sys.executable, "-m", "factory.cli.main", "sql", RUNAWAY, "-w", str(site.root), "--timeout", "0"]
    # A process that has used twice the CPU of a whole trivial `factory sql` (start-up, query, exit) is running
    # the runaway query, even where contention for the cores inflates a start-up's CPU time. Measured here
    # rather than fixed, so a slow machine waits longer and a fast one does not wait for nothing.
    running_after = 2 * start_up_cpu_seconds(site.root)
    for attempt in range(3):
        # SIGINT restored to its default: pytest run as a background job ignores it, and a child inherits that.
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and cpu_seconds(proc.pid) < running_after and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 130, (attempt, err)
        assert (out, err) == ("", "interrupted: the query was stopped\n"), attempt


# --------------------------------------------------------------------------- factory sql: every type
EVERY_TYPE = {
    "interval": "INTERVAL 1 DAY",
    "decimal": "3.14::DECIMAL(10, 2)",
    "blob": "'\\xAA\\x00ab'::BLOB",
    "uuid": "'00000000-0000-0000-0000-000000000001'::UUID",
    "time": "TIME '12:34:56'",
    "timestamptz": "TIMESTAMPTZ '2024-01-01 00:00:00+00'",
    "timestamp_ns": "TIMESTAMP_NS '2024-01-01 00:00:00.000000001'",
    "hugeint": "170141183460469231731687303715884105727::HUGEINT",
    "union": "union_value(num := 2)::UNION(num INTEGER, str VARCHAR)",
    "map": "MAP {'a': 1}",
    "struct": "{'x': 1, 'y': 'z'}",
    "list": "[1, 2]",
    "list_of_intervals": "[INTERVAL 1 HOUR]",
    "array": "[1, 2]::INTEGER[2]",
    "enum": "'b'::ENUM('a', 'b')",
    "bit": "'0101'::BIT",
    "date": "DATE '2024-02-29'",
    "timetz": "TIMETZ '12:00:00+02'",
    "nan": "'nan'::DOUBLE",
}
EVERY_TYPE_QUERY = "SELECT " + ", ".join(f"{sql} AS {name}" for name, sql in EVERY_TYPE.items())


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_every_duckdb_type_prints_in_every_format(site: Warehouse, fmt: str) -> None:
    result = factory_cli("sql", EVERY_TYPE_QUERY, "-w", str(site.root), "--format", fmt)
    assert result.returncode == 0, result.stderr
    if fmt == "table":
        header = next(line for line in result.stdout.splitlines() if "interval" in line)
        assert all(name in header for name in EVERY_TYPE), header
        return
    if fmt == "csv":
        head, row = csv.reader(io.StringIO(result.stdout))
        values = dict(zip(head, row, strict=True))
    else:
        values = json.loads(result.stdout)
    assert list(values) == list(EVERY_TYPE)
    # DuckDB's own text for types Arrow, CSV or JSON cannot carry as they are.
    expected = {"interval": "1 day", "blob": "\\xAA\\x00ab", "bit": "0101", "map": "{a=1}", "union": "2"}
    expected |= {"enum": "b", "timetz": "12:00:00+02"}
    assert {k: values[k] for k in expected} == expected
    assert "01:00:00" in values["list_of_intervals"]  # a list holding an interval: DuckDB's text of the list
    if fmt == "json":
        assert values["hugeint"] == 170141183460469231731687303715884105727 and values["decimal"] == "3.14"
        assert values["list"] == [1, 2] and values["struct"] == {"x": 1, "y": "z"} and values["nan"] == "NaN"


BUILD_OUTPUT = """
import sys
from pathlib import Path
from types import SimpleNamespace

from factory.pipeline.stage import PlannedStage, StageStats
from factory.cli.progress import RichReporter, print_eval, print_loop, print_plan, print_summary
from factory.warehouse.store import Warehouse

hostile, root = sys.argv[1], Path(sys.argv[2])
wh = Warehouse(root / hostile)
RichReporter().warn(f"set aside {hostile}")
print_plan(hostile, 2, [PlannedStage("samples", hostile, 2, 10, 20, note=hostile)])
run = {"run_id": hostile, "status": "ok", "model_calls": 1, "cached_calls": 0, "failed_calls": 0, "tokens_in": 1,
       "tokens_out": 1, "seconds": 1.0}
print_summary(run, [StageStats(hostile, notes={"n": 1})], root / hostile, wh)
rates = {k: 0.5 for k in ("win_rate", "win_rate_low", "win_rate_high", "lc_win_rate", "lc_win_rate_low",
                          "lc_win_rate_high", "avg_len_policy", "avg_len_baseline")}
counts = {k: 1 for k in ("wins", "losses", "ties", "scored", "prompts", "unparsed_judgments")}
print_eval([{"contender": hostile, "baseline": hostile, "judge": hostile, "protocol": "p", **rates, **counts}])
step = SimpleNamespace(round=1, kind="build", row={"status": "ok", "seconds": 1.0}, detail=hostile)
print_loop([step], wh)
"""


@pytest.mark.parametrize("terminal", sorted(TERMINALS))
def test_build_output_prints_names_and_paths_literally(tmp_path: Path, terminal: str) -> None:
    """The warning, plan, summary, win-rate and rounds tables of a build show names and paths as text."""
    result = subprocess.run(
        [sys.executable, "-c", BUILD_OUTPUT, HOSTILE, str(tmp_path)],
        capture_output=True,
        text=True,
        env=cli_env(terminal),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_literal(result.stderr)  # the warning
    assert_literal(result.stdout)
    assert result.stdout.count("[link=file:///etc/passwd]click[/link]") >= 8
