"""Damaged stage tables, CURRENT.json pointers and runs rows (docs/RELIABILITY.md, "Damaged stage tables").

Stage tables are derived data: a build that finds one of their files unreadable sets it aside in the corrupt/
folder beside it, names it in one warning, recomputes the stage from its inputs and the call cache (no model
call), and ends with the same tables as an undamaged build. Read-only commands move nothing and name the file
in a warning. Each test copies one finished build of a small `scripted` recipe, damages one file, and runs the
real CLI in this process (real Parquet files, real DuckDB, no torch).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner, Result
from test_warehouse_safety import corrupt_pages, truncate
from test_warehouse_safety import snapshot as files

from factory.cli.main import main

NAME = "dmg"
STAGE_TABLES = ("prompts", "references", "samples", "judgments", "scores", "pairs")
# Columns that differ between two builds by design: who made a row, when, how fast.
VOLATILE = frozenset({"run_id", "latency_s", "created_at"})
RECIPE: dict[str, Any] = {
    "name": NAME,
    "models": {"pol": {"backend": "scripted", "batch_size": 4}, "judge": {"backend": "scripted", "batch_size": 8}},
    "prompts": {
        "inline": [
            {"instruction": "Name a color.", "ref": "Blue."},
            {"instruction": "Say hi.", "ref": "Hi."},
            {"instruction": "Name a fruit.", "ref": "Apple."},
        ],
        "reference_fields": ["ref"],
    },
    "references": [{"name": "gold", "kind": "column", "field": "ref"}],
    "samples": {"policy": "pol", "n": 3, "params": {"max_tokens": 8}},
    "judgments": {"judge": "judge", "protocol": "refeval", "reference": "gold"},
    "export": {"test_fraction": 0.34},
}
INTERNAL = "internal or backend failure"


# ------------------------------------------------------------------------------------------------ helpers
def cli(*args: str) -> Result:
    """`factory ARGS` in this process (stderr kept apart from stdout)."""
    return CliRunner().invoke(main, list(args))


def build(recipe: Path, wh: Path) -> Result:
    return cli("build", str(recipe), "-w", str(wh), "-q")


def count(wh: Path, table: str) -> tuple[Result, int]:
    """`factory sql "SELECT count(*) ..."` and the count it answered."""
    result = cli("sql", f'SELECT count(*) AS n FROM "{table}"', "-w", str(wh), "--format", "json")
    assert result.exit_code == 0, result.output
    return result, json.loads(result.stdout.strip().splitlines()[-1])["n"]


def current_file(wh: Path, table: str) -> Path:
    pointer = wh / "tables" / table / NAME / "CURRENT.json"
    return pointer.parent / f"{json.loads(pointer.read_text())['stage_key']}.parquet"


def _norm(row: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in VOLATILE}, sort_keys=True, default=str)


def snapshot(wh: Path) -> dict[str, Counter[str]]:
    """The rows of every stage table's current version and of the export, without the volatile columns."""
    out = {t: Counter(_norm(r) for r in pq.read_table(current_file(wh, t)).to_pylist()) for t in STAGE_TABLES}
    for split in ("train", "test"):
        files = sorted((wh / "exports" / NAME / "data").glob(f"{split}-*.parquet"))
        rows = [r for f in files for r in pq.read_table(f).to_pylist()]
        out[f"export/{split}"] = Counter(_norm(r) for r in rows if r)
    return out


def runs_rows(wh: Path) -> list[dict[str, Any]]:
    """The runs rows that can be read (runs/corrupt/ is not globbed), oldest first."""
    rows = [pq.read_table(p).to_pylist()[0] for p in (wh / "runs").glob("*.parquet")]
    return sorted(rows, key=lambda r: r["started_at"])


def lines_naming(text: str, path: Path) -> list[str]:
    return [line for line in text.splitlines() if str(path) in line]


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


# ------------------------------------------------------------------------------------- the undamaged build
class Reference:
    """A finished build of RECIPE, never damaged: each test damages a copy of its warehouse."""

    def __init__(self, recipe: Path, wh: Path) -> None:
        self.recipe, self.wh = recipe, wh
        self.tables = snapshot(wh)
        self.counts = {t: sum(self.tables[t].values()) for t in STAGE_TABLES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    base = tmp_path_factory.mktemp("reference")
    recipe = base / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False), encoding="utf-8")
    result = build(recipe, base / "wh")
    assert result.exit_code == 0, result.output
    [run] = runs_rows(base / "wh")
    assert run["status"] == "ok" and run["model_calls"] == 9 + 18
    return Reference(recipe, base / "wh")


def copy_of(reference: Reference, tmp_path: Path) -> Path:
    wh = tmp_path / "wh"
    shutil.copytree(reference.wh, wh)
    return wh


