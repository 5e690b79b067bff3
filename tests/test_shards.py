"""Builds cut into shards (docs/DESIGN.md, "Shards"): the same tables and export as one shard, an unchanged
rebuild that reads no shard, prompts added at the end that cost only their own calls, and a kill -9 in the
middle that resumes. Real builds on the `scripted` backend, real Parquet and DuckDB."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from factory.cli.main import main
from factory.export.writer import SPLITS
from factory.warehouse.store import Warehouse

TABLES = ("prompts", "references", "samples", "judgments", "scores", "pairs")
# Differ between two builds by design: who made a row, when, how fast, and (across shard sizes) the key.
VOLATILE = {"run_id", "latency_s", "created_at", "stage_key"}


def build(recipe: Path, wh: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(recipe), "-w", str(wh), "-q"])
    assert result.exit_code == 0, result.output


def rows(wh: Path, table: str) -> list[str]:
    found = Warehouse(wh).query(f'SELECT * FROM "{table}"').to_pylist()
    return sorted(json.dumps({k: v for k, v in r.items() if k not in VOLATILE}, default=str) for r in found)


def export(wh: Path, name: str = "scripted") -> dict[str, list[dict[str, Any]]]:
    """The export's rows by split, without the recipe hash (the recipe files differ in `run.shard_prompts`)."""
    folder = wh / "exports" / name / "data"
    files = {s: sorted(folder.glob(f"{s}-*.parquet")) for s in SPLITS}
    found = {s: [r for f in fs for r in pq.read_table(f).to_pylist()] for s, fs in files.items()}
    return {s: sorted(({**r, "recipe_hash": None} for r in recs), key=str) for s, recs in found.items()}


def pointer(wh: Path, table: str) -> dict[str, Any]:
    return json.loads((wh / "tables" / table / "scripted" / "CURRENT.json").read_text())


def test_shards_make_the_same_tables_and_export_as_one_shard(tmp_path: Path, kit: Any) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    build(kit.scripted(tmp_path, "one.yaml"), whole)
    build(kit.scripted(tmp_path, "three.yaml", **{"run.shard_prompts": 3}), cut)
    assert pointer(whole, "judgments").get("shards") is None  # one shard: the layout of a build before shards
    assert len(pointer(cut, "judgments")["shards"]) == 2  # 4 prompts, 3 a shard
    for table in TABLES:
        assert rows(cut, table) == rows(whole, table), table
    assert export(cut) == export(whole)
    [first], [second] = kit.runs(whole), kit.runs(cut)
    assert second["model_calls"] == first["model_calls"]
    stats = kit.stages(second)
    assert stats["judgments"]["rows"] == stats["judgments"]["model_calls"] == 4 * 6  # one stats row over the shards


