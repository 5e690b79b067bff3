"""Two protocols compared on the same judge and cases: accuracies, their difference, a bootstrap interval and
the exact McNemar test, per data set and pooled over them (`factory judge-compare`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from factory.core.errors import UserInputError
from factory.core.stats import bootstrap_ci
from factory.judge_eval.variants import DECODING, Unparsed, Variant, variants


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b and c (binomial test of b vs Bin(b+c, 1/2))."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


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
