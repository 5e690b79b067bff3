"""The win-rate math of `factory.policy_eval.winrate` on hand-made `eval` rows: pure functions, no warehouse, no model.

The fit is checked against its own stated objective by finite differences, not against the Newton code, so a
wrong gradient or Hessian in the implementation cannot hide behind a test that repeats it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest

from factory.policy_eval.winrate import (
    Prompt,
    fit_length_model,
    length_controlled,
    length_features,
    p_policy,
    prompts_of,
    summary,
)


def row(
    prompt_id: str,
    order: str,
    verdict: str | None,
    p_a: float | None,
    parse_status: str = "ok",
    len_policy: int = 10,
    len_baseline: int = 10,
) -> dict[str, Any]:
    """One `eval` row with only the fields the metrics read."""
    return {
        "prompt_id": prompt_id,
        "order": order,
        "verdict": verdict,
        "p_a": p_a,
        "parse_status": parse_status,
        "len_policy": len_policy,
        "len_baseline": len_baseline,
    }


def both(prompt_id: str, p_policy_first: float, p_baseline_first: float, **lengths: int) -> list[dict[str, Any]]:
    """Both orders of one prompt, given each order's P(policy better); p_a and the verdict follow from it."""

    def one(order: str, p: float) -> dict[str, Any]:
        p_a = p if order == "policy_first" else 1.0 - p
        return row(prompt_id, order, "a" if p_a >= 0.5 else "b", p_a, **lengths)

    return [one("policy_first", p_policy_first), one("baseline_first", p_baseline_first)]


# ---------------------------------------------------------------------------------------------- p_policy


def test_p_policy_reads_the_policys_side_in_both_orders_and_both_scorings() -> None:
    # policy_first: the policy is Output (a), so P(policy better) is p_a; baseline_first: it is Output (b).
    assert p_policy(row("p", "policy_first", "a", 0.8), "logprob") == pytest.approx(0.8)
    assert p_policy(row("p", "baseline_first", "a", 0.8), "logprob") == pytest.approx(0.2)
    assert p_policy(row("p", "policy_first", "b", 0.3), "logprob") == pytest.approx(0.3)
    assert p_policy(row("p", "baseline_first", "b", 0.3), "logprob") == pytest.approx(0.7)
    # verdict scoring ignores the soft score: only which output the verdict names counts.
    assert p_policy(row("p", "policy_first", "a", 0.51), "verdict") == 1.0
    assert p_policy(row("p", "policy_first", "b", 0.49), "verdict") == 0.0
    assert p_policy(row("p", "baseline_first", "a", 0.51), "verdict") == 0.0
    assert p_policy(row("p", "baseline_first", "b", 0.49), "verdict") == 1.0


def test_p_policy_is_none_when_the_judgment_carries_no_information() -> None:
    # A failed call has neither verdict nor soft score; an unparsed verdict gives nothing to verdict scoring.
    failed = row("p", "policy_first", None, None, parse_status="error")
    assert p_policy(failed, "logprob") is None and p_policy(failed, "verdict") is None
    assert p_policy(row("p", "baseline_first", None, 0.5, parse_status="no_match"), "verdict") is None
    # A reasoning (cot) answer without a verdict has no soft score either.
    assert p_policy(row("p", "policy_first", None, None, parse_status="no_match"), "logprob") is None


# ------------------------------------------------------------------------------------ prompts and outcomes


def test_a_prompt_without_a_parsed_order_is_left_out_and_counted() -> None:
    rows = [
        *both("good", 0.9, 0.7),
        # Both orders failed: this prompt must not enter the win rate as a coin flip.
        row("failed", "policy_first", None, None, parse_status="error"),
        row("failed", "baseline_first", None, None, parse_status="error"),
        # One order parsed: the prompt's preference is that order alone, not a mean with a guess.
        row("half", "policy_first", "b", 0.4),
        row("half", "baseline_first", None, None, parse_status="error"),
    ]
    prompts = prompts_of(rows, "logprob")
    assert [p.preference for p in prompts] == [pytest.approx(0.8), None, pytest.approx(0.4)]
    s = summary(rows, "logprob", resamples=0)
    assert (s["prompts"], s["scored"], s["unparsed_judgments"]) == (3, 2, 3)
    assert s["win_rate"] == pytest.approx(100 * (0.8 + 0.4) / 2)


