"""Adaptive comparison schedule vs all-pairs: same chosen and rejected sample, at what share of the judge calls?

Two measurements, each comparing `factory.judge.adaptive.Adaptive` with all-pairs on the SAME judge answers (each
ordered pair of a prompt is answered once and both schedules read that answer):

(a) a simulated judge (the main figure): latent sample qualities q ~ N(0, 1); the judge's soft score for
    (a shown first, b second) is logistic(sharpness · (q_a − q_b) + bias + noise), the noise sd set so that
    the verdict (p > 0.5) names the better sample `--accuracy` of the time (averaged over both positions;
    default 79 %, the paper's RefEval average). `--shared` of the noise variance is the pair's own (the judge
    misreads the pair the same way in both orders), the rest is per call; `--fail` of the answers do not parse.
(b) a replay of real judgments: an all-pairs build's `judgments` table answers the adaptive schedule's
    questions, and its pairs are compared with the pairs `score_rows` + `pair_rows` make from all the rows.

Agreement = share of prompts where adaptive picks the same chosen AND the same rejected sample as all-pairs.
Calls = adaptive judge calls / all-pairs judge calls. "vs truth" columns: how often each picks the truly best
and worst sample (simulation only): disagreement with all-pairs is mostly all-pairs' own noise.
"naive obs" = agreement if the stage paired by the observed means (score_rows on the adaptive rows) instead
of `best_worst()` / `scores()[s].score`: do not do that.
`--oracle` adds a bound: the same schedule told the true sample strengths and noise level (only each call's
own noise is unknown to it), without the knockout rule: what agreement any schedule of this kind can reach
for a given share of calls, when all-pairs' own picks are this noisy.

    python bench/adaptive.py                                    # simulation, n = 5 and 16, 2000 prompts each
    python bench/adaptive.py --accuracy 0.9                     # another judge
    python bench/adaptive.py --sweep --oracle                   # agreement / calls for several confidences
    python bench/adaptive.py --warehouse WH --recipe quickstart  # plus the replay
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

from factory.judge.adaptive import Adaptive
from factory.judge.rating import Fit
from factory.judge.schedule import AllPairs, Schedule

# ------------------------------------------------------------------------------------------- the judge


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def verdict_accuracy(sigma: float, sharpness: float, bias: float) -> float:
    """P(the verdict names the better of two N(0, 1) samples), averaged over both positions."""
    if sigma <= 0:
        sigma = 1e-9
    steps, top = 2000, 8.0
    total = 0.0
    for k in range(steps):
        z = (k + 0.5) * top / steps  # |q_a − q_b| = √2 · |z|
        d = sharpness * math.sqrt(2.0) * z
        weight = 2.0 * math.exp(-z * z / 2.0) / math.sqrt(2.0 * math.pi) * top / steps
        total += weight * 0.5 * (_phi((d + bias) / sigma) + _phi((d - bias) / sigma))
    return total


def noise_for_accuracy(accuracy: float, sharpness: float, bias: float) -> float:
    """The logit-scale noise sd that gives the judge this verdict accuracy (bisection)."""
    best = verdict_accuracy(0.0, sharpness, bias)
    if not 0.5 < accuracy < best:
        raise SystemExit(f"--accuracy must be in (0.5, {best:.3f}) with this sharpness and bias")
    lo, hi = 1e-6, 100.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if verdict_accuracy(mid, sharpness, bias) > accuracy:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def simulated_prompt(
    rng: random.Random, n: int, sharpness: float, bias: float, sigma: float, shared: float, fail: float
) -> tuple[list[float], dict[tuple[int, int], float | None]]:
    """Qualities and the judge's answer to every ordered pair (i, j): soft P(i, shown first, beats j)."""
    q = [rng.gauss(0.0, 1.0) for _ in range(n)]
    answers: dict[tuple[int, int], float | None] = {}
    own, per_call = sigma * math.sqrt(shared), sigma * math.sqrt(1.0 - shared)
    for i in range(n):
        for j in range(i + 1, n):
            misread = rng.gauss(0.0, own)  # in favour of i, in both orders
            for a, b, sign in ((i, j, 1.0), (j, i, -1.0)):
                logit = sharpness * (q[a] - q[b]) + bias + sign * misread + rng.gauss(0.0, per_call)
                answers[(a, b)] = None if rng.random() < fail else 1.0 / (1.0 + math.exp(-logit))
    return q, answers


