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

import csv
import hashlib
import io
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from factory.core.errors import UserInputError

ORDERS = ("forward", "swapped")
"""The two orders of a variant whose second order swaps the outputs (the default)."""
BLOCKS = "swapped_blocks"
BLOCKS_ORDERS = ("forward", BLOCKS)
"""The two orders of a `+blocks` variant: each output keeps its letter, (b)'s block is shown first."""
BLOCKS_SUFFIX = "+blocks"
TIE_EPS = 1e-9
UNPARSED_RULES = ("random", "wrong", "half")
"""How an unparsed or tied verdict counts in accuracy; the first is the default."""


@dataclass(frozen=True)
class Unparsed:
    """The rule for a judgment without a verdict (unparsed, a failed call, a tied vote, a soft-score tie)."""

    rule: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rule not in UNPARSED_RULES:
            raise UserInputError(f"unknown --unparsed rule {self.rule!r}; known: {list(UNPARSED_RULES)}")

    def credit(self, dataset: str, case_id: str, order: str, label: int) -> float:
        """What the judgment counts: 0 (wrong), ½ (half), or 1 when the seeded coin names the label (random)."""
        if self.rule == "wrong":
            return 0.0
        if self.rule == "half":
            return 0.5
        return 1.0 if coin(self.seed, dataset, case_id, order) == label else 0.0

    def describe(self) -> str:
        """The rule in words, for report titles."""
        return {
            "random": f"unparsed or tied verdicts get a random winner (seed {self.seed})",
            "wrong": "unparsed or tied verdicts count as wrong",
            "half": "unparsed or tied verdicts count ½",
        }[self.rule]


def coin(seed: int, dataset: str, case_id: str, order: str) -> int:
    """The random winner (1 or 2) of one judgment without a verdict: fixed by the seed, the data set, the case
    and the order, so reruns and every protocol draw the same; SQL recomputes it as `md5(...)` (the docs)."""
    digest = hashlib.md5(f"{seed}|{dataset}|{case_id}|{order}".encode()).hexdigest()
    return 1 if int(digest[-1], 16) % 2 == 0 else 2


def first_output(order: str) -> int:
    """The output (1 or 2) shown as (a) in an order."""
    return 2 if order == "swapped" else 1


@dataclass(frozen=True)
class Judged:
    """One order of one case, as the metrics read it."""

    verdict: str | None
    """'a', 'b' or None (unparsed, or no majority for a vote)."""
    p_a: float | None
    parse_status: str
    len_a: int
    len_b: int
    p_exact: float | None = None
    """The soft score under the exact-marker rule (`p_a_exact`)."""

    def pick(self, order: str) -> int | None:
        """The output (1 or 2) the verdict prefers, undoing the order it was shown in."""
        if self.verdict not in ("a", "b"):
            return None
        first = first_output(order)
        return first if self.verdict == "a" else 3 - first

    def chose_first_shown(self, order: str) -> bool | None:
        """Whether the verdict chose the block shown first: (a) in forward and swapped, (b) in swapped_blocks."""
        if self.verdict not in ("a", "b"):
            return None
        return (self.verdict == "a") != (order == BLOCKS)


