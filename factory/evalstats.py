"""Judge meta-evaluation metrics over `eval_judgments` rows: pure functions, no files, no models.

Conventions (docs/JUDGE_EVAL.md explains each):

- Accuracy is computed per order and averaged over the two orders (the paper's convention); it equals the
  mean over all (case, order) judgments. An unparsed verdict (no `Output (a|b)`, an invalid marker or a
  failed call) counts as wrong and is reported as a parse failure; it is never guessed.
- Soft accuracy averages P(label's output wins) over the two orders; a case is right when the mean is
  above 0.5. An exact tie, or a missing soft score in either order, counts as wrong.
- Several references for one protocol give one variant per reference (`refeval@gpt4`) and a majority vote
  over the per-reference verdicts (`refeval@vote`); unparsed verdicts abstain, and a tie is no verdict.
"""

from __future__ import annotations

import csv
import io
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from factory.errors import UserInputError

ORDERS = ("forward", "swapped")
TIE_EPS = 1e-9


@dataclass(frozen=True)
class Judged:
    """One order of one case, as the metrics read it."""

    verdict: str | None
    """'a', 'b' or None (unparsed, or no majority for a vote)."""
    p_a: float | None
    parse_status: str
    len_a: int
    len_b: int

    def pick(self, order: str) -> int | None:
        """The output (1 or 2) the verdict prefers, undoing the order it was shown in."""
        if self.verdict not in ("a", "b"):
            return None
        first = 1 if order == "forward" else 2
        return first if self.verdict == "a" else 3 - first


@dataclass
class CaseResult:
    """Both orders of one case."""

    case_id: str
    label: int
    judged: dict[str, Judged] = field(default_factory=dict)

    def correct(self, order: str) -> bool:
        """Whether the verdict in `order` names the human-preferred output (unparsed or missing: False)."""
        j = self.judged.get(order)
        return j is not None and j.pick(order) == self.label

    def score(self) -> float:
        """The case's accuracy: mean correctness over the two orders (0, 0.5 or 1)."""
        return sum(self.correct(o) for o in ORDERS) / len(ORDERS)

    def soft(self) -> float | None:
        """P(the human-preferred output wins) averaged over both orders; None if either order lacks it."""
        ps = []
        for order in ORDERS:
            j = self.judged.get(order)
            if j is None or j.p_a is None:
                return None
            label_first = (self.label == 1) == (order == "forward")
            ps.append(j.p_a if label_first else 1.0 - j.p_a)
        return sum(ps) / len(ps)


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


def _judged(row: dict[str, Any]) -> Judged:
    verdict = row["verdict"] if row.get("parse_status") == "ok" else None
    return Judged(verdict, row.get("p_a"), row.get("parse_status") or "error", row["len_a"], row["len_b"])


def _vote(items: list[Judged]) -> Judged:
    """Majority of the parsed verdicts; p_a is the mean of the available soft scores."""
    votes = [j.verdict for j in items if j.verdict in ("a", "b")]
    a, b = votes.count("a"), votes.count("b")
    verdict = "a" if a > b else "b" if b > a else None
    status = "ok" if verdict else ("vote_tie" if votes else "no_votes")
    ps = [j.p_a for j in items if j.p_a is not None]
    p_a = sum(ps) / len(ps) if ps else None
    return Judged(verdict, p_a, status, items[0].len_a, items[0].len_b)