def extremes(values: dict[int, float]) -> tuple[int, int] | None:
    """(highest, lowest) with pair_rows' tie-break (lower index first)."""
    if len(values) < 2:
        return None
    ranked = sorted(values, key=lambda i: (-values[i], i))
    return ranked[0], ranked[-1]


def run_schedule(schedule: Schedule, answer: Any) -> None:
    while pairs := schedule.next_round():
        for a, b in pairs:
            schedule.record(a, b, answer(a, b))


def match_noise(judge: dict[str, float], draws: int = 20000) -> float:
    """The simulated judge's noise sd on the logit of a both-order mean (what Adaptive's `noise` stands for)."""
    rng = random.Random(1)
    residuals = []
    for _ in range(draws // 2):
        q, answers = simulated_prompt(rng, 2, **{**judge, "fail": 0.0})
        m = min(0.995, max(0.005, (answers[(0, 1)] + 1.0 - answers[(1, 0)]) / 2.0))  # type: ignore[operator]
        residuals.append(math.log(m / (1.0 - m)) - judge["sharpness"] * (q[0] - q[1]))
    return math.sqrt(sum(r * r for r in residuals) / len(residuals))


class Oracle(Adaptive):
    """Adaptive told the true strengths (sharpness · q) and the judge's noise: no estimation error, and no
    knockout rule; only the noise of the calls not made is unknown. A bound for schedules of this kind."""

    def __init__(self, sample_ids: list[str], strengths: list[float], noise: float, **kwargs: Any) -> None:
        super().__init__(sample_ids, **kwargs)
        self.strengths, self.true_noise = strengths, noise

    def _fit(self) -> Fit:
        fit = super()._fit()
        n = len(self.sample_ids)
        pos = self._position
        totals = [0.0] * n
        for (a, b), p in self._answers.items():
            if p is not None:
                totals[pos[a]] += p
                totals[pos[b]] += 1.0 - p
        zero = [[0.0] * n for _ in range(n)]
        return Fit(self.strengths, zero, self.true_noise, totals, fit.obs_count, fit.unasked, [True] * n, [True] * n)


def simulate(
    n: int, prompts: int, judge: dict[str, float], seed: int, oracle: bool = False, **kwargs: Any
) -> dict[str, float]:
    rng = random.Random(seed * 1_000_003 + n)
    noise = match_noise(judge) if oracle else 0.0
    counts: dict[str, float] = defaultdict(float)
    for k in range(prompts):
        q, answers = simulated_prompt(rng, n, **judge)
        ids = [f"s{i:02d}" for i in range(n)]
        index = {s: i for i, s in enumerate(ids)}

        def answer(a: str, b: str, answers: dict = answers, index: dict = index) -> float | None:
            return answers[(index[a], index[b])]

        full = AllPairs(ids)
        run_schedule(full, answer)
        if oracle:
            adaptive: Adaptive = Oracle(ids, [judge["sharpness"] * x for x in q], noise, seed=k, **kwargs)
        else:
            adaptive = Adaptive(ids, seed=k, **kwargs)
        run_schedule(adaptive, answer)
        truth = (ids[max(range(n), key=q.__getitem__)], ids[min(range(n), key=q.__getitem__)])
        reference = full.best_worst()
        picked = adaptive.best_worst()
        naive_pick = extremes({index[s]: m for s, (m, _, _) in adaptive.observed().items()})
        naive = None if naive_pick is None else (ids[naive_pick[0]], ids[naive_pick[1]])
        counts["prompts"] += 1
        counts["agree"] += picked == reference
        counts["chosen"] += picked is not None and reference is not None and picked[0] == reference[0]
        counts["rejected"] += picked is not None and reference is not None and picked[1] == reference[1]
        counts["naive"] += naive == reference
        counts["full_truth"] += reference == truth
        counts["adaptive_truth"] += picked == truth
        counts["calls"] += adaptive.calls
        counts["full_calls"] += full.calls
        counts["rounds"] += adaptive.round
        counts["max_fraction"] = max(counts["max_fraction"], adaptive.calls / full.calls)
    return counts


# ----------------------------------------------------------------------------------------------- replay


def replay(
    path: str, recipe: str | None, scoring: str, seed: int, **kwargs: Any
) -> tuple[dict[int, dict[str, float]], str]:
    """Adaptive vs all-pairs on a warehouse's judgments, per number of samples n."""
    from factory.stages.judgments import pair_probability
    from factory.stages.pairs import pair_rows
    from factory.stages.scores import score_rows
    from factory.warehouse.store import Warehouse

    wh = Warehouse(path)
    recipe_filter = [] if recipe is None else ["recipe = '" + recipe.replace("'", "''") + "'"]
    judgment_filter = list(recipe_filter)
    if "schedule" in wh.query("SELECT * FROM judgments LIMIT 0").column_names:
        judgment_filter.append("coalesce(schedule, 'all-pairs') = 'all-pairs'")

    def where(conditions: list[str]) -> str:
        return " WHERE " + " AND ".join(conditions) if conditions else ""

    judgments = wh.query(
        "SELECT recipe, coalesce(round, -1) AS rnd, prompt_id, sample_a, sample_b, verdict, p_a, parse_status"
        " FROM judgments" + where(judgment_filter)
    ).to_pylist()
    samples = wh.query(
        "SELECT recipe, coalesce(round, -1) AS rnd, sample_id, prompt_id, sample_index, text, error,"
        " n_tokens, n_prompt_tokens FROM samples" + where(recipe_filter)
    ).to_pylist()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for j in judgments:
        groups[(j["recipe"], j["rnd"], j["prompt_id"])].append(j)
    sample_groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in samples:
        sample_groups[(s["recipe"], s["rnd"], s["prompt_id"])].append(s)
    spec = SimpleNamespace(max_tokens=None, min_margin=-math.inf)
    by_n: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    skipped = 0
    for key, rows in groups.items():
        votes: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in rows:
            votes[(r["sample_a"], r["sample_b"])].append(r)
        index = {s["sample_id"]: s["sample_index"] for s in sample_groups[key]}
        ids = sorted({s for pair in votes for s in pair}, key=lambda s: (index.get(s, 1 << 30), s))
        n = len(ids)
        if n < 2 or len(votes) != n * (n - 1):
            skipped += 1  # not an all-pairs prompt in both orders (forward-only, or rows missing)
            continue
        full = pair_rows(sample_groups[key], score_rows(sample_groups[key], rows, scoring).rows, spec).rows
        reference = (full[0]["chosen_sample_id"], full[0]["rejected_sample_id"]) if full else None

        def answer(a: str, b: str, votes: dict = votes) -> float | None:
            return pair_probability(votes[(a, b)], scoring)[0]

        adaptive = Adaptive(ids, seed=seed, **kwargs)
        run_schedule(adaptive, answer)
        asked = [r for r in rows if adaptive.asked_round(r["sample_a"], r["sample_b"])]
        naive_rows = pair_rows(sample_groups[key], score_rows(sample_groups[key], asked, scoring).rows, spec).rows
        naive = (naive_rows[0]["chosen_sample_id"], naive_rows[0]["rejected_sample_id"]) if naive_rows else None
        picked = adaptive.best_worst()
        c = by_n[n]
        c["prompts"] += 1
        c["agree"] += picked == reference
        c["chosen"] += picked is not None and reference is not None and picked[0] == reference[0]
        c["rejected"] += picked is not None and reference is not None and picked[1] == reference[1]
        c["naive"] += naive == reference
        c["calls"] += adaptive.calls
        c["full_calls"] += n * (n - 1)
        c["rounds"] += adaptive.round
        c["max_fraction"] = max(c["max_fraction"], adaptive.calls / (n * (n - 1)))
    note = f"{len(groups)} prompt groups in {path}" + (f" (recipe {recipe})" if recipe else "")
    if skipped:
        note += f", {skipped} skipped (not all ordered pairs judged)"
    return by_n, note


# ------------------------------------------------------------------------------------------------ print


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table with aligned columns."""
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def row(n: int, c: dict[str, float], aims: dict[int, float], simulated: bool) -> list[Any]:
    p = c["prompts"]
    fraction = c["calls"] / c["full_calls"]
    agree = c["agree"] / p
    aim = aims.get(n)
    met = "-" if aim is None else ("yes" if agree >= 0.95 and fraction <= aim else "no")
    cells = [n, int(p), pct(agree), pct(c["chosen"] / p), pct(c["rejected"] / p), pct(fraction)]
    cells += [pct(c["max_fraction"]), f"{c['rounds'] / p:.1f}", pct(c["naive"] / p)]
    if simulated:
        cells += [pct(c["full_truth"] / p), pct(c["adaptive_truth"] / p)]
    return [*cells, met]


HEADER = ["n", "prompts", "agreement", "chosen", "rejected", "calls", "max calls", "rounds", "naive obs"]
AIMS = {5: 0.50, 16: 0.25}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2000, help="simulated prompts per n (default 2000)")
    ap.add_argument("--n", type=int, nargs="+", default=[5, 16], help="samples per prompt (default 5 16)")
    ap.add_argument("--accuracy", type=float, default=0.79, help="judge verdict accuracy (default 0.79)")
    ap.add_argument("--bias", type=float, default=0.5, help="first-position bias, logit scale (default 0.5)")
    ap.add_argument("--sharpness", type=float, default=2.0, help="logit per unit of quality gap (default 2)")
    ap.add_argument("--shared", type=float, default=0.5, help="share of noise variance the pair's own (0.5)")
    ap.add_argument("--fail", type=float, default=0.0, help="share of answers that do not parse (default 0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--confidence", type=float, default=None, help="Adaptive(confidence=...) (default: its own)")
    ap.add_argument("--sweep", action="store_true", help="also a sweep over confidence (500 prompts each)")
    ap.add_argument("--oracle", action="store_true", help="also the bound: a schedule told the true strengths")
    ap.add_argument("--warehouse", help="replay the judgments of this (all-pairs) warehouse")
    ap.add_argument("--recipe", help="only this recipe's judgments (default: all)")
    ap.add_argument("--scoring", choices=["logprob", "verdict"], default="logprob", help="as the recipe's")
    args = ap.parse_args(argv)
    kwargs = {} if args.confidence is None else {"confidence": args.confidence}
    defaults = Adaptive(["x"], **kwargs)

    sigma = noise_for_accuracy(args.accuracy, args.sharpness, args.bias)
    judge = dict(sharpness=args.sharpness, bias=args.bias, sigma=sigma, shared=args.shared, fail=args.fail)
    first = 1 / (1 + math.exp(-args.bias))
    print(
        f"settings: judge accuracy {pct(args.accuracy)}, first-position bias {args.bias} logit (a tie goes to "
        f"the first {pct(first)}), sharpness {args.sharpness}, noise sd {sigma:.2f} logit ({pct(args.shared)} "
        f"shared by both orders), unparsed {pct(args.fail)}; Adaptive(confidence={defaults.confidence}, "
        f"noise={defaults.noise}, spread={defaults.spread}); {args.prompts} prompts per n, seed {args.seed}"
    )
    print()
    print("(a) simulated judge: adaptive vs all-pairs on the same answers")
    started = time.perf_counter()
    rows = [row(n, simulate(n, args.prompts, judge, args.seed, **kwargs), AIMS, True) for n in args.n]
    elapsed = time.perf_counter() - started
    print(table([*HEADER, "all-pairs = truth", "adaptive = truth", "aim met"], rows))
    print(f"aims: agreement >= 95 % with calls <= 50 % at n = 5, <= 25 % at n = 16 ({elapsed:.1f} s)")

    if args.sweep:
        print()
        print("confidence sweep (simulated judge, 500 prompts per cell): agreement / calls")
        cells = []
        for z in (0.5, 1.0, 1.5, 2.0, 3.0):
            results = [simulate(n, 500, judge, args.seed, **{**kwargs, "confidence": z}) for n in args.n]
            cells.append(
                [z, *(f"{pct(c['agree'] / c['prompts'])} / {pct(c['calls'] / c['full_calls'])}" for c in results)]
            )
        print(table(["confidence", *(f"n = {n}" for n in args.n)], cells))

    if args.oracle:
        print()
        print("bound: the schedule told the true strengths and noise (300 prompts per cell): agreement / calls")
        cells = []
        for z in (1.0, 1.5, 2.0, 2.5):
            results = [simulate(n, 300, judge, args.seed, oracle=True, confidence=z) for n in args.n]
            cells.append(
                [z, *(f"{pct(c['agree'] / c['prompts'])} / {pct(c['calls'] / c['full_calls'])}" for c in results)]
            )
        print(table(["confidence", *(f"n = {n}" for n in args.n)], cells))

    if args.warehouse:
        print()
        print(f"(b) replay of real judgments (scoring: {args.scoring})")
        by_n, note = replay(args.warehouse, args.recipe, args.scoring, args.seed, **kwargs)
        if not by_n:
            print(f"no all-pairs prompt to replay: {note}")
        else:
            print(table([*HEADER, "aim met"], [row(n, c, AIMS, False) for n, c in sorted(by_n.items())]))
            total = sum(c["prompts"] for c in by_n.values())
            print(
                note
                + (
                    f"; only {int(total)} prompts: too few for a figure (± {pct(1 / math.sqrt(total))})"
                    if total < 200
                    else ""
                )
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
