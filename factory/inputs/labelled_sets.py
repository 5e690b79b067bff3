"""Reading human-labelled pairwise sets for judge meta-evaluation (LLMBar format), with their references.

A case is an instruction, two outputs and a human label saying which output is better:

    {"input" | "instruction": ..., "output_1": ..., "output_2": ..., "label" | "winner": 1 | 2, "id": optional}

References come from columns of the set (default: `reference`, when present) or from separate JSONL/JSON
files aligned with the set by `id` (when both sides carry ids) or else by position. Sets are read from a
JSONL, JSON or Parquet file, a folder written by `datasets.save_to_disk`, or a Hugging Face Hub name.

`PRESETS` name the sets of the paper's Table 1 in their own Hub layouts (LLMBar Natural and Adversarial,
MT-Bench human judgments, InstruSum, HREF) with the mapping of each into the format above: `--data mtbench`
loads one from the Hub, `--data mtbench=FILE` maps a local file in the same layout.

Reading data is input, not warehouse storage, so it lives here rather than in the warehouse module.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.core.reading import shown_path
from factory.core.text import clip_value, message_line
from factory.inputs.sources import path_kind, read_dataset, read_json, read_jsonl, read_table_file

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
INSTRUCTION_COLUMNS = ("input", "instruction")
LABEL_COLUMNS = ("label", "winner")
REFERENCE_TEXT_KEYS = ("reference", "output", "text", "response", "generation", "answer")


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


@dataclass(frozen=True)
class NamedPath:
    """`NAME=PATH` or a bare `PATH` from the command line (the name then comes from the path)."""

    name: str | None
    path: str


def split_named(value: str) -> NamedPath:
    """Split `NAME=PATH`; a bare path (or one that exists as written, '=' and all) has no name."""
    if "=" in value and not Path(value).exists():
        name, _, path = value.partition("=")
        if NAME_RE.match(name) and path:
            return NamedPath(name, path)
    return NamedPath(None, value)


@dataclass(frozen=True)
class DataSource:
    """One `--data` value: a file, folder or Hub name in LLMBar format, or a preset (from the Hub when `path`
    is None, else a local file in the preset's Hub layout)."""

    name: str | None
    path: str | None
    preset: str | None = None


def data_source(value: str) -> DataSource:
    """Read a `--data` value: `PRESET` (when no such file exists), `PRESET=FILE`, `NAME=PATH` or `PATH`."""
    named = split_named(value)
    if named.name is None and named.path in PRESETS and not Path(named.path).expanduser().exists():
        return DataSource(named.path, None, named.path)
    if named.name in PRESETS:
        return DataSource(named.name, named.path, named.name)
    return DataSource(named.name, named.path)


def _default_name(path: str) -> str:
    stem = Path(path.rstrip("/")).name
    for suffix in (".jsonl", ".json", ".parquet"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem) or "data"


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


# ---------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A published pairwise set: where it lies on the Hub and how its rows become LLMBar-format rows."""

    name: str
    title: str
    hub: str
    config: str | None
    splits: tuple[str, ...]
    columns: tuple[str, ...]
    """The source columns the mapping reads (a local file must have them)."""
    convert: Callable[[list[dict[str, Any]], str], tuple[list[dict[str, Any]], list[str]]]
    """Rows in the Hub layout → (LLMBar-format rows, notes on what was left out)."""
    mapping: str
    """One line for --help and the docs: how the rows are mapped."""


def _need(rows: list[dict[str, Any]], columns: tuple[str, ...], where: str, preset: str) -> None:
    """Every row has the preset's source columns, or one error line naming the first one missing."""
    for n, r in enumerate(rows):
        missing = [c for c in columns if c not in r]
        if missing:
            raise UserInputError(
                f"{where}: row {n}: not in the {preset} layout: no column '{missing[0]}' "
                f"(expected {list(columns)}; found {clip_value(sorted(r))})"
            )


def _convert_llmbar(rows: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """LLMBar rows are already the format; a row read from a Hub split is tagged with it (`subset`), and its id
    is `<subset>-<position in the subset>` when it has none."""
    seen: Counter[str] = Counter()
    out = []
    for r in rows:
        row = dict(r)
        subset = row.pop("subset", None)
        if subset is not None and row.get("id") is None:
            row["id"] = f"{subset}-{seen[str(subset)]}"
            seen[str(subset)] += 1
        out.append(row)
    return out, []


def _turn_text(conversation: Any, role: str, where: str) -> str:
    """The first message of `role` in a conversation (a list of {role, content})."""
    if not isinstance(conversation, list):
        raise UserInputError(f"{where}: a conversation must be a list of messages, got {type(conversation).__name__}")
    for m in conversation:
        if isinstance(m, dict) and m.get("role") == role:
            if not isinstance(m.get("content"), str):
                raise UserInputError(f"{where}: the first '{role}' message has no text content")
            return m["content"]
    raise UserInputError(f"{where}: the conversation has no '{role}' message")


def _majority(votes: Counter[Any]) -> Any:
    """The value with strictly the most votes, else None (a tie between the top two)."""
    top = votes.most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


MTBENCH_COLUMNS = ("question_id", "model_a", "model_b", "winner", "conversation_a", "conversation_b", "turn")


def _convert_mtbench(rows: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """MT-Bench human judgments: first turn only; the judges of one (question, model pair) vote, in either
    orientation; a pair whose majority is a tie, or that has no majority, is dropped. output_1 is model_a of
    the pair's first judgment."""
    _need(rows, MTBENCH_COLUMNS, where, "mtbench")
    later = 0
    groups: dict[tuple[str, frozenset[str]], tuple[dict[str, Any], Counter[str]]] = {}
    for n, r in enumerate(rows):
        if str(r["turn"]) != "1":
            later += 1
            continue
        winner = str(r["winner"])
        if winner.startswith("tie"):
            vote = "tie"
        elif winner in ("model_a", "model_b"):
            vote = str(r[winner])
        else:
            raise UserInputError(
                f"{where}: row {n}: winner must be model_a, model_b or tie, got {clip_value(r['winner'])}"
            )
        key = (str(r["question_id"]), frozenset((str(r["model_a"]), str(r["model_b"]))))
        first, votes = groups.setdefault(key, (r, Counter()))
        votes[vote] += 1
    out, dropped = [], 0
    for (qid, _), (first, votes) in groups.items():
        winner = _majority(votes)
        if winner is None or winner == "tie":
            dropped += 1
            continue
        where_row = f"{where}: question {qid}"
        out.append(
            {
                "id": f"{qid}-{first['model_a']}-{first['model_b']}",
                "instruction": _turn_text(first["conversation_a"], "user", where_row),
                "output_1": _turn_text(first["conversation_a"], "assistant", where_row),
                "output_2": _turn_text(first["conversation_b"], "assistant", where_row),
                "label": 1 if winner == str(first["model_a"]) else 2,
            }
        )
    judged = sum(sum(v.values()) for _, v in groups.values())
    notes = [
        f"{where}: first turn only ({later} later-turn judgments left out); {judged} first-turn judgments of "
        f"{len(groups)} (question, model pair)s voted; {dropped} pair(s) tied or without a majority dropped; "
        f"{len(out)} cases"
    ]
    return out, notes


INSTRUSUM_COLUMNS = ("article", "requirement", "output_1", "output_2", "winner")
INSTRUSUM_INSTRUCTION = (
    "Here is an article:\n{article}\n\nHere is a summary requirement:\n{requirement}\n\n"
    "Please summarize the above article based on the given requirement:"
)
"""How an InstruSum case reads as one instruction: the layout of ReIFE's InstruSum file."""


def _convert_instrusum(rows: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """InstruSum's `human_eval_pairwise` (ties already excluded by its authors): the article and the summary
    requirement become the instruction; `winner` (1 or 2) is the label; the id names the document and systems."""
    _need(rows, INSTRUSUM_COLUMNS, where, "instrusum")
    out = []
    for n, r in enumerate(rows):
        for column in ("article", "requirement"):
            if not isinstance(r[column], str):
                raise UserInputError(
                    f"{where}: row {n}: column '{column}' must be text, got {type(r[column]).__name__}"
                )
        parts = [r.get(k) for k in ("doc_id", "sys_1", "sys_2")]
        case_id = "-".join(str(p) for p in parts) if all(p is not None for p in parts) else None
        out.append(
            {
                "id": r.get("id", case_id),
                "instruction": INSTRUSUM_INSTRUCTION.format(
                    article=r["article"].strip(), requirement=r["requirement"].strip()
                ),
                "output_1": r["output_1"],
                "output_2": r["output_2"],
                "label": r["winner"],
            }
        )
    return out, []


HREF_COLUMNS = ("instruction", "output_a", "output_b", "annotations", "reference")


def _convert_href(rows: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """HREF's human preference set: output_a / output_b become output_1 / output_2; the annotators' votes
    (1: output_a, 2: output_b, 0: tie) decide the label by majority, and a tie or a majority of ties is
    dropped; the human-written `reference` is kept (for href-ref and the other reference protocols)."""
    _need(rows, HREF_COLUMNS, where, "href")
    out, dropped = [], 0
    for n, r in enumerate(rows):
        votes = r["annotations"]
        if not isinstance(votes, list) or not votes:
            raise UserInputError(f"{where}: row {n}: 'annotations' must be a non-empty list of votes (0, 1 or 2)")
        try:
            counted = Counter(int(v) for v in votes)
        except (TypeError, ValueError):
            raise UserInputError(f"{where}: row {n}: 'annotations' must hold votes 0, 1 or 2") from None
        if set(counted) - {0, 1, 2}:
            raise UserInputError(f"{where}: row {n}: 'annotations' must hold votes 0, 1 or 2, got {sorted(counted)}")
        label = _majority(counted)
        if not label:
            dropped += 1
            continue
        out.append(
            {
                "id": r.get("id", str(n)),
                "instruction": r["instruction"],
                "output_1": r["output_a"],
                "output_2": r["output_b"],
                "label": label,
                "reference": r["reference"],
            }
        )
    notes = (
        [f"{where}: {dropped} of {len(rows)} pair(s) without a majority preference (ties) dropped"] if dropped else []
    )
    return out, notes


LLMBAR_COLUMNS = ("output_1", "output_2")
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "llmbar-natural",
            "LLMBar Natural",
            "princeton-nlp/LLMBar",
            "LLMBar",
            ("Natural",),
            LLMBAR_COLUMNS,
            _convert_llmbar,
            "LLMBar's own format (input, output_1, output_2, label)",
        ),
        Preset(
            "llmbar-adversarial",
            "LLMBar Adversarial",
            "princeton-nlp/LLMBar",
            "LLMBar",
            ("Adversarial_Neighbor", "Adversarial_GPTInst", "Adversarial_GPTOut", "Adversarial_Manual"),
            LLMBAR_COLUMNS,
            _convert_llmbar,
            "the four Adversarial subsets together, in LLMBar's own format; ids <subset>-<n>",
        ),
        Preset(
            "mtbench",
            "MT-Bench human judgments",
            "lmsys/mt_bench_human_judgments",
            None,
            ("human",),
            MTBENCH_COLUMNS,
            _convert_mtbench,
            "first turn of conversation_a / conversation_b; majority of the human votes per (question, model "
            "pair); ties dropped",
        ),
        Preset(
            "instrusum",
            "InstruSum",
            "Salesforce/InstruSum",
            "human_eval_pairwise",
            ("data",),
            INSTRUSUM_COLUMNS,
            _convert_instrusum,
            "article + requirement as the instruction; output_1, output_2; winner as the label",
        ),
        Preset(
            "href",
            "HREF",
            "allenai/href_preference",
            None,
            ("dev",),
            HREF_COLUMNS,
            _convert_href,
            "output_a / output_b; majority of the annotations (ties dropped); the human reference kept",
        ),
    )
}
"""The sets of the paper's Table 1, by the name `--data` takes."""


def _hub_records(preset: Preset) -> list[Any]:
    """A preset's rows from the Hub (every split, tagged with it when there are several), or one error line."""
    records: list[Any] = []
    for split in preset.splits:
        try:
            rows = read_dataset(preset.hub, folder=None, split=split, config=preset.config)
        except UserInputError as exc:
            reason = str(exc).removeprefix(f"{preset.hub}: ").removeprefix("could not load the dataset: ")
            where = f"{preset.hub}" + (f" ({preset.config}, split {split})" if preset.config else f" (split {split})")
            raise UserInputError(
                f"--data {preset.name}: could not load {where} from the Hugging Face Hub: {message_line(reason)}; "
                f"without network, give {preset.name}=FILE with the rows in the same layout"
            ) from None
        if len(preset.splits) > 1:
            rows = [{**r, "subset": split} if isinstance(r, dict) else r for r in rows]
        records.extend(rows)
    return records


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


def _reference_text(item: Any, where: str) -> str | None:
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
        return [_reference_text(m, f"{where} (id {i})") for i, m in zip(ids, matched, strict=True)]
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
        texts.append(_reference_text(item, f"{where} (item {n})"))
    return texts


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
    name = name or (chosen.name if chosen is not None else _default_name(source))
    if not NAME_RE.match(name):
        raise UserInputError(f"{source}: data set name {clip_value(name)} may hold only letters, digits, '_', '.', '-'")
    if from_hub:
        assert chosen is not None
        records = _hub_records(chosen)
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
    refs: dict[str, list[str | None]] = {}
    if reference_columns is None:
        reference_columns = ["reference"] if any("reference" in r for r in rows) else []
    for column in reference_columns:
        if not any(column in r for r in rows):
            columns = clip_value(sorted(rows[0]))
            raise UserInputError(f"{source}: no reference column {clip_value(column)} (columns: {columns})")
        refs[column] = [_reference_text(r.get(column), f"{source}: row {n}: '{column}'") for n, r in enumerate(rows)]
    for ref in reference_files or []:
        ref_name = ref.name or _default_name(ref.path)
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
