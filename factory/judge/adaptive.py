"""The adaptive comparison schedule (the interface and all-pairs: `factory/judge/schedule.py`).

`Adaptive` aims at the same chosen and rejected sample as all-pairs with far fewer calls: a knockout for the best
and one for the worst sample, then more comparisons only where the soft scores leave the choice in doubt.

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

The rating math it rests on (the fit, its predictions and their uncertainty) is in `factory/judge/rating.py`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from factory.judge.rating import Fit, dot, logit, spd_inverse
from factory.judge.schedule import Pair, Schedule

NOISE_SHARE = 0.5
"""Without a given `noise`: the prior noise sd as a share of the rms logit of the prompt's comparisons."""
PRIOR_WEIGHT = 4.0
"""How many comparisons' worth of residuals the prior noise counts for against the prompt's own residuals."""


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
    def _fit(self) -> Fit:
        """Strengths by least squares on the comparisons' logits, their covariance and the predictions."""
        n = len(self.sample_ids)
        pos = self._position
        answers = {(pos[a], pos[b]): p for (a, b), p in self._answers.items()}
        asked = {(pos[a], pos[b]) for a, b in self._asked}
        both = [
            (logit(p) + logit(answers[(j, i)])) / 2.0
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
                    observations.append((i, j, logit(m), 1.0))
                    if m != 0.5:  # a decided match: both orders parsed (one order alone is position-biased)
                        winner, loser = (i, j) if m > 0.5 else (j, i)
                        beaten[loser] = True
                        beat[winner] = True
                elif ab is not None:
                    observations.append((i, j, logit(ab) - bias, 0.5))
                elif ba is not None:
                    observations.append((i, j, -(logit(ba) - bias), 0.5))
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
        cov = spd_inverse(matrix)
        q = [dot(row, rhs) for row in cov]
        # The prompt's own noise: the prior guess, updated by the residuals beyond a spanning tree.
        rss = sum(w * (y - q[i] + q[j]) ** 2 for i, j, y, w in observations)
        extra = max(0.0, sum(w for *_, w in observations) - (n - 1))
        noise = math.sqrt((PRIOR_WEIGHT * prior_noise**2 + rss) / (PRIOR_WEIGHT + extra))
        unasked = [[i != j and (i, j) not in asked and (j, i) not in asked for j in range(n)] for i in range(n)]
        return Fit(q, cov, noise, obs_sum, obs_count, unasked, beaten, beat)

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

    def _in_doubt(self, fit: Fit, order: list[int], sign: int) -> list[int]:
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
