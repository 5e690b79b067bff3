"""Comparison schedules: which ordered pairs of ONE prompt's samples the judge is asked about, round by round.

Pure: no file, SQL or model is touched here. A schedule is driven by the judgments stage, one per prompt:

    schedule = Adaptive(sample_ids, seed=seed)      # or AllPairs(sample_ids): every ordered pair in round 1
    while pairs := schedule.next_round():           # ordered pairs (a, b), both orders of each comparison
        for a, b in pairs:                          # tag each call with schedule.round (1, 2, ...)
            schedule.record(a, b, p_a)              # soft P(a beats b); None when the answer did not parse
    chosen, rejected = schedule.best_worst()        # None when fewer than two samples have a parsed comparison
    scores = schedule.scores()                      # per sample: SampleScore(score, observed, n_comparisons, wins)

Every round's pairs must be recorded before the next round is asked for. The pairs asked depend only on the
sample ids (in the order given: the stage passes them by sample index), the seed and the recorded answers,
so a resumed build that replays the recorded answers asks exactly the same calls again.

All-pairs (the paper's way) asks every ordered pair and scores a sample by its mean soft win probability over
the comparisons it was in (`factory.stages.scores.score_rows`); best-vs-worst takes the highest and the lowest score.

`Adaptive` (`factory/judge/adaptive.py`) aims at the same chosen and rejected sample with far fewer calls.

Scores: `scores()[s].score` is the estimated all-pairs score (judged values plus predictions for the
comparisons not asked) and orders the samples exactly as `best_worst()` does, so `pair_rows` on these scores
picks the same pair. `scores()[s].observed` is the mean soft win probability over the comparisons the sample
was actually in (score_rows' definition, `observed_scores`): with an adaptive schedule it is computed over
far fewer comparisons, and over different opponents for different samples (the leader meets the strong ones),
so its highest and lowest value are not always the adaptive pair; pair by `score`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Pair = tuple[str, str]

__all__ = ["AllPairs", "SampleScore", "Schedule", "observed_scores"]


@dataclass(frozen=True)
class SampleScore:
    """One sample's scores under a schedule."""

    score: float
    """What all-pairs would score the sample, as far as the schedule knows (AllPairs: exactly `observed`);
    orders the samples as `best_worst` does."""
    observed: float | None
    """Mean soft win probability over the sample's parsed comparisons (`score_rows`); None if it has none."""
    n_comparisons: int
    """Parsed ordered comparisons the sample was in (either position)."""
    wins: int
    """Parsed comparisons whose soft score favours the sample (p > 0.5 for it)."""


