"""References attached to a labelled set's cases: texts from the set's own columns or from JSONL/JSON files
aligned with the set by `id` (when both sides carry ids) or else by position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factory.core.errors import UserInputError
from factory.core.text import clip_value
from factory.inputs.data_sources import NamedPath, default_name
from factory.inputs.sources import path_kind, read_json, read_jsonl

INSTRUCTION_COLUMNS = ("input", "instruction")
"""The columns an LLMBar-format row may hold its instruction in (read in this order)."""
REFERENCE_TEXT_KEYS = ("reference", "output", "text", "response", "generation", "answer")


def reference_text(item: Any, where: str) -> str | None:
    """A reference's text: a string as is, or an object's first text field (`REFERENCE_TEXT_KEYS`); None stays
    None (no reference for that case)."""
    if item is None or isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in REFERENCE_TEXT_KEYS:
            if key in item:
                value = item[key]
                if value is not None and not isinstance(value, str):
                    raise UserInputError(f"{where}: '{key}' must be text, got {type(value).__name__}")
                return value
        keys = list(REFERENCE_TEXT_KEYS)
        raise UserInputError(f"{where}: no reference text (looked for {keys}; found {clip_value(sorted(item))})")
    raise UserInputError(f"{where}: a reference must be a string or an object, got {type(item).__name__}")


def align_references(
    rows: list[dict[str, Any]], ids: list[str | None], items: list[Any], where: str
) -> list[str | None]:
    """Reference texts in the order of `rows`: by `id` when both sides carry ids, else by position.

    Position alignment needs the same number of items as rows; when an item names its instruction
    (`instruction` / `input`) it must match the row's, so a shifted file is an error rather than noise.
    """
    item_ids = [it.get("id") if isinstance(it, dict) else None for it in items]
    if items and all(i is not None for i in item_ids) and all(i is not None for i in ids):
        by_id: dict[str, Any] = {}
        for n, (i, it) in enumerate(zip(item_ids, items, strict=True)):
            if str(i) in by_id:
                raise UserInputError(f"{where}: item {n}: id {clip_value(i)} appears twice")
            by_id[str(i)] = it
        matched = [by_id.get(str(i)) for i in ids]
        if not any(m is not None for m in matched):
            raise UserInputError(f"{where}: no reference id matches an id of the data set")
        return [reference_text(m, f"{where} (id {i})") for i, m in zip(ids, matched, strict=True)]
    if len(items) != len(rows):
        raise UserInputError(
            f"{where}: {len(items)} references for {len(rows)} cases; aligning by position needs equal counts "
            "(or give both files an `id` field)"
        )
    texts = []
    for n, (row, item) in enumerate(zip(rows, items, strict=True)):
        if isinstance(item, dict):
            named = next((item[k] for k in INSTRUCTION_COLUMNS if isinstance(item.get(k), str)), None)
            mine = next((row[k] for k in INSTRUCTION_COLUMNS if isinstance(row.get(k), str)), None)
            if named is not None and mine is not None and named.strip() != mine.strip():
                raise UserInputError(f"{where}: item {n} is for a different instruction than case {n} (misaligned?)")
        texts.append(reference_text(item, f"{where} (item {n})"))
    return texts


def reference_texts(
    rows: list[dict[str, Any]],
    ids: list[str | None],
    source: str,
    reference_columns: list[str] | None,
    reference_files: list[NamedPath] | None,
) -> dict[str, list[str | None]]:
    """Reference name → one text (or None) per row: from the set's columns (default: `reference`, when present),
    then from each reference file, aligned by `align_references`."""
    refs: dict[str, list[str | None]] = {}
    if reference_columns is None:
        reference_columns = ["reference"] if any("reference" in r for r in rows) else []
    for column in reference_columns:
        if not any(column in r for r in rows):
            columns = clip_value(sorted(rows[0]))
            raise UserInputError(f"{source}: no reference column {clip_value(column)} (columns: {columns})")
        refs[column] = [reference_text(r.get(column), f"{source}: row {n}: '{column}'") for n, r in enumerate(rows)]
    for ref in reference_files or []:
        ref_name = ref.name or default_name(ref.path)
        if ref_name in refs:
            raise UserInputError(
                f"{ref.path}: reference name {clip_value(ref_name)} is already used; name it with NAME=FILE"
            )
        path = Path(ref.path).expanduser()
        kind = path_kind(path)
        if kind == "missing":
            raise UserInputError(f"{ref.path}: reference file not found")
        if kind == "folder":
            raise UserInputError(f"{ref.path}: is a folder; expected a reference file (.jsonl or .json)")
        items = read_jsonl(path, objects=False) if path.suffix.lower() == ".jsonl" else read_json(path, objects=False)
        refs[ref_name] = align_references(rows, ids, items, str(path))
    return refs
