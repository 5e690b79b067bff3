"""End-to-end builds on the real embedded model: the CLI, the warehouse tables, incremental rebuilds, export.

One small build (2 prompts × 3 samples → 12 judgments) is made once per module; tests that rebuild work on
a copy of its warehouse, so each sees the same starting point whatever order they run in.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

import duckdb
import pytest
from click.testing import CliRunner

from factory.cli.main import main

pytestmark = pytest.mark.model

PROMPTS, N = 2, 3


def judgments_per_prompt(n: int) -> int:
    """Every ordered pair of distinct samples: n(n−1)."""
    return n * (n - 1)


@dataclass
class Built:
    """The module's base build."""

    root: Path
    recipe: Path
    warehouse: Path
    exit_code: int
    output: str


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, kit: Any, cli_build: Any) -> Built:
    root = tmp_path_factory.mktemp("base")
    recipe = kit.write(root / "recipe.yaml", kit.recipe(prompts=PROMPTS, n=N))
    result = cli_build(recipe, root / "wh")
    return Built(root, recipe, root / "wh", result.exit_code, result.output)


def copy_of(base: Built, tmp_path: Path) -> Path:
    """A private copy of the base warehouse (paths inside it are all derived from its root)."""
    target = tmp_path / "wh"
    shutil.copytree(base.warehouse, target)
    return target


def sql(warehouse: Path, query: str, fmt: str = "json") -> str:
    result = CliRunner().invoke(main, ["sql", query, "-w", str(warehouse), "--format", fmt])
    assert result.exit_code == 0, result.output
    return result.output


