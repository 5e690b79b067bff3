"""`factory train`: settings layers and presets (fast), and real SFT/DPO steps on the embedded model (marked)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from factory.cli.main import main
from factory.config.models import ModelSpec
from factory.config.training import TrainSettings
from factory.core.errors import UserInputError
from factory.train.presets import PRESETS
from factory.train.settings import parse_overrides, resolved, settings_from

# ------------------------------------------------------------------------------------------ settings (fast)


def test_the_paper_preset_follows_the_authors_code() -> None:
    """Each value as yale-nlp/RLRR's dpo.py, self_improve.sh and mle.py set it (file:line in train.py)."""
    values = resolved(TrainSettings(preset="paper"), "dpo")
    assert values["loss_type"] == "sigmoid" and values["learning_rate"] == 5e-7
    assert values["lr_scheduler"] == "cosine" and values["warmup_ratio"] == 0.1 and values["epochs"] == 1.0
    assert values["batch_size"] == 1 and values["examples_per_step"] == 64
    assert values["weight_decay"] == 0.01 and values["max_grad_norm"] == 0.0 and values["max_length"] == 2048
    assert values["precompute_ref_log_probs"] is True and values["eval_steps"] == 400
    assert values["beta"] == [0.005, 0.01, 0.02, 0.05, 0.2] and values["select"] == "all"
    sft = resolved(TrainSettings(preset="paper"), "sft")
    assert (sft["learning_rate"], sft["lr_scheduler"], sft["warmup_ratio"], sft["epochs"]) == (
        2e-5,
        "linear",
        0.03,
        2.0,
    )
    assert sft["batch_size"] == 2 and sft["examples_per_step"] == 256 and sft["eval_steps"] == 1000
    assert "beta" not in sft and "select" not in sft
    # The paper's text, where it differs from mle.py, is one switch away.
    text = resolved(TrainSettings(preset="paper-text"), "sft")
    assert (text["learning_rate"], text["lr_scheduler"], text["warmup_ratio"]) == (5e-6, "cosine", 0.1)
    assert text["examples_per_step"] == 64 and resolved(TrainSettings(preset="paper-text"), "dpo") == values


def test_steps_warmup_and_accumulation_are_counted_by_factory() -> None:
    from factory.train.settings import accumulation, optimizer_steps, warmup_steps

    # 64 pairs per step: 8 accumulation on the authors' 8 GPUs, 64 on one device.
    paper = resolved(TrainSettings(preset="paper"), "dpo")
    assert accumulation(paper, 8) == 8 and accumulation(paper, 1) == 64
    with pytest.raises(UserInputError, match="examples_per_step 64 is not a multiple of batch_size 3"):
        accumulation({**paper, "batch_size": 3}, 1)
    # An accumulation set by hand replaces the preset's examples per step.
    assert accumulation(resolved(TrainSettings(preset="paper", gradient_accumulation=4), "dpo"), 8) == 4
    # 1000 pairs, 1 per device, 8 devices, 8 accumulation: 125 batches per device, 16 steps (the last short).
    assert optimizer_steps(1000, 1, 8, 8, 1.0, None) == 16
    assert optimizer_steps(1000, 1, 8, 8, 2.0, None) == 32 and optimizer_steps(1000, 1, 8, 8, 2.0, 5) == 5
    assert optimizer_steps(3, 8, 8, 1, 1.0, None) == 1
    # Rounded down, as int(warmup_ratio * total_steps) in dpo.py:156 and mle.py:130.
    assert warmup_steps(0.1, 859) == 85 and warmup_steps(0.03, 466) == 13 and warmup_steps(0.5, 4) == 2


def test_selection_rule_is_decided_and_refused_before_training() -> None:
    from factory.train.selection import selection_rule

    sweep = resolved(TrainSettings(preset="cpu", beta=[0.1, 0.2]), "dpo")
    assert selection_rule(resolved(TrainSettings(preset="cpu"), "dpo"), 1, False, None, "d") == "only"
    assert selection_rule(sweep, 2, True, None, "d") == "val_accuracy"
    assert selection_rule(sweep, 2, True, object(), "d") == "eval"  # a recipe with an `eval:` section
    assert selection_rule({**sweep, "select": "all"}, 2, False, None, "d") == "all"
    with pytest.raises(UserInputError, match=r"select: eval .* needs a recipe with an `eval:` section"):
        selection_rule({**sweep, "select": "eval"}, 2, True, None, "d")
    with pytest.raises(UserInputError, match=r"select: val_accuracy .* needs a test split"):
        selection_rule(sweep, 2, False, None, "d")


