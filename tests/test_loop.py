"""The self-improvement loop of `recipes/loop.yaml` on the real embedded model, run as a user runs it:
SFT on references → (sample → RefEval self-judge → DPO) × 2 → held-out eval. One build serves every test
(a few minutes on 2 cores); each test checks one promise of docs/SELF_IMPROVEMENT.md."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
TABLES = (
    "prompts",
    "references",
    "samples",
    "judgments",
    "scores",
    "pairs",
    "trainings",
    "training_metrics",
    "eval_outputs",
    "eval",
    "eval_results",
)


def _build(exe: str, recipe: Path, wh: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe, "build", str(recipe), "--warehouse", str(wh), "--quiet"],
        capture_output=True,
        text=True,
        timeout=1800,
    )


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory, factory_exe: str, embedded_dir: Path) -> dict[str, Any]:
    """The loop recipe (copied with its data) built once, then built again unchanged."""
    work = tmp_path_factory.mktemp("loop")
    shutil.copytree(ROOT / "recipes" / "data", work / "data")
    recipe = work / "loop.yaml"
    shutil.copy(ROOT / "recipes" / "loop.yaml", recipe)
    wh = work / "wh"
    first = _build(factory_exe, recipe, wh)
    assert first.returncode == 0, first.stdout + first.stderr
    from factory.warehouse.store import Warehouse

    runs_before = Warehouse(wh).query("SELECT count(*) AS n FROM runs").to_pylist()[0]["n"]
    again = _build(factory_exe, recipe, wh)
    assert again.returncode == 0, again.stdout + again.stderr
    return {"wh": wh, "recipe": recipe, "base": embedded_dir, "runs_before": runs_before}


def _query(wh: Path, sql: str) -> list[dict[str, Any]]:
    from factory.warehouse.store import Warehouse

    return Warehouse(wh).query(sql).to_pylist()


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_every_stage_has_rows_and_each_round_is_a_run(loop: dict[str, Any]) -> None:
    wh = loop["wh"]
    for table in TABLES:
        assert _query(wh, f'SELECT count(*) AS n FROM "{table}"')[0]["n"] > 0, table
    rounds = _query(wh, "SELECT DISTINCT round FROM samples ORDER BY round")
    assert [r["round"] for r in rounds] == [1, 2]
    runs = _query(wh, "SELECT recipe, round, status FROM runs ORDER BY started_at")
    first = runs[: loop["runs_before"]]
    assert [(r["recipe"], r["round"]) for r in first] == [
        ("loop.r0", 0),
        ("loop.r0-sft", 0),
        ("loop.r1", 1),
        ("loop.r1-dpo", 1),
        ("loop.r2", 2),
        ("loop.r2-dpo", 2),
        ("loop.eval", 2),
    ]
    assert all(r["status"] == "ok" for r in runs)
    contenders = _query(wh, "SELECT contender FROM eval_results ORDER BY contender")
    assert [r["contender"] for r in contenders] == ["loop.r1", "loop.r2", "loop.sft", "smol"]


def test_each_training_changed_the_parameters_and_its_losses_are_finite(loop: dict[str, Any]) -> None:
    wh = loop["wh"]
    chain = [loop["base"], *(wh / "models" / name for name in ("loop.r0-sft", "loop.r1-dpo", "loop.r2-dpo"))]
    for before, after in itertools.pairwise(chain):
        old, new = _weights(before), _weights(after)
        changed = [name for name in new if name in old and not bool((old[name] == new[name]).all())]
        assert changed, f"{after.name}: no parameter differs from {before.name}"
    losses = _query(wh, "SELECT loss FROM training_metrics WHERE loss IS NOT NULL")
    assert losses and all(math.isfinite(r["loss"]) for r in losses)
    finals = _query(wh, "SELECT training_name, method, final_train_loss FROM trainings ORDER BY training_name")
    assert [(r["training_name"], r["method"]) for r in finals] == [
        ("loop.r0-sft", "sft"),
        ("loop.r1-dpo", "dpo"),
        ("loop.r2-dpo", "dpo"),
    ]
    assert all(math.isfinite(r["final_train_loss"]) for r in finals)


def test_the_last_checkpoint_reloads_and_generates(loop: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = loop["wh"] / "models" / "loop.r2-dpo"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    messages = [{"role": "user", "content": "Name a color."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "loop.r2" in card and '"beta"' in card


def test_each_round_samples_with_the_previous_checkpoint(loop: dict[str, Any]) -> None:
    """A round's request keys name the checkpoint that made its samples (a hash of its weights and config)."""
    from factory.config.loading import load_recipe
    from factory.models.registry import model_identity
    from factory.models.requests import generation_call
    from factory.train.selection import checkpoint_spec

    wh = loop["wh"]
    r = load_recipe(loop["recipe"]).recipe
    policy = r.models[r.samples.policy]
    for k, previous in ((1, "loop.r0-sft"), (2, "loop.r1-dpo")):
        identity = model_identity(checkpoint_spec(policy, wh / "models" / previous))
        rows = _query(
            wh,
            "SELECT s.request_key, s.sample_index, p.messages FROM samples s JOIN prompts p "
            f"ON s.prompt_id = p.prompt_id AND p.recipe = s.recipe WHERE s.recipe = 'loop.r{k}'",
        )
        assert rows
        for row in rows:
            call = generation_call(
                identity, json.loads(row["messages"]), r.samples.params, r.samples.seed, row["sample_index"]
            )
            assert call.key == row["request_key"], f"round {k} sample not made by {previous}"


def test_an_unchanged_rebuild_reuses_every_round(loop: dict[str, Any]) -> None:
    wh = loop["wh"]
    rerun = _query(
        wh,
        f"SELECT recipe, model_calls, stages FROM runs ORDER BY started_at OFFSET {loop['runs_before']}",
    )
    assert len(rerun) == loop["runs_before"]
    assert all(r["model_calls"] == 0 for r in rerun)
    trainings = [r for r in rerun if r["recipe"].endswith(("-sft", "-dpo"))]
    assert trainings and all(all(s["skipped"] for s in r["stages"]) for r in trainings)
    assert _query(wh, "SELECT count(*) AS n FROM trainings")[0]["n"] == 3