def observed_scores(comparisons: Iterable[tuple[str, str, float | None]]) -> dict[str, tuple[float, int, int]]:
    """Per sample (mean soft win probability, parsed comparisons, wins) over (a, b, P(a beats b)) answers.

    The score is `factory.stages.scores.score_rows`' (a gets p, b gets 1 − p, None is left out), given one answer per
    ordered pair (several references' votes already combined by `pair_probability`). Wins here count p > 0.5
    for a and p < 0.5 for b; score_rows counts parsed verdicts instead (the same unless they disagree).
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    wins: dict[str, int] = {}
    for a, b, p in comparisons:
        if p is None:
            continue
        for s, v in ((a, p), (b, 1.0 - p)):
            sums[s] = sums.get(s, 0.0) + v
            counts[s] = counts.get(s, 0) + 1
            wins[s] = wins.get(s, 0) + (v > 0.5)
    return {s: (sums[s] / counts[s], counts[s], wins[s]) for s in sums}


class Schedule:
    """The bookkeeping every schedule shares: rounds, asked pairs, recorded answers, scores."""

    def __init__(self, sample_ids: Sequence[str]) -> None:
        ids = [str(s) for s in sample_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("a schedule's sample ids must be distinct (merge copies of one text first)")
        self.sample_ids: list[str] = ids
        self._position = {s: i for i, s in enumerate(ids)}
        self.round = 0
        """The round of the pairs the last `next_round` returned (from 1; 0 before the first)."""
        self._asked: dict[Pair, int] = {}  # ordered pair -> round asked, in asking order
        self._answers: dict[Pair, float | None] = {}
        self._pending: set[Pair] = set()
        self._finished = False

    # ------------------------------------------------------------------------------------------- driving
    def next_round(self) -> list[Pair]:
        """The ordered pairs (a, b) to judge now, both orders of each comparison; [] when the schedule is done."""
        if self._finished:
            return []
        if self._pending:
            missing = sorted(self._pending)
            raise ValueError(f"record every pair of round {self.round} first ({len(missing)} left, e.g. {missing[0]})")
        pairs = self._choose() if len(self.sample_ids) >= 2 else []
        if not pairs:
            self._finished = True
            return []
        self.round += 1
        for pair in pairs:
            self._asked[pair] = self.round
            self._pending.add(pair)
        return pairs

    def record(self, a: str, b: str, p_a: float | None) -> None:
        """The judge's soft P(a beats b) for a pair of the current round; None when it did not parse or failed."""
        if (a, b) not in self._pending:
            state = "was already recorded" if (a, b) in self._answers else "was not asked in this round"
            raise ValueError(f"pair ({a}, {b}) {state}")
        if p_a is not None:
            p_a = float(p_a)
            if math.isnan(p_a):
                p_a = None
            elif not 0.0 <= p_a <= 1.0:
                raise ValueError(f"p_a must be a probability in [0, 1] or None, got {p_a}")
        self._pending.discard((a, b))
        self._answers[(a, b)] = p_a

    @property
    def done(self) -> bool:
        """True once `next_round` has returned [] (it keeps doing so)."""
        return self._finished

    @property
    def calls(self) -> int:
        """Ordered pairs asked so far (judge calls, per reference)."""
        return len(self._asked)

    def asked_round(self, a: str, b: str) -> int | None:
        """The round in which (a, b) was asked, or None."""
        return self._asked.get((a, b))

    def comparisons(self) -> list[tuple[str, str, float | None, int]]:
        """(a, b, recorded p_a or None, round asked) for every recorded pair, in asking order."""
        return [(a, b, self._answers[(a, b)], r) for (a, b), r in self._asked.items() if (a, b) in self._answers]

    # ------------------------------------------------------------------------------------------- results
    def observed(self) -> dict[str, tuple[float, int, int]]:
        """`observed_scores` over the recorded answers."""
        return observed_scores((a, b, p) for a, b, p, _ in self.comparisons())

    def scores(self) -> dict[str, SampleScore]:
        """Per sample with at least one parsed comparison: its scores (see `SampleScore`)."""
        estimate = self._estimated()
        return {
            s: SampleScore(estimate[s], mean, n, wins)
            for s, (mean, n, wins) in self.observed().items()
            if s in estimate
        }

    def best_worst(self) -> tuple[str, str] | None:
        """(chosen, rejected): the highest and the lowest `score` (ties: earlier sample id first, as pair_rows
        breaks ties by sample index); None when fewer than two samples have a parsed comparison."""
        scored = self.scores()
        if len(scored) < 2:
            return None
        ranked = sorted(scored, key=lambda s: (-scored[s].score, self._position[s]))
        return ranked[0], ranked[-1]

    # -------------------------------------------------------------------------------------- for subclasses
    def _choose(self) -> list[Pair]:
        raise NotImplementedError

    def _estimated(self) -> dict[str, float]:
        return {s: mean for s, (mean, _, _) in self.observed().items()}


class AllPairs(Schedule):
    """Every ordered pair in round 1 (the paper's way, in `judge_calls`' order); scores are the observed means."""

    def _choose(self) -> list[Pair]:
        if self.round:
            return []
        return [(a, b) for a in self.sample_ids for b in self.sample_ids if a != b]