def test_layers_override_in_order_and_errors_name_the_layer() -> None:
    settings = settings_from(
        [("recipe", {"preset": "paper", "learning_rate": 1e-6}), ("--set", parse_overrides(["learning_rate=2e-6"]))]
    )
    assert resolved(settings, "dpo")["learning_rate"] == 2e-6
    with pytest.raises(UserInputError, match=r"^--set: field 'lerning_rate': unknown setting"):
        settings_from([("--set", parse_overrides(["lerning_rate=1"]))])
    with pytest.raises(UserInputError, match="beta must be a positive number"):
        settings_from([("conf.yaml", {"beta": [0.1, -1]})])
    with pytest.raises(UserInputError, match="expected KEY=VALUE"):
        parse_overrides(["learning_rate"])


@pytest.mark.slow  # importing trl loads torch: seconds that the fast suite does not pay
def test_trl_config_overrides_trls_own_defaults(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from dataclasses import fields

    from trl import DPOConfig

    from factory.train.trl_config import trl_config

    defaults = {f.name: f.default for f in fields(DPOConfig)}
    values = resolved(TrainSettings(preset="paper"), "dpo")
    config = trl_config("dpo", values, tmp_path / "out", 0.01, 0, evaluate=True, warmup=85)
    # TRL's defaults differ from the paper's: each must have been overridden, not inherited.
    assert (defaults["max_grad_norm"], defaults["weight_decay"], defaults["max_length"]) == (1.0, 0.0, 1024)
    assert (config.max_grad_norm, config.weight_decay, config.max_length) == (0.0, 0.01, 2048)
    assert config.learning_rate == 5e-7 and config.lr_scheduler_type == "cosine" and config.num_train_epochs == 1.0
    # Warm-up is a whole number of steps (a float means a share on transformers 5 and nothing on 4.x).
    assert config.warmup_steps == 85 and isinstance(config.warmup_steps, int)
    assert getattr(config, "warmup_ratio", 0.0) == 0.0
    # Prompts are never cut on their own (TRL 0.20-0.29 kept the last 512 prompt tokens by default).
    assert getattr(config, "max_prompt_length", None) is None and config.truncation_mode == "keep_start"
    assert config.optim == "adamw_torch" and (config.adam_beta1, config.adam_beta2) == (0.9, 0.999)
    assert config.eval_strategy == "steps" and config.eval_steps == 400 and config.save_strategy == "no"
    assert config.beta == 0.01 and config.precompute_ref_log_probs
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size == 64
    assert list(config.loss_type) == ["sigmoid"] or config.loss_type == "sigmoid"
    # `constant` is flat after the warm-up (transformers' own "constant" would ignore the warm-up).
    cpu = trl_config("dpo", resolved(TrainSettings(preset="cpu"), "dpo"), tmp_path / "o", 0.1, 0)
    assert cpu.lr_scheduler_type == "constant_with_warmup" and cpu.eval_strategy == "no"
    sft = trl_config("sft", resolved(TrainSettings(preset="paper"), "sft"), tmp_path / "s", None, 0)
    assert sft.completion_only_loss is True and sft.packing is False and sft.lr_scheduler_type == "linear"


def test_every_preset_validates() -> None:
    for preset, methods in PRESETS.items():
        for method in methods:
            values = resolved(TrainSettings(preset=preset), method)  # type: ignore[arg-type]
            optional = ("max_steps", "threads", "examples_per_step", "eval_steps", "select")
            assert all(v is not None for k, v in values.items() if k not in optional), preset


# ------------------------------------------------------------------------------------- real training (marked)


def scripted_export(tmp_path: Path, sft: bool = False) -> Path:
    """A tiny export made by the scripted backend (no model loaded): 6 preference pairs, or SFT rows."""
    rows = [{"instruction": f"Write a short line about the number {i}.", "ref": f"{i} is a number."} for i in range(8)]
    recipe: dict[str, Any] = {
        "name": "tiny",
        "models": {"m": {"backend": "scripted"}},
        "prompts": {"inline": rows, "reference_fields": ["ref"]},
        "references": [{"name": "human", "kind": "column"}],
        "export": {"test_fraction": 0.25},
    }
    if sft:
        recipe["export"]["sft_reference"] = "human"
    else:
        recipe["samples"] = {"policy": "m", "n": 2, "params": {"max_tokens": 12}}
        recipe["judgments"] = {"judge": "m", "protocol": "refeval", "reference": "human"}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = CliRunner().invoke(main, ["build", str(path), "-w", str(tmp_path / "wh"), "-q"])
    assert result.exit_code == 0, result.output
    return tmp_path / "wh" / "exports" / ("tiny-sft" if sft else "tiny")


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.model
@pytest.mark.slow
def test_dpo_trains_saves_a_model_that_reloads_and_reuses_on_rerun(tmp_path: Path, embedded_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export, wh = scripted_export(tmp_path), tmp_path / "wh"
    args = ["train", str(export), "--preset", "cpu", "--set", "max_steps=2", "-w", str(wh), "-q"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    out = wh / "models" / "tiny-dpo"
    base, trained = weights(embedded_dir), weights(out)
    unchanged = [k for k in base if k in trained and torch.equal(base[k], trained[k])]
    assert len(unchanged) < len(base) // 10, f"DPO left most parameters unchanged: {unchanged[:3]}"
    from factory.warehouse.store import Warehouse

    store = Warehouse(wh)
    (row,) = store.query("SELECT * FROM trainings").to_pylist()
    assert row["selected"] and row["steps"] == 2 and row["method"] == "dpo"
    assert math.isfinite(row["final_train_loss"]) and math.isfinite(row["val_loss"])
    steps = store.query("SELECT loss FROM training_metrics WHERE loss IS NOT NULL").column("loss").to_pylist()
    assert len(steps) == 2 and all(math.isfinite(x) for x in steps)
    assert "max_grad_norm" in (out / "README.md").read_text()
    # Training reads the export without writing into it (the trainers' dataset caches stay out of it).
    assert not list(export.rglob("cache-*")), list(export.rglob("cache-*"))
    # The folder is a plain Hugging Face model: it reloads and generates.
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    # The same data, model and settings: the trained model is reused, nothing is trained again.
    identity = ModelSpec(backend="transformers", model=str(out))
    from factory.models.registry import model_identity

    before = model_identity(identity)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    last = store.query("SELECT stages FROM runs ORDER BY started_at DESC LIMIT 1").to_pylist()[0]["stages"]
    assert all(s["skipped"] for s in last)
    assert model_identity(identity) == before
    # Other settings train again; the retrained folder has another identity, so no cached call is shared.
    changed = CliRunner().invoke(main, [*args[:-3], "--set", "learning_rate=1e-4", "-w", str(wh), "-q"])
    assert changed.exit_code == 0, changed.output
    assert model_identity(identity) != before


@pytest.mark.model
@pytest.mark.slow
def test_sft_on_references(tmp_path: Path, embedded_dir: Path) -> None:
    export, wh = scripted_export(tmp_path, sft=True), tmp_path / "wh"
    result = CliRunner().invoke(main, ["train", str(export), "--preset", "cpu", "--set", "max_steps=1", "-w", str(wh)])
    assert result.exit_code == 0, result.output
    from factory.warehouse.store import Warehouse

    (row,) = Warehouse(wh).query("SELECT method, steps, beta FROM trainings").to_pylist()
    assert row == {"method": "sft", "steps": 1, "beta": None}
    assert (wh / "models" / "tiny-sft-sft" / "model.safetensors").is_file()


def test_bad_training_input_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cases = [
        (["train", str(tmp_path / "empty")], "not an export folder"),
        (["train", str(tmp_path / "empty"), "--set", "beta=-1"], "beta must be a positive number"),
        (["train", str(tmp_path / "empty"), "--set", "nope"], "expected KEY=VALUE"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(main, [*args, "-w", str(tmp_path / "wh")])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "wh").exists()


def _metrics(wh: Path, sql: str) -> list[dict[str, Any]]:
    from factory.warehouse.store import Warehouse

    return Warehouse(wh).query(sql).to_pylist()


@pytest.mark.model
@pytest.mark.slow
def test_a_beta_sweep_keeps_each_runs_best_checkpoint_and_selects_by_validation_accuracy(
    tmp_path: Path, embedded_dir: Path
) -> None:
    """Two β runs of 4 steps (2 epochs of the 4 training pairs), evaluated every 3 steps, at each epoch's end
    and at the end, with half the steps warming up."""
    export, wh = scripted_export(tmp_path), tmp_path / "wh"
    sets = ["beta=[0.05, 0.5]", "eval_steps=3", "warmup_ratio=0.5", "learning_rate=1e-4"]
    args = ["train", str(export), "--preset", "cpu", *(x for s in sets for x in ("--set", s)), "-w", str(wh), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "selected by val_accuracy" in result.output
    rows = _metrics(wh, "SELECT * FROM trainings ORDER BY beta")
    assert [r["beta"] for r in rows] == [0.05, 0.5] and {r["selected_by"] for r in rows} == {"val_accuracy"}
    for row in rows:
        evals = _metrics(
            wh,
            "SELECT step, val_loss, val_rewards_accuracies FROM training_metrics "
            f"WHERE val_loss IS NOT NULL AND beta = {row['beta']} ORDER BY step",
        )
        # Each epoch's end (step 2), every eval_steps (3) and the end (4), each recorded with its rewards.
        assert [e["step"] for e in evals] == [2, 3, 4], evals
        assert all(e["val_rewards_accuracies"] is not None for e in evals)
        # The kept checkpoint is the run's own lowest validation loss (the first of equal ones).
        best = min(evals, key=lambda e: e["val_loss"])
        assert row["best_step"] == best["step"] and row["best_val_loss"] == best["val_loss"]
        kept = next(e for e in evals if e["step"] == row["best_step"])
        assert row["val_accuracy"] == kept["val_rewards_accuracies"]
        assert row["val_loss"] == evals[-1]["val_loss"] and row["steps"] == 4
        # Warm-up really happens: 2 of the 4 steps, the rate rising to the peak, which is the learning rate.
        assert row["warmup_steps"] == 2 and row["examples_per_step"] == 2
        lrs = [
            r["learning_rate"]
            for r in _metrics(
                wh,
                f"SELECT learning_rate FROM training_metrics WHERE loss IS NOT NULL AND beta = {row['beta']} "
                "ORDER BY step",
            )
        ]
        assert len(lrs) == 4 and lrs[0] < lrs[1] < 1e-4 + 1e-12 and lrs[0] < 1e-4
        assert max(lrs) == pytest.approx(1e-4)
    # Across β only the accuracies are compared: the higher one is kept (the first listed on a tie).
    accuracies = [r["val_accuracy"] for r in rows]
    winner = 0 if accuracies[0] >= accuracies[1] else 1
    assert [r["selected"] for r in rows] == [i == winner for i in range(2)]
    out = wh / "models" / "tiny-dpo"
    from factory.models.registry import folder_fingerprint

    assert rows[winner]["output"] == str(out) and folder_fingerprint(out) == rows[winner]["model_hash"]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "chosen by `val_accuracy`" in card and f"Kept checkpoint: step {rows[winner]['best_step']}" in card


@pytest.mark.model
@pytest.mark.slow
def test_select_all_keeps_every_beta_in_its_own_folder(tmp_path: Path, embedded_dir: Path) -> None:
    export, wh = scripted_export(tmp_path), tmp_path / "wh"
    out = tmp_path / "models" / "mine"
    sets = ["beta=[0.05, 0.5]", "select=all", "max_steps=2"]
    args = ["train", str(export), "--preset", "cpu", *(x for s in sets for x in ("--set", s))]
    args += ["--output", str(out), "-w", str(wh), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = _metrics(wh, "SELECT beta, selected, selected_by, output, model_hash FROM trainings ORDER BY beta")
    assert [(r["beta"], r["selected"], r["selected_by"]) for r in rows] == [(0.05, True, "all"), (0.5, True, "all")]
    assert [r["output"] for r in rows] == [str(tmp_path / "models" / f"mine-beta{b}") for b in ("0.05", "0.5")]
    assert all((Path(r["output"]) / "model.safetensors").is_file() for r in rows)
    assert rows[0]["model_hash"] != rows[1]["model_hash"] and not out.exists()
    # Unchanged: both models are reused, nothing trains again.
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    last = _metrics(wh, "SELECT stages FROM runs ORDER BY started_at DESC LIMIT 1")[0]["stages"]
    assert last and all(s["skipped"] for s in last), last


@pytest.mark.model
@pytest.mark.slow
def test_select_eval_picks_the_beta_with_the_best_held_out_win_rate(tmp_path: Path, embedded_dir: Path) -> None:
    """`factory train RECIPE` on a recipe with an `eval:` section: each β's checkpoint answers the held-out
    prompts and the recipe's judge (scripted here) scores it; the higher win rate is kept."""
    rows = [{"instruction": f"Write a short line about the number {i}.", "ref": f"{i} is a number."} for i in range(8)]
    held = [{"instruction": f"Name the number after {i}.", "ref": f"{i + 1}."} for i in range(3)]
    recipe: dict[str, Any] = {
        "name": "tiny",
        "models": {"m": {"backend": "scripted"}},
        "prompts": {"inline": rows, "reference_fields": ["ref"]},
        "references": [{"name": "human", "kind": "column"}],
        "samples": {"policy": "m", "n": 2, "params": {"max_tokens": 12}},
        "judgments": {"judge": "m", "protocol": "refeval", "reference": "human"},
        "export": {"test_fraction": 0.25},
        "eval": {
            "prompts": {"inline": held, "reference_fields": ["ref"]},
            "baseline": "ref",
            "judge": "m",
            "params": {"temperature": 0.0, "max_tokens": 6},
            "resamples": 0,
        },
        "train": {"preset": "cpu", "beta": [0.05, 0.5], "max_steps": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    wh = tmp_path / "wh"
    built = CliRunner().invoke(main, ["build", str(path), "-w", str(wh), "-q"])
    assert built.exit_code == 0, built.output
    result = CliRunner().invoke(main, ["train", str(path), "-w", str(wh), "-q"])
    assert result.exit_code == 0, result.output
    trained = _metrics(wh, "SELECT beta, selected, selected_by, eval_win_rate FROM trainings ORDER BY beta")
    assert {r["selected_by"] for r in trained} == {"eval"}
    rates = [r["eval_win_rate"] for r in trained]
    assert all(rate is not None for rate in rates)
    winner = 0 if rates[0] >= rates[1] else 1
    assert [r["selected"] for r in trained] == [i == winner for i in range(2)]
    results = _metrics(
        wh, "SELECT contender, win_rate FROM eval_results WHERE contender LIKE 'tiny-dpo%' ORDER BY contender"
    )
    assert [(r["contender"], r["win_rate"]) for r in results] == [
        ("tiny-dpo.beta0.05", rates[0]),
        ("tiny-dpo.beta0.5", rates[1]),
    ]
    # Elsewhere (an export folder, no recipe) the rule is refused with one line, before any training.
    export = wh / "exports" / "tiny"
    refused = CliRunner().invoke(
        main, ["train", str(export), "--set", "select=eval", "--set", "beta=[0.1, 0.2]", "-w", str(wh)]
    )
    assert refused.exit_code == 2 and "needs a recipe with an `eval:` section" in refused.output


@pytest.mark.model
def test_a_prompt_longer_than_512_tokens_is_not_cut(tmp_path: Path, embedded_dir: Path) -> None:
    """The trainer's tokenized dataset keeps every prompt token below max_length (TRL 0.20-0.29 kept only the
    last 512 by default)."""
    import datasets
    from transformers import AutoTokenizer

    from factory.train.trainer import build_trainer

    long = " ".join(f"word{i}" for i in range(300))  # about 900 tokens
    row = {
        "prompt": [{"role": "user", "content": f"Summarise: {long}"}],
        "chosen": [{"role": "assistant", "content": "A list of words."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([row])})
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True)
    n_prompt = len(prompt["input_ids"])
    assert 512 < n_prompt < 1500
    values = resolved(TrainSettings(preset="cpu", max_length=2048, precompute_ref_log_probs=False), "dpo")
    trainer = build_trainer("dpo", values, 0.1, 0, str(embedded_dir), dd, tmp_path / "out")
    processed = trainer.train_dataset[0]
    assert len(processed["prompt_ids"]) == n_prompt
    assert processed["prompt_ids"] == list(prompt["input_ids"])
    assert trainer.factory_plan["warmup_steps"] == 0 and trainer.factory_plan["planned_steps"] == 4


def test_rounds_refuse_keeping_every_beta_before_round_0(tmp_path: Path) -> None:
    """Each round samples with one checkpoint, so `select: all` over several β is refused before any build."""
    recipe: dict[str, Any] = {
        "name": "loopy",
        "models": {"smol": {"backend": "embedded", "threads": 1}},
        "prompts": {"inline": [{"instruction": "Name a color.", "ref": "Blue."}], "reference_fields": ["ref"]},
        "references": [{"name": "human", "kind": "column"}],
        "samples": {"policy": "smol", "n": 2, "params": {"max_tokens": 8}},
        "judgments": {"judge": "smol", "protocol": "refeval", "reference": "human"},
        "rounds": {"count": 1, "dpo": {"preset": "cpu", "beta": [0.1, 0.2], "select": "all"}},
    }
    path = tmp_path / "loopy.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = CliRunner().invoke(main, ["build", str(path), "-w", str(tmp_path / "wh")])
    assert result.exit_code == 2, result.output
    assert "rounds.dpo: select: all keeps every β's model" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "wh" / "tables").exists()
