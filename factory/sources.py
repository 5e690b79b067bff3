"""Reading prompt sources: JSONL, JSON, Parquet, CSV, a saved or named Hugging Face dataset, inline rows.

Reading data files is input, not warehouse storage, so it lives here rather than in the warehouse module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factory.errors import UserInputError
from factory.recipe import LoadedRecipe


def read_jsonl(path: Path, objects: bool = True) -> list[Any]:
    """The rows of a JSONL file; with `objects`, every row must be a JSON object."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if objects and not isinstance(row, dict):
                raise UserInputError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
    return rows


def read_json(path: Path, objects: bool = True) -> list[Any]:
    """The items of a JSON list (or of a `{"data": [...]}` wrapper); with `objects`, each must be an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style files
    if not isinstance(data, list) or (objects and not all(isinstance(r, dict) for r in data)):
        raise UserInputError(f"{path}: expected a JSON list{' of objects' if objects else ''}")
    return data


def read_dataset(where: str, *, folder: Path | None, split: str | None, config: str | None) -> list[dict[str, Any]]:
    """Rows of a folder saved by `datasets.save_to_disk`, or of a Hub dataset by name (`where`).

    A DatasetDict needs `split` unless it has only one; problems become one-line UserInputErrors.
    """
    import datasets  # heavy: only for dataset sources

    try:
        if folder is not None:
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(where, config, split=split)
    except Exception as exc:  # datasets raises many types; the user needs the message, not the trace
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"{where}: could not load the dataset: {first}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise UserInputError(f"{where}: split '{split}' not found (available: {splits})")
        loaded = loaded[split]
    return loaded.to_list()


def read_rows(loaded: LoadedRecipe) -> tuple[str, list[dict[str, Any]]]:
    """The raw rows of the recipe's prompt source, and a short name of the source for provenance."""
    source = loaded.recipe.prompts
    if source.inline is not None:
        return "inline", list(source.inline)
    if source.dataset is not None:
        rows = read_dataset(source.dataset, folder=None, split=source.split, config=source.config)
        return f"hf:{source.dataset}", rows
    assert source.path is not None
    path = loaded.resolve(source.path)
    if not path.exists():
        raise UserInputError(f"{loaded.where('prompts', 'path')}: file not found: {path}")
    if path.is_dir():
        return str(source.path), read_dataset(str(path), folder=path, split=source.split, config=None)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = read_jsonl(path)
    elif suffix == ".json":
        rows = read_json(path)
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