def check_rebuild(reference: Reference, wh: Path, damaged: Path) -> tuple[Result, dict[str, Any]]:
    """Rebuild after damaging `damaged`: exit 0, one warning naming it, the file kept in corrupt/, no model
    call, tables equal to the undamaged build's. Returns the build's result and its runs row."""
    bad_bytes = damaged.read_bytes()
    result = build(reference.recipe, wh)
    assert result.exit_code == 0, result.output
    assert INTERNAL not in result.output and "Traceback" not in result.output and "error:" not in result.stderr
    [warning] = lines_naming(result.stderr, damaged)
    assert warning.startswith("warning: set aside 1 damaged table file(s)")
    assert (damaged.parent / "corrupt" / damaged.name).read_bytes() == bad_bytes  # kept, not deleted
    run = runs_rows(wh)[-1]
    assert run["status"] == "ok"
    assert run["model_calls"] == 0
    assert snapshot(wh) == reference.tables
    return result, run


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("damage", [truncate, garbage])
@pytest.mark.parametrize("table", ["prompts", "samples", "judgments"])
def test_a_damaged_stage_table_is_named_then_set_aside_and_recomputed(
    reference: Reference, tmp_path: Path, table: str, damage: Callable[[Path], None]
) -> None:
    wh = copy_of(reference, tmp_path)
    damaged = current_file(wh, table)
    damage(damaged)

    # Read-only commands: exit 0, the file named in a warning, nothing moved.
    before = files(wh)
    sql, n = count(wh, table)
    assert n == 0  # its rows are not there, and the warning says so
    [warning] = lines_naming(sql.stderr, damaged)
    assert warning.startswith("warning: skipped 1 unreadable file(s)")
    ls = cli("ls", "-w", str(wh))
    assert ls.exit_code == 0, ls.output
    assert lines_naming(ls.stderr, damaged)
    assert files(wh) == before

    _, run = check_rebuild(reference, wh, damaged)
    stage = {s["stage"]: s for s in run["stages"]}[table]
    assert not stage["skipped"]  # recomputed, from the source file (prompts) or the call cache
    assert json.loads(stage["notes"])["set_aside"] == [str(damaged)]
    sql, n = count(wh, table)
    assert n == reference.counts[table] and not sql.stderr


def test_a_stage_table_with_damaged_pages_is_set_aside_when_read(reference: Reference, tmp_path: Path) -> None:
    """The footer is intact, so the check at the build's start passes it; reading the rows fails. A build
    reads a reused version only when a stage below it has work to do: here the judgments, whose version is
    no longer marked complete (as a build killed while writing them leaves it)."""
    wh = copy_of(reference, tmp_path)
    damaged = current_file(wh, "samples")
    corrupt_pages(damaged)
    current_file(wh, "judgments").with_suffix(".complete").unlink()
    _, run = check_rebuild(reference, wh, damaged)
    samples = {s["stage"]: s for s in run["stages"]}["samples"]
    assert samples["cached_calls"] == 9 and not samples["skipped"]


@pytest.mark.parametrize(
    "content",
    [b"garbage\x00\xff", b'{"stage_key": "9c49fd', b'{"stage_key": "../../../runs/x"}'],
    ids=["garbage", "truncated", "outside"],
)
def test_a_damaged_current_json_is_named_then_set_aside(reference: Reference, tmp_path: Path, content: bytes) -> None:
    wh = copy_of(reference, tmp_path)
    version = current_file(wh, "judgments")
    pointer = version.parent / "CURRENT.json"
    pointer.write_bytes(content)

    before = files(wh)
    sql, n = count(wh, "judgments")
    assert n == 0
    assert lines_naming(sql.stderr, pointer)
    assert files(wh) == before

    _, run = check_rebuild(reference, wh, pointer)
    judged = {s["stage"]: s for s in run["stages"]}["judgments"]
    assert judged["skipped"]  # the version itself is whole: reused by its key and made current again
    assert json.loads(pointer.read_text())["stage_key"] == version.stem


def test_a_damaged_runs_row_is_named_then_set_aside(reference: Reference, tmp_path: Path) -> None:
    wh = copy_of(reference, tmp_path)
    [damaged] = (wh / "runs").glob("*.parquet")
    truncate(damaged)

    before = files(wh)
    sql, n = count(wh, "runs")
    assert n == 0
    assert lines_naming(sql.stderr, damaged)
    assert files(wh) == before

    check_rebuild(reference, wh, damaged)
    sql, n = count(wh, "runs")
    assert n == 1 and not sql.stderr  # the new run's row; the damaged one waits in runs/corrupt/
