"""Judge-eval's eval rows read into variants: one judge × protocol (× reference) on one data set, its cases
and their judged orders, and the rule an unparsed verdict counts by (docs/JUDGE_EVAL.md).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
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
