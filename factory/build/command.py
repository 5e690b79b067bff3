"""`factory build`: a recipe's stages, declared as data, run by the one loop in `factory.pipeline.stage` inside
one run lifecycle (`factory.pipeline.run`).

The pipeline is prompts → references → samples → (the labeler's stages → scores) → pairs → export. Adding a
stage means adding one `Stage` to `stages_for`; adding a labeler means adding an entry to
`factory.labelers.registry.LABELERS`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from factory.config.recipe import LoadedRecipe
from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.inputs.sources import read_rows
from factory.labelers.registry import judge_protocol, labeler_of
from factory.models.registry import model_identity
from factory.pipeline.calls import ModelPool, Reporter
from factory.pipeline.run import Run
from factory.pipeline.stage import Context, PlannedStage, Stage, StageOutput, StageStats, execute, order
from factory.stages import rows as stages
from factory.warehouse.store import Warehouse


def read_prompts(loaded: LoadedRecipe, loc: tuple[str, ...] = ("prompts",)) -> StageOutput:
    """The prompt rows of the recipe's `prompts` (or of the prompt source at `loc`, e.g. `eval.prompts`), read
    and checked (raises UserInputError naming file, field and row)."""
    spec = loaded.recipe.eval.prompts if loc == ("eval", "prompts") else loaded.recipe.prompts
    source_name, raw = read_rows(loaded, spec, loc)
    source_field = "inline" if spec.inline is not None else "path" if spec.path is not None else "dataset"
    where = loaded.where(*loc, source_field)
    if spec.path is not None:
        where += f" ({loaded.resolve(spec.path).name})"  # name the data file too: the problem is in it
    return stages.prompt_rows(source_name, raw, spec, where=where)


def preflight(loaded: LoadedRecipe, wh_root: Path | None = None, *, keys: bool = True) -> None:
    """Every check that needs more than the recipe text, made before anything is written: a custom judge
    template, local eval prompts, the API key variables (unless `keys` is off: a dry run spends nothing), and
    an export folder that factory did not write."""
    from factory.export.dataset import check_export_target, export_path

    r = loaded.recipe
    if r.judgments is not None:
        judge_protocol(loaded)
    if r.eval is not None and r.eval.prompts.dataset is None:
        read_prompts(loaded, ("eval", "prompts"))  # a held-out file that is missing or wrong fails now, not last
    for name in sorted({name for _, name, _ in r.model_uses()}) if keys else []:
        spec = r.models[name]
        if spec.api_key_env and not os.environ.get(spec.api_key_env):
            raise UserInputError(
                f"{loaded.where('models', name, 'api_key_env')}: the environment variable "
                f"{spec.api_key_env} is not set (it must hold the API key of model '{name}')"
            )
    if wh_root is not None:
        path = export_path(loaded, wh_root)
        check_export_target(path, wh_root)
        if r.export.sft_reference is not None:
            check_export_target(path.with_name(path.name + "-sft"), wh_root)


# ------------------------------------------------------------------------------------------ core stages


def _prompts(ctx: Context, st: StageStats) -> StageOutput:
    return ctx.outputs["prompt_output"]


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
            out = stages.column_reference_rows(ctx.rows["prompts"], ref, r.column_field(ref))
        else:
            identity = model_identity(r.models[ref.model])
            calls = stages.generation_calls(ctx.rows["prompts"], identity, ref.params, ref.seed, 1)
            out = stages.model_reference_rows(calls, ctx.call(ref.model, "references", calls, st), ref)
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


def _samples_spec(ctx: Context) -> Any:
    s = ctx.recipe.samples
    return [s.model_dump(), model_identity(ctx.recipe.models[s.policy])]


def _samples(ctx: Context, st: StageStats) -> StageOutput:
    s = ctx.recipe.samples
    identity = model_identity(ctx.recipe.models[s.policy])
    calls = stages.generation_calls(ctx.rows["prompts"], identity, s.params, s.seed, s.n)
    out = stages.sample_rows(calls, ctx.call(s.policy, "samples", calls, st), s)
    out.complete = not out.notes["failed"]
    return out


def _plan_samples(ctx: Context, n: int | None) -> list[PlannedStage]:
    s = ctx.recipe.samples
    chars = ctx.outputs.get("instruction_chars")
    per = None if n is None else n * s.n
    approx = None if per is None or chars is None else int(per * chars / 4)
    return [
        PlannedStage(
            "samples", s.policy, per, None if per is None else per * s.params.max_tokens, approx, f"{s.n} per prompt"
        )
    ]


def _pairs(ctx: Context, st: StageStats) -> StageOutput:
    return stages.pair_rows(ctx.rows["samples"], ctx.rows["scores"], ctx.recipe.pairs)


def _export_spec(ctx: Context) -> Any:
    r = ctx.recipe
    # The metadata hash covers what the card prints but no row depends on, so an edited description or
    # recipe comment rewrites the card instead of leaving it stale.
    return [r.export.model_dump(), {"metadata": stable_hash([r.description, ctx.loaded.text])}]


def _export(ctx: Context, st: StageStats) -> StageOutput:
    from factory.export.dataset import export_dataset, export_path, export_sft

    r = ctx.recipe
    path = export_path(ctx.loaded, ctx.outputs["warehouse_root"])
    key = ctx.keys["export"]
    notes: dict[str, Any] = {}
    if r.samples is not None:
        result = export_dataset(path, ctx, ctx.rows["pairs"], key)
        notes, st.rows = result.notes, result.rows
        ctx.outputs["export_path"] = path
    if r.export.sft_reference is not None:
        sft_path = path.with_name(path.name + "-sft")
        notes["sft"] = export_sft(sft_path, ctx, key).notes
        ctx.outputs["sft_path"] = sft_path
    return StageOutput([], notes)


def stages_for(loaded: LoadedRecipe) -> list[Stage]:
    """The recipe's stages, declared as data; `factory.pipeline.stage.order` sorts them by their parents."""
    r = loaded.recipe
    found: list[Stage] = [
        Stage(
            "prompts", (), lambda ctx: stable_hash([p["messages"] for p in ctx.outputs["prompt_output"].rows]), _prompts
        ),
        Stage("references", ("prompts",), _references_spec, _references, plan=_plan_references),
    ]
    labeler = labeler_of(r)
    if r.samples is not None and labeler is not None:
        found.append(Stage("samples", ("prompts",), _samples_spec, _samples, plan=_plan_samples))
        found += labeler.stages()
        # version 2: a sample whose text repeats another's is never chosen or rejected in its place.
        found.append(Stage("pairs", ("samples", "scores"), lambda ctx: ctx.recipe.pairs.model_dump(), _pairs, 2))
    found.append(Stage("export", tuple(s.name for s in found), _export_spec, _export, sink=True))
    return found


