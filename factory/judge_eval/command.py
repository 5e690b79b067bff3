"""`factory judge-eval`: run judges × protocols over human-labelled pairwise sets, in both orders.

The same machinery as a build: request keys as in the `judgments` stage, the `judge_calls` cache (a rerun
makes no model call), batches flushed as they finish, and one stage-style table, `eval_judgments`, with a
row per (case, order) judgment. A unit of work is one (data set, judge, protocol, reference); each unit is a
versioned table file, so runs over other protocols or judges add to the table instead of replacing it. The
decoding switches (prefill, markers, top-k) and the second order (`swap`) are in every row and in the unit's
stage key: a run with other switches makes its own version of the unit current.

This file holds the run: each judge's units (`factory.judge_eval.units`) run as stages through
`factory.pipeline.stage.execute`, one judge in memory at a time. The settings are in
`factory/judge_eval/settings.py`, the protocols in `templates.py`, the judges in `judges.py`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from factory.config.models import ModelSpec
from factory.core.errors import UserInputError
from factory.inputs.labelled_sets import EvalSet
from factory.judge_eval.settings import EvalSettings
from factory.judge_eval.templates import EvalProtocol
from factory.judge_eval.units import TABLE, Unit, check_swappable, plan_units, unit_calls, unit_stage
from factory.models.registry import Backend, load_backend, model_identity
from factory.pipeline.calls import ModelPool, Reporter
from factory.pipeline.run import Run
from factory.pipeline.stage import Context, Stage, StageStats, execute
from factory.warehouse.store import Warehouse

RECIPE = "judge-eval"


# ------------------------------------------------------------------------------------------------- runs


@dataclass
class EvalRun:
    """What one judge-eval run did: its rows (exactly as stored), per-unit stats, and notes."""

    run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    stats: list[StageStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = "running"

    @property
    def model_calls(self) -> int:
        """Model calls this run made (cached results not counted)."""
        return sum(s.model_calls for s in self.stats)

    @property
    def cached_calls(self) -> int:
        """Calls answered from the cache."""
        return sum(s.cached_calls for s in self.stats)


class JudgeEval:
    """One judge-eval run into one warehouse, in the same run lifecycle as a build (`factory.pipeline.run.Run`)."""

    def __init__(
        self,
        wh: Warehouse,
        settings: EvalSettings,
        judges: dict[str, ModelSpec],
        reporter: Reporter | None = None,
        loader: Callable[[ModelSpec], Backend] | None = None,
    ) -> None:
        self.wh = wh
        self.settings = settings
        self.judges = judges
        self.reporter = reporter or Reporter()
        # Looked up at call time (not bound as a default) so tests can substitute the loader.
        self.pool = ModelPool(judges, loader=loader or load_backend)
        self.notes: list[str] = []

    def _stage(self, unit: Unit) -> Stage:
        identity = model_identity(self.judges[unit.judge])
        calls, missing = unit_calls(unit, identity, self.settings)
        if missing:
            self.notes.append(f"{unit.title}: {missing} case(s) without reference '{unit.reference}' left out")
        return unit_stage(unit, calls, self.settings, missing)

    def execute(self, units: list[Unit]) -> EvalRun:
        """Run every unit; the run is recorded in the runs table and the DuckDB views are refreshed."""
        recipe_hash = Run.hash_of({"settings": self.settings.recorded(), "units": [u.folder for u in units]})
        run = Run(self.wh, RECIPE, recipe_hash, self.reporter, models=self.pool)
        result = EvalRun(run.run_id, stats=run.stats, notes=self.notes)
        ctx = Context(None, run.call, run_id=run.run_id)
        try:
            with run:
                previous: str | None = None
                for judge, group in itertools.groupby(units, key=lambda u: u.judge):
                    if previous is not None:
                        self.pool.release(previous)  # one judge in memory at a time
                    previous = judge
                    stages = [self._stage(unit) for unit in group]
                    execute(stages, ctx, run)
                    for stage in stages:  # the report reads exactly what is stored
                        result.rows.extend(self.wh.read_stage(TABLE, stage.unit or "", ctx.keys[stage.name]))
        finally:
            result.status = run.status
        return result


def run_judge_eval(
    datasets: list[EvalSet],
    judges: dict[str, ModelSpec],
    protocols: list[EvalProtocol],
    settings: EvalSettings,
    wh: Warehouse,
    *,
    explicit_protocols: bool = True,
    reporter: Reporter | None = None,
    loader: Callable[[ModelSpec], Backend] | None = None,
) -> EvalRun:
    """Judge every case of every set with every judge × protocol (× reference), forward and in the second
    order(s) of `settings.swap`."""
    names = [p.name for p in protocols]
    if len(set(names)) != len(names):
        raise UserInputError(f"protocols must be unique, got {names}")
    data_names = [d.name for d in datasets]
    if len(set(data_names)) != len(data_names):
        raise UserInputError(f"data set names must be unique, got {data_names}; name them with NAME=PATH")
    check_swappable(protocols, settings)
    units, notes = plan_units(datasets, judges, protocols, explicit_protocols)
    if not units:
        raise UserInputError("nothing to judge: " + "; ".join(notes) if notes else "nothing to judge")
    runner = JudgeEval(wh, settings, judges, reporter, loader)
    runner.notes.extend(note for ds in datasets for note in ds.notes)
    runner.notes.extend(notes)
    return runner.execute(units)
