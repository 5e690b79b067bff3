"""Reading prompt sources: JSONL, JSON, Parquet, CSV, a saved or named Hugging Face dataset, inline rows.

Reading data files is input, not warehouse storage, so it lives here rather than in the warehouse module.
Every reader only reads, and every problem with a file (missing, a folder, unreadable, not UTF-8, not the
format its name says) is a one-line `UserInputError` naming the file, and the line where there is one.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any, Literal

from factory.config.recipe import LoadedRecipe
from factory.config.sources import PromptSource
from factory.core.errors import UserInputError
from factory.core.reading import decode_utf8, read_input_bytes, read_input_text, shown_path
from factory.core.text import clip_value, first_line, message_line

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
"""File types a prompt source may be (besides a saved dataset folder)."""
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
"""Files `datasets.save_to_disk` writes at the top of its folder (a DatasetDict, a Dataset)."""


def json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words, for messages such as 'got a string'."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    return "a number"


def path_kind(path: Path) -> Literal["missing", "folder", "file"]:
    """Whether `path` is missing, a folder, or something else (left to `read_input_bytes` to read or refuse)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except (OSError, ValueError):  # permission, a name too long, ...: the reader reports it, naming the file
        return "file"
    return "folder" if stat.S_ISDIR(mode) else "file"


def _exception_line(exc: BaseException) -> str:
    """A library exception as one short line (pyarrow and datasets messages may span lines or echo data)."""
    return message_line(first_line(exc))


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """`json.loads` whose failures name the file and line; `line` is the JSONL line `text` came from."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{shown_path(path)}:{line if line is not None else exc.lineno}"
        raise UserInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise UserInputError(f"{shown_path(path)}:{line or 1}: JSON nested too deeply") from None


def read_jsonl(path: Path, objects: bool = True) -> list[Any]:
    """The rows of a JSONL file; with `objects`, every row must be a JSON object."""
    rows = []
    # Split on "\n" only: str.splitlines would also split inside JSON strings holding U+2028 and the like.
    for n, line in enumerate(read_input_text(path, "JSONL file").split("\n"), 1):
        if not line.strip():
            continue
        row = _parse_json(line, path, n)
        if objects and not isinstance(row, dict):
            raise UserInputError(f"{shown_path(path)}:{n}: expected a JSON object per line, got {json_kind(row)}")
        rows.append(row)
    return rows


def read_json(path: Path, objects: bool = True) -> list[Any]:
    """The items of a JSON list (or of a `{"data": [...]}` wrapper); with `objects`, each must be an object."""
    text = read_input_text(path, "JSON file")
    expected = f"a JSON list{' of objects' if objects else ''}"
    if not text.strip():
        raise UserInputError(f"{shown_path(path)}: the file is empty; expected {expected}")
    data = _parse_json(text, path)
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style files
    if not isinstance(data, list):
        raise UserInputError(f"{shown_path(path)}: expected {expected}, got {json_kind(data)}")
    if objects:
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise UserInputError(f"{shown_path(path)}: expected {expected}; item {i} is {json_kind(item)}")
    return data


def read_table_file(path: Path, kind: Literal["Parquet", "CSV"]) -> list[dict[str, Any]]:
    """The rows of a Parquet or CSV file; an unreadable, non-UTF-8 or garbled file is a one-line UserInputError."""
    import pyarrow as pa

    data = read_input_bytes(path, f"{kind} file")
    if kind == "CSV":
        decode_utf8(data, path)  # pyarrow's own message names neither the file nor where the bad byte is
    try:
        if kind == "CSV":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(pa.BufferReader(data))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(pa.BufferReader(data))
        return table.to_pylist()
    except Exception as exc:  # pyarrow raises many types (ArrowInvalid, OSError, ...): the user needs the message
        raise UserInputError(f"{shown_path(path)}: not a readable {kind} file: {_exception_line(exc)}") from None


def read_dataset(where: str, *, folder: Path | None, split: str | None, config: str | None) -> list[dict[str, Any]]:
    """Rows of a folder saved by `datasets.save_to_disk`, or of a Hub dataset by name (`where`).

    A DatasetDict needs `split` unless it has only one; problems become one-line UserInputErrors.
    """
    if folder is not None and not any((folder / m).is_file() for m in SAVED_DATASET_MARKERS):
        # Said plainly, without importing datasets, for the common mistake of pointing at an ordinary folder.
        markers = " or ".join(SAVED_DATASET_MARKERS)
        raise UserInputError(f"{where}: a folder, but not a dataset saved by datasets.save_to_disk (no {markers})")
    import datasets  # heavy: only for dataset sources
    import huggingface_hub

    # The libraries log each retry of an unreachable Hub to stderr; the one line below says what failed.
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        if folder is not None:
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(where, config, split=split)
    except Exception as exc:  # datasets raises many types; the user needs the message, not the trace
        raise UserInputError(f"{where}: could not load the dataset: {_exception_line(exc)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise UserInputError(f"{where}: split {clip_value(split)} not found (available: {clip_value(splits)})")
        loaded = loaded[split]
    return loaded.to_list()


def read_rows(
    loaded: LoadedRecipe, source: PromptSource | None = None, loc: tuple[str, ...] = ("prompts",)
) -> tuple[str, list[dict[str, Any]]]:
    """The raw rows of a prompt source (the recipe's `prompts` unless given, found at `loc` in the recipe), and
    a short name of the source for provenance."""
    source = source or loaded.recipe.prompts
    if source.inline is not None:
        return "inline", list(source.inline)
    if source.dataset is not None:
        rows = read_dataset(source.dataset, folder=None, split=source.split, config=source.config)
        return f"hf:{source.dataset}", rows
    assert source.path is not None
    path = loaded.resolve(source.path)
    kind = path_kind(path)
    suffix = path.suffix.lower()
    if kind == "missing":
        raise UserInputError(f"{loaded.where(*loc, 'path')}: file not found: {path}")
    if kind == "folder":
        if suffix in DATA_SUFFIXES:  # named like a file: a dataset folder is not what the user meant
            raise UserInputError(f"{shown_path(path)}: is a folder; expected a {suffix} file")
        return str(source.path), read_dataset(str(path), folder=path, split=source.split, config=None)
    if suffix == ".jsonl":
        rows = read_jsonl(path)
    elif suffix == ".json":
        rows = read_json(path)
    elif suffix in (".parquet", ".csv"):
        rows = read_table_file(path, "Parquet" if suffix == ".parquet" else "CSV")
    else:
        raise UserInputError(
            f"{loaded.where(*loc, 'path')} ({clip_value(path.name)}): unsupported file type {clip_value(suffix)} "
            "(expected .jsonl, .json, .parquet, .csv or a saved dataset folder)"
        )
    return str(source.path), rows
