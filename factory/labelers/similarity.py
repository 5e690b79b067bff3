"""The `similarity` labeler: ROUGE-L F1 of each sample against a reference (the paper's lexical baseline);
no model. Its one stage writes `scores`."""

from __future__ import annotations

from typing import Any

from factory.labelers.labeler import Labeler
from factory.pipeline.stage import Context, PlannedStage, Stage, StageOutput, StageStats


def similarity_score_rows(
    samples: list[dict[str, Any]], references: list[dict[str, Any]], reference_name: str
) -> StageOutput:
    """A sample's score is its ROUGE-L F1 against the prompt's reference (the paper's lexical baseline)."""
    from rouge_score import rouge_scorer  # light, but only this labeler needs it

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    refs = {
        r["prompt_id"]: r["text"] for r in references if r["reference_name"] == reference_name and r["status"] == "ok"
    }
    rows = []
    for s in samples:
        ref = refs.get(s["prompt_id"])
        if s["error"] is not None or ref is None:
            continue
        score = scorer.score(ref, s["text"])["rougeL"].fmeasure
        row = {"sample_id": s["sample_id"], "prompt_id": s["prompt_id"], "labeler": "similarity", "score": score}
        rows.append({**row, "n_comparisons": None, "wins": None})
    return StageOutput(rows, {"unscored_samples": len(samples) - len(rows)})


def _similarity_scores(ctx: Context, st: StageStats) -> StageOutput:
    sim = ctx.recipe.similarity
    return similarity_score_rows(ctx.rows["samples"], ctx.rows["references"], sim.reference)


def _similarity_spec(ctx: Context) -> Any:
    return ctx.recipe.similarity.model_dump()


def _plan_similarity(ctx: Context, n_prompts: int | None) -> list[PlannedStage]:
    return [PlannedStage("scores", None, 0, 0, 0, "ROUGE-L, no model")]


SIMILARITY = Labeler(
    name="similarity",
    summary="ROUGE-L F1 of each sample against the reference (the lexical baseline); no model",
    model_field=None,
    role=None,
    stages=lambda: [
        Stage("scores", ("samples", "references"), _similarity_spec, _similarity_scores, plan=_plan_similarity)
    ],
    provenance=lambda r: {"judge": None, "protocol": r.similarity.metric, "reference_name": r.similarity.reference},
    card_line=lambda r: f"- Labeler: {r.similarity.metric} against reference `{r.similarity.reference}`",
)
