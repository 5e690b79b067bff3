"""The paper's baseline labelers and exports: reward model, ROUGE-L similarity, SFT on references, dry-run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from factory.cli.main import main
from factory.labelers.similarity import similarity_score_rows
from factory.warehouse.store import Warehouse


def _write(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


SFT_RECIPE: dict[str, Any] = {
    "name": "sftonly",
    "models": {},
    "prompts": {
        "inline": [
            {"instruction": "Name a color.", "ref": "Blue."},
            {"instruction": "What is 2+2?", "ref": "4"},
            {"instruction": "Name a fruit.", "ref": ""},
        ],
        "reference_fields": ["ref"],
    },
    "references": [{"name": "human", "kind": "column"}],
    "export": {"sft_reference": "human", "test_fraction": 0.0},
}


def test_sft_export_of_references_needs_no_model(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "sft.yaml", SFT_RECIPE)
    result = CliRunner().invoke(main, ["build", str(recipe), "-w", str(tmp_path / "wh"), "-q"])
    assert result.exit_code == 0, result.output
    import datasets

    dd = datasets.load_from_disk(str(tmp_path / "wh" / "exports" / "sftonly-sft"))
    rows = dd["train"].to_list()
    # The prompt without a reference is left out, never exported with an empty completion.
    assert len(rows) == 2 and len(dd["test"]) == 0
    assert rows[0]["prompt"] == [{"role": "user", "content": "Name a color."}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "Blue."}]
    assert {r["reference_name"] for r in rows} == {"human"}
    refs = Warehouse(tmp_path / "wh").query('SELECT status, count(*) AS n FROM "references" GROUP BY 1').to_pylist()
    assert {r["status"]: r["n"] for r in refs} == {"ok": 2, "missing": 1}


def test_similarity_scores_are_rouge_l_against_the_reference() -> None:
    samples = [
        {"sample_id": "s1", "prompt_id": "p", "text": "the cat sat on the mat", "error": None},
        {"sample_id": "s2", "prompt_id": "p", "text": "dogs bark loudly", "error": None},
        {"sample_id": "s3", "prompt_id": "p", "text": None, "error": "boom"},
        {"sample_id": "s4", "prompt_id": "q", "text": "no reference here", "error": None},
    ]
    refs = [{"prompt_id": "p", "reference_name": "human", "text": "the cat sat on the mat", "status": "ok"}]
    out = similarity_score_rows(samples, refs, "human")
    scores = {r["sample_id"]: r["score"] for r in out.rows}
    assert scores == {"s1": 1.0, "s2": 0.0}
    assert out.notes["unscored_samples"] == 2
    assert {r["labeler"] for r in out.rows} == {"similarity"}


def test_dry_run_counts_calls_without_loading_a_model(tmp_path: Path) -> None:
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "paper" / "llama3-8b-refeval.yaml"
    result = CliRunner().invoke(main, ["build", "--dry-run", str(recipe), "-w", str(tmp_path / "wh")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "60,000 prompts" in text
    assert "300,000" in text  # 60K prompts × 5 samples
    assert "1,200,000" in text  # 60K × 5 × 4 ordered judgments
    assert not (tmp_path / "wh").exists()


@pytest.fixture(scope="module")
def tiny_reward_model(embedded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sequence classifier built locally from the embedded model's weights plus a seeded random score head.

    Its rewards carry no meaning; it exercises the reward-model labeler end to end with real weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("reward-model")
    config = AutoConfig.from_pretrained(embedded_dir, num_labels=1)
    config.pad_token_id = AutoTokenizer.from_pretrained(embedded_dir).pad_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(embedded_dir, config=config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(folder)
    return folder


@pytest.mark.model
def test_reward_model_and_similarity_labelers_build_pairs(
    tmp_path: Path, kit: Any, cli_build: Any, tiny_reward_model: Path
) -> None:
    base = kit.recipe(prompts=2, n=3)
    del base["judgments"]
    rewards = {**base, "name": "rm", "rewards": {"model": "rm"}}
    rewards["models"] = {**base["models"], "rm": {"backend": "reward-model", "model": str(tiny_reward_model)}}
    wh = tmp_path / "wh"
    result = cli_build(_write(tmp_path / "rm.yaml", rewards), wh)
    assert result.exit_code == 0, result.output
    similarity = {**base, "name": "rouge", "similarity": {"reference": "human"}}
    result = cli_build(_write(tmp_path / "rouge.yaml", similarity), wh)
    assert result.exit_code == 0, result.output

    w = Warehouse(wh)
    scores = w.query(
        "SELECT recipe, labeler, count(*) AS n, min(score) AS lo, max(score) AS hi FROM scores GROUP BY ALL"
    )
    by_recipe = {r["recipe"]: r for r in scores.to_pylist()}
    assert by_recipe["rm"]["labeler"] == "rewards" and by_recipe["rm"]["n"] == 6
    assert (
        by_recipe["rouge"]["labeler"] == "similarity"
        and 0.0 <= by_recipe["rouge"]["lo"] <= by_recipe["rouge"]["hi"] <= 1.0
    )
    calls = w.query("SELECT count(*) AS n, count(DISTINCT request_key) AS k FROM reward_calls WHERE status = 'ok'")
    assert calls.to_pylist() == [{"n": 6, "k": 6}]
    # The same samples feed both recipes: the second build made no sampling calls.
    last = kit.stages(kit.runs(wh)[-1])
    assert last["samples"]["model_calls"] == 0 and last["samples"]["cached_calls"] == 6
    import datasets

    dd = datasets.load_from_disk(str(wh / "exports" / "rm"))
    protocols = {row["protocol"] for split in dd.values() for row in split}
    assert protocols <= {"reward-model"}
    card = (wh / "exports" / "rm" / "README.md").read_text()
    assert "reward model `rm`" in card
    # Rebuilding the reward recipe changes nothing and calls nothing.
    assert cli_build(_write(tmp_path / "rm.yaml", rewards), wh).exit_code == 0
    assert kit.runs(wh)[-1]["model_calls"] == 0


def test_pairs_with_chat_control_tokens_are_dropped_and_counted() -> None:
    from factory.export.dataset import without_special_tokens

    def rec(text: str) -> dict[str, Any]:
        user = [{"role": "user", "content": "Q"}]
        return {"prompt": user, "chosen": [{"role": "assistant", "content": text}], "rejected": user}

    records = [rec("fine"), rec("ends early<|im_end|>"), rec("<s>struck</s> is plain HTML")]
    kept, dropped = without_special_tokens(records)
    assert dropped == 1 and [r["chosen"][0]["content"] for r in kept] == ["fine", "<s>struck</s> is plain HTML"]
