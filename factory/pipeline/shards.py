"""Shards: a build's prompts cut into slices of a fixed size that flow through every stage one slice at a
time, so a build holds one shard's rows, never a whole table's (docs/DESIGN.md, "Shards").

Every stage of a build reads and writes rows of one prompt at a time (a prompt's samples, their pairs, their
scores), so shard `i` of a stage depends only on shard `i` of its parents. Each shard of each stage is its
own version file, keyed like a whole stage (`stage_key`) from the shard's own prompts up; the stage's
pointer lists the shard files in order. Hence:

- memory follows the shard size, not the prompt count: a shard's rows are dropped before the next one;
- a reused shard is not read unless a stage below it has work to do (an unchanged rebuild reads nothing);
- prompts added at the end of the source change the last shard and add new ones: the others are reused;
- a build of one shard (up to `run.shard_prompts` prompts, 1,000 by default) has the keys a build had
  before there were shards.

Sinks (the export) run after the last shard, on the whole stages: they read back shard by shard
(`Context.shard_table`); the export takes a shard it already holds unchanged as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from factory.core.keys import stable_hash
from factory.pipeline.run import Run
from factory.pipeline.stage import Context, Stage, StageOutput, StageStats, execute, order, stage_key


@dataclass
class Shard:
    """One shard's prompt rows, held as Arrow between shards (a third of their size as dicts), and the
    source's counts for the first one."""

    prompts: pa.Table
    notes: dict[str, Any] = field(default_factory=dict)

    def output(self) -> StageOutput:
        """The shard's rows as the `prompts` stage hands them on."""
        return StageOutput(self.prompts.to_pylist(), dict(self.notes))


def cut(prompts: StageOutput, size: int) -> list[Shard]:
    """The prompt rows in consecutive shards of `size` (the last one shorter); the source's counts (rows
    read, duplicates, empty) go with the first. The rows are moved out of `prompts` as they are cut."""
    if size < 1:
        raise ValueError(f"a shard holds at least one prompt, not {size}")
    rows, prompts.rows = prompts.rows, []
    shards = []
    for start in range(0, max(len(rows), 1), size):
        shards.append(Shard(pa.Table.from_pylist(rows[start : start + size])))
        rows[start : start + size] = [None] * len(rows[start : start + size])  # freed shard by shard
    shards[0].notes = dict(prompts.notes)
    return shards


def whole_key(stage: Stage, keys: Sequence[str]) -> str:
    """A stage's key over its shards: the one shard's key when there is one (so a small build keeps the key
    it had before shards), else a hash of the shard keys in order."""
    if len(keys) == 1:
        return keys[0]
    return stable_hash({"stage": stage.writes, "version": stage.version, "shards": list(keys)})


SHARD_COMPACT_FILES = 1024
"""Between shards, the call cache is compacted once a table has this many small files: a long build's own parts
would otherwise make every listing of the cache slower than the last (the end of the build compacts at 16).
High, so that a merge makes files of about ROWS_PER_FILE rows at a batch size of 256, which are not merged again."""


def execute_sharded(stages: list[Stage], ctx: Context, run: Run, shards: list[Shard]) -> set[str]:
    """Run the stages shard by shard (`shards`: the prompt rows of each, which the `prompts` stage hands on
    as `ctx.outputs["prompt_output"]`), point each stage at its shard files, then run the sinks on the whole
    stages. Returns the names of the stages left incomplete."""
    ordered = order(stages)
    body = [s for s in ordered if not s.sink]
    stats = {s.name: StageStats(s.name, skipped=True) for s in body}
    shard_keys: dict[str, list[str]] = {s.name: [] for s in body}
    compacted_at = run.wh.parts_written  # parts the run had written at its last compaction between shards
    for shard in shards:
        ctx.outputs["prompt_output"] = shard.output()
        ctx.rows.clear()
        keys: dict[str, str] = {}
        ctx.keys = keys
        for stage in body:
            keys[stage.name] = stage_key(stage, ctx)
            shard_keys[stage.name].append(keys[stage.name])
        # Rows are read back only for stages whose children compute (or all of them when a corrupt call file
        # was set aside: each reused shard then checks that its calls are still cached).
        computing = {s.name for s in body if not _reusable(s, ctx, run)}
        wanted = {p for s in body if s.name in computing for p in s.parents}
        shard_incomplete: set[str] = set()
        for stage in body:
            upstream_ok = not shard_incomplete.intersection(stage.parents)
            made: list[StageOutput] = []

            def compute(
                st: StageStats, stage: Stage = stage, upstream_ok: bool = upstream_ok, made: list[StageOutput] = made
            ) -> StageOutput:
                out = stage.compute(ctx, st)
                out.complete = out.complete and upstream_ok
                made.append(out)
                return out

            reuse = True if stage.reuse is None else stage.reuse(ctx)
            read = run.recheck or stage.name in wanted
            rows = run.version(stage.writes, keys[stage.name], compute, stats[stage.name], reuse=reuse, read=read)
            if rows is not None:
                ctx.rows[stage.name] = rows
            if not upstream_ok or any(not out.complete for out in made):
                shard_incomplete.add(stage.name)
        ctx.incomplete |= shard_incomplete
        if shard is not shards[-1] and run.wh.parts_written - compacted_at >= SHARD_COMPACT_FILES:
            run.compact_calls(SHARD_COMPACT_FILES)
            compacted_at = run.wh.parts_written
    ctx.rows.clear()
    ctx.outputs.pop("prompt_output", None)
    ctx.keys = {}
    for stage in body:
        key = whole_key(stage, shard_keys[stage.name])
        ctx.keys[stage.name] = key
        st = stats[stage.name]
        st.stage_key = key
        run.point(stage.writes, key, st, shards=shard_keys[stage.name] if len(shards) > 1 else ())
        run.finish(st)
    ctx.shard_keys = shard_keys
    ctx.read = run.read
    return execute([s for s in ordered if s.sink], ctx, run)


def _reusable(stage: Stage, ctx: Context, run: Run) -> bool:
    """Whether the stage's shard has a complete version the run may reuse (without reading it)."""
    if stage.reuse is not None and not stage.reuse(ctx):
        return False
    return run.wh.has_version(stage.writes, run.recipe, ctx.keys[stage.name])
