"""Compaction of the call cache on real Parquet and DuckDB: every row kept (failed calls too), a compaction
killed before it removed what it covers, readers racing a compaction, damaged parts, and builds that
compact and then reuse their calls."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from factory.build.command import Build
from factory.config.loading import load_recipe
from factory.core.errors import FactoryError
from factory.warehouse import compaction
from factory.warehouse.call_cache import CallCache
from factory.warehouse.compaction import COVERS_KEY, MIN_FILES
from factory.warehouse.store import Warehouse
from factory.warehouse.views import Views

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
TABLE = "generation_calls"
ROWS_SQL = f"SELECT request_key, status, text, created_at, retries FROM {TABLE} ORDER BY ALL"


def call(key: str, status: str = "ok", minutes: int = 0, text: str = "t") -> dict[str, Any]:
    return {
        "request_key": key,
        "recipe": "r",
        "run_id": "run1",
        "model": "m",
        "text": f"{text}-{minutes}" if status == "ok" else None,
        "finish_reason": "stop" if status == "ok" else None,
        "tokens_in": 1,
        "tokens_out": 1,
        "latency_s": 0.0,
        "status": status,
        "error": None if status == "ok" else "RuntimeError: boom",
        "created_at": T0 + timedelta(minutes=minutes),
    }


def fill(wh: Warehouse, parts: int, run: str = "run1", start: int = 0) -> list[str]:
    """`parts` parts of three calls each: a failure, an ok call, and a newer ok call of a key already called
    (so the newest-wins rule is exercised across files); returns every key written."""
    keys = []
    for i in range(start, start + parts):
        rows = [call(f"bad{i}", "error", i), call(f"k{i}", "ok", i), call(f"k{i // 2}", "ok", 100 + i)]
        wh.append_calls(TABLE, run, rows)
        keys += [r["request_key"] for r in rows]
    return keys


def folder(wh: Warehouse) -> Path:
    return wh.root / "calls" / TABLE


def names(wh: Warehouse, glob: str) -> list[str]:
    return sorted(p.name for p in folder(wh).glob(glob))


def compact(wh: Warehouse, run: str = "runC") -> list[Path]:
    with wh.lock():
        return wh.compact_calls(run)


def test_compaction_keeps_every_row_ok_and_failed(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    keys = fill(wh, MIN_FILES + 4)
    # An older part without the accounting columns added later: merged, with those columns null.
    old = pa.table({"request_key": ["old"], "status": ["ok"], "text": ["o"], "created_at": [T0]})
    pq.write_table(old, folder(wh) / "part-run0-000001.parquet")
    rows_before = Warehouse(wh.root).query(ROWS_SQL).to_pylist()
    cached_before = Warehouse(wh.root).cached_calls(TABLE, [*keys, "old"])

    written = compact(wh)

    assert len(written) == 1 and names(wh, "part-*") == []
    fresh = Warehouse(wh.root)
    assert fresh.query(ROWS_SQL).to_pylist() == rows_before
    assert len(rows_before) == 3 * (MIN_FILES + 4) + 1
    assert sum(r["status"] == "error" for r in rows_before) == MIN_FILES + 4  # failures are kept...
    cached = fresh.cached_calls(TABLE, [*keys, "old"])
    assert cached == cached_before
    assert not any(k.startswith("bad") for k in cached)  # ...and never count as cached
    assert cached["k1"]["text"] == "t-103"  # the newest of its three ok calls (parts 1, 2 and 3)
    assert fresh.missing_calls(["k0", "bad0", "old"]) == {"bad0"}


def test_a_compaction_killed_before_removing_its_parts_counts_nothing_twice(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    keys = fill(wh, MIN_FILES)
    rows_before = Warehouse(wh.root).query(ROWS_SQL).to_pylist()
    parts = names(wh, "part-*")
    kept = tmp_path / "kept"
    shutil.copytree(folder(wh), kept)
    compact(wh)
    for name in parts:  # the parts back, as if the compaction had been killed after its rename
        shutil.copy2(kept / name, folder(wh) / name)
    assert len(names(wh, "part-*")) == MIN_FILES and len(names(wh, "compact-*")) == 1

    reader = Warehouse(wh.root)
    assert reader.query(ROWS_SQL).to_pylist() == rows_before
    assert reader.row_counts()[TABLE] == 3 * MIN_FILES
    assert len(reader.cached_calls(TABLE, keys)) == MIN_FILES
    # The next compaction removes what the compacted file covers, and merges nothing new.
    assert compact(wh, "runD") == []
    assert names(wh, "part-*") == [] and Warehouse(wh.root).query(ROWS_SQL).to_pylist() == rows_before


@pytest.mark.parametrize("row_group", [compaction.ROW_GROUP_ROWS, 4])
def test_small_compacted_files_are_merged_again_and_cover_what_they_merged(
    tmp_path: Path, monkeypatch: Any, row_group: int
) -> None:
    # With row groups of 4 rows, a compacted file is larger than one and is checked, then streamed, piecewise.
    monkeypatch.setattr(compaction, "ROW_GROUP_ROWS", row_group)
    wh = Warehouse(tmp_path / "wh")
    fill(wh, MIN_FILES)
    first = compact(wh)
    fill(wh, MIN_FILES - 1, run="run2", start=MIN_FILES)  # with the small compacted file: MIN_FILES files
    rows_before = Warehouse(wh.root).query(ROWS_SQL).to_pylist()
    second = compact(wh, "runD")
    assert len(second) == 1 and names(wh, "*.parquet") == [second[0].name]
    covers = pq.read_metadata(second[0]).metadata[COVERS_KEY].decode()
    assert first[0].name in covers and "part-run1-000001.parquet" in covers  # what the first one covered too
    assert Warehouse(wh.root).query(ROWS_SQL).to_pylist() == rows_before
    # The same run id again (a warehouse handle serving several runs): no new file takes a covered name.
    fill(wh, MIN_FILES - 1, run="run3", start=2 * MIN_FILES)
    rows_before = Warehouse(wh.root).query(ROWS_SQL).to_pylist()
    third = compact(wh)  # the first one's run id: its first name is gone, but covered
    assert len(third) == 1 and third[0].name not in {first[0].name, second[0].name}
    assert Warehouse(wh.root).query(ROWS_SQL).to_pylist() == rows_before
    assert len(rows_before) == 3 * (3 * MIN_FILES - 2)


def test_too_few_files_are_left_alone_and_compaction_needs_the_lock(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    fill(wh, MIN_FILES - 1)
    assert compact(wh) == [] and len(names(wh, "part-*")) == MIN_FILES - 1
    with pytest.raises(FactoryError, match="lock"):
        wh.compact_calls("runC")


def test_a_damaged_part_is_set_aside_not_merged(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    fill(wh, MIN_FILES + 1)
    bad = folder(wh) / "part-run1-000003.parquet"
    bad.write_bytes(bytes(range(256)) * 4)
    compact(wh)
    assert (folder(wh) / "corrupt" / bad.name).is_file() and not bad.exists()
    assert Warehouse(wh.root).row_counts()[TABLE] == 3 * MIN_FILES


def test_a_part_whose_columns_do_not_fit_is_left_as_it_is(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    fill(wh, MIN_FILES + 1)
    # A column of another type: merging it would have to drop or change it.
    odd = pa.table({"request_key": ["x"], "status": ["ok"], "created_at": [T0], "tokens_in": ["many"]})
    pq.write_table(odd, folder(wh) / "part-run9-000001.parquet")
    compact(wh)
    assert names(wh, "part-*") == ["part-run9-000001.parquet"]
    assert len(names(wh, "compact-*")) == 1


def test_readers_that_listed_before_a_compaction_read_again(tmp_path: Path, monkeypatch: Any) -> None:
    """A reader lists the files, a build compacts and removes them, then the reader reads: it must list again
    and count every row once (the parts it listed are gone, the compacted file is new)."""
    wh = Warehouse(tmp_path / "wh")
    keys = fill(wh, MIN_FILES)
    rows_before = Warehouse(wh.root).query(ROWS_SQL).to_pylist()
    cached_before = Warehouse(wh.root).cached_calls(TABLE, keys)
    writer = Warehouse(wh.root)
    compacted: list[int] = []

    def compact_once() -> None:
        if not compacted:
            compacted.append(len(compact(writer)))

    read_cached = CallCache._read_cached

    def racing_read(parts: list[str], wanted: pa.Table) -> dict[str, dict[str, Any]]:
        compact_once()
        return read_cached(parts, wanted)

    monkeypatch.setattr(CallCache, "_read_cached", staticmethod(racing_read))
    assert Warehouse(wh.root).cached_calls(TABLE, keys) == cached_before
    assert compacted == [1]

    fill(writer, MIN_FILES, run="run2", start=MIN_FILES)
    rows_before = Warehouse(wh.root).query(ROWS_SQL).to_pylist()
    compacted.clear()
    define = Views._define_views

    def racing_define(self: Views, con: Any) -> list[str]:
        files = define(self, con)
        compact_once()  # after the views were defined over the parts, before the query reads them
        return files

    monkeypatch.setattr(Views, "_define_views", racing_define)
    assert Warehouse(wh.root).query(ROWS_SQL).to_pylist() == rows_before
    assert compacted == [1]


def test_the_listing_waits_for_a_compaction_that_lands_while_parts_are_listed(tmp_path: Path, monkeypatch: Any) -> None:
    wh = Warehouse(tmp_path / "wh")
    fill(wh, MIN_FILES)
    rows_before = Warehouse(wh.root).query(ROWS_SQL).to_pylist()
    writer = Warehouse(wh.root)
    globs: list[str] = []
    real_glob = Path.glob

    def glob(self: Path, pattern: str) -> Any:
        found = list(real_glob(self, pattern))
        globs.append(pattern)
        if pattern == compaction.PART_GLOB and globs.count(pattern) == 1:
            compact(writer)  # lands between the first listing of compacted files and the second
        return iter(found)

    monkeypatch.setattr(Path, "glob", glob)
    reader = Warehouse(wh.root)
    listed, _ = reader._listing(TABLE)
    assert [Path(p).name for p in listed] == names(wh, "compact-*")
    monkeypatch.undo()
    assert reader.query(ROWS_SQL).to_pylist() == rows_before


# ------------------------------------------------------------------------------------------------ builds
def scripted(tmp_path: Path, prompts: int) -> Path:
    """A scripted recipe with one call per batch, so that a small build leaves enough parts to compact."""
    recipe = {
        "name": "compacted",
        "models": {"m": {"backend": "scripted", "batch_size": 1}},
        "prompts": {
            "inline": [{"instruction": f"Question {i}?", "ref": f"Answer {i}."} for i in range(prompts)],
            "reference_fields": ["ref"],
        },
        "references": [{"name": "human", "kind": "column"}],
        "samples": {"policy": "m", "n": 5, "params": {"max_tokens": 12}},
        "judgments": {"judge": "m", "protocol": "refeval", "reference": "human"},
        "export": {"test_fraction": 0.25},
    }
    path = tmp_path / f"r{prompts}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def test_a_build_compacts_its_calls_and_a_rebuild_makes_no_call(tmp_path: Path, monkeypatch: Any) -> None:
    wh_path = tmp_path / "wh"
    recipe = scripted(tmp_path, 16)  # 16 generation batches, 320 judge batches
    monkeypatch.setattr(compaction, "MIN_FILES", 10**9)  # a first build that leaves its parts, to compare
    first = Build(load_recipe(recipe), Warehouse(wh_path)).run()
    assert first["status"] == "ok" and first["model_calls"] > 0
    tables = ("generation_calls", "judge_calls", "samples", "judgments")
    before = {t: Warehouse(wh_path).query(f"SELECT * EXCLUDE (run_id) FROM {t} ORDER BY ALL") for t in tables}
    monkeypatch.undo()

    again = Build(load_recipe(recipe), Warehouse(wh_path)).run()
    assert again["model_calls"] == 0 and again["cached_calls"] == 0  # every stage reused
    for table in ("generation_calls", "judge_calls"):
        calls = wh_path / "calls" / table
        assert not list(calls.glob("part-*")) and len(list(calls.glob("compact-*"))) == 1
    after = {t: Warehouse(wh_path).query(f"SELECT * EXCLUDE (run_id) FROM {t} ORDER BY ALL") for t in tables}
    assert after == before

    shutil.rmtree(wh_path / "tables" / "judgments")  # a stage remade from the compacted cache alone
    third = Build(load_recipe(recipe), Warehouse(wh_path)).run()
    assert third["model_calls"] == 0 and third["cached_calls"] > 0
    more = Build(load_recipe(scripted(tmp_path, 17)), Warehouse(wh_path)).run()
    assert more["model_calls"] == first["model_calls"] // 16  # one more prompt: its calls only


# ------------------------------------------------------------------------------------------- kill -9
COMPACT_CHILD = """
import sys
from factory.warehouse.store import Warehouse
wh = Warehouse(sys.argv[1])
with wh.lock():
    print("go", flush=True)
    wh.compact_calls(sys.argv[2])
