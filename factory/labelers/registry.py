"""Labelers: what turns a policy's samples into scores, and every fact about each one.

A labeler is a recipe section (`judgments`, `rewards`, `similarity`) that adds stages ending in a `scores`
table, names the model it calls and the role that model must play, and says how the export's provenance
columns, the dataset card and the dry-run plan describe it. The build, the export and the CLI read these
facts from `LABELERS`; the recipe schema checks the same sections from `factory/config/vocabulary.py`
(tests/test_vocabulary.py holds them equal), so adding a labeler touches both files and their tests.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.config.vocabulary import CUSTOM, Role
from factory.core.errors import UserInputError
from factory.core.reading import read_input_text
from factory.judge.protocols import Protocol, custom_protocol, get_protocol, with_template
from factory.models.registry import model_identity
from factory.pipeline.stage import Context, PlannedStage, Stage, StageOutput, StageStats
from factory.stages import rows as stages

if TYPE_CHECKING:
    from factory.config.recipe import LoadedRecipe, Recipe


@dataclass(frozen=True)
class Labeler:
    """One way to score samples, declared as data."""

    name: str
    """The recipe section, and the `labeler` value of its rows in `scores`."""
    summary: str
    """One line for `--help` and docs."""
    model_field: str | None
    """The field of its section that names a model (None: it calls no model)."""
    role: Role | None
    """What that model must be able to do."""
    stages: Callable[[], list[Stage]]
    """The stages it adds after `samples`; the last one writes `scores`."""
    provenance: Callable[[Recipe], dict[str, str | None]]
    """The export's `judge`, `protocol` and `reference_name` columns."""
    card_line: Callable[[Recipe], str]
    """How the dataset card names it."""
    card_facts: Callable[[Context], tuple[list[tuple[str, int]], list[str]]] = lambda ctx: ([], [])
    """Extra rows for the card's counts table, and lines for its scores section."""


# ------------------------------------------------------------------------------------------------- judge


def judge_protocol(loaded: LoadedRecipe) -> Protocol:
    """The recipe's judge protocol (checked up front): a built-in one, a `custom` one read from its template
    file, or a built-in one worded by its template file (`factory.judge.protocols.with_template`)."""
    j = loaded.recipe.judgments
    assert j is not None
    if j.template is None:
        protocol = get_protocol(j.protocol)
        return protocol.unprefilled() if j.prefill == "none" else protocol
    path = loaded.resolve(j.template)
    where = loaded.where("judgments", "template")
    try:
        text = read_input_text(path, "judge template file")
    except UserInputError as exc:
        raise UserInputError(f"{where}: {exc}") from None
    named = f"{where} ({path.name})"
    if j.protocol != CUSTOM:
        protocol = with_template(get_protocol(j.protocol), text, named)
        return protocol.unprefilled() if j.prefill == "none" else protocol
    protocol = custom_protocol(text, prefill="" if j.prefill == "none" else "Output (", where=named)
    if protocol.uses_reference != bool(j.reference_names):
        need = "uses {reference}, so set" if protocol.uses_reference else "has no {reference}, so remove"
        raise UserInputError(f"{loaded.where('judgments', 'reference')}: the template {need} 'judgments.reference'")
    return protocol


def _judgments_spec(ctx: Context) -> Any:
    j = ctx.recipe.judgments
    # The prompt text is in the key, so editing a protocol's wording (or a custom file) re-judges.
    protocol = judge_protocol(ctx.loaded)
    return [j.model_dump(), protocol.template, protocol.system, model_identity(ctx.recipe.models[j.judge])]


def _judgments(ctx: Context, st: StageStats) -> StageOutput:
    j = ctx.recipe.judgments
    protocol = judge_protocol(ctx.loaded)
    identity = model_identity(ctx.recipe.models[j.judge])
    calls, notes = stages.judge_calls(
        ctx.rows["prompts"], ctx.rows["samples"], ctx.rows["references"], j, protocol, identity
    )
    if j.schedule == "adaptive":
        out = _adaptive_judgments(ctx, st, calls, protocol)
    else:
        out = stages.judgment_rows(calls, ctx.call(j.judge, "judgments", calls, st), j, protocol)
        for row in out.rows:
            row.update(schedule="all-pairs", schedule_round=1)
    out.notes.update(notes)
    out.complete = not out.notes["parse_status"].get("error", 0)
    return out