def test_an_unchanged_rebuild_reads_no_shard_and_added_prompts_cost_only_their_calls(tmp_path: Path, kit: Any) -> None:
    wh = tmp_path / "wh"
    recipe = kit.scripted(tmp_path, **{"run.shard_prompts": 1})
    build(recipe, wh)
    before = {t: pointer(wh, t)["shards"] for t in TABLES}
    build(recipe, wh)
    again = kit.runs(wh)[-1]
    assert again["model_calls"] == 0 and all(s["skipped"] for s in again["stages"] if s["stage"] != "export")
    counted = [{s["stage"]: s["rows"] for s in run["stages"]} for run in kit.runs(wh)]
    assert counted[1] == counted[0]  # a reused shard's rows are counted from its footer

    data = kit.edited(kit.scripted_data, **{"run.shard_prompts": 1})
    data["prompts"]["inline"].append({"instruction": "Name a planet.", "ref": "Mars."})
    kit.write(recipe, data)
    build(recipe, wh)
    more = kit.runs(wh)[-1]
    assert more["model_calls"] == 3 + 3 * 2  # the new prompt's samples and its six judgments
    for table in TABLES:
        shards = pointer(wh, table)["shards"]
        assert shards[:4] == before[table] and len(shards) == 5, table
    pairs = Warehouse(wh).query("SELECT count(*) AS n FROM pairs").to_pylist()[0]["n"]
    assert sum(len(v) for v in export(wh).values()) == pairs


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_build_killed_between_shards_resumes_with_no_repeated_call(tmp_path: Path, kit: Any) -> None:
    wh = tmp_path / "wh"
    slow = kit.scripted(tmp_path, **{"run.shard_prompts": 1, "models.m.script": {"delay_s": 0.05}})
    env = {k: v for k, v in os.environ.items() if k != "COVERAGE_PROCESS_START"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "factory.cli.main", "build", str(slow), "-w", str(wh), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        # Killed once the second shard's samples are written: the first shard is whole, the rest is not.
        while time.monotonic() < deadline and len(list((wh / "tables" / "samples").rglob("*.complete"))) < 2:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    written = Warehouse(wh).query("SELECT count(*) AS n FROM generation_calls").to_pylist()[0]["n"]
    assert 0 < written < 12
    build(kit.scripted(tmp_path, "fast.yaml", **{"run.shard_prompts": 1}), wh)
    calls = (
        Warehouse(wh)
        .query("SELECT count(*) AS n, count(DISTINCT request_key) AS keys FROM generation_calls WHERE status = 'ok'")
        .to_pylist()[0]
    )
    assert calls["n"] == calls["keys"] == 12  # every sample made once, the killed build's ones not again
    for table in TABLES:
        assert len(pointer(wh, table)["shards"]) == 4


def test_the_cards_position_consistency_over_arrow_matches_the_row_by_row_count() -> None:
    import random

    import pyarrow as pa

    from factory.labelers.judge import consistent_pairs, consistent_pairs_arrow

    rng = random.Random(0)
    rows = [
        {
            "sample_a": a,
            "sample_b": b,
            "verdict": rng.choice(["a", "b", None]),
            "reference_name": rng.choice(["r", None]),
        }
        for p in range(40)
        for a in (f"s{p}-{i}" for i in range(4))
        for b in (f"s{p}-{i}" for i in range(4))
        if a != b
    ]
    same, both = consistent_pairs(rows)
    assert both > 0 and 0 < same < both
    assert consistent_pairs_arrow(pa.Table.from_pylist(rows)) == (same, both)


def test_a_long_build_compacts_its_call_parts_between_shards(
    tmp_path: Path, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between shards the run merges its calls parts once a table has SHARD_COMPACT_FILES of them (lowered
    here to 2 so a 4-prompt build reaches it); the tables equal a build without shards, and a rebuild makes no
    call."""
    from factory.pipeline import run as run_module
    from factory.pipeline import shards

    monkeypatch.setattr(shards, "SHARD_COMPACT_FILES", 2)
    seen: list[int] = []  # the min_files of each compaction the run asked for
    real = run_module.Run.compact_calls

    def counting(self: Any, min_files: int = 16) -> None:
        seen.append(min_files)
        real(self, min_files)

    monkeypatch.setattr(run_module.Run, "compact_calls", counting)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    build(kit.scripted(tmp_path, "one.yaml"), whole)
    seen.clear()
    build(kit.scripted(tmp_path, "cut.yaml", **{"run.shard_prompts": 1, "models.m.batch_size": 1}), cut)
    assert seen == [2, 2, 2, 16]  # after each of the first three shards, then at the end
    assert len(list((cut / "calls").rglob("compact-*.parquet"))) >= 1
    calls = kit.runs(cut)[-1]["model_calls"]  # batch size 1: each call was written as its own part
    assert len(list((cut / "calls").rglob("*.parquet"))) < calls / 3  # merged, and no row lost (tables below)
    for table in TABLES:
        assert rows(cut, table) == rows(whole, table), table
    build(kit.scripted(tmp_path, "cut.yaml", **{"run.shard_prompts": 1, "models.m.batch_size": 1}), cut)
    assert kit.runs(cut)[-1]["model_calls"] == 0
