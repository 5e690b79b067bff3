"""The export trains: TRL's DPOTrainer takes a tiny factory build as it is and moves the embedded model.

Also checks docs/DESIGN.md §5's templating rule: after the chat template, no BOS/EOS token is doubled.
"""

from __future__ import annotations

import math
from dataclasses import fields
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

PROMPTS, N = 3, 2


@pytest.fixture(scope="module")
def export_path(tmp_path_factory: pytest.TempPathFactory, kit: Any, embedded_dir: Path) -> Path:
    """A tiny build's export folder, with every pair in train."""
    from factory.build.command import Build
    from factory.config.loading import load_recipe
    from factory.warehouse.store import Warehouse

    root = tmp_path_factory.mktemp("dpo")
    recipe = kit.write(root / "recipe.yaml", kit.recipe(PROMPTS, N, export={"test_fraction": 0.0}))
    build = Build(load_recipe(recipe), Warehouse(root / "wh"))
    run = build.run()
    assert run["status"] == "ok"
    assert build.export_path is not None
    return build.export_path


@pytest.fixture(scope="module")
def train_split(export_path: Path) -> Any:
    datasets = pytest.importorskip("datasets")
    split = datasets.load_from_disk(str(export_path))["train"]
    assert len(split) > 0, "the tiny build made no pairs"
    return split


def special_ids(tokenizer: Any) -> tuple[int, int]:
    assert tokenizer.bos_token_id is not None and tokenizer.eos_token_id is not None
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def assert_not_doubled(ids: list[int], bos: int, eos: int, turns: int, where: str) -> None:
    """One BOS and one EOS per chat turn, never two of them side by side."""
    for a, b in pairwise(ids):
        assert not (a == b and a in (bos, eos)), f"{where}: doubled special token {a}"
    assert ids.count(bos) == turns, f"{where}: {ids.count(bos)} BOS for {turns} turns"
    assert ids.count(eos) == turns, f"{where}: {ids.count(eos)} EOS for {turns} turns"


def test_chat_template_doubles_no_bos_or_eos(train_split: Any, embedded_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    bos, eos = special_ids(tokenizer)
    row = train_split[0]
    conversation = row["prompt"] + row["chosen"]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
    # SmolLM2's template adds its default system turn when the prompt has none.
    turns = len(conversation) + (0 if conversation[0]["role"] == "system" else 1)
    assert_not_doubled(ids, bos, eos, turns, "templated ids")
    # Tokenizing the templated text again (what a generic pipeline does) must not add a second BOS either.
    assert tokenizer(text)["input_ids"] == ids
    # The completion ends the assistant turn exactly once.
    assert text.endswith(row["chosen"][0]["content"] + tokenizer.eos_token + "\n")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_dpo_trainer_updates_the_embedded_model(train_split: Any, embedded_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    # TRL defaults to bf16 autocast, which CPUs without native bf16 run ~6x slower than float32, and to
    # activation checkpointing, which only costs time at this size.
    names = {f.name for f in fields(DPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-4,
        beta=0.1,
        max_length=128,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        **{checkpointing: False},
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=train_split, processing_class=tokenizer
    )

    bos, eos = special_ids(tokenizer)
    for example in trainer.train_dataset:
        ids = list(example["prompt_ids"]) + list(example["chosen_ids"])
        # SmolLM2's default system turn, the user turn, the assistant turn.
        assert_not_doubled(ids, bos, eos, turns=3, where="DPOTrainer's tokenized prompt + chosen")

    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(x) for x in losses)
    assert trainer.state.global_step == 2

    unchanged = [name for name, p in model.named_parameters() if name in before and torch.equal(before[name], p)]
    assert not unchanged, f"parameters not updated by DPO: {unchanged[:5]}"
    # The reference model is a separate copy and stays where it started.
    ref_params = dict(ref_model.named_parameters())
    assert all(torch.equal(before[name], ref_params[name]) for name in list(before)[:5])