def _adaptive_judgments(ctx: Context, st: StageStats, calls: list[Any], protocol: Any) -> StageOutput:
    """Judge round by round, every prompt's schedule in lockstep: each round's calls go to the judge as one
    batch, and its answers decide the next round's pairs (`factory.judge.adaptive.Adaptive`)."""
    from factory.judge.adaptive import Adaptive

    j = ctx.recipe.judgments
    by_pair: dict[tuple[str, str], list[Any]] = {}
    for c in calls:  # all-pairs calls in both orders; the schedule picks among them (one per reference)
        by_pair.setdefault((c.meta["sample_a"], c.meta["sample_b"]), []).append(c)
    schedules = {
        pid: Adaptive(ids, seed=stages.schedule_seed(pid))
        for pid, ids in stages.distinct_samples(ctx.rows["samples"]).items()
    }
    rows: list[dict[str, Any]] = []
    while True:
        asked = [(s, a, b) for s in schedules.values() for a, b in s.next_round()]
        if not asked:
            break
        batch = [c for _, a, b in asked for c in by_pair.get((a, b), [])]
        answered = stages.judgment_rows(batch, ctx.call(j.judge, "judgments", batch, st), j, protocol).rows
        votes: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in answered:
            votes.setdefault((row["sample_a"], row["sample_b"]), []).append(row)
        for schedule, a, b in asked:
            for row in votes.get((a, b), []):
                row.update(schedule="adaptive", schedule_round=schedule.round)
            found = votes.get((a, b))
            schedule.record(a, b, stages.pair_probability(found, j.scoring)[0] if found else None)
        rows += answered
    asked_calls = len(rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["parse_status"]] = counts.get(row["parse_status"], 0) + 1
    notes = {"parse_status": counts, "schedule": "adaptive", "all_pairs_calls": len(calls), "asked": asked_calls}
    return StageOutput(rows, notes)


def _judge_scores(ctx: Context, st: StageStats) -> StageOutput:
    j = ctx.recipe.judgments
    if j.schedule == "adaptive":
        return stages.adaptive_score_rows(ctx.rows["samples"], ctx.rows["judgments"], j.scoring)
    if j.pooling == "paper":
        return stages.paper_score_rows(ctx.rows["samples"], ctx.rows["judgments"], j.scoring)
    return stages.score_rows(ctx.rows["samples"], ctx.rows["judgments"], j.scoring)


def _scores_spec(ctx: Context) -> dict[str, str]:
    j = ctx.recipe.judgments
    spec = {"scoring": j.scoring, "schedule": j.schedule}
    if j.pooling != "merged":  # only when set, so the key of a recipe that leaves it unset is unchanged
        spec["pooling"] = j.pooling
    return spec


def _plan_judgments(ctx: Context, n_prompts: int | None) -> list[PlannedStage]:
    r = ctx.recipe
    s, j = r.samples, r.judgments
    protocol = judge_protocol(ctx.loaded)
    pairs = s.n * (s.n - 1) // (1 if j.orders == "both" else 2)
    votes = max(1, len(j.reference_names))  # each reference that votes is one more judgment per pair
    chars = ctx.outputs.get("instruction_chars")
    ref = next((x for x in r.references if x.name in j.reference_names), None)
    ref_tokens = 0.0
    if ref is not None and ref.kind == "model":
        ref_tokens = ref.params.max_tokens
    elif ref is not None and chars is not None:
        field = r.column_field(ref)
        columns = [json.loads(p["reference_fields"]) for p in ctx.rows.get("prompts", [])]
        ref_tokens = sum(len(c.get(field) or "") for c in columns) / max(len(columns), 1) / 4
    each = len(protocol.template) / 4 + 2 * s.params.max_tokens + (ref_tokens if protocol.uses_reference else 0)
    per = None if n_prompts is None else n_prompts * pairs * votes
    # Without the instructions at hand (a Hub dataset) the estimate counts everything but them.
    approx = None if per is None else int(per * (each + (chars or 0) / 4))
    note = f"{pairs} ordered pairs per prompt, protocol {j.protocol}"
    if j.schedule == "adaptive":
        note = f"at most {pairs} ordered pairs per prompt (adaptive asks fewer), protocol {j.protocol}"
    if j.template is not None:
        note += f", worded by {Path(j.template).name}"
    note += "" if chars is not None else "; input tokens exclude the instructions"
    return [PlannedStage("judgments", j.judge, per, None if per is None else per * j.generation_tokens, approx, note)]


def _judge_provenance(r: Recipe) -> dict[str, str | None]:
    j = r.judgments
    return {"judge": j.judge, "protocol": j.protocol, "reference_name": "+".join(j.reference_names) or None}


def _judge_card_line(r: Recipe) -> str:
    j = r.judgments
    protocol = j.protocol if j.protocol == CUSTOM else f"{j.protocol} ({get_protocol(j.protocol).description})"
    if j.template is not None:
        protocol += f", worded by the template file {Path(j.template).name}"
    return (
        f"- Judge: `{j.judge}` ({r.models[j.judge].model}), protocol `{protocol}`, reference "
        f"`{j.reference}`, orders `{j.orders}`, scoring `{j.scoring}`, schedule `{j.schedule}`, prefill "
        f"`{j.prefill}`, markers `{j.markers}`, top-{j.top_logprobs} log-probabilities"
        + (" (pooling `paper`: scores averaged as the paper's data_processing.py does)" if j.pooling == "paper" else "")
        + (
            " (adaptive scores estimate each sample's all-pairs score from fewer comparisons)"
            if j.schedule == "adaptive"
            else ""
        )
    )


