"""`factory train`: settings layers and presets (fast), and real SFT/DPO steps on the embedded model (marked)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from factory.cli import main
from factory.errors import UserInputError
from factory.recipe import ModelSpec, TrainSettings
from factory.train import PRESETS, parse_overrides, resolved, settings_from

# ------------------------------------------------------------------------------------------ settings (fast)


def test_the_paper_preset_carries_the_papers_settings() -> None:
    values = resolved(TrainSettings(preset="paper"), "dpo")
    assert values["loss_type"] == "sigmoid" and values["learning_rate"] == 5e-7
    assert values["lr_scheduler"] == "cosine" and values["warmup_ratio"] == 0.1 and values["epochs"] == 1.0
    assert values["batch_size"] * values["gradient_accumulation"] == 64
    assert values["weight_decay"] == 0.01 and values["max_grad_norm"] == 0.0 and values["max_length"] == 2048
    assert values["precompute_ref_log_probs"] is True
    assert values["beta"] == [0.005, 0.01, 0.02, 0.05, 0.2]
    sft = resolved(TrainSettings(preset="paper"), "sft")
    assert sft["epochs"] == 2.0 and sft["learning_rate"] == 5e-6 and "beta" not in sft


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


def test_trl_config_overrides_trls_own_defaults(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from dataclasses import fields

    from trl import DPOConfig

    from factory.train import trl_config

    defaults = {f.name: f.default for f in fields(DPOConfig)}
    values = resolved(TrainSettings(preset="paper"), "dpo")
    config = trl_config("dpo", values, tmp_path / "out", 0.01, 0)
    # TRL's defaults differ from the paper's: each must have been overridden, not inherited.
    assert (defaults["max_grad_norm"], defaults["weight_decay"], defaults["max_length"]) == (1.0, 0.0, 1024)
    assert (config.max_grad_norm, config.weight_decay, config.max_length) == (0.0, 0.01, 2048)
    assert config.learning_rate == 5e-7 and config.lr_scheduler_type == "cosine" and config.warmup_steps == 0.1
    assert config.num_train_epochs == 1.0 and config.beta == 0.01 and config.precompute_ref_log_probs
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 64
    assert list(config.loss_type) == ["sigmoid"] or config.loss_type == "sigmoid"


def test_every_preset_validates() -> None:
    for preset, methods in PRESETS.items():
        for method in methods:
            values = resolved(TrainSettings(preset=preset), method)  # type: ignore[arg-type]
            assert all(v is not None for k, v in values.items() if k not in ("max_steps", "threads")), preset


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
    from factory.warehouse import Warehouse

    store = Warehouse(wh)
    (row,) = store.query("SELECT * FROM trainings").to_pylist()
    assert row["selected"] and row["steps"] == 2 and row["method"] == "dpo"
    assert math.isfinite(row["final_train_loss"]) and math.isfinite(row["val_loss"])
    steps = store.query("SELECT loss FROM training_metrics WHERE loss IS NOT NULL").column("loss").to_pylist()
    assert len(steps) == 2 and all(math.isfinite(x) for x in steps)
    assert "max_grad_norm" in (out / "README.md").read_text()
    # The folder is a plain Hugging Face model: it reloads and generates.
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    # The same data, model and settings: the trained model is reused, nothing is trained again.
    identity = ModelSpec(backend="transformers", model=str(out))
    from factory.backends import model_identity

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
    from factory.warehouse import Warehouse

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
