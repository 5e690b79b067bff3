"""The `samples` stage: the policy's answers to the prompts, one row per (prompt, sample index).

Also the one builder of a generation row (`generation_row`: references, samples and policy eval's
`eval_outputs` all start from it) and the reading of samples that judges and scores share
(`text_representatives`, `distinct_samples`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from factory.config.sample_sources import ImportedSamples
from factory.core.keys import stable_hash
from factory.models.registry import model_identity
from factory.models.requests import Call, GenerationCaller
from factory.pipeline.stage import Context, PlannedStage, Stage, StageOutput, StageStats
from factory.stages.imported import content_key, imported_rows, read_imports
from factory.stages.prompts import read_prompt_source

if TYPE_CHECKING:
    from factory.config.labeling import SamplesSpec
    from factory.config.sample_sources import PolicySamples


def generation_calls(
    prompts: list[dict[str, Any]], identity: dict[str, Any], params: Any, seed: int, n: int
) -> list[Call]:
    """One call per (prompt, sample index); the backend groups a prompt's indices into one n-sample call."""
    calls = []
    make = GenerationCaller(identity, params, seed)
    for p in prompts:
        calls += make.calls(json.loads(p["messages"]), range(n), {"prompt_id": p["prompt_id"]}, "sample_index")
    return calls


def generation_row(call: Call, result: dict[str, Any] | None) -> dict[str, Any]:
    """The fields every generation row has: the text (None unless the call succeeded), finish reason (`error`
    for a failed call), request key, error, token counts and latency."""
    r = result or {}
    ok = r.get("status") == "ok"
    return {
        "text": r.get("text") if ok else None,
        "finish_reason": r.get("finish_reason") if ok else "error",
        "request_key": call.key,
        "error": None if ok else (r.get("error") or "no result"),
        "tokens_in": r.get("tokens_in"),
        "tokens_out": r.get("tokens_out"),
        "latency_s": r.get("latency_s"),
    }


def sample_rows(
    calls: list[Call], results: dict[str, dict[str, Any]], spec: SamplesSpec | PolicySamples
) -> StageOutput:
    """The policy's outputs; a failed call is a row with finish_reason `error`."""
    rows = []
    for c in calls:
        r = results.get(c.key, {})
        rows.append(
            {
                "sample_id": c.key[:16],
                "prompt_id": c.meta["prompt_id"],
                "policy": spec.policy,
                "sample_index": c.meta["sample_index"],
                "n_tokens": r.get("tokens_out"),
                "n_prompt_tokens": r.get("tokens_in"),
                **generation_row(c, r),
            }
        )
    return StageOutput(rows, {"failed": sum(r["error"] is not None for r in rows)})


def text_representatives(samples: list[dict[str, Any]]) -> dict[str, str]:
    """For every good sample, the sample that stands for its text: the lowest sample index of the prompt's
    samples with exactly that text. Identical samples are one candidate (as the paper keys candidates by
    text): the text is judged and scored once, and a sample is never paired with its own copy."""
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for s in sorted((s for s in samples if s["error"] is None), key=lambda s: (s["prompt_id"], s["sample_index"])):
        first.setdefault((s["prompt_id"], s["text"]), s)
    return {s["sample_id"]: first[(s["prompt_id"], s["text"])]["sample_id"] for s in samples if s["error"] is None}


