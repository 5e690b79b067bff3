"""Several policies, imported completions and a panel of judges in one recipe, built on the `scripted`
backend: every source's samples of a prompt are judged as one set, a one-policy recipe keeps its keys, imports
call no model and count what they could not use, and a panel's judges keep their own rows and vote."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import pytest
from click.testing import CliRunner

from factory.build.command import Build, plan
from factory.cli.main import main
from factory.config.loading import load_recipe
from factory.core.errors import UserInputError
from factory.warehouse.store import Warehouse

ROOT = Path(__file__).resolve().parents[1]
TWO_POLICIES = [
    {"policy": "m", "n": 2, "params": {"max_tokens": 12}},
    {"policy": "m2", "n": 2, "params": {"max_tokens": 12}},
]
M2 = {"backend": "scripted", "script": {"seed": 1}}
PANEL = [
    {"judge": "m", "protocol": "refeval", "reference": "human"},
    {"judge": "m2", "protocol": "reffree"},
]


def build(path: Path, wh: Path) -> dict[str, Any]:
    """One build in this process; the runs row with `by_stage` (stage name -> its stats)."""
    run = Build(load_recipe(path), Warehouse(wh)).run()
    return {**run, "by_stage": {s["stage"]: s for s in run["stages"]}}


def rows(wh: Path, sql: str) -> list[dict[str, Any]]:
    return Warehouse(wh).query(sql).to_pylist()


def calls(run: dict[str, Any]) -> int:
    return sum(s["model_calls"] for s in run["stages"])


def test_two_policies_are_judged_as_one_set_and_rebuild_without_calls(tmp_path: Path, kit: Any) -> None:
    path = kit.scripted(tmp_path, **{"models.m2": M2, "samples": TWO_POLICIES})
    wh = tmp_path / "wh"
    first = build(path, wh)
    assert first["status"] == "ok"
    samples = rows(wh, "SELECT prompt_id, policy, sample_index FROM samples ORDER BY prompt_id, sample_index")
    by_prompt: dict[str, list[tuple[str, int]]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt_id"], []).append((s["policy"], s["sample_index"]))
    # Indices run on across policies, so a prompt's samples are one set of four.
    assert all(v == [("m", 0), ("m", 1), ("m2", 2), ("m2", 3)] for v in by_prompt.values()), by_prompt
    crossed = rows(
        wh,
        "SELECT count(*) AS n FROM judgments j JOIN samples a ON j.sample_a = a.sample_id "
        "JOIN samples b ON j.sample_b = b.sample_id WHERE a.policy <> b.policy",
    )
    assert crossed[0]["n"] == 4 * 8  # 4 prompts, 2 × 2 cross-policy pairs in both orders
    assert first["by_stage"]["judgments"]["rows"] == 4 * 12
    again = build(path, wh)
    assert calls(again) == 0 and all(s["skipped"] for s in again["stages"] if s["stage"] != "export")
    export = datasets.load_from_disk(str(wh / "exports" / "scripted"))
    records = [r for split in export.values() for r in split]
    assert {r["chosen_policy"] for r in records} | {r["rejected_policy"] for r in records} <= {"m", "m2"}
    assert all(r["policy"] == "m+m2" for r in records)
    card = (wh / "exports" / "scripted" / "README.md").read_text(encoding="utf-8")
    chosen = sum(r["chosen_policy"] == "m" for r in records)
    assert f"| `m` | 8 | {chosen} |" in card


def test_one_policy_and_one_judge_as_lists_keep_their_keys(tmp_path: Path, kit: Any) -> None:
    """And a second policy added to them reuses the first one's samples."""
    wh = tmp_path / "wh"
    build(kit.scripted(tmp_path), wh)
    one = [{"policy": "m", "n": 3, "params": {"max_tokens": 12}}]
    listed = kit.scripted(tmp_path, "listed.yaml", **{"samples": one})
    reused = build(listed, wh)
    assert calls(reused) == 0
    assert [s["stage"] for s in reused["stages"] if not s["skipped"]] == ["export"]  # its key covers the text
    judge = kit.scripted_data["judgments"]
    panel_of_one = build(kit.scripted(tmp_path, "judge.yaml", **{"samples": one, "judgments": [judge]}), wh)
    assert [s["stage"] for s in panel_of_one["stages"] if not s["skipped"]] == ["export"]
    widened = kit.scripted(
        tmp_path,
        "widened.yaml",
        **{"models.m2": M2, "samples": [*one, TWO_POLICIES[1]]},
    )
    grown = build(widened, wh)
    assert grown["by_stage"]["samples"]["model_calls"] == 4 * 2  # only the new policy's samples
    assert grown["by_stage"]["samples"]["cached_calls"] == 4 * 3


