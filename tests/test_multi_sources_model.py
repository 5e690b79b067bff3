"""The issue's checks on the real embedded model: a new user's file of completions, never seen by the project,
imported and relabelled with RefEval; two policies and a panel of two judges, rebuilt with no model call; and
SQL over `judgments` comparing the two judges on the same pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from factory.cli.main import main
from factory.warehouse.store import Warehouse

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]
SMOL = {"backend": "embedded", "threads": 1, "batch_size": 8}


def build(recipe: Path, wh: Path) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["build", str(recipe), "-w", str(wh), "-q"])
    assert result.exit_code == 0, result.output
    run = Warehouse(wh).query("SELECT * FROM runs ORDER BY started_at DESC LIMIT 1").to_pylist()[0]
    return {**run, "by_stage": {s["stage"]: s for s in run["stages"]}}


def test_a_users_file_of_completions_is_relabelled_with_refeval(tmp_path: Path) -> None:
    prompts = [
        {"id": "q1", "question": "Name a color.", "answer": "Blue."},
        {"id": "q2", "question": "What is 2+2?", "answer": "4"},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    outputs = [
        {"qid": "q1", "completions": [{"model": "a", "response": "Red."}, {"model": "b", "response": "Blue!"}]},
        {"qid": "q2", "completions": [{"model": "a", "response": "4"}, {"model": "b", "response": "five"}]},
        {"qid": "q9", "completions": [{"model": "a", "response": "orphan"}]},
    ]
    (tmp_path / "theirs.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outputs), encoding="utf-8")
    recipe = {
        "name": "relabel",
        "models": {"smol": SMOL},
        "prompts": {"path": "prompts.jsonl", "instruction_field": "question", "reference_fields": ["answer"]}
        | {"id_field": "id"},
        "references": [{"name": "answer", "kind": "column"}],
        "samples": [
            {"imported": "theirs", "path": "theirs.jsonl", "field": "completions", "join": "id"}
            | {"join_field": "qid", "model_field": "model"}
        ],
        "judgments": {"judge": "smol", "protocol": "refeval", "reference": "answer", "max_tokens": 4},
        "export": {"test_fraction": 0.5},
    }
    path = tmp_path / "relabel.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    wh = tmp_path / "wh"
    run = build(path, wh)
    assert run["by_stage"]["samples"]["model_calls"] == 0
    assert run["by_stage"]["judgments"]["model_calls"] == 2 * 2
    notes = json.loads(run["by_stage"]["samples"]["notes"])
    assert notes["imports"]["theirs"]["unjoined_rows"] == [2]
    parsed = Warehouse(wh).query("SELECT count(*) AS n FROM judgments WHERE parse_status = 'ok'").to_pylist()
    assert parsed[0]["n"] >= 1
    assert sum(s["model_calls"] for s in build(path, wh)["stages"]) == 0


def test_two_policies_and_two_judges_rebuild_without_a_call(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "recipes" / "two-policies-panel.yaml").read_text(encoding="utf-8"))
    data["models"]["smol"] = SMOL
    data["prompts"]["path"] = str(ROOT / "recipes" / "data" / "llmbar_natural_16.jsonl")
    data["prompts"]["limit"] = 2
    for policy in data["samples"]:
        policy["params"]["max_tokens"] = 12
    path = tmp_path / "panel.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    wh = tmp_path / "wh"
    first = build(path, wh)
    assert first["by_stage"]["samples"]["model_calls"] == 2 * 4
    assert first["by_stage"]["judgments"]["rows"] <= 2 * 12 * 2
    again = build(path, wh)
    assert sum(s["model_calls"] for s in again["stages"]) == 0
    compared = (
        Warehouse(wh)
        .query(
            "SELECT a.protocol AS first, b.protocol AS second, count(*) AS pairs FROM judgments a JOIN judgments b "
            "USING (recipe, prompt_id, sample_a, sample_b) WHERE a.protocol = 'refeval' AND b.protocol = 'reffree' "
            "GROUP BY ALL"
        )
        .to_pylist()
    )
    assert compared and compared[0]["pairs"] == first["by_stage"]["judgments"]["rows"] // 2
