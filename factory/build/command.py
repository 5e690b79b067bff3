"""`factory build`: a recipe's stages run by the one loop in `factory.pipeline.stage` inside one run lifecycle
(`factory.pipeline.run`): the build's lifecycle, its checks before anything is written, and its dry-run plan.

The pipeline is prompts → references → samples → (the labeler's stages → scores) → pairs → export; each stage
is declared in its own file under `factory/stages/` (the export sink in `factory/export/stage.py`). Adding a
stage means declaring it there and adding it to `stages_for`; adding a labeler means adding a file under
`factory/labelers/` and an entry to `factory.labelers.registry.LABELERS`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from factory.config.recipe import LoadedRecipe
from factory.core.errors import UserInputError
from factory.export.dataset import export_path
from factory.export.stage import export_stage
from factory.export.writer import check_export_target
from factory.labelers.registry import labeler_of
from factory.pipeline.calls import ModelPool, Reporter
from factory.pipeline.run import Run
from factory.pipeline.shards import cut, execute_sharded
from factory.pipeline.stage import Context, PlannedStage, Stage, StageStats, order
from factory.stages.imported import read_imports
from factory.stages.judgments import judge_protocol
from factory.stages.pairs import PAIRS
from factory.stages.prompts import PROMPTS, read_prompt_source, read_prompts
from factory.stages.references import REFERENCES
from factory.stages.samples import SAMPLES
from factory.warehouse.store import Warehouse


def preflight(loaded: LoadedRecipe, wh_root: Path | None = None, *, keys: bool = True) -> None:
    """Every check that needs more than the recipe text, made before anything is written: a custom judge
    template, local eval prompts, the API key variables (unless `keys` is off: a dry run spends nothing), and
    an export folder that factory did not write."""
    r = loaded.recipe
    for entry in range(len(r.judges)):
        judge_protocol(loaded, entry)
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


def stages_for(loaded: LoadedRecipe) -> list[Stage]:
    """The recipe's stages, declared as data; `factory.pipeline.stage.order` sorts them by their parents."""
    r = loaded.recipe
    found: list[Stage] = [PROMPTS, REFERENCES]
    labeler = labeler_of(r)
    if r.samples is not None and labeler is not None:
        found += [SAMPLES, *labeler.stages(), PAIRS]
    found.append(export_stage(tuple(s.name for s in found)))
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
        prompt_output, raw = read_prompt_source(self.loaded)
        imports = read_imports(self.loaded, prompt_output.rows, raw) if self.recipe.imports else None
        del raw  # the prompt rows hold what the build needs; the raw rows may be large
        preflight(self.loaded, self.wh.root)
        recipe_hash = Run.hash_of(self.recipe.model_dump(mode="json"))
        run = Run(
            self.wh, self.recipe.name, recipe_hash, self.reporter, str(self.loaded.path), self.round, models=self.pool
        )
        self.run_id = run.run_id
        ctx = Context(self.loaded, run.call, run_id=run.run_id)
        ctx.outputs["warehouse_root"] = self.wh.root
        if imports is not None:
            ctx.outputs["imports"] = imports
            ctx.outputs["first_prompt_id"] = prompt_output.rows[0]["prompt_id"]
        shards = cut(prompt_output, self.recipe.run.shard_prompts)
        del prompt_output  # the shards hold the rows now
        self.stats = run.stats
        try:
            with run:
                execute_sharded(stages_for(self.loaded), ctx, run, shards)
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