def test_imported_completions_call_no_model_and_count_what_they_cannot_use(tmp_path: Path, kit: Any) -> None:
    prompts = kit.edited(kit.scripted_data)["prompts"]["inline"]
    prompts[0]["outputs"] = [{"model": "gpt", "response": "Red."}, {"model": "llama", "response": "Green."}]
    prompts[1]["outputs"] = ["Hello!", "", "Hi."]
    prompts[2]["outputs"] = []
    for i, p in enumerate(prompts):
        p["id"] = f"p{i}"
    old = tmp_path / "old.jsonl"
    lines = [
        {"prompt": "p0", "response": "Crimson."},
        {"prompt": "p3", "response": ["Four.", "4"]},
        {"prompt": "nowhere", "response": "Lost."},
    ]
    old.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    sources = [
        {"policy": "m", "n": 1, "params": {"max_tokens": 12}},
        {"imported": "uf", "field": "outputs", "model_field": "model"},
        {"imported": "old", "field": "response", "path": "old.jsonl", "join": "id", "join_field": "prompt"},
    ]
    path = kit.scripted(tmp_path, **{"prompts.inline": prompts, "prompts.id_field": "id", "samples": sources})
    wh = tmp_path / "wh"
    first = build(path, wh)
    assert first["by_stage"]["samples"]["model_calls"] == 4  # the policy's; imports call nothing
    samples = rows(wh, "SELECT policy, finish_reason, text FROM samples WHERE finish_reason = 'imported'")
    assert sorted((s["policy"], s["text"]) for s in samples) == [
        ("old", "4"),
        ("old", "Crimson."),
        ("old", "Four."),
        ("uf", "Hello!"),
        ("uf", "Hi."),
        ("uf/gpt", "Red."),
        ("uf/llama", "Green."),
    ]
    notes = first["by_stage"]["samples"]["notes"]
    notes = json.loads(notes) if isinstance(notes, str) else notes
    assert notes["imports"]["uf"]["empty"] == 3 and notes["imports"]["uf"]["empty_rows"] == [1, 2, 3]
    assert notes["imports"]["old"]["unjoined"] == 1 and notes["imports"]["old"]["unjoined_rows"] == [2]
    assert notes["imports"]["old"]["completions"] == 3
    assert calls(build(path, wh)) == 0
    # Editing one imported text re-judges only the pairs that show it: every other judgment is cached.
    lines[0]["response"] = "Scarlet."
    old.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    edited = build(path, wh)
    judged = edited["by_stage"]["judgments"]
    assert judged["model_calls"] == 2 * 3  # prompt p0 has 4 samples: the new text against 3 others, both orders
    assert judged["cached_calls"] == judged["rows"] - judged["model_calls"]


def test_a_panel_keeps_each_judges_rows_and_votes(tmp_path: Path, kit: Any) -> None:
    path = kit.scripted(tmp_path, **{"models.m2": M2, "judgments": PANEL})
    wh = tmp_path / "wh"
    first = build(path, wh)
    per_judge = rows(wh, "SELECT judge, protocol, count(*) AS n FROM judgments GROUP BY ALL ORDER BY judge")
    assert per_judge == [
        {"judge": "m", "protocol": "refeval", "n": 24},
        {"judge": "m2", "protocol": "reffree", "n": 24},
    ]
    compared = rows(
        wh,
        "SELECT count(*) AS n FROM judgments a JOIN judgments b USING (prompt_id, sample_a, sample_b) "
        "WHERE a.judge = 'm' AND b.judge = 'm2'",
    )
    assert compared[0]["n"] == 24
    # A score is the mean over ordered pairs of the panel's mean soft score.
    votes = rows(wh, "SELECT sample_a, sample_b, avg(p_a) AS p FROM judgments GROUP BY ALL")
    mine: dict[str, list[float]] = {}
    for v in votes:
        mine.setdefault(v["sample_a"], []).append(v["p"])
        mine.setdefault(v["sample_b"], []).append(1 - v["p"])
    for s in rows(wh, "SELECT sample_id, score FROM scores"):
        assert s["score"] == pytest.approx(sum(mine[s["sample_id"]]) / len(mine[s["sample_id"]]))
    assert calls(build(path, wh)) == 0
    card = (wh / "exports" / "scripted" / "README.md").read_text(encoding="utf-8")
    assert "A panel of 2 judges" in card and "| judgments by judge `m2` | 24 |" in card
    assert first["status"] == "ok"


