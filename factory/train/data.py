"""What a training reads: the splits of an export folder, Parquet files or a Hub dataset, the method their columns
call for, and the length checks run before training."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from factory.core.errors import UserInputError
from factory.core.text import clip_value, message_line
from factory.train.presets import Method


def dataset_method(columns: list[str], where: str) -> Method:
    """DPO for preference columns, SFT for prompt/completion; anything else is an input error."""
    if {"prompt", "chosen", "rejected"} <= set(columns):
        return "dpo"
    if {"prompt", "completion"} <= set(columns):
        return "sft"
    raise UserInputError(
        f"{where}: neither a preference dataset (prompt, chosen, rejected) nor an SFT one (prompt, completion); "
        f"columns: {clip_value(columns)}"
    )


def load_splits(source: str | Path) -> tuple[Any, str]:
    """The train and test splits of an export folder, a folder of Parquet files, or a Hub dataset."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    try:
        if (path / "dataset_dict.json").is_file():
            # In memory: the trainers' `map` calls would otherwise write cache files into the export folder,
            # which is factory's own sealed folder (the next export would refuse to replace it).
            dd = datasets.load_from_disk(str(path), keep_in_memory=True)
        elif (path / "data").is_dir():
            dd = datasets.load_dataset("parquet", data_dir=str(path / "data"))
        elif path.exists():
            raise UserInputError(f"{path}: not an export folder (no dataset_dict.json and no data/)")
        else:
            dd = datasets.load_dataset(str(source))
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"{source}: could not load the dataset: {message_line(str(exc))}") from None
    if "train" not in dd or len(dd["train"]) == 0:
        raise UserInputError(f"{source}: the train split is empty or missing; nothing to train on")
    name = path.name if path.exists() else str(source).replace("/", "--")
    return dd, name


def length_report(tokenizer: Any, split: Any, method: Method, max_length: int) -> dict[str, int]:
    """Counts of examples the trainer would cut at `max_length`, and a check that no BOS or EOS is doubled
    after the chat template (a dataset whose text carries them would teach a broken turn)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    cut = doubled = 0
    answers = ("chosen", "rejected") if method == "dpo" else ("completion",)
    for row in split:
        for answer in answers:
            ids = tokenizer.apply_chat_template(row["prompt"] + row[answer], tokenize=True, return_dict=True)
            ids = list(ids["input_ids"])
            cut += len(ids) > max_length
            doubled += any(a == b and a in (bos, eos) for a, b in itertools.pairwise(ids))
    return {"examples_cut_at_max_length": cut, "examples_with_doubled_bos_or_eos": doubled}


def validation_split(dd: Any) -> Any:
    """The split evaluated during training (the export's `test` split), or None when there is none or it is empty."""
    return dd["test"] if "test" in dd and len(dd["test"]) else None