def variants(rows: Iterable[dict[str, Any]]) -> list[Variant]:
    """Group eval rows into variants, in first-seen order.

    A protocol judged with one reference keeps its name; with several, each reference is `protocol@ref`
    and their majority vote is `protocol@vote`.
    """
    groups: dict[tuple[str, str, str], dict[str | None, list[dict[str, Any]]]] = {}
    for r in rows:
        key = (r["dataset"], r["judge"], r["protocol"])
        groups.setdefault(key, {}).setdefault(r["reference_name"], []).append(r)
    out: list[Variant] = []
    for (dataset, judge, protocol), by_ref in groups.items():
        multi = len(by_ref) > 1
        for ref, ref_rows in by_ref.items():
            v = Variant(dataset, judge, f"{protocol}@{ref}" if multi else protocol)
            for r in ref_rows:
                case = v.cases.setdefault(r["case_id"], CaseResult(r["case_id"], int(r["label"])))
                case.judged[r["order"]] = _judged(r)
                v.judgments += 1
                v.tokens_in += r.get("tokens_in") or 0
                v.tokens_out += r.get("tokens_out") or 0
            out.append(v)
        if multi:
            vote = Variant(dataset, judge, f"{protocol}@vote")
            per: dict[tuple[str, str], list[Judged]] = defaultdict(list)
            labels: dict[str, int] = {}
            for ref_rows in by_ref.values():
                for r in ref_rows:
                    per[(r["case_id"], r["order"])].append(_judged(r))
                    labels[r["case_id"]] = int(r["label"])
                    vote.judgments += 1
                    vote.tokens_in += r.get("tokens_in") or 0
                    vote.tokens_out += r.get("tokens_out") or 0
            for (case_id, order), items in per.items():
                case = vote.cases.setdefault(case_id, CaseResult(case_id, labels[case_id]))
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
    if "forward" in case.judged:
        j = case.judged["forward"]
        first, second = j.len_a, j.len_b
    elif "swapped" in case.judged:
        j = case.judged["swapped"]
        first, second = j.len_b, j.len_a
    else:
        return None
    return (first, second) if case.label == 1 else (second, first)


def metrics(v: Variant, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every reported metric of one variant, as fractions (0–1) and means; None where undefined."""
    cases = list(v.cases.values())
    n = len(cases)
    judged = [(o, c.judged[o], c) for c in cases for o in ORDERS if o in c.judged]
    parsed = [(o, j, c) for o, j, c in judged if j.verdict in ("a", "b")]
    acc_f = _mean([float(c.correct("forward")) for c in cases])
    acc_s = _mean([float(c.correct("swapped")) for c in cases])
    scores = [c.score() for c in cases]
    lo, hi = bootstrap_ci(scores, resamples, seed)
    softs = [c.soft() for c in cases]
    soft_right = [s is not None and s > 0.5 + TIE_EPS for s in softs]
    consistent = [
        all(o in c.judged for o in ORDERS)
        and c.judged["forward"].pick("forward") is not None
        and c.judged["forward"].pick("forward") == c.judged["swapped"].pick("swapped")
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
        "acc_forward": acc_f,
        "acc_swapped": acc_s,
        "acc_soft": _mean([float(x) for x in soft_right]),
        "soft_unscored": sum(s is None or abs(s - 0.5) <= TIE_EPS for s in softs),
        "consistency": _mean([float(x) for x in consistent]),
        "first_position_rate": _mean([float(j.verdict == "a") for _, j, _ in parsed]),
        "parse_failure_rate": _mean([float(j.verdict not in ("a", "b")) for _, j, _ in judged]),
        "call_errors": sum(j.parse_status == "error" for _, j, _ in judged),
        "len_preferred": _mean(chosen_len),
        "len_other": _mean(other_len),
        "len_human_preferred": _mean([h[0] for h in human if h is not None]),
        "len_human_other": _mean([h[1] for h in human if h is not None]),
        "judgments": v.judgments,
        "tokens_in": v.tokens_in,
        "tokens_out": v.tokens_out,
    }


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
                    for o in ORDERS:
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


def compare(a: Variant, b: Variant, resamples: int = 1000, seed: int = 0) -> Comparison:
    """Paired comparison over the cases both variants judged.

    McNemar's exact test runs on per-judgment correctness (each case in each order: the units whose mean
    is the accuracy); the paired bootstrap resamples cases, keeping a case's two orders together.
    """
    common = [cid for cid in a.cases if cid in b.cases]
    if not common:
        raise ValueError(f"{a.protocol} and {b.protocol} share no case on {a.dataset}")
    only_a = only_b = 0
    for cid in common:
        for o in ORDERS:
            ra, rb = a.cases[cid].correct(o), b.cases[cid].correct(o)
            only_a += ra and not rb
            only_b += rb and not ra
    sa = [a.cases[cid].score() for cid in common]
    sb = [b.cases[cid].score() for cid in common]
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


def table1(metric_rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The paper's Table 1 layout: one row per judge × protocol, data sets as columns, the average last.

    Cells are accuracy in percent; the average is the unweighted mean over the data sets a row has.
    With several judges, rows `mean over judges` follow. Returns (columns, rows).
    """
    datasets = list(dict.fromkeys(m["dataset"] for m in metric_rows))
    judges = list(dict.fromkeys(m["judge"] for m in metric_rows))
    protocols = list(dict.fromkeys(m["protocol"] for m in metric_rows))
    acc = {(m["judge"], m["protocol"], m["dataset"]): m["accuracy"] for m in metric_rows}
    columns = ["judge", "protocol", *datasets, AVERAGE]
    rows = []

    def row(judge: str, protocol: str, values: dict[str, float | None]) -> dict[str, Any]:
        present = [x for x in values.values() if x is not None]
        avg = sum(present) / len(present) if present else None
        cells = {d: None if values.get(d) is None else round(100 * values[d], 1) for d in datasets}  # type: ignore[operator]
        return {"judge": judge, "protocol": protocol, **cells, AVERAGE: None if avg is None else round(100 * avg, 1)}

    for judge in judges:
        for protocol in protocols:
            values = {d: acc.get((judge, protocol, d)) for d in datasets}
            if any(x is not None for x in values.values()):
                rows.append(row(judge, protocol, values))
    if len(judges) > 1:
        for protocol in protocols:
            values: dict[str, float | None] = {}
            for d in datasets:
                xs = [acc[(j, protocol, d)] for j in judges if acc.get((j, protocol, d)) is not None]
                values[d] = sum(xs) / len(xs) if xs else None
            rows.append(row("mean over judges", protocol, values))
    return columns, rows


