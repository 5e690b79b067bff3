"""Judge meta-evaluation metrics over `eval_judgments` rows: pure functions, no files, no models.

Conventions (docs/JUDGE_EVAL.md explains each):

- Every case is judged forward (output_1 shown as (a)) and in a second order: `swapped` (output_2 shown as
  (a): the outputs move under fixed letters) or `swapped_blocks` (output_1 stays (a), but (b)'s block is shown
  first: each output keeps its letter). A variant pairs forward with one second order; a protocol judged with
  blocks-swapping is the variant `protocol+blocks`.
- Accuracy is computed per order and averaged over the two orders (the paper's convention); it equals the
  mean over all (case, order) judgments. An unparsed verdict (no `Output (a|b)`, an invalid marker or a
  failed call) or a tied vote counts by the `Unparsed` rule: a seeded random winner (`random`, the
  literature's rule and the default), wrong (`wrong`) or ½ (`half`). It is always reported as a parse failure.
- Soft accuracy averages P(label's output wins) over the two orders; a case is right when the mean is
  above 0.5. An exact tie, or a missing soft score in either order, counts by the same rule.
- Several references for one protocol give one variant per reference (`refeval@gpt4`) and a majority vote
  over the per-reference verdicts (`refeval@vote`); unparsed verdicts abstain, and a tie is no verdict.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from factory.core.stats import bootstrap_ci
from factory.judge_eval.variants import (
    BLOCKS,
    BLOCKS_ORDERS,
    ORDERS,
    TIE_EPS,
    CaseResult,
    Unparsed,
    Variant,
    first_output,
)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _label_lengths(case: CaseResult) -> tuple[int, int] | None:
    """(length of the human-preferred output, length of the other), from whichever order was judged."""
    for order in case.orders:
        j = case.judged.get(order)
        if j is not None:
            first, second = (j.len_a, j.len_b) if first_output(order) == 1 else (j.len_b, j.len_a)
            return (first, second) if case.label == 1 else (second, first)
    return None


def metrics(v: Variant, resamples: int = 1000, seed: int = 0, unparsed: str = "random") -> dict[str, Any]:
    """Every reported metric of one variant, as fractions (0–1) and means; None where undefined.

    `seed` seeds the bootstrap and the random winner of the `random` rule.
    """
    rule = Unparsed(unparsed, seed)
    first, second = v.orders
    cases = list(v.cases.values())
    n = len(cases)
    judged = [(o, c.judged[o], c) for c in cases for o in v.orders if o in c.judged]
    parsed = [(o, j, c) for o, j, c in judged if j.verdict in ("a", "b")]
    acc_f = _mean([c.credit(first, rule) for c in cases])
    acc_s = _mean([c.credit(second, rule) for c in cases])
    scores = [c.score(rule) for c in cases]
    lo, hi = bootstrap_ci(scores, resamples, seed)
    softs = [c.soft() for c in cases]
    has_exact = any(j.p_exact is not None for _, j, _ in judged)
    consistent = [
        all(o in c.judged for o in v.orders)
        and c.judged[first].pick(first) is not None
        and c.judged[first].pick(first) == c.judged[second].pick(second)
        for c in cases
    ]
    chosen_len = [j.len_a if j.verdict == "a" else j.len_b for _, j, _ in parsed]
    other_len = [j.len_b if j.verdict == "a" else j.len_a for _, j, _ in parsed]
    human = [_label_lengths(c) for c in cases]
    return {
        "dataset": v.dataset,
        "judge": v.judge,
        "protocol": v.protocol,
        "cases": n,
        "accuracy": None if acc_f is None or acc_s is None else (acc_f + acc_s) / 2,
        "ci_low": None if math.isnan(lo) else lo,
        "ci_high": None if math.isnan(hi) else hi,
        "parse_failure_rate": _mean([float(j.verdict not in ("a", "b")) for _, j, _ in judged]),
        "acc_forward": acc_f,
        "acc_swapped": acc_s,
        "acc_soft": _mean([c.soft_credit(rule) for c in cases]),
        "acc_soft_exact": _mean([c.soft_credit(rule, exact=True) for c in cases]) if has_exact else None,
        "soft_unscored": sum(s is None or abs(s - 0.5) <= TIE_EPS for s in softs),
        "consistency": _mean([float(x) for x in consistent]),
        "first_position_rate": _mean([float(bool(j.chose_first_shown(o))) for o, j, _ in parsed]),
        "call_errors": sum(j.parse_status == "error" for _, j, _ in judged),
        "len_preferred": _mean(chosen_len),
        "len_other": _mean(other_len),
        "len_human_preferred": _mean([h[0] for h in human if h is not None]),
        "len_human_other": _mean([h[1] for h in human if h is not None]),
        "judgments": v.judgments,
        "tokens_in": v.tokens_in,
        "tokens_out": v.tokens_out,
        "unparsed": rule.rule,
        "swap": v.swap,
        "prefill": v.decoding.get("prefill"),
        "markers": v.decoding.get("markers"),
        "top_logprobs": v.decoding.get("top_logprobs"),
    }


def bias(vs: Sequence[Variant]) -> list[dict[str, Any]]:
    """Position bias and letter bias, apart, for every variant judged with both kinds of second order.

    Position: among the parsed verdicts of forward and swapped_blocks (each output keeps its letter, its block
    moves), the share that chose the block shown first. Letter: among the parsed verdicts of swapped and
    swapped_blocks (output_2's block is first in both, its letter changes), the share that said (a). 50% is
    no bias; the outputs-swapped first-position rate mixes the two (there (a) is always shown first).
    """
    by_group: dict[tuple[str, str, str], dict[str, Variant]] = defaultdict(dict)
    for v in vs:
        by_group[(v.dataset, v.judge, v.group)][v.swap] = v
    out = []
    for (dataset, judge, group), pair in by_group.items():
        if set(pair) != {"outputs", "blocks"}:
            continue
        outputs, blocks = pair["outputs"], pair["blocks"]
        position = [
            j.chose_first_shown(o)
            for c in blocks.cases.values()
            for o in BLOCKS_ORDERS
            if (j := c.judged.get(o)) is not None and j.verdict in ("a", "b")
        ]
        letter = [
            j.verdict == "a"
            for v, o in ((outputs, "swapped"), (blocks, BLOCKS))
            for c in v.cases.values()
            if (j := c.judged.get(o)) is not None and j.verdict in ("a", "b")
        ]
        mixed = [
            j.chose_first_shown(o)
            for c in outputs.cases.values()
            for o in ORDERS
            if (j := c.judged.get(o)) is not None and j.verdict in ("a", "b")
        ]
        out.append(
            {
                "dataset": dataset,
                "judge": judge,
                "protocol": group,
                "cases": len(set(outputs.cases) | set(blocks.cases)),
                "position_first_rate": _mean([float(bool(x)) for x in position]),
                "letter_a_rate": _mean([float(x) for x in letter]),
                "first_position_rate": _mean([float(bool(x)) for x in mixed]),
            }
        )
    return out


def agreement(vs: Sequence[Variant]) -> list[dict[str, Any]]:
    """For each data set and protocol judged by several judges: how often two judges give the same verdict.

    Over the (case, order) judgments both judges made; a judgment either judge left unparsed counts as a
    disagreement.
    """
    by_key: dict[tuple[str, str], list[Variant]] = defaultdict(list)
    for v in vs:
        by_key[(v.dataset, v.protocol)].append(v)
    out = []
    for (dataset, protocol), group in by_key.items():
        for i, x in enumerate(group):
            for y in group[i + 1 :]:
                same = total = 0
                for case_id, cx in x.cases.items():
                    cy = y.cases.get(case_id)
                    if cy is None:
                        continue
                    for o in x.orders:
                        if o in cx.judged and o in cy.judged:
                            total += 1
                            vx, vy = cx.judged[o].verdict, cy.judged[o].verdict
                            same += vx is not None and vx == vy
                rate = same / total if total else None
                out.append(
                    {
                        "dataset": dataset,
                        "protocol": protocol,
                        "judge_1": x.judge,
                        "judge_2": y.judge,
                        "judgments": total,
                        "agreement": rate,
                    }
                )
    return out
