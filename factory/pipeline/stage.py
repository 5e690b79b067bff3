"""Stages as data, and the one loop that runs them.

A `Stage` declares its name (the table it writes), its parents, the spec its key hashes and a compute
function. `execute` derives everything else the same way for every stage, as datatrove's executor runs a
list of steps and sqlmesh derives its DAG from declared parents:

- the order: parents before children (a cycle or an unknown parent is a programming error);
- the key: a hash of the stage's name, code version, spec and its parents' keys, so a change anywhere
  upstream changes every key below it;
- reuse: a complete version with that key is read back instead of computed;
- completeness: a stage is complete when its own compute says so and every parent is complete; an
  incomplete stage is shown in the views but recomputed by the next run.

Nothing here touches a file or a model: `execute` hands keys and compute functions to a `Materializer`
(the run lifecycle in `factory.pipeline.run`), and compute functions reach models only through `Context.call`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import pyarrow as pa

from factory.core.keys import stable_hash

if TYPE_CHECKING:
    from factory.config.recipe import LoadedRecipe
    from factory.models.requests import Call


@dataclass
class StageOutput:
    """A stage's rows, the counts worth reporting about them, and whether every call they need succeeded."""

    rows: list[dict[str, Any]]
    notes: dict[str, Any] = field(default_factory=dict)
    complete: bool = True


@dataclass
class StageStats:
    """What one stage did in one run (a row of the runs table's `stages` list)."""

    stage: str
    stage_key: str = ""
    skipped: bool = False
    rows: int = 0
    model_calls: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    retries: int = 0
    """Requests repeated after a transient failure (HTTP backends), over every call of the stage."""
    cost_usd: float | None = None
    """Summed price of the stage's priced calls; None when no call had a known price."""
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlannedStage:
    """What one stage would ask of a model on an empty warehouse (cached calls are not subtracted)."""

    stage: str
    model: str | None
    calls: int | None
    max_output_tokens: int | None
    approx_input_tokens: int | None
    note: str = ""


CallFn = Callable[[str, str, "list[Call]", StageStats], "dict[str, dict[str, Any]]"]
"""(model name, stage name, calls, stats) -> results by request key: the cache first, then the model."""