# ----------------------------------------------------------------------------------------------- build


class Build:
    """One build of one recipe into one warehouse."""

    def __init__(
        self,
        loaded: LoadedRecipe,
        warehouse: Warehouse,
        reporter: Reporter | None = None,
        pool: ModelPool | None = None,
        loop_round: int | None = None,
    ) -> None:
        self.loaded = loaded
        self.round = loop_round
        self.recipe = loaded.recipe
        self.wh = warehouse
        self.reporter = reporter or Reporter()
        self.pool = pool or ModelPool(loaded.recipe.models)
        self.stats: list[StageStats] = []
        self.export_path: Path | None = None
        self.sft_path: Path | None = None
        self.run_id = ""

    def run(self) -> dict[str, Any]:
        """Build every stage; returns the runs-table row. The warehouse is locked for the duration."""
        # Bad input is the user's to fix: find it before anything is written to the warehouse.
        prompt_output = read_prompts(self.loaded)
        preflight(self.loaded, self.wh.root)
        recipe_hash = self.recipe.content_hash
        run = Run(self.wh, self.recipe.name, recipe_hash, self.pool, self.reporter, str(self.loaded.path), self.round)
        self.run_id = run.run_id
        ctx = Context(self.loaded, run.call, run_id=run.run_id)
        ctx.outputs.update(prompt_output=prompt_output, warehouse_root=self.wh.root)
        self.stats = run.stats
        try:
            with run:
                execute(stages_for(self.loaded), ctx, run)
        finally:
            self.export_path = ctx.outputs.get("export_path")
            self.sft_path = ctx.outputs.get("sft_path")
        return run.row


def plan(loaded: LoadedRecipe) -> tuple[int | None, list[PlannedStage]]:
    """The prompt count and the model calls each stage plans, without loading any model.

    A Hub dataset is not downloaded: its size is taken from `prompts.limit` (unknown without one). Input
    tokens are estimated at 4 characters a token from the instructions and references that are at hand.
    """
    r = loaded.recipe
    ctx = Context(loaded, lambda *a: {})
    if r.prompts.dataset is not None:
        n_prompts = r.prompts.limit
    else:
        rows = read_prompts(loaded).rows
        n_prompts = len(rows)
        ctx.rows["prompts"] = rows
        ctx.outputs["instruction_chars"] = sum(len(p["instruction"]) for p in rows) / max(n_prompts, 1)
    planned: list[PlannedStage] = []
    for stage in order(stages_for(loaded)):
        if stage.plan is not None:
            planned += stage.plan(ctx, n_prompts)
    return n_prompts, planned
