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

`Adaptive` aims at the same chosen and rejected sample with far fewer calls: a knockout for the best and one
for the worst sample, then more comparisons only where the soft scores leave the choice in doubt.

* Round 1 pairs the samples at random (seeded): n // 2 comparisons, the first split of both knockouts at
  once (winners go on towards the top, losers towards the bottom; an odd sample out is in both).
* After each round the schedule estimates what all-pairs would score every sample: the mean of its judged
  values (exactly what all-pairs would see: the same judge answers the same pair the same way) and, for the
  comparisons not asked yet, a prediction. The predictions come from a Bradley–Terry fit by least squares:
  logit(both-order mean p) = q_a − q_b + noise, with a Gaussian prior on q (the position bias cancels in
  the both-order mean; a pair with one order parsed counts at half weight after subtracting the prompt's
  mean bias). The noise sd is the prompt's own: a prior guess (half the rms logit of its comparisons, so a
  judge whose logits are ±0.1 and one whose logits are ±5 are treated alike) updated by the fit's residuals.
  A prediction is the mean of sigmoid(q̂_a − q̂_b + noise); its uncertainty is the fit's posterior
  covariance plus that noise, and it is small where the outcome is clear (a strong sample against a weak
  one), large for close pairs.
* The leader (highest estimate; ties by sample order, as `pair_rows`) is settled when every other sample
  trails it by at least `confidence` standard deviations of the estimated gap, and no sample is left that
  the knockout has not ruled out: a sample never beaten (in a comparison decided in both orders) stays in
  doubt while it has not met the leader or the leader has been beaten. The same for the bottom sample
  ("never won"). A sample with no parsed comparison stays in doubt while it has comparisons left.
* Each later round gives every sample in doubt (top and bottom taking turns, leaders first) one
  comparison: the one not asked yet whose outcome is the least predictable (the leader meets its closest
  rivals, a rival meets what would move its score most). A sample plays at most once per round, and every
  comparison is asked in both orders in the same round, so the position bias cancels.
* The schedule ends when the top and the bottom are settled, when nothing that could help is left to ask,
  or at `max_calls`. With a consistent judge (the better sample wins every comparison) the knockout rule
  alone guarantees the true best and worst; with a noisy one, `confidence` trades calls for agreement with
  all-pairs (bench/adaptive.py measures it).

