"""Comparison schedules (factory.judge.schedule, factory.judge.adaptive): pure and fast, no model."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from factory.judge.adaptive import Adaptive
from factory.judge.schedule import AllPairs, Schedule, observed_scores
from factory.stages.scores import score_rows

Judge = Callable[[str, str], "float | None"]


def ids_for(n: int) -> list[str]:
    return [f"s{i:02d}" for i in range(n)]


def consistent_judge(qualities: dict[str, float], kind: str) -> Judge:
    """A noiseless judge: the better sample wins in both orders. `soft`: logistic of the quality gap plus a
    first-position bias; `hard`: verdicts 1/0; `flat`: 0.8/0.2 whatever the gap."""

    def judge(a: str, b: str) -> float:
        d = qualities[a] - qualities[b]
        if kind == "soft":
            return 1.0 / (1.0 + math.exp(-(2.0 * d + 0.3)))
        if kind == "hard":
            return 1.0 if d > 0 else 0.0
        return 0.8 if d > 0 else 0.2

    return judge


def drive(schedule: Schedule, judge: Judge) -> list[list[tuple[str, str]]]:
    """Run a schedule to its end; the pairs of every round."""
    rounds = []
    while pairs := schedule.next_round():
        rounds.append(pairs)
        for a, b in pairs:
            schedule.record(a, b, judge(a, b))
    return rounds


def random_prompt(seed: int, low: int = 2, high: int = 16) -> tuple[list[str], dict[str, float]]:
    rng = random.Random(seed)
    ids = ids_for(rng.randint(low, high))
    return ids, {s: rng.gauss(0.0, 1.0) for s in ids}


def truth(qualities: dict[str, float]) -> tuple[str, str]:
    return max(qualities, key=qualities.__getitem__), min(qualities, key=qualities.__getitem__)


@pytest.mark.parametrize("kind", ["soft", "hard", "flat"])
def test_consistent_judge_finds_the_true_best_and_worst_in_both_orders(kind: str) -> None:
    for seed in range(150):
        ids, q = random_prompt(seed)
        schedule = Adaptive(ids, seed=seed)
        rounds = drive(schedule, consistent_judge(q, kind))
        assert schedule.best_worst() == truth(q), (kind, seed, len(ids))
        for number, pairs in enumerate(rounds, start=1):
            asked = set(pairs)
            assert len(asked) == len(pairs), "an ordered pair asked twice in one round"
            assert all((b, a) in asked for a, b in pairs), "a comparison asked in one order only"
            assert all(schedule.asked_round(a, b) == number for a, b in pairs)
        everything = [pair for pairs in rounds for pair in pairs]
        assert len(everything) == len(set(everything)) == schedule.calls, "an ordered pair asked again"


def test_calls_are_below_all_pairs_from_five_samples() -> None:
    fractions: dict[int, list[float]] = {}
    for seed in range(300):
        ids, q = random_prompt(seed, 5, 16)
        n = len(ids)
        schedule = Adaptive(ids, seed=seed)
        drive(schedule, consistent_judge(q, "soft"))
        fractions.setdefault(n, []).append(schedule.calls / (n * (n - 1)))
        # Told that the judge is (nearly) noiseless, the schedule needs no more than the knockouts' share.
        told = Adaptive(ids, seed=seed, noise=0.05)
        drive(told, consistent_judge(q, "soft"))
        assert told.calls < n * (n - 1), (seed, n, told.calls)
        assert told.best_worst() == truth(q)
    # With the default noise prior, close pairs need a direct comparison: below all-pairs on average from 5
    # samples, on every prompt from 8, and well below it at 16.
    for n, values in fractions.items():
        assert sum(values) / len(values) < 0.9, (n, values)
        if n >= 8:
            assert max(values) < 1.0, (n, values)
    assert sum(fractions[16]) / len(fractions[16]) < 0.4


def test_all_pairs_asks_every_ordered_pair_once_in_round_one() -> None:
    for n in range(0, 9):
        ids = ids_for(n)
        schedule = AllPairs(ids)
        rounds = drive(schedule, lambda a, b: 0.5)
        assert schedule.calls == n * (n - 1)
        if n >= 2:
            assert len(rounds) == 1 and schedule.round == 1
            assert set(rounds[0]) == {(a, b) for a in ids for b in ids if a != b}
        else:
            assert rounds == [] and schedule.round == 0 and schedule.best_worst() is None
        assert schedule.done and schedule.next_round() == []


def test_rounds_are_numbered_from_one() -> None:
    ids, q = random_prompt(7, 12, 12)
    schedule = Adaptive(ids, seed=1)
    assert schedule.round == 0
    judge = consistent_judge(q, "soft")
    seen = []
    while pairs := schedule.next_round():
        seen.append(schedule.round)
        for a, b in pairs:
            schedule.record(a, b, judge(a, b))
    assert seen == list(range(1, len(seen) + 1)) and len(seen) >= 2
    assert schedule.next_round() == [] and schedule.round == seen[-1]
    assert [r for *_, r in schedule.comparisons()] == sorted(r for *_, r in schedule.comparisons())
    assert {r for *_, r in schedule.comparisons()} == set(seen)


def test_deterministic_for_a_seed() -> None:
    ids, q = random_prompt(3, 16, 16)
    judge = consistent_judge(q, "soft")
    noisy = random.Random(5)
    answers = {(a, b): min(1.0, max(0.0, judge(a, b) + noisy.gauss(0, 0.2))) for a in ids for b in ids if a != b}
    runs = [drive(Adaptive(ids, seed=4), lambda a, b: answers[(a, b)]) for _ in range(2)]
    assert runs[0] == runs[1]
    other = drive(Adaptive(ids, seed=5), lambda a, b: answers[(a, b)])
    assert other[0] != runs[0][0], "the seed should change round 1's pairing"


def test_unparsed_answers_are_never_guessed_nor_asked_again() -> None:
    # Both orders of a comparison fail: it decides nothing, scores leave it out, nothing is asked twice.
    for seed in range(60):
        ids, q = random_prompt(100 + seed, 3, 12)
        judge = consistent_judge(q, "soft")
        failing = random.Random(seed)
        failed = {frozenset(p) for p in ((a, b) for a in ids for b in ids if a < b) if failing.random() < 0.3}
        answers = {(a, b): None if frozenset((a, b)) in failed else judge(a, b) for a in ids for b in ids if a != b}
        schedule = Adaptive(ids, seed=seed)
        rounds = drive(schedule, lambda a, b, answers=answers: answers[(a, b)])
        everything = [pair for pairs in rounds for pair in pairs]
        assert len(everything) == len(set(everything)), "a failed pair was asked again"
        assert schedule.done
        parsed = [(a, b, p) for a, b, p, _ in schedule.comparisons() if p is not None]
        scores = schedule.scores()
        assert set(scores) == {s for a, b, _ in parsed for s in (a, b)}
        for s, score in scores.items():
            mine = [p if a == s else 1 - p for a, b, p in parsed if s in (a, b)]
            assert score.n_comparisons == len(mine) and score.observed == pytest.approx(sum(mine) / len(mine))
        # All-pairs on the same answers: the adaptive pick is never a sample all-pairs could not score.
        full = AllPairs(ids)
        drive(full, lambda a, b, answers=answers: answers[(a, b)])
        picked = schedule.best_worst()
        if picked is not None:
            assert set(picked) <= set(full.scores())


def test_a_failed_deciding_match_falls_back_on_other_comparisons() -> None:
    # The best two samples' comparison never parses: the schedule goes on and still finds the best one
    # through their other comparisons, as all-pairs does on the same answers.
    ids = ids_for(6)
    q = dict(zip(ids, [3.0, 2.9, 1.0, 0.0, -1.0, -2.0], strict=True))
    judge = consistent_judge(q, "soft")

    def answer(a: str, b: str) -> float | None:
        return None if {a, b} == {"s00", "s01"} else judge(a, b)

    for seed in range(20):
        schedule = Adaptive(ids, seed=seed)
        drive(schedule, answer)
        full = AllPairs(ids)
        drive(full, answer)
        assert schedule.best_worst() == full.best_worst() == ("s00", "s05")


def test_all_failed_gives_no_pair_and_ends() -> None:
    for n in (2, 3, 6):
        schedule = Adaptive(ids_for(n), seed=0)
        rounds = drive(schedule, lambda a, b: None)
        assert schedule.done and schedule.best_worst() is None and schedule.scores() == {}
        assert schedule.calls == n * (n - 1) and len(rounds) <= n * (n - 1) // 2  # each tried once, then it stops


def test_one_parsed_order_counts_as_all_pairs_counts_it() -> None:
    # One order of a comparison fails: the other is kept in the scores (as score_rows keeps it) and nothing is
    # invented for the failed one; the pick is all-pairs' pick on the same answers.
    for seed in range(20):
        ids, q = random_prompt(300 + seed, 3, 8)
        judge = consistent_judge(q, "soft")
        rng = random.Random(seed)
        answers = {(a, b): None if rng.random() < 0.4 else judge(a, b) for a in ids for b in ids if a != b}
        schedule = Adaptive(ids, seed=seed, confidence=3.0)
        drive(schedule, lambda a, b, answers=answers: answers[(a, b)])
        for s, score in schedule.scores().items():
            mine = [p if a == s else 1 - p for a, b, p, _ in schedule.comparisons() if p is not None and s in (a, b)]
            assert score.n_comparisons == len(mine)
        if schedule.calls == len(ids) * (len(ids) - 1):
            full = AllPairs(ids)
            drive(full, lambda a, b, answers=answers: answers[(a, b)])
            assert schedule.best_worst() == full.best_worst()


def test_scores_match_score_rows() -> None:
    ids, _ = random_prompt(11, 6, 6)
    rng = random.Random(2)
    answers = {(a, b): rng.choice([None, rng.random(), rng.random()]) for a in ids for b in ids if a != b}
    full = AllPairs(ids)
    drive(full, lambda a, b: answers[(a, b)])
    samples = [
        {"sample_id": s, "prompt_id": "p", "sample_index": i, "text": s, "error": None} for i, s in enumerate(ids)
    ]
    judgments = [
        {"sample_a": a, "sample_b": b, "p_a": p, "verdict": None if p is None else "ab"[p < 0.5], "parse_status": "ok"}
        for (a, b), p in answers.items()
    ]
    rows = {r["sample_id"]: r for r in score_rows(samples, judgments, "logprob").rows}
    mine = full.scores()
    assert set(rows) == set(mine)
    for s, row in rows.items():
        assert mine[s].score == pytest.approx(row["score"]) and mine[s].observed == pytest.approx(row["score"])
        assert mine[s].n_comparisons == row["n_comparisons"]
    assert observed_scores((a, b, p) for (a, b), p in answers.items()) == full.observed()


def test_adaptive_scores_order_the_samples_as_best_worst() -> None:
    for seed in range(30):
        ids, q = random_prompt(200 + seed, 5, 16)
        rng = random.Random(seed)
        judge = consistent_judge(q, "soft")
        schedule = Adaptive(ids, seed=seed)
        drive(schedule, lambda a, b, judge=judge, rng=rng: min(1.0, max(0.0, judge(a, b) + rng.gauss(0, 0.25))))
        scores = schedule.scores()
        ranked = sorted(scores, key=lambda s: (-scores[s].score, ids.index(s)))
        assert schedule.best_worst() == (ranked[0], ranked[-1])
        assert all(0.0 <= v.score <= 1.0 and v.n_comparisons >= 1 for v in scores.values())


def test_max_calls_caps_the_schedule() -> None:
    ids, _ = random_prompt(1, 16, 16)
    rng = random.Random(0)
    schedule = Adaptive(ids, seed=0, max_calls=40)
    drive(schedule, lambda a, b: rng.random())
    assert schedule.calls <= 40 and schedule.best_worst() is not None


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        Adaptive(["a", "a"])
    schedule = Adaptive(ids_for(4))
    pairs = schedule.next_round()
    with pytest.raises(ValueError, match="record every pair"):
        schedule.next_round()
    with pytest.raises(ValueError, match="not asked"):
        schedule.record("s00", "s00", 0.5)
    with pytest.raises(ValueError, match="probability"):
        schedule.record(*pairs[0], 1.5)
    schedule.record(*pairs[0], float("nan"))  # NaN is no answer
    with pytest.raises(ValueError, match="already recorded"):
        schedule.record(*pairs[0], 0.5)
    assert Adaptive(["only"]).next_round() == [] and Adaptive([]).best_worst() is None


# ------------------------------------------------------------------------------ the judgments stage, end to end


def test_an_adaptive_build_asks_fewer_calls_tags_rounds_and_resumes_by_replay(tmp_path: Path, kit: Any) -> None:
    """On the scripted judge the adaptive build asks fewer judge calls than all-pairs, tags every judgment
    with its schedule round, and an unchanged rebuild replays the stored answers with 0 calls."""
    from factory.build.command import Build
    from factory.config.loading import load_recipe
    from factory.warehouse.store import Warehouse

    calls = {}
    for schedule in ("all-pairs", "adaptive"):
        folder = tmp_path / schedule
        folder.mkdir()
        path = kit.scripted(folder, **{"samples.n": 6, "judgments.schedule": schedule})
        wh = Warehouse(folder / "wh")
        run = Build(load_recipe(path), wh).run()
        assert run["status"] == "ok"
        calls[schedule] = next(s["model_calls"] for s in run["stages"] if s["stage"] == "judgments")
        rows = wh.query("SELECT DISTINCT schedule, schedule_round FROM judgments ORDER BY 2").to_pylist()
        assert {r["schedule"] for r in rows} == {schedule}
        assert [r["schedule_round"] for r in rows] == list(range(1, len(rows) + 1))
        assert wh.query("SELECT count(*) AS n FROM pairs").to_pylist()[0]["n"] > 0
        assert Build(load_recipe(path), wh).run()["model_calls"] == 0
    assert calls["adaptive"] < calls["all-pairs"]


def test_the_adaptive_schedule_refuses_forward_only_orders(tmp_path: Path, kit: Any) -> None:
    from factory.config.loading import load_recipe
    from factory.core.errors import UserInputError

    with pytest.raises(UserInputError, match="both orders"):
        load_recipe(kit.scripted(tmp_path, **{"judgments.schedule": "adaptive", "judgments.orders": "forward"}))