def test_dry_run_plans_calls_per_policy_and_per_judge(tmp_path: Path, kit: Any) -> None:
    path = kit.scripted(tmp_path, **{"models.m2": M2, "samples": TWO_POLICIES, "judgments": PANEL})
    n, planned = plan(load_recipe(path))
    assert n == 4
    got = [(p.stage, p.model, p.calls) for p in planned if p.stage in ("samples", "judgments")]
    assert got == [("samples", "m", 8), ("samples", "m2", 8), ("judgments", "m", 48), ("judgments", "m2", 48)]
    result = CliRunner().invoke(main, ["build", "--dry-run", str(path), "-w", str(tmp_path / "wh")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"samples": [{"policy": "nope", "n": 2}]}, "samples.0.policy", "unknown model 'nope'"),
        ({"samples": [{"policy": "m", "n": 1}]}, "samples", "at least 2 samples"),
        ({"samples": [TWO_POLICIES[0], TWO_POLICIES[0]]}, "samples.1", "repeats entry 0"),
        ({"samples": [{"imported": "x", "field": "f", "path": "a.jsonl", "join": "id"}]}, "samples.0.join", "id_field"),
        ({"samples": [{"imported": "x", "field": "f", "nope": 1}]}, "samples.0.nope", "unknown key"),
        ({"judgments": [PANEL[0], {"judge": "m", "protocol": "refmatch"}]}, "judgments.1.reference", "needs"),
        ({"judgments": [PANEL[0], {**PANEL[1], "scoring": "verdict"}]}, "judgments.1.scoring", "share"),
        ({"rounds": 1, "samples": TWO_POLICIES}, "rounds", "one policy"),
    ],
)
def test_bad_lists_name_the_field(tmp_path: Path, kit: Any, changes: dict[str, Any], field: str, words: str) -> None:
    path = kit.scripted(tmp_path, **{"models.m2": M2, **changes})
    with pytest.raises(UserInputError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert f"field '{field}'" in message and words in message and "\n" not in message


def test_import_columns_of_the_wrong_kind_are_refused_before_anything_is_written(tmp_path: Path, kit: Any) -> None:
    prompts = kit.edited(kit.scripted_data)["prompts"]["inline"]
    prompts[0]["outputs"] = [{"text": "no response key"}]
    path = kit.scripted(tmp_path, **{"prompts.inline": prompts, "samples": [{"imported": "x", "field": "outputs"}]})
    wh = tmp_path / "wh"
    with pytest.raises(UserInputError, match=r"samples\.0\.field.*row 0.*no 'response'"):
        build(path, wh)
    assert not wh.exists()


def test_the_shipped_relabelling_recipe_reads_its_ultrafeedback_fixture(tmp_path: Path) -> None:
    """The relabelling recipe on the scripted model: every completion of the fixture becomes a sample named by
    its model, the empty ones are counted, and no sample is generated."""
    text = (ROOT / "recipes" / "relabel-ultrafeedback.yaml").read_text(encoding="utf-8")
    recipe = tmp_path / "relabel.yaml"
    recipe.write_text(text.replace("backend: embedded", "backend: scripted"), encoding="utf-8")
    (tmp_path / "data").mkdir()
    fixture = (ROOT / "recipes" / "data" / "ultrafeedback_4.jsonl").read_text(encoding="utf-8")
    (tmp_path / "data" / "ultrafeedback_4.jsonl").write_text(fixture, encoding="utf-8")
    wh = tmp_path / "wh"
    run = build(recipe, wh)
    assert run["by_stage"]["samples"]["model_calls"] == 0
    policies = rows(wh, "SELECT policy, count(*) AS n FROM samples GROUP BY ALL ORDER BY policy")
    assert policies == [
        {"policy": "ultrafeedback/alpaca-7b", "n": 3},
        {"policy": "ultrafeedback/gpt-3.5-turbo", "n": 3},
        {"policy": "ultrafeedback/llama-2-7b-chat", "n": 1},
    ]
    notes = run["by_stage"]["samples"]["notes"]
    notes = json.loads(notes) if isinstance(notes, str) else notes
    assert notes["imports"]["ultrafeedback"]["empty_rows"] == [1, 3]
    assert run["by_stage"]["judgments"]["rows"] == 6 + 2 + 2
    assert calls(build(recipe, wh)) == 0


def test_show_and_report_give_per_policy_figures(tmp_path: Path, kit: Any) -> None:
    path = kit.scripted(tmp_path, **{"models.m2": M2, "samples": TWO_POLICIES, "judgments": PANEL})
    wh = tmp_path / "wh"
    build(path, wh)
    figures = rows(
        wh,
        "SELECT s.policy, count(*) AS samples, count(p.prompt_id) AS chosen FROM samples s "
        "LEFT JOIN pairs p ON p.chosen_sample_id = s.sample_id GROUP BY ALL ORDER BY 1",
    )
    prompt = rows(wh, "SELECT prompt_id FROM prompts ORDER BY prompt_id LIMIT 1")[0]["prompt_id"]
    shown = CliRunner().invoke(main, ["show", prompt[:8], "-w", str(wh)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "policies of the recipe (2)" in shown.output
    for f in figures:  # policy, samples, chosen: the table's first three columns
        assert re.search(rf"\n\s+{f['policy']}\s+{f['samples']}\s+{f['chosen']}\s", shown.output), shown.output
    assert "m2 reffree" in shown.output  # a panel's rows name their judge
    out = tmp_path / "report.html"
    reported = CliRunner().invoke(main, ["report", "-w", str(wh), "--out", str(out)])
    assert reported.exit_code == 0, reported.output
    page = out.read_text(encoding="utf-8")
    assert "policy or import source" in page
    for f in figures:
        cells = f'<td>{f["policy"]}</td><td class="num">{f["samples"]}</td><td class="num">{f["chosen"]}</td>'
        assert cells in page
    assert "m · refeval · human</td><td>m2 · reffree · no reference" in page  # the panel's agreement


def test_completions_from_a_hub_dataset_join_by_instruction(
    tmp_path: Path, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub dataset is read by the prompt sources' own reader (stood in for here: no network in tests)."""
    import factory.inputs.sources

    asked: list[tuple[Any, ...]] = []

    def hub(name: str, *, folder: Any, split: Any, config: Any) -> list[dict[str, Any]]:
        asked.append((name, folder, split, config))
        return [{"instruction": "Name a color.", "answer": "Teal."}, {"instruction": "Unknown?", "answer": "x"}]

    monkeypatch.setattr(factory.inputs.sources, "read_dataset", hub)
    source = {"imported": "hub", "dataset": "someone/outputs", "split": "test", "field": "answer"}
    path = kit.scripted(tmp_path, **{"samples": [{"policy": "m", "n": 1}, source]})
    run = build(path, tmp_path / "wh")
    assert asked == [("someone/outputs", None, "test", None)]
    texts = rows(tmp_path / "wh", "SELECT policy, text FROM samples WHERE finish_reason = 'imported'")
    assert texts == [{"policy": "hub", "text": "Teal."}]
    notes = run["by_stage"]["samples"]["notes"]
    notes = json.loads(notes) if isinstance(notes, str) else notes
    assert notes["imports"]["hub"]["unjoined_rows"] == [1]


def test_two_names_for_one_model_give_copies_not_colliding_ids(tmp_path: Path, kit: Any) -> None:
    """Two model names with one identity ask the same requests: their samples are copies of one text each,
    judged once, and every row keeps an id of its own."""
    same = [
        {"policy": "m", "n": 2, "params": {"max_tokens": 12}},
        {"policy": "twin", "n": 2, "params": {"max_tokens": 12}},
    ]
    path = kit.scripted(tmp_path, **{"models.twin": {"backend": "scripted"}, "samples": same})
    wh = tmp_path / "wh"
    run = build(path, wh)
    assert run["by_stage"]["samples"]["model_calls"] == 4 * 2
    ids = rows(wh, "SELECT count(DISTINCT sample_id) AS ids, count(*) AS n FROM samples")[0]
    assert ids["ids"] == ids["n"] == 4 * 4
    assert run["by_stage"]["judgments"]["rows"] <= 4 * 2  # two distinct texts a prompt at most
    assert rows(wh, "SELECT count(*) AS n FROM scores")[0]["n"] == 4 * 4  # a copy carries its text's score
