"""The `export` stage: the build's sink, writing the preference dataset (and the SFT set from references)
into its export folder (`factory.export.dataset`)."""

from __future__ import annotations

from typing import Any

from factory.core.keys import stable_hash
from factory.export.dataset import export_dataset, export_path, export_sft
from factory.pipeline.stage import Context, Stage, StageOutput, StageStats


def _export_spec(ctx: Context) -> Any:
    r = ctx.recipe
    # The metadata hash covers what the card prints but no row depends on, so an edited description or
    # recipe comment rewrites the card instead of leaving it stale.
    return [r.export.model_dump(), {"metadata": stable_hash([r.description, ctx.loaded.text])}]


def _export(ctx: Context, st: StageStats) -> StageOutput:
    r = ctx.recipe
    path = export_path(ctx.loaded, ctx.outputs["warehouse_root"])
    key = ctx.keys["export"]
    notes: dict[str, Any] = {}
    if r.samples is not None:
        result = export_dataset(path, ctx, key)
        notes, st.rows = result.notes, result.rows
        ctx.outputs["export_path"] = path
    if r.export.sft_reference is not None:
        sft_path = path.with_name(path.name + "-sft")
        notes["sft"] = export_sft(sft_path, ctx, key).notes
        ctx.outputs["sft_path"] = sft_path
    return StageOutput([], notes)


def export_stage(parents: tuple[str, ...]) -> Stage:
    """The export sink, after every stage in `parents` (all the build's stages: its key changes with any)."""
    return Stage("export", parents, _export_spec, _export, sink=True)