def test_a_prompt_with_only_unparsed_verdicts_is_never_guessed() -> None:
    # As the judge pipeline writes an answer with no `Output (x)` after the `Output (` prefill: no verdict,
    # parse_status no_match, and p_a read at the first token (0.5 when neither marker is among its top-k).
    rows = [
        *both("good", 0.9, 0.7),
        row("garbled", "policy_first", None, 0.5, parse_status="no_match"),
        row("garbled", "baseline_first", None, 0.5, parse_status="no_match"),
    ]
    s = summary(rows, "logprob", resamples=0)
    assert (s["prompts"], s["unparsed_judgments"]) == (2, 2)
    assert s["scored"] == 1
    assert s["win_rate"] == pytest.approx(80.0)


def test_outcomes_count_agreeing_and_split_verdicts() -> None:
    rows = [
        *both("win", 0.9, 0.6),  # both orders name the policy
        *both("loss", 0.2, 0.4),  # both orders name the baseline
        *both("tie", 0.7, 0.3),  # Output (a) wins both times: a position-biased split
        row("none", "policy_first", None, None, parse_status="error"),
        row("none", "baseline_first", None, None, parse_status="error"),
    ]
    s = summary(rows, "logprob", resamples=0)
    assert (s["wins"], s["losses"], s["ties"]) == (1, 1, 1)
    assert (s["prompts"], s["scored"]) == (4, 3)
    # verdict scoring: a prompt's preference is 1, 0 or ½ from its two verdicts.
    v = summary(rows, "verdict", resamples=0)
    assert v["win_rate"] == pytest.approx(100 * (1 + 0 + 0.5) / 3)
    assert [p.outcome for p in prompts_of(rows, "verdict")] == ["win", "loss", "tie", None]


def test_lengths_and_averages_come_from_the_rows() -> None:
    rows = [
        *both("p1", 0.6, 0.6, len_policy=30, len_baseline=10),
        *both("p2", 0.4, 0.4, len_policy=10, len_baseline=20),
    ]
    s = summary(rows, "logprob", resamples=0)
    assert (s["avg_len_policy"], s["avg_len_baseline"]) == (20.0, 15.0)


# ----------------------------------------------------------------------------------- the length model fit


def objective(theta: float, phi: float, y: list[float], x: list[float], c: float) -> float:
    """C·Σ logloss(y, σ(θ + φx)) + ½(θ² + φ²), written out independently (numerically stable softplus)."""

    def softplus(z: float) -> float:
        return max(z, 0.0) + math.log1p(math.exp(-abs(z)))

    # logloss(y, σ(z)) = −y·log σ(z) − (1−y)·log(1−σ(z)) = softplus(z) − y·z
    loss = sum(softplus(theta + phi * xi) - yi * (theta + phi * xi) for yi, xi in zip(y, x, strict=True))
    return c * loss + 0.5 * (theta**2 + phi**2)


def numeric_gradient(theta: float, phi: float, y: list[float], x: list[float], c: float) -> tuple[float, float]:
    h = 1e-5
    g0 = (objective(theta + h, phi, y, x, c) - objective(theta - h, phi, y, x, c)) / (2 * h)
    g1 = (objective(theta, phi + h, y, x, c) - objective(theta, phi - h, y, x, c)) / (2 * h)
    return g0, g1


