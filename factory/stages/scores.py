"""The judge's `scores` stage: each sample's score from its judgments (all pairs, the paper's pooling, or
the adaptive schedule's estimate). The reward and similarity labelers write `scores` their own way
(`factory.labelers.reward`, `factory.labelers.similarity`)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from factory.judge.adaptive import Adaptive
from factory.pipeline.stage import Context, Stage, StageOutput, StageStats
from factory.stages.judgments import pair_probability, schedule_seed
from factory.stages.samples import distinct_samples, text_representatives


def score_rows(samples: list[dict[str, Any]], judgments: list[dict[str, Any]], scoring: str) -> StageOutput:
    """A sample's score: the mean of its win probabilities over every comparison it appears in."""
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for j in judgments:
        by_pair[(j["sample_a"], j["sample_b"])].append(j)
    probs: dict[str, list[float]] = defaultdict(list)
    wins: dict[str, int] = defaultdict(int)
    for (sample_a, sample_b), votes in by_pair.items():
        p, winner = pair_probability(votes, scoring)
        if p is None:
            continue
        probs[sample_a].append(p)
        probs[sample_b].append(1.0 - p)
        if winner is not None:
            wins[sample_a if winner == "a" else sample_b] += 1
    representative = text_representatives(samples)
    rows = []
    for s in samples:
        rep = representative.get(s["sample_id"], s["sample_id"])  # a copy carries its text's score
        ps = probs.get(rep)
        if not ps:
            continue
        rows.append(
            {
                "sample_id": s["sample_id"],
                "prompt_id": s["prompt_id"],
                "labeler": "judgments",
                "score": sum(ps) / len(ps),
                "n_comparisons": len(ps),
                "wins": wins[rep],
            }
        )
    return StageOutput(rows, {"unscored_samples": len(samples) - len(rows)})


def paper_score_rows(samples: list[dict[str, Any]], judgments: list[dict[str, Any]], scoring: str) -> StageOutput:
    """Scores as the paper's data_processing.py computes them (`pooling: paper`), from the merged judgments.

    The paper judges every ordered pair of sample indices (scoring.py:141-144) and appends both sides' soft
    scores to a list per text (data_processing.py:108-119), so a text's score is a mean over its copies'
    comparisons. The same numbers, without the calls whose answers are known:

    - a copy shows the judge the same messages as the sample that stands for its text, so a judged ordered
      pair (a, b) counts m(a)·m(b) times, m being the number of samples with that text;
    - a copy against a copy of its own text puts both of the judgment's scores on that text, and they sum to
      1 whatever the judge says (data_processing.py:76-99), so the m(m−1) ordered copy pairs add 2·m(m−1)
      entries that sum to m(m−1): asked of no model;
    - an unparsed judgment counts (the soft score `verdict_fields` gave it under this pooling; ½ under
      `scoring: verdict`). Failed calls count nothing: the run is incomplete, and the next one retries them.

    A text with no judged comparison stays unscored. `n_comparisons` is the number of entries averaged;
    `wins` counts the weighted comparisons whose verdict named the text (copy pairs name none).
    """
    representative = text_representatives(samples)
    copies: dict[str, int] = defaultdict(int)
    for rep in representative.values():
        copies[rep] += 1
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for j in judgments:
        by_pair[(j["sample_a"], j["sample_b"])].append(j)
    total: dict[str, float] = defaultdict(float)
    entries: dict[str, int] = defaultdict(int)
    wins: dict[str, int] = defaultdict(int)
    for (sample_a, sample_b), votes in by_pair.items():
        p, winner = pair_probability(votes, scoring)
        if p is None and any(v["parse_status"] != "error" for v in votes):
            p = 0.5  # answered, but without a verdict to read: the paper's ½ for both sides
        if p is None:
            continue
        weight = copies[sample_a] * copies[sample_b]
        total[sample_a] += weight * p
        total[sample_b] += weight * (1.0 - p)
        entries[sample_a] += weight
        entries[sample_b] += weight
        if winner is not None:
            wins[sample_a if winner == "a" else sample_b] += weight
    for rep in list(entries):
        pairs_of_copies = copies[rep] * (copies[rep] - 1)
        total[rep] += pairs_of_copies
        entries[rep] += 2 * pairs_of_copies
    rows = []
    for s in samples:
        rep = representative.get(s["sample_id"])
        if rep is None or not entries.get(rep):
            continue
        rows.append(
            {
                "sample_id": s["sample_id"],
                "prompt_id": s["prompt_id"],
                "labeler": "judgments",
                "score": total[rep] / entries[rep],
                "n_comparisons": entries[rep],
                "wins": wins[rep],
            }
        )
    return StageOutput(rows, {"unscored_samples": len(samples) - len(rows), "pooling": "paper"})


def replay_schedules(samples: list[dict[str, Any]], judgments: list[dict[str, Any]], scoring: str) -> dict[str, Any]:
    """Each prompt's adaptive schedule, replayed from its stored judgments (the pairs a schedule asks depend
    only on its samples, its seed and the answers, so the replay asks exactly what the build asked)."""
    votes: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for j in judgments:
        votes[(j["sample_a"], j["sample_b"])].append(j)
    out = {}
    for prompt_id, ids in distinct_samples(samples).items():
        schedule = Adaptive(ids, seed=schedule_seed(prompt_id))
        while pairs := schedule.next_round():
            for a, b in pairs:
                found = votes.get((a, b))
                schedule.record(a, b, pair_probability(found, scoring)[0] if found else None)
        out[prompt_id] = schedule
    return out


def adaptive_score_rows(samples: list[dict[str, Any]], judgments: list[dict[str, Any]], scoring: str) -> StageOutput:
    """Scores under the adaptive schedule: each sample's estimate of its all-pairs score (its judged
    comparisons plus predictions for those not asked; `factory.judge.schedule`), so best-vs-worst picks the pair
    the schedule settled on. A copy of another sample's text takes that sample's score."""
    # One fit per prompt: `scores()` refits the schedule's model each time it is called.
    by_prompt = {pid: schedule.scores() for pid, schedule in replay_schedules(samples, judgments, scoring).items()}
    representative = text_representatives(samples)
    rows = []
    for s in samples:
        rep = representative.get(s["sample_id"])
        score = by_prompt.get(s["prompt_id"], {}).get(rep) if rep is not None else None
        if score is None or not score.n_comparisons:
            continue
        rows.append(
            {
                "sample_id": s["sample_id"],
                "prompt_id": s["prompt_id"],
                "labeler": "judgments",
                "score": score.score,
                "n_comparisons": score.n_comparisons,
                "wins": score.wins,
            }
        )
    return StageOutput(rows, {"unscored_samples": len(samples) - len(rows), "schedule": "adaptive"})


def _judge_scores(ctx: Context, st: StageStats) -> StageOutput:
    j = ctx.recipe.judging
    if j.schedule == "adaptive":
        return adaptive_score_rows(ctx.rows["samples"], ctx.rows["judgments"], j.scoring)
    if j.pooling == "paper":
        return paper_score_rows(ctx.rows["samples"], ctx.rows["judgments"], j.scoring)
    return score_rows(ctx.rows["samples"], ctx.rows["judgments"], j.scoring)


def _scores_spec(ctx: Context) -> dict[str, str]:
    j = ctx.recipe.judging
    spec = {"scoring": j.scoring, "schedule": j.schedule}
    if j.pooling != "merged":  # only when set, so the key of a recipe that leaves it unset is unchanged
        spec["pooling"] = j.pooling
    return spec


JUDGE_SCORES = Stage("scores", ("samples", "judgments"), _scores_spec, _judge_scores, version=2)