def sql_rows(warehouse: Path, query: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sql(warehouse, query).splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ the base build


def test_build_exits_ok_and_records_the_run(base: Built, kit: Any) -> None:
    assert base.exit_code == 0, base.output
    [run] = kit.runs(base.warehouse)
    assert run["status"] == "ok"
    assert run["error"] is None
    stats = kit.stages(run)
    assert list(stats) == ["prompts", "references", "samples", "judgments", "scores", "pairs", "export"]
    assert stats["samples"]["model_calls"] == PROMPTS * N
    assert stats["judgments"]["model_calls"] == PROMPTS * judgments_per_prompt(N)
    assert run["model_calls"] == PROMPTS * N + PROMPTS * judgments_per_prompt(N)
    assert run["failed_calls"] == 0
    assert run["tokens_out"] > 0
    assert json.loads(run["versions"])["factory"]


def test_sql_group_by_over_judgments_in_every_format(base: Built) -> None:
    query = (
        "SELECT prompt_id, count(*) AS n, count(DISTINCT sample_a) AS a_samples, avg(p_a) AS mean_p_a "
        "FROM judgments GROUP BY prompt_id ORDER BY prompt_id"
    )
    rows = sql_rows(base.warehouse, query)
    assert len(rows) == PROMPTS
    assert all(r["n"] == judgments_per_prompt(N) and r["a_samples"] == N for r in rows)
    assert all(0.0 <= r["mean_p_a"] <= 1.0 for r in rows)

    parsed = list(csv.DictReader(io.StringIO(sql(base.warehouse, query, "csv"))))
    assert [r["prompt_id"] for r in parsed] == [r["prompt_id"] for r in rows]
    assert all(int(r["n"]) == judgments_per_prompt(N) for r in parsed)

    table = sql(base.warehouse, "SELECT count(*) AS judged FROM judgments", "table")
    assert str(PROMPTS * judgments_per_prompt(N)) in table


def test_duckdb_file_opens_read_only_with_plain_duckdb(base: Built) -> None:
    con = duckdb.connect(str(base.warehouse / "factory.duckdb"), read_only=True)
    try:
        [(judged,)] = con.execute("SELECT count(*) FROM judgments").fetchall()
        [(samples,)] = con.execute("SELECT count(*) FROM samples").fetchall()
        [(calls,)] = con.execute("SELECT count(*) FROM judge_calls WHERE status = 'ok'").fetchall()
    finally:
        con.close()
    assert judged == PROMPTS * judgments_per_prompt(N)
    assert samples == PROMPTS * N
    assert calls == judged


def test_judgment_rows_cover_every_ordered_pair(base: Built) -> None:
    judgments = sql_rows(base.warehouse, "SELECT * FROM judgments")
    samples = sql_rows(base.warehouse, "SELECT sample_id, prompt_id FROM samples")
    call_keys = {r["request_key"] for r in sql_rows(base.warehouse, "SELECT request_key FROM judge_calls")}
    by_prompt: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        by_prompt[s["prompt_id"]].add(s["sample_id"])
    assert len(by_prompt) == PROMPTS and all(len(ids) == N for ids in by_prompt.values())

    for j in judgments:
        assert j["parse_status"] in ("ok", "no_match", "invalid_marker"), j
        assert j["raw_output"].startswith("Output (")
        assert j["verdict"] in ("a", "b", None)
        assert 0.0 <= j["p_a"] <= 1.0
        assert j["request_key"] in call_keys
        assert j["protocol"] == "refeval" and j["reference_name"] == "human" and j["judge"] == "smol"
    pairs = Counter((j["prompt_id"], j["sample_a"], j["sample_b"]) for j in judgments)
    expected = {(p, a, b) for p, ids in by_prompt.items() for a, b in permutations(sorted(ids), 2)}
    assert set(pairs) == expected
    assert all(count == 1 for count in pairs.values())
    assert Counter(j["prompt_id"] for j in judgments) == dict.fromkeys(by_prompt, judgments_per_prompt(N))


# ----------------------------------------------------------------------------------- incremental rebuilds


def test_unchanged_rebuild_makes_no_model_calls(base: Built, tmp_path: Path, kit: Any, cli_build: Any) -> None:
    wh = copy_of(base, tmp_path)
    result = cli_build(base.recipe, wh)
    assert result.exit_code == 0, result.output
    first, second = kit.runs(wh)
    assert second["status"] == "ok"
    assert second["model_calls"] == 0
    assert second["tokens_out"] == 0
    stats = kit.stages(second)
    for stage in ("prompts", "references", "samples", "judgments", "scores", "pairs"):
        assert stats[stage]["skipped"], stage
        assert stats[stage]["rows"] == kit.stages(first)[stage]["rows"], stage


def test_protocol_change_recomputes_judgments_only(base: Built, tmp_path: Path, kit: Any, cli_build: Any) -> None:
    wh = copy_of(base, tmp_path)
    recipe = kit.write(tmp_path / "refmatch.yaml", kit.recipe(PROMPTS, N, **{"judgments.protocol": "refmatch"}))
    result = cli_build(recipe, wh)
    assert result.exit_code == 0, result.output
    run = kit.runs(wh)[-1]
    assert run["status"] == "ok"
    stats = kit.stages(run)
    assert stats["samples"]["model_calls"] == 0 and stats["samples"]["skipped"]
    assert stats["references"]["model_calls"] == 0
    assert stats["judgments"]["model_calls"] == PROMPTS * judgments_per_prompt(N)
    assert stats["judgments"]["cached_calls"] == 0
    assert not stats["scores"]["skipped"] and not stats["pairs"]["skipped"]
    assert run["model_calls"] == PROMPTS * judgments_per_prompt(N)
    protocols = sql_rows(wh, "SELECT protocol, count(*) AS n FROM judgments GROUP BY protocol")
    assert protocols == [{"protocol": "refmatch", "n": PROMPTS * judgments_per_prompt(N)}]


def test_added_prompt_makes_only_its_calls(base: Built, tmp_path: Path, kit: Any, cli_build: Any) -> None:
    wh = copy_of(base, tmp_path)
    recipe = kit.write(tmp_path / "more.yaml", kit.recipe(PROMPTS + 1, N))
    result = cli_build(recipe, wh)
    assert result.exit_code == 0, result.output
    run = kit.runs(wh)[-1]
    assert run["status"] == "ok"
    stats = kit.stages(run)
    assert stats["samples"]["model_calls"] == N
    assert stats["samples"]["cached_calls"] == PROMPTS * N
    assert stats["judgments"]["model_calls"] == judgments_per_prompt(N)
    assert stats["judgments"]["cached_calls"] == PROMPTS * judgments_per_prompt(N)
    assert run["model_calls"] == N + judgments_per_prompt(N)
    [counts] = sql_rows(wh, "SELECT (SELECT count(*) FROM samples) AS s, (SELECT count(*) FROM judgments) AS j")
    assert counts == {"s": (PROMPTS + 1) * N, "j": (PROMPTS + 1) * judgments_per_prompt(N)}


# --------------------------------------------------------------------------------------------------- export


def test_export_is_a_trl_conversational_preference_dataset(base: Built) -> None:
    datasets = pytest.importorskip("datasets")
    path = base.warehouse / "exports" / "modeltest"
    dd = datasets.load_from_disk(str(path))
    assert set(dd) == {"train", "test"}
    pairs = sql_rows(base.warehouse, "SELECT * FROM pairs")
    samples = {s["sample_id"]: s for s in sql_rows(base.warehouse, "SELECT sample_id, text FROM samples")}
    prompts = {p["prompt_id"]: p for p in sql_rows(base.warehouse, "SELECT prompt_id, instruction FROM prompts")}
    assert pairs, "the build made no pairs: the export test would check nothing"
    assert sum(len(split) for split in dd.values()) == len(pairs)

    provenance = {"prompt_id", "chosen_sample_id", "rejected_sample_id", "chosen_score", "rejected_score", "margin"}
    provenance |= {"policy", "judge", "protocol", "reference_name", "recipe", "recipe_hash"}
    for split in dd.values():
        assert {"prompt", "chosen", "rejected"} | provenance <= set(split.column_names)
    rows = [row for split in dd.values() for row in split]
    for row in rows:
        assert row["prompt"] == [{"role": "user", "content": prompts[row["prompt_id"]]["instruction"]}]
        assert row["chosen"] == [{"role": "assistant", "content": samples[row["chosen_sample_id"]]["text"]}]
        assert row["rejected"] == [{"role": "assistant", "content": samples[row["rejected_sample_id"]]["text"]}]
        assert row["chosen_score"] > row["rejected_score"]
        assert row["margin"] == pytest.approx(row["chosen_score"] - row["rejected_score"])
        assert (row["recipe"], row["protocol"], row["judge"]) == ("modeltest", "refeval", "smol")

    files = sorted((path / "data").glob("*.parquet"))
    assert [f.name for f in files] == ["test-00000.parquet", "train-00000.parquet"]  # a build of one shard
    from_parquet = datasets.load_dataset("parquet", data_dir=str(path / "data"))
    for name, split in dd.items():
        assert from_parquet[name].to_list() == split.to_list()

    card = (path / "README.md").read_text(encoding="utf-8")
    assert "# modeltest" in card and "refeval" in card and "data/train-*.parquet" in card
