"""The `prompts` stage: a recipe's prompt source read, checked and turned into prompt rows.

`read_prompts` reads and checks the rows before a run starts (bad input is the user's to fix, found before
anything is written); the stage itself hands those rows on. `prompt_rows` is the pure half.
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING, Any

from factory.core.errors import UserInputError
from factory.core.keys import canonical_messages, hash_text, stable_hash
from factory.inputs.sources import read_rows
from factory.pipeline.stage import Context, Stage, StageOutput, StageStats

if TYPE_CHECKING:
    from factory.config.recipe import LoadedRecipe
    from factory.config.sources import PromptSource


_STRING = json.encoder.encode_basestring  # how json.dumps writes a string with ensure_ascii off


def _messages_json(messages: list[dict[str, str]]) -> str:
    """`json.dumps(messages, ensure_ascii=False)` of chat messages (string role and content), byte for byte,
    without the encoder `dumps` builds per call for non-default options: most of the time a build spent
    reading 60K prompts went there (docs/BENCHMARKS.md, "Paper scale")."""
    turns = (f'{{"role": {_STRING(m["role"])}, "content": {_STRING(m["content"])}}}' for m in messages)
    return "[" + ", ".join(turns) + "]"


def _texts_json(texts: dict[str, str | None]) -> str:
    """`json.dumps(texts, ensure_ascii=False)` of a mapping of names to texts or None, without its per-call setup."""
    return "{" + ", ".join(f"{_STRING(k)}: {'null' if v is None else _STRING(v)}" for k, v in texts.items()) + "}"


def _columns(names: Any) -> str:
    """Available column names for an error message, cut short when there are many or they are long."""
    shown = [str(n)[:40] for n in sorted(names, key=str)[:12]]
    return repr(shown)[:-1] + (", …]" if len(names) > 12 else "]")


def _text(row: dict[str, Any], column: str, where: str, required: bool) -> str | None:
    if column not in row or row[column] is None:
        if required and column in row:
            raise UserInputError(f"{where}: column '{column[:80]}' is null; expected text")
        if required:
            raise UserInputError(f"{where}: missing column '{column[:80]}' (available: {_columns(row)})")
        return None
    value = row[column]
    if not isinstance(value, str):
        raise UserInputError(f"{where}: column '{column}' must be text, got {type(value).__name__}")
    return value


def prompt_rows(
    source_name: str, raw: list[dict[str, Any]], spec: PromptSource, where: str | None = None
) -> StageOutput:
    """Instructions as chat messages with a content-hash id; duplicates dropped, then shuffle and limit.

    `where` starts error messages (the build passes the recipe file, line and field of the source).
    """
    where = where or f"prompts ({source_name})"
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    duplicates = empty = 0
    for i, row in enumerate(raw):
        row_where = f"{where} (row {i})"
        instruction = _text(row, spec.instruction_field, row_where, required=True)
        assert instruction is not None
        if not instruction.strip():
            empty += 1
            continue
        messages = []
        system = _text(row, spec.system_field, row_where, required=False) if spec.system_field else None
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": instruction})
        prompt_id = hash_text(canonical_messages(messages), 16)  # = stable_hash(messages, 16), rendered faster
        if prompt_id in seen and spec.dedupe:
            duplicates += 1
            continue
        seen.add(prompt_id)
        refs = {c: _text(row, c, row_where, required=False) for c in spec.reference_fields}
        rows.append(
            {
                "prompt_id": prompt_id,
                "messages": _messages_json(messages),
                "instruction": instruction,
                "source": source_name,
                "source_row": i,
                "source_id": None if spec.id_field is None else str(row.get(spec.id_field)),
                "reference_fields": _texts_json(refs),
            }
        )
    named = [(c, "prompts.reference_fields") for c in spec.reference_fields]
    named += [(c, f"prompts.{f}") for f, c in (("id_field", spec.id_field), ("system_field", spec.system_field)) if c]
    absent = [(c, field) for c, field in named if raw and all(c not in r for r in raw)]
    if absent:
        column, field = absent[0]
        raise UserInputError(f"{where}: column '{column[:80]}' ({field}) is in no row (available: {_columns(raw[0])})")
    if spec.shuffle:
        random.Random(spec.seed).shuffle(rows)
    if spec.limit is not None:
        rows = rows[: spec.limit]
    if not rows:
        raise UserInputError(
            f"{where}: the source {source_name} gave no usable prompts ({len(raw)} rows read, {empty} empty)"
        )
    return StageOutput(rows, {"read": len(raw), "duplicates": duplicates, "empty": empty, "kept": len(rows)})


def read_prompts(loaded: LoadedRecipe, loc: tuple[str, ...] = ("prompts",)) -> StageOutput:
    """The prompt rows of the recipe's `prompts` (or of the prompt source at `loc`, e.g. `eval.prompts`), read
    and checked (raises UserInputError naming file, field and row)."""
    return read_prompt_source(loaded, loc)[0]


def read_prompt_source(
    loaded: LoadedRecipe, loc: tuple[str, ...] = ("prompts",)
) -> tuple[StageOutput, list[dict[str, Any]]]:
    """`read_prompts`, and the raw rows it read (a column of them may hold imported completions)."""
    spec = loaded.recipe.eval.prompts if loc == ("eval", "prompts") else loaded.recipe.prompts
    source_name, raw = read_rows(loaded, spec, loc)
    source_field = "inline" if spec.inline is not None else "path" if spec.path is not None else "dataset"
    where = loaded.where(*loc, source_field)
    if spec.path is not None:
        where += f" ({loaded.resolve(spec.path).name})"  # name the data file too: the problem is in it
    return prompt_rows(source_name, raw, spec, where=where), raw


def _prompts(ctx: Context, st: StageStats) -> StageOutput:
    return ctx.outputs["prompt_output"]


def _prompts_spec(ctx: Context) -> str:
    return stable_hash([p["messages"] for p in ctx.outputs["prompt_output"].rows])


PROMPTS = Stage("prompts", (), _prompts_spec, _prompts)
"""The rows `read_prompts` read before the run, handed on as `ctx.outputs["prompt_output"]`."""
