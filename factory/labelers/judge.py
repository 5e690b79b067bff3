"""The `judgments` labeler: a pairwise LLM judge compares a prompt's samples (the method). Its stages are
`factory.stages.judgments` and `factory.stages.scores`; here are how the export, the card and the report
describe it, and its position consistency."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from factory.config.vocabulary import CUSTOM
from factory.judge.protocols import get_protocol
from factory.labelers.labeler import Labeler
from factory.pipeline.stage import Context
from factory.stages.judgments import JUDGMENTS
from factory.stages.scores import JUDGE_SCORES

if TYPE_CHECKING:
    from factory.config.labeling import JudgmentsSpec
    from factory.config.recipe import Recipe


def _judge_provenance(r: Recipe) -> dict[str, str | None]:
    # A panel's entries joined with `+`, as several references are (one judge: its own values).
    judges = r.judges
    return {
        "judge": "+".join(j.judge for j in judges),
        "protocol": "+".join(j.protocol for j in judges),
        "reference_name": "+".join("+".join(j.reference_names) for j in judges) or None,
    }


def _judge_card_line(r: Recipe) -> str:
    lines = [_judge_entry_line(r, j) for j in r.judges]
    if len(lines) == 1:
        return lines[0]
    votes = "mean soft score" if r.judging.scoring == "logprob" else "majority verdict"
    return f"- A panel of {len(lines)} judges votes on every ordered pair ({votes}):\n" + "\n".join(
        "  " + line for line in lines
    )


def _judge_entry_line(r: Recipe, j: JudgmentsSpec) -> str:
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


def consistent_pairs(judgments: list[dict[str, Any]]) -> tuple[int, int]:
    """Of the sample pairs judged in both orders with two parsed verdicts, how many name the same winner both
    times, and how many there are (a prompt's judgments are never split across shards)."""
    winners: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for j in judgments:
        if j["verdict"] not in ("a", "b"):
            continue
        pair = (*sorted((j["sample_a"], j["sample_b"])), j.get("reference_name") or "", j.get("judge") or "")
        winners[pair].append(j["sample_a"] if j["verdict"] == "a" else j["sample_b"])
    both = [w for w in winners.values() if len(w) == 2]
    return sum(w[0] == w[1] for w in both), len(both)


def position_consistency(judgments: list[dict[str, Any]]) -> tuple[float | None, int]:
    """Share of sample pairs judged in both orders whose two parsed verdicts name the same winner."""
    same, both = consistent_pairs(judgments)
    return (same / both if both else None), both


def consistent_pairs_arrow(judgments: pa.Table) -> tuple[int, int]:
    """`consistent_pairs` over Arrow columns (sample_a, sample_b, verdict, reference_name, and judge when
    present), without a Python loop per row: the card counts a paper-scale run's million judgments this way."""
    parsed = judgments.filter(pc.is_in(judgments["verdict"], pa.array(["a", "b"])))
    a, b = parsed["sample_a"], parsed["sample_b"]
    first = pc.if_else(pc.less(a, b), a, b)
    second = pc.if_else(pc.less(a, b), b, a)
    winner = pc.if_else(pc.equal(parsed["verdict"], "a"), a, b)
    judge = parsed["judge"] if "judge" in parsed.column_names else pa.nulls(parsed.num_rows, pa.string())
    columns = {"x": first, "y": second, "ref": pc.fill_null(parsed["reference_name"], ""), "w": winner}
    grouped = (
        pa.table({**columns, "judge": pc.fill_null(judge, "")})
        .group_by(["x", "y", "ref", "judge"])
        .aggregate([("w", "count"), ("w", "count_distinct")])
    )
    both = grouped.filter(pc.equal(grouped["w_count"], 2))
    return int(pc.sum(pc.equal(both["w_count_distinct"], 1)).as_py() or 0), both.num_rows


def _judge_shard_counts(ctx: Context, i: int) -> dict[str, int]:
    columns = ["sample_a", "sample_b", "verdict", "parse_status", "reference_name", "judge"]
    judgments = ctx.shard_table("judgments", i, columns)
    if judgments.num_rows == 0:
        return {}
    counts = {"judgments": judgments.num_rows}
    for found in pc.value_counts(judgments["parse_status"]).to_pylist():
        counts[f"status:{found['values']}"] = found["counts"]
    for found in pc.value_counts(judgments["judge"]).to_pylist():
        counts[f"judge:{found['values']}"] = found["counts"]
    counts["consistent"], counts["both_orders"] = consistent_pairs_arrow(judgments)
    return counts


def _judge_card_facts(counts: dict[str, int]) -> tuple[list[tuple[str, int]], list[str]]:
    def having(prefix: str) -> list[tuple[str, int]]:
        return sorted((k.removeprefix(prefix), v) for k, v in counts.items() if k.startswith(prefix))

    rows = [("judgments", counts.get("judgments", 0))]
    rows += [(f"judgments with parse status `{k}`", v) for k, v in having("status:")]
    judges = having("judge:")
    if len(judges) > 1:  # a panel: each judge's share (one judge's card stays as it was)
        rows += [(f"judgments by judge `{k}`", v) for k, v in judges]
    same, both = counts.get("consistent", 0), counts.get("both_orders", 0)
    shown = "n/a" if not both else f"{same / both:.3f}"
    return rows, [f"- Position consistency (same winner in both orders): {shown} over {both} pairs"]


JUDGE = Labeler(
    name="judgments",
    summary="a pairwise LLM judge compares every ordered pair of a prompt's samples (the method)",
    model_field="judge",
    role="judge",
    stages=lambda: [JUDGMENTS, JUDGE_SCORES],
    provenance=_judge_provenance,
    card_line=_judge_card_line,
    shard_counts=_judge_shard_counts,
    card_facts=_judge_card_facts,
)
