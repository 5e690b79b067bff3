"""Reading human-labelled pairwise sets for judge meta-evaluation (LLMBar format), with their references.

A case is an instruction, two outputs and a human label saying which output is better:

    {"input" | "instruction": ..., "output_1": ..., "output_2": ..., "label" | "winner": 1 | 2, "id": optional}

References come from columns of the set (default: `reference`, when present) or from separate JSONL/JSON
files aligned with the set by `id` (when both sides carry ids) or else by position. Sets are read from a
JSONL, JSON or Parquet file, a folder written by `datasets.save_to_disk`, or a Hugging Face Hub name.

The presets (`factory.inputs.presets.PRESETS`) name the sets of the paper's Table 1 in their own Hub layouts
with the mapping of each into the format above: `--data mtbench` loads one from the Hub, `--data mtbench=FILE`
maps a local file in the same layout.

Reading data is input, not warehouse storage, so it lives here rather than in the warehouse module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.core.reading import shown_path
from factory.core.text import clip_value
from factory.inputs.data_sources import NAME_RE, NamedPath, default_name
from factory.inputs.presets import PRESETS, hub_records
from factory.inputs.references import INSTRUCTION_COLUMNS, reference_texts
from factory.inputs.sources import path_kind, read_dataset, read_json, read_jsonl, read_table_file

LABEL_COLUMNS = ("label", "winner")


@dataclass(frozen=True)
class EvalCase:
    """One human-labelled comparison."""

    case_id: str
    """The set's own `id`, or the row position when it has none."""
    index: int
    """Position in the set (0-based)."""
    instruction: str
    output_1: str
    output_2: str
    label: int
    """1 when output_1 is the better output, 2 when output_2 is."""
    references: dict[str, str | None] = field(default_factory=dict)
    """Reference name → text (None when this case has none)."""


@dataclass
class EvalSet:
    """A named list of cases and the reference names every case may carry."""

    name: str
    source: str
    cases: list[EvalCase]
    reference_names: list[str]
    notes: list[str] = field(default_factory=list)
    """What reading left out or decided (a preset's dropped ties, later turns), for the run's notes."""

    def fingerprint(self) -> str:
        """Hash of the cases' content (not of the references, which reach request keys anyway)."""
        return stable_hash([(c.case_id, c.instruction, c.output_1, c.output_2, c.label) for c in self.cases], 16)


# ------------------------------------------------------------------------------------------------ files


def read_records(source: str, *, split: str | None = None, config: str | None = None) -> list[Any]:
    """The raw records of a JSONL/JSON/Parquet file, a saved dataset folder, or a Hub dataset name.

    Only reads; a missing, unreadable, non-UTF-8 or malformed file is a one-line UserInputError naming it.
    """
    path = Path(source).expanduser()
    kind = path_kind(path)
    suffix = path.suffix.lower()
    if kind == "folder":
        if suffix in (".jsonl", ".json", ".parquet"):  # named like a file: a dataset folder is not what was meant
            raise UserInputError(f"{shown_path(path)}: is a folder; expected a {suffix} file")
        return read_dataset(source, folder=path, split=split, config=config)
    if kind == "file":
        if suffix == ".jsonl":
            return read_jsonl(path, objects=False)
        if suffix == ".json":
            return read_json(path, objects=False)
        if suffix == ".parquet":
            return read_table_file(path, "Parquet")
        raise UserInputError(
            f"{shown_path(path)}: unsupported file type {clip_value(suffix)} (expected .jsonl, .json, .parquet)"
        )
    if re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", source) and not source.endswith((".json", ".jsonl")):
        return read_dataset(source, folder=None, split=split, config=config)
    raise UserInputError(f"{shown_path(source)}: no such file or folder (nor a Hub dataset name like owner/name)")


# ------------------------------------------------------------------------------------------------ cases


