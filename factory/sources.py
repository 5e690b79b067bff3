"""Reading prompt sources: JSONL, JSON, Parquet, CSV, a saved or named Hugging Face dataset, inline rows.

Reading data files is input, not warehouse storage, so it lives here rather than in the warehouse module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factory.errors import UserInputError
from factory.recipe import LoadedRecipe, PromptSource


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserInputError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style files
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserInputError(f"{path}: expected a JSON list of objects")
    return data


def _read_hf(source: PromptSource, path: Path | None) -> list[dict[str, Any]]:
    import datasets  # heavy; only for dataset sources

    try:
        if path is not None:
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(source.dataset, source.config, split=source.split)
    except Exception as exc:  # datasets raises many types; the user needs the message, not the trace
        where = path or source.dataset
        raise UserInputError(f"prompts: could not load dataset {where}: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise UserInputError(f"prompts.split: '{source.split}' not in {list(loaded)}")
        loaded = loaded[source.split]
    return loaded.to_list()


def read_rows(loaded: LoadedRecipe) -> tuple[str, list[dict[str, Any]]]:
    """The raw rows of the recipe's prompt source, and a short name of the source for provenance."""
    source = loaded.recipe.prompts
    if source.inline is not None:
        return "inline", list(source.inline)
    if source.dataset is not None:
        return f"hf:{source.dataset}", _read_hf(source, None)
    assert source.path is not None
    path = loaded.resolve(source.path)
    if not path.exists():
        raise UserInputError(f"{loaded.where('prompts', 'path')}: file not found: {path}")
    if path.is_dir():
        return str(source.path), _read_hf(source, path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix in (".parquet", ".csv"):
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path) if suffix == ".parquet" else pacsv.read_csv(path)
        except Exception as exc:
            raise UserInputError(f"{path}: could not read {suffix[1:]} file: {exc}") from None
        rows = table.to_pylist()
    else:
        raise UserInputError(
            f"{loaded.where('prompts', 'path')}: unsupported file type '{suffix}' "
            "(expected .jsonl, .json, .parquet, .csv or a saved dataset folder)"
        )
    return str(source.path), rows