@dataclass
class CaseResult:
    """Both orders of one case."""

    case_id: str
    label: int
    judged: dict[str, Judged] = field(default_factory=dict)
    orders: tuple[str, str] = ORDERS
    dataset: str = ""

    def correct(self, order: str) -> bool:
        """Whether the verdict in `order` names the human-preferred output (unparsed or missing: False)."""
        j = self.judged.get(order)
        return j is not None and j.pick(order) == self.label

    def credit(self, order: str, rule: Unparsed) -> float:
        """The judgment's accuracy credit: 1 right, 0 wrong, and the rule's credit when it has no verdict."""
        j = self.judged.get(order)
        pick = None if j is None else j.pick(order)
        if pick is None:
            return rule.credit(self.dataset, self.case_id, order, self.label)
        return float(pick == self.label)

    def score(self, rule: Unparsed | None = None) -> float:
        """The case's accuracy: mean credit over its two orders."""
        rule = rule or Unparsed()
        return sum(self.credit(o, rule) for o in self.orders) / len(self.orders)

    def soft(self, exact: bool = False) -> float | None:
        """P(the human-preferred output wins) averaged over both orders; None if either order lacks it."""
        ps = []
        for order in self.orders:
            j = self.judged.get(order)
            p = None if j is None else (j.p_exact if exact else j.p_a)
            if p is None:
                return None
            label_first = self.label == first_output(order)
            ps.append(p if label_first else 1.0 - p)
        return sum(ps) / len(ps)

    def soft_credit(self, rule: Unparsed, exact: bool = False) -> float:
        """1 when the soft score favours the label, 0 when it favours the other; a tie or a missing score counts
        by the rule (its random coin is drawn for the order `soft`)."""
        s = self.soft(exact)
        if s is None or abs(s - 0.5) <= TIE_EPS:
            return rule.credit(self.dataset, self.case_id, "soft", self.label)
        return float(s > 0.5)


@dataclass
class Variant:
    """One judge × protocol variant × data set: its cases, and what its calls cost."""

    dataset: str
    judge: str
    protocol: str
    cases: dict[str, CaseResult] = field(default_factory=dict)
    judgments: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    orders: tuple[str, str] = ORDERS
    group: str = ""
    """The variant's name without `+blocks`: a protocol's two swap kinds share it (position vs letter bias)."""
    decoding: dict[str, Any] = field(default_factory=dict)
    """prefill, markers, top_logprobs as its rows record them ('mixed' when they differ; None when unrecorded)."""

    @property
    def swap(self) -> str:
        """`outputs` or `blocks`: what the second order moves."""
        return "blocks" if self.orders[1] == BLOCKS else "outputs"


DECODING = ("prefill", "markers", "top_logprobs")
"""The decoding switches every row records."""


def _judged(row: dict[str, Any]) -> Judged:
    verdict = row["verdict"] if row.get("parse_status") == "ok" else None
    return Judged(
        verdict,
        row.get("p_a"),
        row.get("parse_status") or "error",
        row["len_a"],
        row["len_b"],
        row.get("p_a_exact"),
    )


def _vote(items: list[Judged]) -> Judged:
    """Majority of the parsed verdicts; soft scores are the means of the available ones."""
    votes = [j.verdict for j in items if j.verdict in ("a", "b")]
    a, b = votes.count("a"), votes.count("b")
    verdict = "a" if a > b else "b" if b > a else None
    status = "ok" if verdict else ("vote_tie" if votes else "no_votes")
    ps = [j.p_a for j in items if j.p_a is not None]
    exact = [j.p_exact for j in items if j.p_exact is not None]
    p_a = sum(ps) / len(ps) if ps else None
    p_exact = sum(exact) / len(exact) if exact else None
    return Judged(verdict, p_a, status, items[0].len_a, items[0].len_b, p_exact)


