"""Rating math of the adaptive schedule, pure: a Bradley–Terry fit's predictions for the comparisons not yet
asked and their uncertainty, and the small linear algebra it needs (`factory/judge/adaptive.py` fits it).
"""

from __future__ import annotations

import math
import operator

from factory.core.stats import sigmoid

# Gauss–Hermite nodes and weights for E f(Z), Z ~ N(0, 1) (probabilists', 5 points).
_X1, _X2 = 1.3556261799742657, 2.8569700138728056
_W0, _W1, _W2 = 0.5333333333333333, 0.2220759220056126, 0.011257411327720691


def logit(p: float, eps: float = 0.005) -> float:
    """log(p / (1 − p)), with p clipped to [eps, 1 − eps] so a certain answer stays finite."""
    p = min(1.0 - eps, max(eps, p))
    return math.log(p / (1.0 - p))


def noisy_sigmoid(d: float, sd: float) -> tuple[float, float, float]:
    """Mean, slope (d/dd of the mean) and variance of sigmoid(d + sd·Z), Z ~ N(0, 1)."""
    s = (sigmoid(d), sigmoid(d + sd * _X1), sigmoid(d - sd * _X1), sigmoid(d + sd * _X2), sigmoid(d - sd * _X2))
    mean = _W0 * s[0] + _W1 * (s[1] + s[2]) + _W2 * (s[3] + s[4])
    square = _W0 * s[0] ** 2 + _W1 * (s[1] ** 2 + s[2] ** 2) + _W2 * (s[3] ** 2 + s[4] ** 2)
    slope = (
        _W0 * s[0] * (1 - s[0])
        + _W1 * (s[1] * (1 - s[1]) + s[2] * (1 - s[2]))
        + _W2 * (s[3] * (1 - s[3]) + s[4] * (1 - s[4]))
    )
    return mean, slope, max(0.0, square - mean * mean)


def dot(x: list[float], y: list[float]) -> float:
    """The dot product of two vectors."""
    return sum(map(operator.mul, x, y))


class Fit:
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
                    m, g, v = noisy_sigmoid(q[i] - q[j], noise)
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
            cus = [[dot(row, u) for row in self.cov] for u in us]
            quads = [dot(u, cu) for u, cu in zip(us, cus, strict=True)]
            self._gradients = (us, cus, quads, noises)
        return self._gradients

    def gap_variance(self, t: int, i: int) -> float:
        """Var(ŝ_t − ŝ_i): the fit's uncertainty and the noise of the comparisons not yet asked."""
        us, cus, quads, noises = self._gradient_terms()
        model = (quads[t] + quads[i] - 2.0 * dot(us[t], cus[i])) * self.noise**2
        noise = noises[t] + noises[i]
        if self.unasked[t][i]:
            # The comparison of t and i enters both estimates, in opposite directions: its noise adds up.
            a, b = 2.0 / self.count[t], 2.0 / self.count[i]
            noise += ((a + b) ** 2 - a * a - b * b) * self.var[t][i]
        return max(0.0, model) + noise


def spd_inverse(matrix: list[list[float]]) -> list[list[float]]:
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
