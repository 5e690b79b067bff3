"""The `references` stage: one row per (prompt, reference), read from a prompt column (human) or written by
a model."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from factory.models.registry import model_identity
from factory.models.requests import Call
from factory.pipeline.stage import Context, PlannedStage, Stage, StageOutput, StageStats
from factory.stages.samples import generation_calls, generation_row

if TYPE_CHECKING:
    from factory.config.sources import ReferenceSpec


def column_reference_rows(prompts: list[dict[str, Any]], ref: ReferenceSpec, column: str) -> StageOutput:
    """Human references read from the prompt source; prompts without one get a `missing` row."""
    rows = []
    for p in prompts:
        text = json.loads(p["reference_fields"]).get(column)
        ok = bool(text and text.strip())
        rows.append(
            {
                "prompt_id": p["prompt_id"],
                "reference_name": ref.name,
                "text": text if ok else None,
                "source_kind": "human",
                "status": "ok" if ok else "missing",
            }
        )
    return StageOutput(rows, {"missing": sum(r["status"] == "missing" for r in rows)})


def model_reference_rows(calls: list[Call], results: dict[str, dict[str, Any]], ref: ReferenceSpec) -> StageOutput:
    """References written by a model: one row per prompt, failures kept as rows."""
    rows = []
    for c in calls:
        fields = generation_row(c, results.get(c.key))
        del fields["finish_reason"]  # the references table keeps a status instead
        status = "ok" if fields["error"] is None else "error"
        row = {"prompt_id": c.meta["prompt_id"], "reference_name": ref.name, "source_kind": "model"}
        rows.append({**row, "model": ref.model, "status": status, **fields})
    return StageOutput(rows, {"failed": sum(r["status"] != "ok" for r in rows)})


def _references_spec(ctx: Context) -> Any:
    r = ctx.recipe
    identities = {ref.name: model_identity(r.models[ref.model]) for ref in r.references if ref.model}
    return [[ref.model_dump() for ref in r.references], identities]


def _references(ctx: Context, st: StageStats) -> StageOutput:
    r = ctx.recipe
    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}
    for ref in r.references:
        if ref.kind == "column":
            out = column_reference_rows(ctx.rows["prompts"], ref, r.column_field(ref))
        else:
            identity = model_identity(r.models[ref.model])
            calls = generation_calls(ctx.rows["prompts"], identity, ref.params, ref.seed, 1)
            out = model_reference_rows(calls, ctx.call(ref.model, "references", calls, st), ref)
        rows += out.rows
        notes[ref.name] = out.notes
    return StageOutput(rows, notes, complete=all(not n.get("failed") for n in notes.values()))


def _plan_references(ctx: Context, n: int | None) -> list[PlannedStage]:
    chars = ctx.outputs.get("instruction_chars")
    planned = []
    for ref in ctx.recipe.references:
        if ref.kind == "model":
            approx = None if n is None or chars is None else n * int(chars / 4)
            planned.append(
                PlannedStage(
                    f"references:{ref.name}", ref.model, n, None if n is None else n * ref.params.max_tokens, approx
                )
            )
    return planned


REFERENCES = Stage("references", ("prompts",), _references_spec, _references, plan=_plan_references)
