"""Builds end to end on the `scripted` backend: caching, reuse, incomplete runs, failures, export and the
pipeline's own rules, in milliseconds and without torch. What only a real model shows stays in the tests
marked `model`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from factory.build.command import Build, plan, stages_for
from factory.cli.main import main
from factory.config.loading import load_recipe
from factory.core.errors import UserInputError
from factory.models.scripted import ScriptedCrash
from factory.pipeline.stage import Context, Stage, StageOutput, execute, order
from factory.warehouse.store import Warehouse


def build(path: Path, wh: Path) -> dict[str, Any]:
    """One build in this process; returns the runs-table row with `stages` keyed by name."""
    run = Build(load_recipe(path), Warehouse(wh)).run()
    return {**run, "by_stage": {s["stage"]: s for s in run["stages"]}}


def table(wh: Path, sql: str) -> list[dict[str, Any]]:
    return Warehouse(wh).query(sql).to_pylist()


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ the pipeline


def test_stages_run_parents_first_and_keys_follow_parents() -> None:
    def noop(ctx: Context, st: Any) -> StageOutput:
        return StageOutput([])

    c = Stage("c", ("a", "b"), lambda ctx: 3, noop)
    b = Stage("b", ("a",), lambda ctx: 2, noop)
    a = Stage("a", (), lambda ctx: 1, noop)
    assert [s.name for s in order([c, b, a])] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="unknown parent"):
        order([Stage("x", ("nope",), lambda ctx: 0, noop)])
    with pytest.raises(ValueError, match="cycle"):
        order([Stage("x", ("y",), lambda ctx: 0, noop), Stage("y", ("x",), lambda ctx: 0, noop)])

    class Memory:
        def __init__(self) -> None:
            self.incomplete: list[str] = []

        def materialize(
            self, table: str, key: str, compute: Any, *, sink: bool = False, reuse: bool = True
        ) -> list[dict[str, Any]]:
            return compute(None).rows

    ctx = Context(loaded=None, call=lambda *a: {})  # type: ignore[arg-type]
    execute([a, b, c], ctx, Memory())
    first = dict(ctx.keys)
    ctx2 = Context(loaded=None, call=lambda *a: {})  # type: ignore[arg-type]
    execute([Stage("a", (), lambda ctx: "changed", noop), b, c], ctx2, Memory())
    assert all(first[n] != ctx2.keys[n] for n in "abc")  # a change upstream changes every key below it


def test_every_recipe_shape_has_a_valid_stage_graph(tmp_path: Path, kit: Any) -> None:
    shapes = {
        "judge": {},
        "rewards": {"judgments": None, "rewards": {"model": "m"}},
        "similarity": {"judgments": None, "similarity": {"reference": "human"}},
        "sft": {"samples": None, "judgments": None, "export.sft_reference": "human"},
    }
    for name, changes in shapes.items():
        names = [s.name for s in order(stages_for(load_recipe(kit.scripted(tmp_path, f"{name}.yaml", **changes))))]
        assert names[0] == "prompts" and names[-1] == "export", name
        assert ("scores" in names) == (name != "sft")


# ------------------------------------------------------------------------------------- caching and reuse


def test_build_then_unchanged_rebuild_makes_no_calls(tmp_path: Path, kit: Any) -> None:
    path, wh = kit.scripted(tmp_path), tmp_path / "wh"
    first = build(path, wh)
    assert first["status"] == "ok" and first["model_calls"] == 4 * 3 + 4 * 6
    counts = {t: table(wh, f'SELECT count(*) AS n FROM "{t}"')[0]["n"] for t in ("samples", "judgments", "pairs")}
    assert counts == {"samples": 12, "judgments": 24, "pairs": 4}
    judged = table(wh, "SELECT parse_status, count(*) AS n FROM judgments GROUP BY ALL")
    assert judged == [{"parse_status": "ok", "n": 24}]
    again = build(path, wh)
    assert again["model_calls"] == 0 and again["status"] == "ok"
    assert all(s["skipped"] for name, s in again["by_stage"].items() if name != "export")
    assert again["by_stage"]["export"]["notes"] and json.loads(again["by_stage"]["export"]["notes"])["skipped"]


def test_protocol_change_rejudges_without_resampling(tmp_path: Path, kit: Any) -> None:
    wh = tmp_path / "wh"
    build(kit.scripted(tmp_path), wh)
    changed = build(kit.scripted(tmp_path, **{"judgments.protocol": "refmatch"}), wh)
    stages = changed["by_stage"]
    assert stages["samples"]["skipped"] and stages["samples"]["model_calls"] == 0
    assert not stages["judgments"]["skipped"] and stages["judgments"]["model_calls"] == 24
    assert {r["protocol"] for r in table(wh, "SELECT DISTINCT protocol FROM judgments")} == {"refmatch"}


def test_added_prompt_calls_only_its_own_rows(tmp_path: Path, kit: Any) -> None:
    wh = tmp_path / "wh"
    build(kit.scripted(tmp_path), wh)
    prompts = [*kit.scripted_data["prompts"]["inline"], {"instruction": "Name a tree.", "ref": "Oak."}]
    grown = build(kit.scripted(tmp_path, **{"prompts.inline": prompts}), wh)
    assert grown["by_stage"]["samples"]["model_calls"] == 3
    assert grown["by_stage"]["samples"]["cached_calls"] == 12
    assert grown["by_stage"]["judgments"]["model_calls"] == 6


# ----------------------------------------------------------------------------------------------- failure


def test_transient_failures_leave_the_run_incomplete_and_are_retried(tmp_path: Path, kit: Any) -> None:
    wh = tmp_path / "wh"
    flaky = build(kit.scripted(tmp_path, **{"models.m.script": {"fail_rate": 0.4, "fail_seed": 1}}), wh)
    assert flaky["status"] == "incomplete" and flaky["failed_calls"] > 0
    errors = table(wh, "SELECT count(*) AS n FROM generation_calls WHERE status = 'error'")[0]["n"]
    errors += table(wh, "SELECT count(*) AS n FROM judge_calls WHERE status = 'error'")[0]["n"]
    assert errors == flaky["failed_calls"]
    fixed = build(kit.scripted(tmp_path), wh)  # failures are operational: the same cache keys, only failed calls remade
    assert fixed["status"] == "ok"
    reference = build(kit.scripted(tmp_path), tmp_path / "wh-clean")
    # Only what had failed is made again: the calls of both builds add up to one clean build's.
    assert fixed["model_calls"] + flaky["model_calls"] - flaky["failed_calls"] == reference["model_calls"]
    for t in ("samples", "judgments", "pairs"):
        cols = "* EXCLUDE (run_id, stage_key, latency_s)" if t != "pairs" else "* EXCLUDE (run_id, stage_key)"
        q = f'SELECT {cols} FROM "{t}" ORDER BY ALL'
        assert table(wh, q) == table(tmp_path / "wh-clean", q), t
    dup = "SELECT request_key FROM judge_calls WHERE status = 'ok' GROUP BY ALL HAVING count(*) > 1"
    assert table(wh, dup) == []


def test_a_non_transient_failure_stops_the_build_and_records_no_failed_call(tmp_path: Path, kit: Any) -> None:
    wh = tmp_path / "wh"
    crashing = kit.scripted(tmp_path, **{"models.m.script": {"crash_after": 5}})
    with pytest.raises(ScriptedCrash):
        build(crashing, wh)
    (run,) = table(wh, "SELECT status, error FROM runs")
    assert run["status"] == "failed" and "ScriptedCrash" in run["error"]
    assert table(wh, "SELECT count(*) AS n FROM generation_calls WHERE status = 'error'") == [{"n": 0}]
    result = CliRunner().invoke(main, ["build", str(crashing), "-w", str(wh), "-q"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert lines[-1].startswith("error: ScriptedCrash") and len([x for x in lines if x.startswith("error")]) == 1
    assert build(kit.scripted(tmp_path), wh)["status"] == "ok"


def test_garbled_verdicts_are_kept_and_never_guessed(tmp_path: Path, kit: Any) -> None:
    wh = tmp_path / "wh"
    build(kit.scripted(tmp_path, **{"models.m.script": {"garble_rate": 0.5}}), wh)
    rows = table(wh, "SELECT verdict, parse_status, raw_output FROM judgments WHERE parse_status <> 'ok'")
    assert rows and all(r["verdict"] is None and r["parse_status"] == "no_match" and r["raw_output"] for r in rows)


# --------------------------------------------------------------------------------------- labelers, export


def test_reward_and_similarity_labelers(tmp_path: Path, kit: Any) -> None:
    rewards = build(kit.scripted(tmp_path, "rw.yaml", judgments=None, rewards={"model": "m"}), tmp_path / "wh1")
    assert rewards["status"] == "ok" and rewards["by_stage"]["scores"]["model_calls"] == 12
    assert table(tmp_path / "wh1", "SELECT DISTINCT labeler FROM scores") == [{"labeler": "rewards"}]
    sim = build(kit.scripted(tmp_path, "sim.yaml", judgments=None, similarity={"reference": "human"}), tmp_path / "wh2")
    assert sim["status"] == "ok" and sim["by_stage"]["scores"]["model_calls"] == 0
    # The scripted words share nothing with the references: every ROUGE-L score is 0, so every prompt ties.
    scores = table(tmp_path / "wh2", "SELECT labeler, max(score) AS best, count(*) AS n FROM scores GROUP BY ALL")
    assert scores == [{"labeler": "similarity", "best": 0.0, "n": 12}]
    assert json.loads(sim["by_stage"]["pairs"]["notes"])["ties_or_small_margin"] == 4


def test_export_card_follows_the_description_without_model_calls(tmp_path: Path, kit: Any) -> None:
    wh = tmp_path / "wh"
    build(kit.scripted(tmp_path), wh)
    card = wh / "exports" / "scripted" / "README.md"
    assert "Position consistency" in card.read_text()
    edited = build(kit.scripted(tmp_path, description="Now with a description."), wh)
    assert edited["model_calls"] == 0 and "Now with a description." in card.read_text()


def test_export_never_replaces_a_folder_it_did_not_write(tmp_path: Path, kit: Any) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    path, wh = kit.scripted(tmp_path, **{"export.path": str(foreign)}), tmp_path / "wh"
    with pytest.raises(UserInputError, match="did not write"):
        build(path, wh)
    assert (foreign / "thesis.tex").read_text() == "precious" and not wh.exists()


def test_sft_export_from_model_references(tmp_path: Path, kit: Any) -> None:
    path = kit.scripted(
        tmp_path,
        samples=None,
        judgments=None,
        references=[{"name": "gen", "kind": "model", "model": "m", "params": {"max_tokens": 8}}],
        **{"export.sft_reference": "gen"},
    )
    run = build(path, tmp_path / "wh")
    assert run["status"] == "ok" and run["model_calls"] == 4
    rows = pq.read_table(tmp_path / "wh" / "exports" / "scripted-sft" / "data" / "train-00000.parquet").to_pylist()
    assert rows and all(r["completion"][0]["content"] for r in rows)


def test_dry_run_plans_every_model_stage(tmp_path: Path, kit: Any) -> None:
    n, planned = plan(load_recipe(kit.scripted(tmp_path)))
    assert n == 4 and {p.stage: p.calls for p in planned} == {"samples": 12, "judgments": 24}


# -------------------------------------------------------------------------- checks before anything is written


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": ".."}, "field 'name'"),
        ({"models.m.backend": "reward-model", "models.m.model": "x"}, "cannot generate"),
        ({"models.r": {"backend": "reward-model", "model": "x"}, "judgments.judge": "r"}, "cannot judge"),
        ({"judgments": None, "rewards": {"model": "e"}, "models.e": {"backend": "embedded"}}, "cannot reward"),
        ({"models.m.model": "smollm2-9b", "models.m.backend": "embedded"}, "unknown embedded model"),
        ({"models.m.threads": -1}, "models.m.threads"),
    ],
)
def test_recipe_errors_name_the_field(tmp_path: Path, changes: dict[str, Any], message: str, kit: Any) -> None:
    with pytest.raises(UserInputError, match=message):
        load_recipe(kit.scripted(tmp_path, **changes))


def test_late_checks_run_before_the_warehouse_is_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kit: Any
) -> None:
    monkeypatch.delenv("FACTORY_TEST_UNSET_KEY", raising=False)
    openai = {"backend": "openai", "model": "gpt", "base_url": "http://127.0.0.1:9/v1"}
    cases = [
        kit.scripted(tmp_path, "t.yaml", **{"judgments.protocol": "custom", "judgments.template": "missing.txt"}),
        kit.scripted(
            tmp_path,
            "k.yaml",
            **{"models.o": {**openai, "api_key_env": "FACTORY_TEST_UNSET_KEY"}, "judgments.judge": "o"},
        ),
    ]
    wh = tmp_path / "wh"
    for path in cases:
        result = CliRunner().invoke(main, ["build", str(path), "-w", str(wh), "-q"])
        assert result.exit_code == 2, result.output
        assert path.name in result.output and "Traceback" not in result.output
        validated = CliRunner().invoke(main, ["validate", str(path), "-w", str(wh)])
        assert validated.exit_code == 2
        assert not wh.exists()


def test_a_warehouse_held_by_another_build_is_refused(tmp_path: Path, kit: Any) -> None:
    wh = Warehouse(tmp_path / "wh")
    path = kit.scripted(tmp_path)
    build(path, wh.root)
    before = files(wh.root / "tables")
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(wh.root), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        result = CliRunner().invoke(main, ["build", str(path), "-w", str(wh.root), "-q"])
        assert result.exit_code == 1 and "another build is using this warehouse" in result.output
    finally:
        release.set()
        holder.join(60)
    assert files(wh.root / "tables") == before


def _hold_lock(root: str, ready: Any, release: Any) -> None:
    with Warehouse(root).lock():
        ready.set()
        release.wait(60)


def test_every_shipped_recipe_validates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent / "recipes"
    for name in ("DEEPSEEK_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.setenv(name, "test-value-not-a-key")
    for path in sorted(root.rglob("*.yaml")):
        result = CliRunner().invoke(main, ["validate", str(path), "-w", str(tmp_path / "wh")])
        assert result.exit_code == 0 and result.output.startswith("ok:"), f"{path.name}: {result.output}"
    assert not (tmp_path / "wh").exists()


def test_scripted_backend_is_deterministic_and_injects_trouble() -> None:
    from factory.config.models import ModelSpec, SamplingParams
    from factory.models.registry import load_backend
    from factory.models.requests import GenerationRequest, JudgeRequest, RequestFailed

    spec = ModelSpec(backend="scripted")
    gen = [GenerationRequest([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=20), 0, (0, 1))]
    first, second = load_backend(spec).generate(gen), load_backend(spec).generate(gen)
    assert first == second and first[0][0].text != first[0][1].text  # same request, same answer; indices differ
    prompt = "# Output (a):\nGood answer.\n\n# Output (b):\nBad answer.\n\n# Which?"
    judge = load_backend(spec).judge([JudgeRequest([{"role": "user", "content": prompt}], "Output (", 4, 5)])
    swapped = prompt.replace("Good", "X").replace("Bad", "Good").replace("X", "Bad")
    back = load_backend(spec).judge([JudgeRequest([{"role": "user", "content": swapped}], "Output (", 4, 5)])
    assert {judge[0].text, back[0].text} == {"a)", "b)"}  # consistent across orders: no position bias by default
    flaky = load_backend(ModelSpec(backend="scripted", script={"fail_rate": 1.0}))
    assert all(isinstance(o, RequestFailed) for o in flaky.generate(gen * 3))
    crashing = load_backend(ModelSpec(backend="scripted", script={"crash_after": 2}))
    crashing.generate(gen * 2)
    with pytest.raises(ScriptedCrash):
        crashing.generate(gen)
