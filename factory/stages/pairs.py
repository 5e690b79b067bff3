"""The `pairs` stage: best versus worst sample per prompt, by score."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from factory.pipeline.stage import Context, Stage, StageOutput, StageStats
from factory.stages.samples import text_representatives

if TYPE_CHECKING:
    from factory.config.labeling import PairsSpec


def pair_rows(samples: list[dict[str, Any]], scores: list[dict[str, Any]], spec: PairsSpec) -> StageOutput:
    """Best-vs-worst per prompt, after dropping over-length samples; ties and thin prompts are counted."""
    sample_by_id = {s["sample_id"]: s for s in samples}
    representative = text_representatives(samples)
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    over_length = 0
    for sc in scores:
        s = sample_by_id[sc["sample_id"]]
        if representative.get(s["sample_id"], s["sample_id"]) != s["sample_id"]:
            continue  # a copy of another sample's text: that sample stands for it
        if spec.max_tokens is not None and (s["n_prompt_tokens"] or 0) + (s["n_tokens"] or 0) > spec.max_tokens:
            over_length += 1
            continue
        by_prompt[sc["prompt_id"]].append(sc)
    rows = []
    too_few = ties = 0
    for prompt_id, group in by_prompt.items():
        if len(group) < 2:
            too_few += 1
            continue
        # Sort by score, then by sample index, so equal scores pick the same pair on every run.
        group.sort(key=lambda sc: (-sc["score"], sample_by_id[sc["sample_id"]]["sample_index"]))
        best, worst = group[0], group[-1]
        margin = best["score"] - worst["score"]
        if margin <= spec.min_margin:
            ties += 1
            continue
        rows.append(
            {
                "prompt_id": prompt_id,
                "chosen_sample_id": best["sample_id"],
                "rejected_sample_id": worst["sample_id"],
                "chosen_score": best["score"],
                "rejected_score": worst["score"],
                "margin": margin,
            }
        )
    notes = {"over_length_samples": over_length, "too_few_samples": too_few, "ties_or_small_margin": ties}
    return StageOutput(rows, notes)


def _pairs(ctx: Context, st: StageStats) -> StageOutput:
    return pair_rows(ctx.rows["samples"], ctx.rows["scores"], ctx.recipe.pairs)


def _pairs_spec(ctx: Context) -> Any:
    return ctx.recipe.pairs.model_dump()


# version 2: a sample whose text repeats another's is never chosen or rejected in its place.
PAIRS = Stage("pairs", ("samples", "scores"), _pairs_spec, _pairs, 2)