def merge_notes(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Two stage notes as one (a stage's notes over its shards): counts add up, mappings merge key by key,
    lists join, anything else keeps the later value."""
    merged = dict(into)
    for name, value in more.items():
        old = merged.get(name)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[name] = merge_notes(old, value)
        elif _addable(old, value):
            merged[name] = old + value
        else:
            merged[name] = value
    return merged


def _addable(old: Any, new: Any) -> bool:
    """Two counts (not flags), or two lists."""
    if isinstance(old, list) and isinstance(new, list):
        return True
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))


def _no_model() -> dict[str, dict[str, Any]]:
    raise RuntimeError("a stage asked for a model call in a context that was given no way to call models")


@dataclass
class Context:
    """What compute functions see: the recipe, the rows of finished stages, and a way to call models."""

    loaded: LoadedRecipe | None
    """The recipe the stages build from (None for a command that runs none: judge-eval)."""
    call: CallFn = field(default=lambda *args: _no_model())
    """How its stages call models; a command whose stages call none (train's own stages, publish) leaves it."""
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    run_id: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    """Things a stage made besides rows (e.g. the export folder), for the command's summary."""
    incomplete: set[str] = field(default_factory=set)
    """Stages of this run left incomplete so far (a sink uses it to mark what it writes as complete or not)."""
    shard_keys: dict[str, list[str]] = field(default_factory=dict)
    """For a build cut into shards (`factory.pipeline.shards`): each stage's version key per shard, in order."""
    read: Callable[[str, str, Sequence[str] | None], pa.Table] | None = None
    """How a sink reads one shard back: (table, shard key, columns or None) -> its rows as Arrow."""

    @property
    def shard_count(self) -> int:
        """How many shards the build's stages were cut into (1 for a run without shards)."""
        return len(next(iter(self.shard_keys.values()), [None]))

    def shard_key(self, i: int) -> str | None:
        """Shard `i` across every stage: a hash of each stage's key for it, so it changes with any row of the
        shard; None for a run without shards (nothing to recognise it by)."""
        if not self.shard_keys:
            return None
        return stable_hash({name: keys[i] for name, keys in sorted(self.shard_keys.items())})

    def shard_table(self, stage: str, i: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Shard `i` of a finished stage as Arrow (only `columns`, when given); a run without shards has one."""
        keys = self.shard_keys.get(stage)
        if keys is None or self.read is None:
            rows = self.rows.get(stage, [])
            table = pa.Table.from_pylist(rows)
            return table if columns is None or not rows else table.select(list(columns))
        return self.read(stage, keys[i], columns)

    @property
    def recipe(self) -> Any:
        """The validated recipe."""
        if self.loaded is None:
            raise RuntimeError("these stages run without a recipe")
        return self.loaded.recipe


KeyLayout = Literal["nested", "flat", "chained", "parent"]
"""How a stage key's document is laid out (`stage_key`). Build stages are `nested`; policy eval, judge-eval and
train keyed their tables `flat` and `chained` before they were stages, and keep those layouts so the versions a
warehouse already holds are reused. `parent` is a table its one parent's computation writes as a by-product
(train's `training_metrics`), stored under the parent's key."""


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline, declared as data."""

    name: str
    """The stage's name among its run's stages, in progress output and the runs table: by default also the
    table it writes (or, for a sink, the name its stats carry)."""
    parents: tuple[str, ...]
    spec: Callable[[Context], Any]
    """What the key hashes besides the code version and the parents' keys: the recipe section, the model
    identities and templates that change the stage's rows. Operational settings stay out."""
    compute: Callable[[Context, StageStats], StageOutput]
    version: int = 1
    """Bump when the code changes what the stage writes: every key from here down changes."""
    sink: bool = False
    """Writes outside the tables (an export folder): run every time, skipping its own work when current."""
    plan: Callable[[Context, int | None], list[PlannedStage]] | None = None
    """For `--dry-run`: the calls it would make for a number of prompts (None when that is unknown)."""
    table: str | None = None
    """The table it writes when that is not its name (several stages of one run write one table, each in
    its own `unit`)."""
    unit: str | None = None
    """The folder its versions live in under the table (None: the run's recipe)."""
    layout: KeyLayout = "nested"
    """How its key is laid out (`stage_key`)."""
    reuse: Callable[[Context], bool] | None = None
    """Whether a complete stored version may stand (None: always). False when what the version records is
    gone outside the tables (a trained model folder), or when the stage records an act that must happen each
    time (a publication)."""

    @property
    def writes(self) -> str:
        """The table the stage writes."""
        return self.table or self.name


class Materializer(Protocol):
    """The run lifecycle as `execute` needs it (implemented by `factory.pipeline.run.Run`)."""

    incomplete: list[str]
    """Stages whose saved version is incomplete in this run."""

    def materialize(
        self,
        table: str,
        key: str,
        compute: Callable[[StageStats], StageOutput],
        *,
        sink: bool = False,
        unit: str | None = None,
        label: str | None = None,
        reuse: bool = True,
    ) -> list[dict[str, Any]]:
        """Rows of the stage version `key` in folder `unit` of `table` (shown as `label`): reused when
        complete (and `reuse`), else computed, saved and made current."""
        ...


def order(stages: list[Stage], earlier: Collection[str] = ()) -> list[Stage]:
    """Parents before children, keeping the declared order among independent stages. A parent named in
    `earlier` (run by an earlier `execute` on the same context) need not be in the list."""
    by_name = {s.name: s for s in stages}
    if len(by_name) != len(stages):
        raise ValueError(f"stage names repeat: {[s.name for s in stages]}")
    done: list[Stage] = []
    seen: set[str] = set()
    visiting: set[str] = set()

    def visit(stage: Stage) -> None:
        if stage.name in seen:
            return
        if stage.name in visiting:
            raise ValueError(f"stage cycle through '{stage.name}'")
        visiting.add(stage.name)
        for parent in stage.parents:
            if parent in earlier and parent not in by_name:
                continue
            if parent not in by_name:
                raise ValueError(f"stage '{stage.name}' names an unknown parent '{parent}'")
            visit(by_name[parent])
        visiting.discard(stage.name)
        seen.add(stage.name)
        done.append(stage)

    for stage in stages:
        visit(stage)
    return done


def stage_key(stage: Stage, ctx: Context) -> str:
    """The stage's key: its table, code version, spec and its parents' keys, laid out as `stage.layout` says.

    - `nested`: {stage, version, spec, parents};
    - `flat`: {stage, version, **spec}; the spec is a mapping that names its parents' keys itself;
    - `chained`: [*parents' keys, *spec]; the spec is a list (policy eval's `eval_results`);
    - `parent`: the key of its one parent (its spec is not read).
    """
    parents = [ctx.keys[p] for p in stage.parents]
    if stage.layout == "parent":
        (parent,) = parents
        return parent
    spec = stage.spec(ctx)
    if stage.layout == "flat":
        return stable_hash({"stage": stage.writes, "version": stage.version, **spec})
    if stage.layout == "chained":
        return stable_hash([*parents, *spec])
    return stable_hash({"stage": stage.writes, "version": stage.version, "spec": spec, "parents": parents})


def execute(stages: list[Stage], ctx: Context, run: Materializer) -> set[str]:
    """Run every stage in order through `run`; returns the names of the stages left incomplete.

    A command that must act between stages (policy eval frees a policy before its judge is loaded) calls
    `execute` more than once on one context: a later list's stages may name the earlier ones as parents."""
    incomplete = ctx.incomplete
    for stage in order(stages, set(ctx.keys)):
        key = stage_key(stage, ctx)
        ctx.keys[stage.name] = key
        upstream_ok = not incomplete.intersection(stage.parents)

        def compute(stats: StageStats, stage: Stage = stage, upstream_ok: bool = upstream_ok) -> StageOutput:
            out = stage.compute(ctx, stats)
            out.complete = out.complete and upstream_ok
            return out

        # Where and under what label: only a stage that writes another table or folder says (`Stage.table`).
        where = {} if stage.table is None and stage.unit is None else {"unit": stage.unit, "label": stage.name}
        reuse = True if stage.reuse is None else stage.reuse(ctx)
        ctx.rows[stage.name] = run.materialize(stage.writes, key, compute, sink=stage.sink, reuse=reuse, **where)
        if not upstream_ok or stage.name in run.incomplete:
            incomplete.add(stage.name)
    return incomplete