Failed answers (`record(..., None)`: unparsed or errored) are never guessed and never asked again (a
deterministic judge would give the same answer, and the stage's call cache holds it under the same key):
the comparison is left out of the scores exactly as `score_rows` leaves it out, a match counts as won or lost
only when both orders parsed, and the schedule falls back on other comparisons for the information (the
samples stay in doubt until other comparisons settle them). The schedule still ends: every round asks at
least one comparison never asked before, and a finished schedule's best guess stands.

Scores: `scores()[s].score` is the estimated all-pairs score (judged values plus predictions for the
comparisons not asked) and orders the samples exactly as `best_worst()` does, so `pair_rows` on these scores
picks the same pair. `scores()[s].observed` is the mean soft win probability over the comparisons the sample
was actually in (score_rows' definition, `observed_scores`): with an adaptive schedule it is computed over
far fewer comparisons, and over different opponents for different samples (the leader meets the strong ones),
so its highest and lowest value are not always the adaptive pair; pair by `score`.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Pair = tuple[str, str]

__all__ = ["Adaptive", "AllPairs", "SampleScore", "Schedule", "observed_scores"]


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


class Adaptive(Schedule):
    """Comparisons where they decide the best and the worst sample (module docstring: model, rules, rounds).

    confidence: standard deviations by which the leader (and the bottom sample) must lead every other sample's
        estimated all-pairs score before the schedule stops; higher asks more and agrees more with all-pairs
        (2.0: about 95 % agreement with a 79 %-accurate simulated judge; 0 leaves only the knockout rule).
    noise: the prior guess of the logit-scale noise sd of one comparison (both orders averaged); None: half
        the rms logit of the prompt's comparisons. Each prompt's residuals update it. A small value (0.05)
        tells the schedule the judge is nearly noiseless.
    spread: the prior sd of the samples' strengths q (logit scale); None: the rms logit over √2.
    max_calls: a hard cap on the ordered pairs asked (None: no cap); the best guess so far stands at the cap.
    seed: the random pairing of round 1 (and the order among equal estimates).
    """

    def __init__(
        self,
        sample_ids: Sequence[str],
        *,
        confidence: float = 2.0,
        noise: float | None = None,
        spread: float | None = None,
        max_calls: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(sample_ids)
        if confidence < 0 or (noise is not None and noise <= 0) or (spread is not None and spread <= 0):
            raise ValueError("confidence must be >= 0, noise and spread > 0 (or None)")
        self.confidence = confidence
        self.noise = noise
        self.spread = spread
        self.max_calls = max_calls
        self.seed = seed
        order = list(range(len(self.sample_ids)))
        random.Random(seed).shuffle(order)
        self._draw = {self.sample_ids[i]: k for k, i in enumerate(order)}  # seeded order among equals

    # ------------------------------------------------------------------------------------------ the model
    def _fit(self) -> _Fit:
        """Strengths by least squares on the comparisons' logits, their covariance and the predictions."""
        n = len(self.sample_ids)
        pos = self._position
        answers = {(pos[a], pos[b]): p for (a, b), p in self._answers.items()}
        asked = {(pos[a], pos[b]) for a, b in self._asked}
        both = [
            (_logit(p) + _logit(answers[(j, i)])) / 2.0
            for (i, j), p in answers.items()
            if i < j and p is not None and answers.get((j, i)) is not None
        ]
        bias = sum(both) / len(both) if both else 0.0
        obs_sum = [0.0] * n
        obs_count = [0] * n
        for (i, j), p in answers.items():
            if p is not None:
                obs_sum[i] += p
                obs_sum[j] += 1.0 - p
                obs_count[i] += 1
                obs_count[j] += 1
        # One observation per compared pair: the logit of the both-order mean (bias cancels), or of the one
        # parsed order less the bias, at half weight.
        observations: list[tuple[int, int, float, float]] = []
        beaten, beat = [False] * n, [False] * n
        for i in range(n):
            for j in range(i + 1, n):
                ab, ba = answers.get((i, j)), answers.get((j, i))
                if ab is not None and ba is not None:
                    m = (ab + 1.0 - ba) / 2.0
                    observations.append((i, j, _logit(m), 1.0))
                    if m != 0.5:  # a decided match: both orders parsed (one order alone is position-biased)
                        winner, loser = (i, j) if m > 0.5 else (j, i)
                        beaten[loser] = True
                        beat[winner] = True
                elif ab is not None:
                    observations.append((i, j, _logit(ab) - bias, 0.5))
                elif ba is not None:
                    observations.append((i, j, -(_logit(ba) - bias), 0.5))
        # Scales: given, or relative to the prompt's own comparisons (a judge's logits may be ±0.1 or ±5).
        scale = (
            math.sqrt(sum(w * y * y for _, _, y, w in observations) / sum(w for *_, w in observations))
            if observations
            else 1.0
        )
        scale = max(scale, 1e-3)
        prior_noise = self.noise if self.noise is not None else NOISE_SHARE * scale
        spread = self.spread if self.spread is not None else scale / math.sqrt(2.0)
        ridge = (prior_noise / spread) ** 2
        matrix = [[ridge if i == j else 0.0 for j in range(n)] for i in range(n)]
        rhs = [0.0] * n
        for i, j, y, w in observations:
            matrix[i][i] += w
            matrix[j][j] += w
            matrix[i][j] -= w
            matrix[j][i] -= w
            rhs[i] += w * y
            rhs[j] -= w * y
        cov = _spd_inverse(matrix)
        q = [_dot(row, rhs) for row in cov]
        # The prompt's own noise: the prior guess, updated by the residuals beyond a spanning tree.
        rss = sum(w * (y - q[i] + q[j]) ** 2 for i, j, y, w in observations)
        extra = max(0.0, sum(w for *_, w in observations) - (n - 1))
        noise = math.sqrt((PRIOR_WEIGHT * prior_noise**2 + rss) / (PRIOR_WEIGHT + extra))
        unasked = [[i != j and (i, j) not in asked and (j, i) not in asked for j in range(n)] for i in range(n)]
        return _Fit(q, cov, noise, obs_sum, obs_count, unasked, beaten, beat)

    def _estimated(self) -> dict[str, float]:
        fit = self._fit()
        return {s: v for s, v in zip(self.sample_ids, fit.estimates, strict=True) if v is not None}

    # --------------------------------------------------------------------------------------- the rounds
    def _choose(self) -> list[Pair]:
        ids = self.sample_ids
        n = len(ids)
        budget = None if self.max_calls is None else self.max_calls - self.calls
        if budget is not None and budget < 2:
            return []
        fit = self._fit()
        est = fit.estimates
        live = [i for i in range(n) if est[i] is not None]
        if len(live) < 2:
            return []
        draw = [self._draw[s] for s in ids]
        top_order = sorted(live, key=lambda i: (-est[i], i))  # type: ignore[operator]
        bottom_order = sorted(live, key=lambda i: (est[i], i))  # type: ignore[arg-type]
        top_doubt = self._in_doubt(fit, top_order, +1)
        bottom_doubt = self._in_doubt(fit, bottom_order, -1)
        if len(top_doubt) <= 1 and len(bottom_doubt) <= 1:
            return []
        # Take turns: the top's leader, the bottom's leader, the top's next, ...
        queue: list[int] = []
        for k in range(max(len(top_doubt), len(bottom_doubt))):
            for side in (top_doubt, bottom_doubt):
                if k < len(side) and len(side) > 1:
                    queue.append(side[k])
        busy: set[int] = set()
        matches: list[tuple[int, int]] = []
        for i in queue:
            if i in busy:
                continue
            if budget is not None and 2 * (len(matches) + 1) > budget:
                break
            # Its least predictable comparison not yet asked (round 1: a seeded random partner).
            others = [j for j in live if j != i and j not in busy and fit.unasked[i][j]]
            if not others:
                continue
            j = max(others, key=lambda j: (fit.spread_of(i, j), -draw[j]))
            busy.update((i, j))
            matches.append((i, j) if draw[i] < draw[j] else (j, i))
        return [pair for i, j in matches for pair in ((ids[i], ids[j]), (ids[j], ids[i]))]

    def _in_doubt(self, fit: _Fit, order: list[int], sign: int) -> list[int]:
        """The leader of one side (top: sign +1, bottom: −1) and every sample that could still overtake it."""
        est = fit.estimates
        leader = order[0]
        doubt = [leader]
        # The knockout's rule: on the top side, a sample never beaten stays in doubt while the leader has been
        # beaten or the two have not met (with a consistent judge the best sample is never beaten); the same
        # with "never won" on the bottom side.
        unbeaten = [not b for b in (fit.beaten if sign > 0 else fit.beat)]
        for i in order[1:]:
            if fit.obs_count[i] == 0 and any(fit.unasked[i]):
                doubt.append(i)  # never compared successfully yet: measure it first
                continue
            if unbeaten[i] and (not unbeaten[leader] or fit.unasked[leader][i]):
                doubt.append(i)
                continue
            gap = sign * (est[leader] - est[i])  # type: ignore[operator]
            if gap < self.confidence * math.sqrt(fit.gap_variance(leader, i)):
                doubt.append(i)
        return doubt


NOISE_SHARE = 0.5
"""Without a given `noise`: the prior noise sd as a share of the rms logit of the prompt's comparisons."""
PRIOR_WEIGHT = 4.0
"""How many comparisons' worth of residuals the prior noise counts for against the prompt's own residuals."""

# Gauss–Hermite nodes and weights for E f(Z), Z ~ N(0, 1) (probabilists', 5 points).
_X1, _X2 = 1.3556261799742657, 2.8569700138728056
_W0, _W1, _W2 = 0.5333333333333333, 0.2220759220056126, 0.011257411327720691


def _logit(p: float, eps: float = 0.005) -> float:
    p = min(1.0 - eps, max(eps, p))
    return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _noisy_sigmoid(d: float, sd: float) -> tuple[float, float, float]:
    """Mean, slope (d/dd of the mean) and variance of sigmoid(d + sd·Z), Z ~ N(0, 1)."""
    s = (_sigmoid(d), _sigmoid(d + sd * _X1), _sigmoid(d - sd * _X1), _sigmoid(d + sd * _X2), _sigmoid(d - sd * _X2))
    mean = _W0 * s[0] + _W1 * (s[1] + s[2]) + _W2 * (s[3] + s[4])
    square = _W0 * s[0] ** 2 + _W1 * (s[1] ** 2 + s[2] ** 2) + _W2 * (s[3] ** 2 + s[4] ** 2)
    slope = (
        _W0 * s[0] * (1 - s[0])
        + _W1 * (s[1] * (1 - s[1]) + s[2] * (1 - s[2]))
        + _W2 * (s[3] * (1 - s[3]) + s[4] * (1 - s[4]))
    )
    return mean, slope, max(0.0, square - mean * mean)


def _dot(x: list[float], y: list[float]) -> float:
    return sum(map(operator.mul, x, y))


class _Fit:
    """One fit of a prompt's comparisons and what it predicts for the comparisons not yet asked."""

    def __init__(
        self,
        q: list[float],
        cov: list[list[float]],
        noise: float,
        obs_sum: list[float],
        obs_count: list[int],
        unasked: list[list[bool]],
        beaten: list[bool],
        beat: list[bool],
    ) -> None:
        n = len(q)
        self.q, self.cov, self.noise, self.obs_count, self.unasked = q, cov, noise, obs_count, unasked
        self.beaten, self.beat = beaten, beat  # lost / won a match decided in both orders
        # For every pair not asked: the expected value of one judgment for i, its slope in q_i − q_j, its variance.
        self.mean = [[0.0] * n for _ in range(n)]
        self.slope = [[0.0] * n for _ in range(n)]
        self.var = [[0.0] * n for _ in range(n)]
        self.count = [obs_count[i] + 2 * sum(unasked[i]) for i in range(n)]
        estimates: list[float | None] = []
        for i in range(n):
            total = obs_sum[i]
            for j in range(i + 1, n):
                if unasked[i][j]:
                    m, g, v = _noisy_sigmoid(q[i] - q[j], noise)
                    self.mean[i][j], self.slope[i][j], self.var[i][j] = m, g, v
                    self.mean[j][i], self.slope[j][i], self.var[j][i] = 1.0 - m, g, v
            total += 2.0 * sum(m for m, u in zip(self.mean[i], unasked[i], strict=True) if u)
            estimates.append(total / self.count[i] if self.count[i] else None)
        self.estimates = estimates
        self._gradients: tuple[list[list[float]], list[list[float]], list[float], list[float]] | None = None

    def spread_of(self, i: int, j: int) -> float:
        """How uncertain the comparison of i and j is (variance of its value before it is asked)."""
        c = self.cov
        g = self.slope[i][j]
        return self.var[i][j] + g * g * self.noise**2 * (c[i][i] + c[j][j] - 2 * c[i][j])

    def _gradient_terms(self) -> tuple[list[list[float]], list[list[float]], list[float], list[float]]:
        """Per sample s: the gradient u_s of its estimate in q, cov·u_s, u_s·cov·u_s, and the noise variance of
        its values not yet judged."""
        if self._gradients is None:
            n = len(self.q)
            us, noises = [], []
            for s in range(n):
                u = [0.0] * n
                noise = 0.0
                if self.count[s]:
                    scale = 2.0 / self.count[s]
                    for j in range(n):
                        if self.unasked[s][j]:
                            c = scale * self.slope[s][j]
                            u[s] += c
                            u[j] -= c
                            noise += scale * scale * self.var[s][j]
                us.append(u)
                noises.append(noise)
            cus = [[_dot(row, u) for row in self.cov] for u in us]
            quads = [_dot(u, cu) for u, cu in zip(us, cus, strict=True)]
            self._gradients = (us, cus, quads, noises)
        return self._gradients

    def gap_variance(self, t: int, i: int) -> float:
        """Var(ŝ_t − ŝ_i): the fit's uncertainty and the noise of the comparisons not yet asked."""
        us, cus, quads, noises = self._gradient_terms()
        model = (quads[t] + quads[i] - 2.0 * _dot(us[t], cus[i])) * self.noise**2
        noise = noises[t] + noises[i]
        if self.unasked[t][i]:
            # The comparison of t and i enters both estimates, in opposite directions: its noise adds up.
            a, b = 2.0 / self.count[t], 2.0 / self.count[i]
            noise += ((a + b) ** 2 - a * a - b * b) * self.var[t][i]
        return max(0.0, model) + noise


def _spd_inverse(matrix: list[list[float]]) -> list[list[float]]:
    """The inverse of a small symmetric positive-definite matrix (in-place Gauss–Jordan; no pivoting needed)."""
    a = [list(row) for row in matrix]
    n = len(a)
    for k in range(n):
        pivot = a[k][k]
        a[k][k] = 1.0
        row_k = [v / pivot for v in a[k]]
        a[k] = row_k
        for r in range(n):
            if r != k:
                f = a[r][k]
                if f:
                    a[r][k] = 0.0
                    a[r] = [x - f * y for x, y in zip(a[r], row_k, strict=True)]
    return a