def _pick(row: dict[str, Any], columns: tuple[str, ...], where: str, what: str) -> Any:
    for c in columns:
        if c in row and row[c] is not None:
            return row[c]
    present = [c for c in columns if c in row]
    if present:
        raise UserInputError(f"{where}: the {what} ('{present[0]}') is null")
    raise UserInputError(f"{where}: no {what} column (looked for {list(columns)}; found {clip_value(sorted(row))})")


def _label(value: Any, where: str) -> int:
    """1 or 2 from an int, a float like 1.0, or a string like "2"; anything else is an error."""
    label: int | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) in (1.0, 2.0):
        label = int(value)
    elif isinstance(value, str) and value.strip() in ("1", "2"):
        label = int(value.strip())
    if label is None:
        raise UserInputError(f"{where}: the label must be 1 or 2 (the better output), got {clip_value(value)}")
    return label


def _text(row: dict[str, Any], column: str, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise UserInputError(f"{where}: column '{column}' must be text, got {type(value).__name__}")
    return value


def read_eval_set(
    source: str | None,
    *,
    name: str | None = None,
    preset: str | None = None,
    reference_columns: list[str] | None = None,
    reference_files: list[NamedPath] | None = None,
    split: str | None = None,
    config: str | None = None,
    limit: int | None = None,
) -> EvalSet:
    """Read one labelled set and its references; `limit` keeps the first N cases (after alignment).

    With `preset`, the rows are in that preset's layout and mapped to LLMBar format: read from `source` when
    given, else from the Hub (`split` and `config` are then the preset's own).
    """
    chosen = PRESETS.get(preset) if preset is not None else None
    if preset is not None and chosen is None:
        raise UserInputError(f"unknown data set preset {clip_value(preset)}; known: {list(PRESETS)}")
    if source is None and chosen is None:
        raise UserInputError("give a data set file, folder or Hub name, or a preset")
    from_hub = chosen is not None and source is None
    if chosen is not None and source is None:
        source = f"{chosen.hub} ({chosen.name})"
    assert source is not None
    name = name or (chosen.name if chosen is not None else default_name(source))
    if not NAME_RE.match(name):
        raise UserInputError(f"{source}: data set name {clip_value(name)} may hold only letters, digits, '_', '.', '-'")
    if from_hub:
        assert chosen is not None
        records = hub_records(chosen)
    else:
        records = read_records(source, split=split, config=config)
    if not records:
        raise UserInputError(f"{source}: no rows")
    for n, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserInputError(f"{source}: row {n}: expected an object, got {type(r).__name__}")
    notes: list[str] = []
    if chosen is not None:
        records, notes = chosen.convert(records, source)
        if not records:
            raise UserInputError(f"{source}: no case left after mapping the {chosen.name} layout ({'; '.join(notes)})")
    rows: list[dict[str, Any]] = records
    ids = [None if r.get("id") is None else str(r["id"]) for r in rows]
    refs = reference_texts(rows, ids, source, reference_columns, reference_files)
    cases = []
    seen: set[str] = set()
    for n, r in enumerate(rows):
        where = f"{source}: row {n}"
        case_id = ids[n] if ids[n] is not None else str(n)
        if case_id in seen:
            raise UserInputError(f"{where}: id {clip_value(case_id)} appears twice")
        seen.add(case_id)
        instruction = _pick(r, INSTRUCTION_COLUMNS, where, "instruction")
        if not isinstance(instruction, str):
            raise UserInputError(f"{where}: the instruction must be text, got {type(instruction).__name__}")
        cases.append(
            EvalCase(
                case_id=case_id,
                index=n,
                instruction=instruction,
                output_1=_text(r, "output_1", where),
                output_2=_text(r, "output_2", where),
                label=_label(_pick(r, LABEL_COLUMNS, where, "label"), where),
                references={k: (v[n] if v[n] and v[n].strip() else None) for k, v in refs.items()},
            )
        )
    if limit is not None:
        cases = cases[:limit]
    return EvalSet(name, source, cases, list(refs), notes)
