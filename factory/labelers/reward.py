"""The `rewards` labeler: a reward model (a sequence classifier) scores each sample; a baseline. Its one
stage writes `scores`."""

from __future__ import annotations

import json
from typing import Any

from factory.labelers.labeler import Labeler
from factory.models.registry import model_identity
from factory.models.requests import Call, reward_call
from factory.pipeline.stage import Context, PlannedStage, Stage, StageOutput, StageStats


def reward_calls(prompts: list[dict[str, Any]], samples: list[dict[str, Any]], identity: dict[str, Any]) -> list[Call]:
    """One reward-model call per good sample: the prompt's messages plus the sample as the assistant turn."""
    messages = {p["prompt_id"]: json.loads(p["messages"]) for p in prompts}
    calls = []
    for s in samples:
        if s["error"] is not None:
            continue
        conversation = [*messages[s["prompt_id"]], {"role": "assistant", "content": s["text"]}]
        calls.append(reward_call(identity, conversation, sample_id=s["sample_id"], prompt_id=s["prompt_id"]))
    return calls


def reward_score_rows(calls: list[Call], results: dict[str, dict[str, Any]]) -> StageOutput:
    """A sample's score is its reward; samples whose call failed get no score (and are counted)."""
    rows = []
    for c in calls:
        r = results.get(c.key)
        if r is None or r.get("status") != "ok":
            continue
        rows.append({**c.meta, "labeler": "rewards", "score": r["reward"], "n_comparisons": None, "wins": None})
    return StageOutput(rows, {"unscored_samples": len(calls) - len(rows)})


def _rewards_spec(ctx: Context) -> Any:
    r = ctx.recipe
    return [r.rewards.model_dump(), model_identity(r.models[r.rewards.model])]


def _reward_scores(ctx: Context, st: StageStats) -> StageOutput:
    r = ctx.recipe
    calls = reward_calls(ctx.rows["prompts"], ctx.rows["samples"], model_identity(r.models[r.rewards.model]))
    out = reward_score_rows(calls, ctx.call(r.rewards.model, "scores", calls, st))
    out.complete = not out.notes["unscored_samples"]
    return out


def _plan_rewards(ctx: Context, n_prompts: int | None) -> list[PlannedStage]:
    r = ctx.recipe
    calls = None if n_prompts is None else n_prompts * sum(p.n for p in r.policies)
    return [PlannedStage("scores", r.rewards.model, calls, 0, None, "reward model")]


REWARD = Labeler(
    name="rewards",
    summary="a reward model (sequence classifier, ArmoRM-class) scores each sample (a baseline)",
    model_field="model",
    role="reward",
    stages=lambda: [Stage("scores", ("prompts", "samples"), _rewards_spec, _reward_scores, plan=_plan_rewards)],
    provenance=lambda r: {"judge": r.rewards.model, "protocol": "reward-model", "reference_name": None},
    card_line=lambda r: (
        f"- Labeler: reward model `{r.rewards.model}` ({r.models[r.rewards.model].model}); score = reward"
    ),
)
