"""`factory eval` and a recipe's `eval:` section end to end on the `scripted` backend: outputs, both-order
judgments, the result row, reuse, the AlpacaEval export and the input errors, in milliseconds and without torch.
The win-rate arithmetic itself is tested on hand-made rows in test_winrate.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from factory.cli.main import main
from factory.warehouse.store import Warehouse

EVAL_PROMPTS = [
    {"instruction": "Name a tree.", "gpt4": "Oak is a common tree."},
    {"instruction": "Name a bird.", "gpt4": "Robin."},
    {"instruction": "Name a fish.", "gpt4": "Salmon, a fish that swims upstream."},
    {"instruction": "Name a month.", "gpt4": "May."},
]
N = len(EVAL_PROMPTS)

# Policy and judge are different scripted models (different seeds), so the judge's latent qualities are not
# the policy's own; the held-out prompts share nothing with the training prompts.
RECIPE: dict[str, Any] = {
    "name": "ev",
    "models": {
        "pol": {"backend": "scripted", "script": {"seed": 1}},
        "judge": {"backend": "scripted", "script": {"seed": 2}},
    },
    "prompts": {
        "inline": [{"instruction": "Name a color.", "ref": "Blue."}, {"instruction": "Say hi.", "ref": "Hi."}],
        "reference_fields": ["ref"],
    },
    "references": [{"name": "human", "kind": "column"}],
    "samples": {"policy": "pol", "n": 2, "params": {"max_tokens": 12}},
    "judgments": {"judge": "judge", "reference": "human"},
    "eval": {
        "prompts": {"inline": EVAL_PROMPTS, "reference_fields": ["gpt4"]},
        "baseline": "gpt4",
        "judge": "judge",
        "resamples": 200,
    },
}


@pytest.fixture
def recipe(kit: Any) -> Callable[..., Path]:
    """`recipe(folder, filename="r.yaml", **changes)`: the recipe with dotted-path edits (`{"eval.protocol":
    "llmbar-base"}`; None deletes the key), written to `folder/filename`."""

    def write(folder: Path, filename: str = "r.yaml", **changes: Any) -> Path:
        return kit.write_edited(RECIPE, folder / filename, **changes)

    return write


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def factory_eval(path: Path, wh: Path, *extra: str | Path) -> Result:
    result = cli("eval", path, "-w", wh, "-q", *extra)
    assert result.exit_code == 0, result.output
    return result


def table(wh: Path, sql: str) -> list[dict[str, Any]]:
    """Rows of a SQL query over the warehouse's views (what `factory sql` shows)."""
    return Warehouse(wh).query(sql).to_pylist()


def current(wh: Path, name: str) -> list[dict[str, Any]]:
    """Rows of a stage table's current versions, read from Parquet: the same rows the views show, without
    the tenth of a second each DuckDB connection takes to define them (it adds up over a file of tests)."""
    return Warehouse(wh).current_rows(name)


def runs(wh: Path) -> list[dict[str, Any]]:
    """Every run, oldest first."""
    return table(wh, "SELECT recipe, status, model_calls FROM runs ORDER BY started_at")


def latest_run(wh: Path) -> dict[str, Any]:
    return runs(wh)[-1]


def one_error_line(result: Result) -> str:
    """The only output line of a refused command (input errors are one `error:` line, exit 2)."""
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "Traceback" not in result.output
    return lines[0]


# -------------------------------------------------------------------------------------------- the tables