PERCENT = (
    "accuracy",
    "ci_low",
    "ci_high",
    "acc_forward",
    "acc_swapped",
    "acc_soft",
    "consistency",
    "first_position_rate",
    "parse_failure_rate",
    "agreement",
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
    "acc_forward",
    "acc_swapped",
    "acc_soft",
    "consistency",
    "first_position_rate",
    "parse_failure_rate",
    "call_errors",
    "len_preferred",
    "len_other",
    "len_human_preferred",
    "len_human_other",
    "judgments",
    "tokens_in",
    "tokens_out",
)


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

    def files(self) -> dict[str, str]:
        """File name → content: Table 1 and the full metrics as CSV and Markdown, and judge agreement."""
        out = {
            "table1.csv": to_csv(self.table1_columns, self.table1),
            "table1.md": to_markdown(self.table1_columns, self.table1),
            "metrics.csv": to_csv(METRIC_COLUMNS, self.metrics),
            "metrics.md": to_markdown(METRIC_COLUMNS, self.metrics, percent=True),
        }
        if self.agreement:
            columns = list(self.agreement[0])
            out["agreement.csv"] = to_csv(columns, self.agreement)
            out["agreement.md"] = to_markdown(columns, self.agreement, percent=True)
        return out


def build_report(rows: Iterable[dict[str, Any]], resamples: int = 1000, seed: int = 0) -> Report:
    """Metrics per judge × protocol variant × data set, Table 1, and agreement between judges."""
    vs = variants(rows)
    metric_rows = [metrics(v, resamples, seed) for v in vs]
    columns, t1 = table1(metric_rows)
    return Report(metric_rows, columns, t1, agreement(vs))


def _pooled(vs: Sequence[Variant]) -> Variant:
    """Several data sets' variants as one (case ids prefixed with their data set)."""
    out = Variant("all", vs[0].judge, vs[0].protocol)
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
) -> tuple[list[Comparison], list[str]]:
    """Paired comparisons per data set (and pooled over them when there are several) from eval rows."""
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
        results.append(compare(va, vb, resamples, seed))
        pairs.append((va, vb))
    if not results:
        raise UserInputError(f"no data set was judged by {judge} with both {protocol_a} and {protocol_b}")
    if len(pairs) > 1:
        results.append(compare(_pooled([a for a, _ in pairs]), _pooled([b for _, b in pairs]), resamples, seed))
    return results, notes