def position_consistency(judgments: list[dict[str, Any]]) -> tuple[float | None, int]:
    """Share of sample pairs judged in both orders whose two parsed verdicts name the same winner."""
    winners: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for j in judgments:
        if j["verdict"] not in ("a", "b"):
            continue
        pair = (*sorted((j["sample_a"], j["sample_b"])), j.get("reference_name") or "")
        winners[pair].append(j["sample_a"] if j["verdict"] == "a" else j["sample_b"])
    both = [w for w in winners.values() if len(w) == 2]
    if not both:
        return None, 0
    return sum(w[0] == w[1] for w in both) / len(both), len(both)


def _judge_card_facts(ctx: Context) -> tuple[list[tuple[str, int]], list[str]]:
    judgments = ctx.rows.get("judgments", [])
    status: dict[str, int] = defaultdict(int)
    for j in judgments:
        status[j["parse_status"]] += 1
    counts = [("judgments", len(judgments))]
    counts += [(f"judgments with parse status `{k}`", v) for k, v in sorted(status.items())]
    consistency, n_both = position_consistency(judgments)
    shown = "n/a" if consistency is None else f"{consistency:.3f}"
    return counts, [f"- Position consistency (same winner in both orders): {shown} over {n_both} pairs"]


# ------------------------------------------------------------------------------------------------ reward


def _rewards_spec(ctx: Context) -> Any:
    r = ctx.recipe
    return [r.rewards.model_dump(), model_identity(r.models[r.rewards.model])]


def _reward_scores(ctx: Context, st: StageStats) -> StageOutput:
    r = ctx.recipe
    calls = stages.reward_calls(ctx.rows["prompts"], ctx.rows["samples"], model_identity(r.models[r.rewards.model]))
    out = stages.reward_score_rows(calls, ctx.call(r.rewards.model, "scores", calls, st))
    out.complete = not out.notes["unscored_samples"]
    return out


def _plan_rewards(ctx: Context, n_prompts: int | None) -> list[PlannedStage]:
    r = ctx.recipe
    calls = None if n_prompts is None else n_prompts * r.samples.n
    return [PlannedStage("scores", r.rewards.model, calls, 0, None, "reward model")]


# -------------------------------------------------------------------------------------------- similarity


def _similarity_scores(ctx: Context, st: StageStats) -> StageOutput:
    sim = ctx.recipe.similarity
    return stages.similarity_score_rows(ctx.rows["samples"], ctx.rows["references"], sim.reference)


LABELERS: dict[str, Labeler] = {
    "judgments": Labeler(
        name="judgments",
        summary="a pairwise LLM judge compares every ordered pair of a prompt's samples (the method)",
        model_field="judge",
        role="judge",
        stages=lambda: [
            # version 2: identical samples merged, system turns, decoding switches recorded in rows.
            Stage(
                "judgments",
                ("prompts", "samples", "references"),
                _judgments_spec,
                _judgments,
                version=2,
                plan=_plan_judgments,
            ),
            Stage(
                "scores",
                ("samples", "judgments"),
                _scores_spec,
                _judge_scores,
                version=2,
            ),
        ],
        provenance=_judge_provenance,
        card_line=_judge_card_line,
        card_facts=_judge_card_facts,
    ),
    "rewards": Labeler(
        name="rewards",
        summary="a reward model (sequence classifier, ArmoRM-class) scores each sample (a baseline)",
        model_field="model",
        role="reward",
        stages=lambda: [Stage("scores", ("prompts", "samples"), _rewards_spec, _reward_scores, plan=_plan_rewards)],
        provenance=lambda r: {"judge": r.rewards.model, "protocol": "reward-model", "reference_name": None},
        card_line=lambda r: (
            f"- Labeler: reward model `{r.rewards.model}` ({r.models[r.rewards.model].model}); score = reward"
        ),
    ),
    "similarity": Labeler(
        name="similarity",
        summary="ROUGE-L F1 of each sample against the reference (the lexical baseline); no model",
        model_field=None,
        role=None,
        stages=lambda: [
            Stage(
                "scores",
                ("samples", "references"),
                lambda ctx: ctx.recipe.similarity.model_dump(),
                _similarity_scores,
                plan=lambda ctx, n: [PlannedStage("scores", None, 0, 0, 0, "ROUGE-L, no model")],
            )
        ],
        provenance=lambda r: {"judge": None, "protocol": r.similarity.metric, "reference_name": r.similarity.reference},
        card_line=lambda r: f"- Labeler: {r.similarity.metric} against reference `{r.similarity.reference}`",
    ),
}


def labeler_of(recipe: Recipe) -> Labeler | None:
    """The recipe's labeler, if it has samples to label."""
    return LABELERS[recipe.labeler] if recipe.labeler else None