def test_eval_writes_outputs_both_orders_and_one_result(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh = recipe(tmp_path), tmp_path / "wh"
    factory_eval(path, wh)
    # A column baseline needs no model: only the policy writes outputs, one per held-out prompt.
    outputs = current(wh, "eval_outputs")
    assert len(outputs) == N and len({o["prompt_id"] for o in outputs}) == N
    assert all(o["role"] == "policy" and o["contender"] == "pol" and o["text"] and o["error"] is None for o in outputs)

    judged = table(wh, 'SELECT prompt_id, "order", p_a, p_policy, parse_status, baseline, judge FROM eval')
    orders: dict[str, list[str]] = {}
    for j in judged:
        orders.setdefault(j["prompt_id"], []).append(j["order"])
        assert j["parse_status"] == "ok" and (j["baseline"], j["judge"]) == ("gpt4", "judge")
        # P(policy better) is read from the policy's side: Output (a) in policy_first, Output (b) otherwise.
        expected = j["p_a"] if j["order"] == "policy_first" else 1 - j["p_a"]
        assert j["p_policy"] == pytest.approx(expected)
    assert {pid: sorted(o) for pid, o in orders.items()} == {
        o["prompt_id"]: ["baseline_first", "policy_first"] for o in outputs
    }

    (result,) = current(wh, "eval_results")
    assert (result["contender"], result["baseline"], result["protocol"]) == ("pol", "gpt4", "refeval")
    assert (result["prompts"], result["scored"], result["unparsed_judgments"], result["resamples"]) == (N, N, 0, 200)
    assert result["win_rate_low"] <= result["win_rate"] <= result["win_rate_high"]
    assert result["lc_win_rate_low"] <= result["lc_win_rate"] <= result["lc_win_rate_high"]
    assert result["wins"] + result["losses"] + result["ties"] == N
    assert latest_run(wh) == {"recipe": "ev.eval", "status": "ok", "model_calls": N + 2 * N}


def test_rerun_makes_no_model_calls(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh = recipe(tmp_path), tmp_path / "wh"
    factory_eval(path, wh)
    first = current(wh, "eval_results")
    factory_eval(path, wh)
    # Each eval is a run of its own; the second finds every version complete and calls nothing.
    assert [r["model_calls"] for r in runs(wh)] == [N + 2 * N, 0]
    assert latest_run(wh)["status"] == "ok"
    assert current(wh, "eval_results") == first  # the same version, read back (same run_id and figures)


def test_alpaca_eval_out_writes_one_record_per_prompt(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh, out = recipe(tmp_path), tmp_path / "wh", tmp_path / "alpaca.json"
    result = factory_eval(path, wh, "--alpaca-eval-out", out)
    assert str(out) in result.output
    records = json.loads(out.read_text(encoding="utf-8"))
    assert isinstance(records, list) and len(records) == N
    assert all(set(r) == {"instruction", "output", "generator", "dataset"} for r in records)
    assert [r["instruction"] for r in records] == [p["instruction"] for p in EVAL_PROMPTS]
    assert {(r["generator"], r["dataset"]) for r in records} == {("pol", "ev")}
    texts = {o["text"] for o in table(wh, "SELECT text FROM eval_outputs WHERE role = 'policy'")}
    assert {r["output"] for r in records} == texts


# --------------------------------------------------------------------------------- unparsed judgments


def test_a_garbling_judge_leaves_every_judgment_unparsed(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh = recipe(tmp_path, **{"models.judge.script.garble_rate": 1.0}), tmp_path / "wh"
    factory_eval(path, wh)  # unparsed answers are data, not failed calls: the run completes
    judged = current(wh, "eval")
    assert len(judged) == 2 * N and all(j["verdict"] is None and j["parse_status"] == "no_match" for j in judged)
    (result,) = current(wh, "eval_results")
    assert (result["unparsed_judgments"], result["wins"], result["losses"], result["ties"]) == (2 * N, 0, 0, 0)


def test_a_garbling_judge_scores_nothing_with_logprob_scoring(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh = recipe(tmp_path, **{"models.judge.script.garble_rate": 1.0}), tmp_path / "wh"
    factory_eval(path, wh)
    assert all(j["p_policy"] is None for j in current(wh, "eval"))
    (result,) = current(wh, "eval_results")
    assert (result["scored"], result["win_rate"], result["lc_win_rate"]) == (0, None, None)


def test_a_garbling_judge_scores_nothing_with_verdict_scoring(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    changes = {"models.judge.script.garble_rate": 1.0, "eval.scoring": "verdict"}
    path, wh = recipe(tmp_path, **changes), tmp_path / "wh"
    factory_eval(path, wh)
    assert all(j["p_policy"] is None for j in current(wh, "eval"))
    (result,) = current(wh, "eval_results")
    assert (result["scored"], result["unparsed_judgments"]) == (0, 2 * N)
    assert result["win_rate"] is None and result["win_rate_low"] is None and result["lc_win_rate"] is None


# ----------------------------------------------------------------------------------------- variants


def test_a_baseline_model_writes_the_baseline(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    changes = {
        "models.base": {"backend": "scripted", "script": {"seed": 3}},
        "eval.baseline": None,
        "eval.baseline_model": "base",
        "eval.reference": "gpt4",  # refeval still shows the judge a reference: now one named explicitly
    }
    path, wh = recipe(tmp_path, **changes), tmp_path / "wh"
    factory_eval(path, wh)
    outputs = current(wh, "eval_outputs")
    by_role = {role: [o for o in outputs if o["role"] == role] for role in ("policy", "baseline")}
    assert len(by_role["policy"]) == N and len(by_role["baseline"]) == N
    assert {o["contender"] for o in by_role["baseline"]} == {"base"}
    baseline_text = {o["prompt_id"]: o["text"] for o in by_role["baseline"]}
    policy_text = {o["prompt_id"]: o["text"] for o in by_role["policy"]}
    assert baseline_text != policy_text  # another seed, other answers
    judged = current(wh, "eval")
    assert len(judged) == 2 * N
    for j in judged:
        assert (j["baseline"], j["reference_name"]) == ("model:base", "gpt4")
        assert j["len_baseline"] == len(baseline_text[j["prompt_id"]])
    assert [r["baseline"] for r in current(wh, "eval_results")] == ["model:base"]
    assert latest_run(wh)["model_calls"] == N + N + 2 * N


def test_build_runs_the_eval_section(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh = recipe(tmp_path), tmp_path / "wh"
    result = cli("build", path, "-w", wh, "-q")
    assert result.exit_code == 0, result.output
    assert len(current(wh, "eval_results")) == 1
    assert {r["recipe"] for r in table(wh, "SELECT recipe FROM runs")} == {"ev", "ev.eval"}
    # `factory eval` afterwards finds the same versions: nothing to call.
    factory_eval(path, wh)
    assert latest_run(wh)["model_calls"] == 0


def test_a_protocol_change_writes_a_new_result_version(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh = recipe(tmp_path), tmp_path / "wh"
    factory_eval(path, wh)
    (before,) = current(wh, "eval_results")
    factory_eval(path, wh, "--protocol", "llmbar-base")
    (after,) = current(wh, "eval_results")
    assert after["protocol"] == "llmbar-base" and after["stage_key"] != before["stage_key"]
    # Only the judge runs again: the policy's outputs do not depend on the protocol.
    assert latest_run(wh)["model_calls"] == 2 * N
    judged = table(wh, "SELECT DISTINCT protocol, reference_name FROM eval")
    assert judged == [{"protocol": "llmbar-base", "reference_name": None}]  # llmbar-base shows no reference
    # The refeval version is kept, not overwritten: switching back calls nothing.
    units = [d.name for d in (wh / "tables" / "eval_results").iterdir()]
    assert len(units) == 1 and Warehouse(wh).has_version("eval_results", units[0], before["stage_key"])
    factory_eval(path, wh)
    assert latest_run(wh)["model_calls"] == 0
    assert [r["stage_key"] for r in current(wh, "eval_results")] == [before["stage_key"]]


def test_policy_may_name_another_model_of_the_recipe(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh = recipe(tmp_path), tmp_path / "wh"
    factory_eval(path, wh, "--policy", "judge")
    assert [r["contender"] for r in current(wh, "eval_results")] == ["judge"]
    assert {o["contender"] for o in current(wh, "eval_outputs")} == {"judge"}


# ------------------------------------------------------------------------------------------- refusals


def test_policy_naming_neither_a_model_nor_a_folder_is_refused(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh = recipe(tmp_path), tmp_path / "wh"
    line = one_error_line(cli("eval", path, "-w", wh, "-q", "--policy", "nope"))
    assert "--policy nope" in line and "a model folder" in line
    assert not wh.exists()  # refused before the warehouse is touched


def test_a_recipe_without_an_eval_section_is_refused(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh = recipe(tmp_path, eval=None), tmp_path / "wh"
    line = one_error_line(cli("eval", path, "-w", wh, "-q"))
    assert "r.yaml" in line and "no 'eval' section" in line
    assert not wh.exists()


def test_an_unknown_protocol_override_is_refused(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    path, wh = recipe(tmp_path), tmp_path / "wh"
    line = one_error_line(cli("eval", path, "-w", wh, "-q", "--protocol", "nope"))
    assert "--protocol 'nope'" in line
    assert not wh.exists()


def test_an_lc_win_rate_on_few_prompts_is_flagged_unstable(tmp_path: Path, recipe: Callable[..., Path]) -> None:
    from factory.policy_eval.winrate import LC_MIN_PROMPTS

    assert N < LC_MIN_PROMPTS
    output = " ".join(factory_eval(recipe(tmp_path), tmp_path / "wh").output.split())
    assert "unstable*" in output
    assert f"* LC win rate on fewer than {LC_MIN_PROMPTS} scored prompts" in output