CASES = {
    "soft targets": ([0.9, 0.2, 0.65, 0.5, 0.8, 0.1, 0.7], [0.9, -0.8, 0.3, 0.0, 0.6, -0.95, -0.2], 1.0),
    "hard targets": ([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0.5, -0.5, 0.9, -0.1, -0.7, 0.2], 1.0),
    "another C": ([0.9, 0.2, 0.65, 0.5, 0.8], [0.9, -0.8, 0.3, 0.0, 0.6], 0.3),
    # Separable data: without the penalty the fit would run off to infinity.
    "all ones": ([1.0] * 8, [-0.9, -0.5, -0.1, 0.0, 0.2, 0.4, 0.7, 0.95], 1.0),
    "all zeros, x constant": ([0.0] * 5, [0.0] * 5, 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fit_sets_the_gradient_of_the_stated_objective_to_zero(case: str) -> None:
    y, x, c = CASES[case]
    theta, phi = fit_length_model(y, x, c=c)
    assert math.isfinite(theta) and math.isfinite(phi)
    g0, g1 = numeric_gradient(theta, phi, y, x, c)
    assert abs(g0) < 1e-5 and abs(g1) < 1e-5, (g0, g1)
    # The objective is strictly convex, so a zero gradient is its minimum: nudging either way only raises it.
    best = objective(theta, phi, y, x, c)
    for dt, dp in ((1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)):
        assert objective(theta + dt, phi + dp, y, x, c) > best


def test_all_ones_targets_give_a_finite_win_rate_below_100() -> None:
    y, x, _ = CASES["all ones"]
    theta, _ = fit_length_model(y, x)
    # The penalty holds θ at a finite value: a win rate that every prompt supports, yet short of certainty.
    assert 0 < theta < 10
    prompts = [Prompt(1.0, "win", 10 + i * 7, 30) for i in range(8)]
    lc, coefficient = length_controlled(prompts)
    assert lc is not None and coefficient is not None
    assert 50 < lc < 100 and math.isfinite(coefficient)


def test_length_features_standardise_the_length_difference() -> None:
    prompts = [Prompt(0.5, None, lp, lb) for lp, lb in ((30, 10), (10, 30), (20, 20))]
    # Δ = 20, −20, 0; sd = 20 (sample standard deviation), so tanh(1), tanh(−1), 0.
    assert length_features(prompts) == pytest.approx([math.tanh(1), -math.tanh(1), 0.0])
    assert length_features([Prompt(0.5, None, 30, 10)]) == [0.0]  # one prompt: no spread to scale by
    assert length_features([Prompt(0.5, None, 30, 10)] * 3) == [0.0] * 3  # sd 0


# ------------------------------------------------------------------------- length-controlled win rate


def length_only(n: int) -> list[Prompt]:
    """A judge that only looks at length: P(policy better) = σ(4·tanh(Δ/sd)). Half the policy's answers are
    much longer than the baseline's, half a little shorter, so the raw win rate favours the policy."""
    shapes = []
    for i in range(n):
        if i % 2 == 0:
            shapes.append(Prompt(None, None, 100 + (i * 37) % 300, 50))
        else:
            shapes.append(Prompt(None, None, 50, 55 + (i * 13) % 40))
    x = length_features(shapes)
    prefs = [1 / (1 + math.exp(-4 * xi)) for xi in x]
    return [Prompt(pref, None, p.len_policy, p.len_baseline) for pref, p in zip(prefs, shapes, strict=True)]


def test_a_preference_explained_by_length_alone_has_an_lc_win_rate_near_50() -> None:
    prompts = length_only(200)
    raw = 100 * sum(p.preference for p in prompts) / len(prompts)  # type: ignore[misc]
    lc, coefficient = length_controlled(prompts)
    assert raw > 60  # the longer answers win, and the policy's are the longer ones more often
    assert lc == pytest.approx(50, abs=2)
    assert coefficient is not None and coefficient > 2  # the length term carries the preference


@pytest.mark.parametrize("preference", [0.8, 0.3])
def test_with_equal_lengths_the_lc_win_rate_follows_the_raw_direction(preference: float) -> None:
    prompts = [Prompt(preference + 0.05 * (i % 3 - 1), None, 40, 40) for i in range(100)]
    raw = 100 * sum(p.preference for p in prompts) / len(prompts)  # type: ignore[misc]
    lc, coefficient = length_controlled(prompts)
    assert lc is not None and coefficient == 0.0
    # The penalty pulls θ towards 0, so LC lies between 50 and the raw rate (within a point or two with 100 prompts).
    assert (50 < lc <= raw) if raw > 50 else (raw <= lc < 50)
    assert lc == pytest.approx(raw, abs=2)


def test_no_scored_prompt_gives_no_lc_win_rate() -> None:
    assert length_controlled([Prompt(None, None, 10, 20)]) == (None, None)
    rows = [row("p", o, None, None, parse_status="error") for o in ("policy_first", "baseline_first")]
    s = summary(rows, "logprob", resamples=100)
    assert s["scored"] == 0 and s["win_rate"] is None and s["lc_win_rate"] is None
    assert s["win_rate_low"] is None and s["lc_win_rate_low"] is None


# ---------------------------------------------------------------------------------------------- intervals


def varied_rows(n: int = 24) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        p = 0.15 + 0.7 * ((i * 7) % n) / n
        rows += both(f"p{i}", p, min(1.0, p + 0.1), len_policy=20 + (i * 11) % 50, len_baseline=30)
    return rows


def test_bootstrap_intervals_contain_the_estimates_and_repeat_with_the_seed() -> None:
    rows = varied_rows()
    s = summary(rows, "logprob", resamples=300, seed=7)
    assert s["resamples"] == 300
    assert s["win_rate_low"] <= s["win_rate"] <= s["win_rate_high"]
    assert s["lc_win_rate_low"] <= s["lc_win_rate"] <= s["lc_win_rate_high"]
    assert s["win_rate_low"] < s["win_rate_high"]  # the prompts differ, so the interval has width
    # A rerun prints the same figures.
    assert summary(rows, "logprob", resamples=300, seed=7) == s


def test_no_resamples_means_no_intervals() -> None:
    s = summary(varied_rows(), "logprob", resamples=0)
    assert s["win_rate"] is not None and s["lc_win_rate"] is not None
    assert [s[k] for k in ("win_rate_low", "win_rate_high", "lc_win_rate_low", "lc_win_rate_high")] == [None] * 4


# ------------------------------------------------------------------------- against alpaca_eval's own fit
def synthetic_prompts(n: int, seed: int, quality: float = 0.4, length_effect: float = 1.0) -> list[Prompt]:
    """Prompts whose soft preference follows a known logistic model of quality plus length, with noise."""
    import random as rnd

    rng = rnd.Random(seed)
    out = []
    for _ in range(n):
        len_baseline = rng.randint(200, 1200)
        len_policy = max(1, int(len_baseline + rng.gauss(150, 300)))
        z = quality + length_effect * math.tanh((len_policy - len_baseline) / 300)
        p = 1.0 / (1.0 + math.exp(-z))
        preference = min(1.0, max(0.0, p + rng.gauss(0, 0.15)))
        out.append(Prompt(preference=preference, outcome=None, len_policy=len_policy, len_baseline=len_baseline))
    return out


def alpaca_eval_lc(prompts: list[Prompt]) -> float:
    """The LC win rate as `alpaca_eval` computes its minimal model, with its own fitting function: features
    tanh(std Δ) (Δ = baseline length − policy length, its convention) and a constant, L1 penalty, C chosen by
    5-fold cross-validation, soft targets; read at Δ = 0."""
    pd = pytest.importorskip("pandas")
    glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    import sklearn

    deltas = [p.len_baseline - p.len_policy for p in prompts]
    mean = sum(deltas) / len(deltas)
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1))
    data = pd.DataFrame(
        {
            "np.tanh(std_delta_len)": [math.tanh(d / sd) for d in deltas],
            "not_gamed_baseline.astype(float)": 1.0,
            "preference": [p.preference for p in prompts],
        }
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's deprecation notes on alpaca_eval's call
            model = glm.fit_LogisticRegressionCV(data, "preference", is_ytrue_proba=True, n_splits=5)
    finally:
        sklearn.set_config(enable_metadata_routing=False)  # the fit turns it on for the whole process
    constant = list(data.columns).index("not_gamed_baseline.astype(float)")
    return 100.0 / (1.0 + math.exp(-model.coef_[0][constant]))


@pytest.mark.parametrize(("n", "seed"), [(200, 1), (400, 2), (805, 3)])
def test_lc_win_rate_agrees_with_alpaca_evals_fit_within_one_point(n: int, seed: int) -> None:
    prompts = synthetic_prompts(n, seed)
    ours, _ = length_controlled(prompts)
    theirs = alpaca_eval_lc(prompts)
    assert ours is not None and abs(ours - theirs) < 1.0, (ours, theirs)