def _decoding(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in DECODING:
        values = {r.get(key) for r in rows}
        out[key] = values.pop() if len(values) == 1 else "mixed"
    return out


def _count(v: Variant, r: dict[str, Any]) -> None:
    v.judgments += 1
    v.tokens_in += r.get("tokens_in") or 0
    v.tokens_out += r.get("tokens_out") or 0


def variants(rows: Iterable[dict[str, Any]]) -> list[Variant]:
    """Group eval rows into variants, in first-seen order.

    A protocol judged with one reference keeps its name; with several, each reference is `protocol@ref`
    and their majority vote is `protocol@vote`. Its blocks-swapped judgments form the variant
    `protocol+blocks` (with the same forward judgments), beside `protocol` when the outputs were swapped too.
    """
    groups: dict[tuple[str, str, str], dict[str | None, list[dict[str, Any]]]] = {}
    for r in rows:
        key = (r["dataset"], r["judge"], r["protocol"])
        groups.setdefault(key, {}).setdefault(r["reference_name"], []).append(r)
    out: list[Variant] = []
    for (dataset, judge, protocol), by_ref in groups.items():
        multi = len(by_ref) > 1
        present = {r["order"] for ref_rows in by_ref.values() for r in ref_rows}
        kinds = [o for o in (ORDERS, BLOCKS_ORDERS) if o[1] in present] or [ORDERS]
        for orders in kinds:
            base = protocol + (BLOCKS_SUFFIX if orders == BLOCKS_ORDERS else "")
            for ref, ref_rows in by_ref.items():
                mine = [r for r in ref_rows if r["order"] in orders]
                group = f"{protocol}@{ref}" if multi else protocol
                v = Variant(dataset, judge, f"{base}@{ref}" if multi else base, orders=orders, group=group)
                v.decoding = _decoding(mine)
                for r in mine:
                    case = v.cases.setdefault(
                        r["case_id"], CaseResult(r["case_id"], int(r["label"]), orders=orders, dataset=dataset)
                    )
                    case.judged[r["order"]] = _judged(r)
                    _count(v, r)
                out.append(v)
            if multi:
                vote = Variant(dataset, judge, f"{base}@vote", orders=orders, group=f"{protocol}@vote")
                per: dict[tuple[str, str], list[Judged]] = defaultdict(list)
                labels: dict[str, int] = {}
                mine = [r for ref_rows in by_ref.values() for r in ref_rows if r["order"] in orders]
                vote.decoding = _decoding(mine)
                for r in mine:
                    per[(r["case_id"], r["order"])].append(_judged(r))
                    labels[r["case_id"]] = int(r["label"])
                    _count(vote, r)
                for (case_id, order), items in per.items():
                    case = vote.cases.setdefault(
                        case_id, CaseResult(case_id, labels[case_id], orders=orders, dataset=dataset)
                    )
                    case.judged[order] = _vote(items)
                out.append(vote)
    return out


# ------------------------------------------------------------------------------------------- statistics


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_ci(values: Sequence[float], resamples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` (resampling cases with replacement, seeded)."""
    if not values:
        return (math.nan, math.nan)
    if resamples <= 0:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return quantile(means, tail), quantile(means, 1 - tail)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b and c (binomial test of b vs Bin(b+c, 1/2))."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


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


@dataclass
class Comparison:
    """Two protocols on the same judge and cases: accuracies, their difference and its significance."""

    dataset: str
    judge: str
    protocol_a: str
    protocol_b: str
    cases: int
    acc_a: float
    acc_b: float
    diff: float
    diff_ci_low: float | None
    diff_ci_high: float | None
    only_a_right: int
    """(case, order) judgments that A got right and B wrong (McNemar's b)."""
    only_b_right: int
    """(case, order) judgments that B got right and A wrong (McNemar's c)."""
    p_value: float
    """Exact two-sided McNemar p-value over the (case, order) judgments."""


def compare(a: Variant, b: Variant, resamples: int = 1000, seed: int = 0, unparsed: str = "random") -> Comparison:
    """Paired comparison over the cases both variants judged.

    McNemar's exact test runs on per-judgment correctness (each case in each order: the units whose mean
    is the accuracy; the forward judgments pair, and so do the two second orders); the paired bootstrap
    resamples cases, keeping a case's two orders together. Judgments without a verdict are credited by the
    `unparsed` rule; under `half`, a judgment credited ½ is in no discordant pair.
    """
    rule = Unparsed(unparsed, seed)
    common = [cid for cid in a.cases if cid in b.cases]
    if not common:
        raise ValueError(f"{a.protocol} and {b.protocol} share no case on {a.dataset}")
    only_a = only_b = 0
    for cid in common:
        for oa, ob in zip(a.orders, b.orders, strict=True):
            ra, rb = a.cases[cid].credit(oa, rule), b.cases[cid].credit(ob, rule)
            if ra in (0.0, 1.0) and rb in (0.0, 1.0):
                only_a += ra > rb
                only_b += rb > ra
    sa = [a.cases[cid].score(rule) for cid in common]
    sb = [b.cases[cid].score(rule) for cid in common]
    diffs = [x - y for x, y in zip(sa, sb, strict=True)]
    lo, hi = bootstrap_ci(diffs, resamples, seed)
    return Comparison(
        dataset=a.dataset,
        judge=a.judge,
        protocol_a=a.protocol,
        protocol_b=b.protocol,
        cases=len(common),
        acc_a=sum(sa) / len(sa),
        acc_b=sum(sb) / len(sb),
        diff=sum(diffs) / len(diffs),
        diff_ci_low=None if math.isnan(lo) else lo,
        diff_ci_high=None if math.isnan(hi) else hi,
        only_a_right=only_a,
        only_b_right=only_b,
        p_value=mcnemar_exact(only_a, only_b),
    )


# ------------------------------------------------------------------------------------------------ tables


AVERAGE = "Avg."
UNPARSED_COLUMN = "unparsed"
"""Table 1's last column: the parse-failure rate (%), averaged like the accuracies."""


def table1(metric_rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The paper's Table 1 layout: one row per judge × protocol, data sets as columns, the average last.

    Cells are accuracy in percent; the average is the unweighted mean over the data sets a row has. When the
    metrics carry parse-failure rates, the column `unparsed` follows: their mean over the same data sets, in
    percent (accuracy is never shown without it). With several judges, rows `mean over judges` follow.
    Returns (columns, rows).
    """
    datasets = list(dict.fromkeys(m["dataset"] for m in metric_rows))
    judges = list(dict.fromkeys(m["judge"] for m in metric_rows))
    protocols = list(dict.fromkeys(m["protocol"] for m in metric_rows))
    acc = {(m["judge"], m["protocol"], m["dataset"]): m["accuracy"] for m in metric_rows}
    with_failures = any("parse_failure_rate" in m for m in metric_rows)
    fails = {(m["judge"], m["protocol"], m["dataset"]): m.get("parse_failure_rate") for m in metric_rows}
    columns = ["judge", "protocol", *datasets, AVERAGE] + ([UNPARSED_COLUMN] if with_failures else [])
    rows = []

    def pct(x: float | None) -> float | None:
        return None if x is None else round(100 * x, 1)

    def row(judge: str, protocol: str, values: dict[str, float | None], failed: list[float]) -> dict[str, Any]:
        present = [x for x in values.values() if x is not None]
        avg = sum(present) / len(present) if present else None
        out = {"judge": judge, "protocol": protocol, **{d: pct(values.get(d)) for d in datasets}, AVERAGE: pct(avg)}
        if with_failures:
            out[UNPARSED_COLUMN] = pct(sum(failed) / len(failed)) if failed else None
        return out

    def failures(keys: list[tuple[str, str, str]]) -> list[float]:
        return [f for k in keys if (f := fails.get(k)) is not None]

    for judge in judges:
        for protocol in protocols:
            values = {d: acc.get((judge, protocol, d)) for d in datasets}
            if any(x is not None for x in values.values()):
                rows.append(row(judge, protocol, values, failures([(judge, protocol, d) for d in datasets])))
    if len(judges) > 1:
        for protocol in protocols:
            values: dict[str, float | None] = {}
            for d in datasets:
                xs = [acc[(j, protocol, d)] for j in judges if acc.get((j, protocol, d)) is not None]
                values[d] = sum(xs) / len(xs) if xs else None
            keys = [(j, protocol, d) for j in judges for d in datasets]
            rows.append(row("mean over judges", protocol, values, failures(keys)))
    return columns, rows


PERCENT = (
    "accuracy",
    "ci_low",
    "ci_high",
    "acc_forward",
    "acc_swapped",
    "acc_soft",
    "acc_soft_exact",
    "consistency",
    "first_position_rate",
    "parse_failure_rate",
    "agreement",
    "position_first_rate",
    "letter_a_rate",
)
"""Metrics stored as fractions and shown as percentages."""

METRIC_COLUMNS = (
    "dataset",
    "judge",
    "protocol",
    "cases",
    "accuracy",
    "ci_low",
    "ci_high",
    "parse_failure_rate",
    "acc_forward",
    "acc_swapped",
    "acc_soft",
    "acc_soft_exact",
    "soft_unscored",
    "consistency",
    "first_position_rate",
    "call_errors",
    "len_preferred",
    "len_other",
    "len_human_preferred",
    "len_human_other",
    "judgments",
    "tokens_in",
    "tokens_out",
    "unparsed",
    "swap",
    "prefill",
    "markers",
    "top_logprobs",
)
BIAS_COLUMNS = ("dataset", "judge", "protocol", "cases", "position_first_rate", "letter_a_rate", "first_position_rate")


def shown(column: str, value: Any) -> str:
    """A value as the report shows it: rates in percent (1 decimal), lengths rounded, counts as is."""
    if value is None:
        return ""
    if column in PERCENT:
        return f"{100 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _cell(value: Any) -> str:
    return "" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))


def to_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """Rows as CSV text (floats at full precision; missing values empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
    return buf.getvalue()


def to_markdown(columns: Sequence[str], rows: Sequence[dict[str, Any]], percent: bool = False) -> str:
    """Rows as a GitHub Markdown table; with `percent`, rate columns are shown as percentages."""

    def cell(column: str, value: Any) -> str:
        text = shown(column, value) if percent else _cell(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


@dataclass
class Report:
    """Everything judge-eval reports about a set of eval rows."""

    metrics: list[dict[str, Any]]
    table1_columns: list[str]
    table1: list[dict[str, Any]]
    agreement: list[dict[str, Any]]
    bias: list[dict[str, Any]] = field(default_factory=list)
    rule: Unparsed = field(default_factory=Unparsed)
    preset: str | None = None
    """The judge-eval preset the judgments were made and read with (None: the options one by one)."""

    @property
    def caption(self) -> str:
        """The rules every accuracy in the report was computed with, in one line."""
        text = f"Accuracy (%), both orders averaged; {self.rule.describe()}; `unparsed` is the parse-failure rate (%)."
        return text + (f" Preset: {self.preset}." if self.preset else "")

    def files(self) -> dict[str, str]:
        """File name → content: Table 1 and the full metrics as CSV and Markdown, judge agreement, and position vs
        letter bias. The Markdown files open with the rules; the CSV files carry them in columns."""
        head = self.caption + "\n\n"
        # With a preset, table1.csv names it in a last column (the Markdown files in their caption).
        t1_columns = [*self.table1_columns, "preset"] if self.preset else self.table1_columns
        t1_rows = [{**r, "preset": self.preset} for r in self.table1] if self.preset else self.table1
        out = {
            "table1.csv": to_csv(t1_columns, t1_rows),
            "table1.md": head + to_markdown(self.table1_columns, self.table1),
            "metrics.csv": to_csv(METRIC_COLUMNS, self.metrics),
            "metrics.md": head + to_markdown(METRIC_COLUMNS, self.metrics, percent=True),
        }
        if self.agreement:
            columns = list(self.agreement[0])
            out["agreement.csv"] = to_csv(columns, self.agreement)
            out["agreement.md"] = to_markdown(columns, self.agreement, percent=True)
        if self.bias:
            out["bias.csv"] = to_csv(BIAS_COLUMNS, self.bias)
            out["bias.md"] = to_markdown(BIAS_COLUMNS, self.bias, percent=True)
        return out


def build_report(
    rows: Iterable[dict[str, Any]],
    resamples: int = 1000,
    seed: int = 0,
    unparsed: str = "random",
    preset: str | None = None,
) -> Report:
    """Metrics per judge × protocol variant × data set, Table 1, agreement between judges, and position vs
    letter bias where both kinds of second order were judged. `preset` names the judge-eval preset the rows
    were made with, for the captions and table1.csv."""
    rule = Unparsed(unparsed, seed)
    vs = variants(rows)
    metric_rows = [metrics(v, resamples, seed, unparsed) for v in vs]
    columns, t1 = table1(metric_rows)
    return Report(metric_rows, columns, t1, agreement(vs), bias(vs), rule, preset)


def _pooled(vs: Sequence[Variant]) -> Variant:
    """Several data sets' variants as one (case ids prefixed with their data set)."""
    out = Variant("all", vs[0].judge, vs[0].protocol, orders=vs[0].orders, group=vs[0].group)
    for v in vs:
        for cid, case in v.cases.items():
            out.cases[f"{v.dataset}/{cid}"] = case
        out.judgments += v.judgments
        out.tokens_in += v.tokens_in
        out.tokens_out += v.tokens_out
    return out


def compare_stored(
    rows: Sequence[dict[str, Any]],
    protocol_a: str,
    protocol_b: str,
    judge: str | None,
    datasets: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
    unparsed: str = "random",
) -> tuple[list[Comparison], list[str]]:
    """Paired comparisons per data set (and pooled over them when there are several) from eval rows.

    A note says when the two variants were decoded differently (prefill, markers, top-k): the comparison then
    measures the decoding too, not only the protocols."""
    if not rows:
        raise UserInputError("no eval judgments in this warehouse; run `factory judge-eval` first")
    vs = variants(rows)
    judges = sorted({v.judge for v in vs})
    if judge is None:
        if len(judges) != 1:
            raise UserInputError(f"the table holds several judges; choose one with --judge: {judges}")
        judge = judges[0]
    if judge not in judges:
        raise UserInputError(f"no eval judgments by judge '{judge}'; judges: {judges}")
    vs = [v for v in vs if v.judge == judge]
    known = sorted({v.dataset for v in vs})
    for d in datasets:
        if d not in known:
            raise UserInputError(f"no eval judgments on data set '{d}' by {judge}; data sets: {known}")
    if datasets:
        vs = [v for v in vs if v.dataset in datasets]
    protocols = list(dict.fromkeys(v.protocol for v in vs))
    for p in (protocol_a, protocol_b):
        if p not in protocols:
            raise UserInputError(f"protocol '{p}' has no eval judgments by {judge}; protocols: {protocols}")
    by = {(v.dataset, v.protocol): v for v in vs}
    results, notes, pairs = [], [], []
    for d in dict.fromkeys(v.dataset for v in vs):
        va, vb = by.get((d, protocol_a)), by.get((d, protocol_b))
        if va is None or vb is None:
            notes.append(f"{d}: not judged with both protocols; left out")
            continue
        results.append(compare(va, vb, resamples, seed, unparsed))
        pairs.append((va, vb))
        differ = [
            f"{k} {va.decoding.get(k)!r} vs {vb.decoding.get(k)!r}"
            for k in DECODING
            if va.decoding.get(k) != vb.decoding.get(k)
        ]
        if differ:
            notes.append(f"{d}: the two were decoded differently ({', '.join(differ)})")
    if not results:
        raise UserInputError(f"no data set was judged by {judge} with both {protocol_a} and {protocol_b}")
    if len(pairs) > 1:
        pooled_a, pooled_b = _pooled([a for a, _ in pairs]), _pooled([b for _, b in pairs])
        results.append(compare(pooled_a, pooled_b, resamples, seed, unparsed))
    return results, notes
