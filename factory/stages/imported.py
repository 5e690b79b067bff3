"""Imported completions: samples read from data rather than generated (`samples` entries with `imported`).

`read_imports` reads and checks every import source before a run starts (a missing column, or one of the
wrong type, is the user's to fix and is found before anything is written), joins each completion to its
prompt, and counts what could not be used: empty completions and file rows that match no prompt. The
`samples` stage turns a prompt's completions into sample rows (`imported_rows`), no model called.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from factory.config.sources import PromptSource
from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.core.text import clip_value
from factory.inputs.sources import json_kind, read_rows

if TYPE_CHECKING:
    from factory.config.recipe import LoadedRecipe
    from factory.config.sample_sources import ImportedSamples

NAMED_ROWS = 20
"""How many unusable rows the notes name (by row number in their file); the rest are counted."""


@dataclass
class ImportedSource:
    """One import source's completions by prompt id, and what could not be used."""

    completions: dict[str, list[tuple[str, str | None]]] = field(default_factory=lambda: defaultdict(list))
    """prompt_id -> [(text, model or None)], in the order the data holds them."""
    rows: int = 0
    empty: list[int] = field(default_factory=list)
    """Rows whose completion (or one of them) is empty or missing."""
    unjoined: list[int] = field(default_factory=list)
    """File rows whose instruction or id matches no prompt of the build."""

    def notes(self) -> dict[str, Any]:
        """The counts for the run's notes, naming the first unusable rows."""
        return {
            "rows": self.rows,
            "completions": sum(len(c) for c in self.completions.values()),
            "prompts_with_completions": sum(bool(c) for c in self.completions.values()),
            "empty": len(self.empty),
            "empty_rows": self.empty[:NAMED_ROWS],
            "unjoined": len(self.unjoined),
            "unjoined_rows": self.unjoined[:NAMED_ROWS],
        }


def completions_of(value: Any, spec: ImportedSamples, where: str) -> tuple[list[tuple[str, str | None]], bool] | None:
    """A cell's completions as (text, model) and whether any was empty; None when the cell holds none at all.
    Raises UserInputError when it is neither a text, a list of texts, nor a list of records with a text."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    found: list[tuple[str, str | None]] = []
    empty = False
    for item in items:
        text: Any
        model: Any = None
        if isinstance(item, dict):
            if spec.response_field not in item:
                raise UserInputError(
                    f"{where}: a record has no '{spec.response_field}' (samples response_field); keys: "
                    f"{clip_value(sorted(item)[:12])}"
                )
            text = item[spec.response_field]
            model = item.get(spec.model_field) if spec.model_field else None
        else:
            text = item
        if text is None or (isinstance(text, str) and not text.strip()):
            empty = True
            continue
        if not isinstance(text, str):
            raise UserInputError(
                f"{where}: expected a text, a list of texts or a list of records with '{spec.response_field}', "
                f"got {json_kind(text)}"
            )
        found.append((text, None if model is None else str(model)))
    return found, empty or not items


def _read_source(
    loaded: LoadedRecipe,
    i: int,
    spec: ImportedSamples,
    prompts: list[dict[str, Any]],
    prompt_raw: list[dict[str, Any]] | None,
) -> ImportedSource:
    """One source's completions joined to `prompts` (a prompt-source column by the prompt's own row, a
    file's rows by instruction text or id). `prompt_raw`: the prompt source's rows when already read."""
    out = ImportedSource()
    r = loaded.recipe
    if not spec.separate:
        raw = prompt_raw if prompt_raw is not None else read_rows(loaded)[1]
        where = f"{loaded.where('samples', i, 'field')}: column '{spec.field}' of the prompt source"
        keyed = [(p["prompt_id"], p["source_row"]) for p in prompts]
    else:
        source = PromptSource(path=spec.path, dataset=spec.dataset, config=spec.config, split=spec.split)
        named, raw = read_rows(loaded, source, ("samples", i))
        named = loaded.resolve(spec.path).name if spec.path is not None else named
        where = f"{loaded.where('samples', i, 'field')} ({named}): column '{spec.field}'"
        default = r.prompts.instruction_field if spec.join == "instruction" else r.prompts.id_field
        join_field = spec.join_field or default
        by_key = {(p["instruction"] if spec.join == "instruction" else p["source_id"]): p["prompt_id"] for p in prompts}
        if raw and all(join_field not in row for row in raw):
            raise UserInputError(
                f"{loaded.where('samples', i, 'join_field')} ({named}): column "
                f"'{join_field}' is in no row (available: {clip_value(sorted(raw[0])[:12])})"
            )
        keyed = []
        for n, row in enumerate(raw):
            key = row.get(join_field)
            pid = by_key.get(key if spec.join == "instruction" or key is None else str(key))
            if pid is None:
                out.unjoined.append(n)
            else:
                keyed.append((pid, n))
    if raw and all(spec.field not in row for row in raw):
        raise UserInputError(f"{where} is in no row (available: {clip_value(sorted(raw[0])[:12])})")
    out.rows = len(raw)
    for prompt_id, n in keyed:
        found = completions_of(raw[n].get(spec.field), spec, f"{where} (row {n})")
        if found is None:
            out.empty.append(n)
            continue
        texts, had_empty = found
        if had_empty:
            out.empty.append(n)
        out.completions[prompt_id] += texts
    return out


def read_imports(
    loaded: LoadedRecipe, prompts: list[dict[str, Any]], prompt_raw: list[dict[str, Any]] | None = None
) -> dict[str, ImportedSource]:
    """Every import source of the recipe, read, checked and joined to the build's prompts (by source name).
    `prompt_raw`: the prompt source's raw rows, when the caller has read them already (`read_prompt_source`),
    so a column of imported completions does not read the prompt source a second time."""
    specs = loaded.recipe.samples if isinstance(loaded.recipe.samples, list) else []
    return {
        s.imported: _read_source(loaded, i, s, prompts, prompt_raw)
        for i, s in enumerate(specs)
        if hasattr(s, "imported")
    }


def imported_rows(
    spec: ImportedSamples, prompt_ids: list[str], source: ImportedSource, offsets: dict[str, int]
) -> list[dict[str, Any]]:
    """A source's completions of these prompts as sample rows, indexed from each prompt's `offsets` (which
    move on past them). A sample's id hashes the source's name, the prompt and the text; a text repeated
    within one source for one prompt is one sample."""
    rows = []
    for pid in prompt_ids:
        seen: set[str] = set()
        for text, model in source.completions.get(pid, []):
            if text in seen:
                continue
            seen.add(text)
            rows.append(
                {
                    "sample_id": stable_hash(["imported", spec.imported, pid, text], 16),
                    "prompt_id": pid,
                    "policy": spec.imported if model is None else f"{spec.imported}/{model}",
                    "sample_index": offsets[pid],
                    "n_tokens": None,
                    "n_prompt_tokens": None,
                    "text": text,
                    "finish_reason": "imported",
                    "request_key": None,
                    "error": None,
                    "tokens_in": None,
                    "tokens_out": None,
                    "latency_s": None,
                }
            )
            offsets[pid] += 1
    return rows


def content_key(spec: ImportedSamples, prompt_ids: list[str], source: ImportedSource) -> str:
    """A hash of a source's completions of these prompts: part of the samples stage's key, so editing the data
    rebuilds the samples (and what follows) while the calls of unchanged texts stay cached."""
    return stable_hash([spec.model_dump(), [[pid, source.completions.get(pid, [])] for pid in prompt_ids]])