print("done", flush=True)
"""


def compact_in_child(wh: Path, run: str, kill_after_s: float | None) -> tuple[float, int]:
    """Compact in a child process, killed with SIGKILL `kill_after_s` after it took the lock (None: let it
    finish); returns the seconds from taking the lock to the end, and the child's exit code."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-c", COMPACT_CHILD, str(wh), run], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
    t0 = time.monotonic()
    if kill_after_s is not None:
        time.sleep(kill_after_s)
        proc.send_signal(signal.SIGKILL)
    code = proc.wait(timeout=120)
    return time.monotonic() - t0, code


def test_kill_9_during_compaction_loses_and_doubles_nothing(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    keys = fill(wh, 6 * MIN_FILES)
    spare = tmp_path / "spare"
    shutil.copytree(wh.root, spare)
    duration, _ = compact_in_child(spare, "runT", None)  # how long an uninterrupted compaction takes here
    killed = []
    for n, fraction in enumerate((0.05, 0.3, 0.6, 0.9)):
        keys += fill(wh, 1, run=f"more{n}", start=10_000 + n)  # each trial also has a new part to merge
        rows_before = Warehouse(wh.root).query(ROWS_SQL).to_pylist()
        cached_before = Warehouse(wh.root).cached_calls(TABLE, keys)
        killed.append(compact_in_child(wh.root, f"runK{n}", duration * fraction)[1] == -signal.SIGKILL)
        reader = Warehouse(wh.root)
        assert reader.query(ROWS_SQL).to_pylist() == rows_before
        assert len(rows_before) == 3 * (6 * MIN_FILES + n + 1)
        assert reader.cached_calls(TABLE, keys) == cached_before
    assert killed[0]  # at 5 % of its time, at least the first was killed mid-way
    compact_in_child(wh.root, "runEnd", None)
    reader = Warehouse(wh.root)
    assert reader.query(ROWS_SQL).to_pylist() == rows_before
    _, covered = reader._listing(TABLE)
    assert not any((folder(wh) / name).exists() for name in covered)  # leftovers of killed runs removed