def distinct_samples(samples: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per prompt, the ids of its distinct good samples (`text_representatives`) in sample-index order."""
    representative = text_representatives(samples)
    out: dict[str, list[str]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: (s["prompt_id"], s["sample_index"])):
        if s["error"] is None and representative[s["sample_id"]] == s["sample_id"]:
            out[s["prompt_id"]].append(s["sample_id"])
    return out


def _imports(ctx: Context) -> dict[str, Any]:
    """The recipe's import sources, read once per build over all its prompts (`Build` reads them before the
    run; a context without them, such as a dry run, reads them here)."""
    if "imports" not in ctx.outputs:
        prompt_output, raw = read_prompt_source(ctx.loaded)
        ctx.outputs["imports"] = read_imports(ctx.loaded, prompt_output.rows, raw)
    return ctx.outputs["imports"]


def _one_policy(ctx: Context) -> Any:
    """The recipe's only sample source when it is one policy (whichever form): its spec and key are what
    they were before lists of sources existed, so its warehouse is reused."""
    sources = ctx.recipe.sample_sources
    return sources[0] if len(sources) == 1 and not ctx.recipe.imports else None


def _samples_spec(ctx: Context) -> Any:
    one = _one_policy(ctx)
    if one is not None:
        return [one.model_dump(), model_identity(ctx.recipe.models[one.policy])]
    prompt_ids = [p["prompt_id"] for p in ctx.outputs["prompt_output"].rows]
    spec = []
    for s in ctx.recipe.sample_sources:
        if isinstance(s, ImportedSamples):
            spec.append(content_key(s, prompt_ids, _imports(ctx)[s.imported]))
        else:
            spec.append([s.model_dump(), model_identity(ctx.recipe.models[s.policy])])
    return spec


def _samples(ctx: Context, st: StageStats) -> StageOutput:
    prompts = ctx.rows["prompts"]
    offsets = {p["prompt_id"]: 0 for p in prompts}
    rows: list[dict[str, Any]] = []
    failed = 0
    notes: dict[str, Any] = {}
    seen: set[str] = set()
    for position, s in enumerate(ctx.recipe.sample_sources):
        if isinstance(s, ImportedSamples):
            source = _imports(ctx)[s.imported]
            rows += imported_rows(s, list(offsets), source, offsets)
            if ctx.outputs.get("first_prompt_id") in offsets:  # the build's facts, once: in its first shard
                notes.setdefault("imports", {})[s.imported] = source.notes()
            continue
        identity = model_identity(ctx.recipe.models[s.policy])
        calls = generation_calls(prompts, identity, s.params, s.seed, s.n)
        out = sample_rows(calls, ctx.call(s.policy, "samples", calls, st), s)
        for row in out.rows:  # indices run on across sources; the request key keeps the policy's own index
            row["sample_index"] += offsets[row["prompt_id"]]
            if row["request_key"] in seen:
                # Two model names with one identity ask the same requests: the same answers, which are merged
                # as copies of one text, but each row needs its own id.
                row["sample_id"] = stable_hash([row["request_key"], position], 16)
            seen.add(row["request_key"])
        for p in prompts:
            offsets[p["prompt_id"]] += s.n
        rows += out.rows
        failed += out.notes["failed"]
    out = StageOutput(rows, {"failed": failed, **notes})
    out.complete = not failed
    return out


def samples_per_prompt(ctx: Context) -> list[int] | None:
    """Each prompt's samples as a plan counts them: every policy's `n`, plus the completions the imports hold
    for it (None for the imports' share when the prompts are not at hand: a Hub dataset)."""
    n = sum(p.n for p in ctx.recipe.policies)
    if not ctx.recipe.imports:
        return [n]
    if "prompts" not in ctx.rows:
        return None
    sources = _imports(ctx).values()
    counts = [n + sum(len(set(s.completions.get(p["prompt_id"], []))) for s in sources) for p in ctx.rows["prompts"]]
    return counts


def _plan_samples(ctx: Context, n: int | None) -> list[PlannedStage]:
    chars = ctx.outputs.get("instruction_chars")
    planned = []
    for s in ctx.recipe.policies:
        per = None if n is None else n * s.n
        approx = None if per is None or chars is None else int(per * chars / 4)
        tokens = None if per is None else per * s.params.max_tokens
        planned.append(PlannedStage("samples", s.policy, per, tokens, approx, f"{s.n} per prompt"))
    for imp in ctx.recipe.imports:
        planned.append(PlannedStage("samples", None, 0, 0, 0, f"imported '{imp.imported}': no model call"))
    return planned


SAMPLES = Stage("samples", ("prompts",), _samples_spec, _samples, plan=_plan_samples)
