"""`judgments.pooling: paper`: a sample's score as the paper's data_processing.py computes it (issue 19, item 5).

The paper judges every ordered pair of sample indices, copies of one text included (scoring.py:141-144), and
averages both sides' soft scores per text (data_processing.py:108-119); an answer whose verdict token it
cannot read is scored at its first token, ½ for both sides when neither marker is there (:70-72, :94-99).
factory judges each distinct text once and, under `paper`, weighs the answers as that loop would. The default
(`merged`) is unchanged: its keys, its rows, and the recipe hash of a recipe that does not set the switch.
Fast: pure functions and the scripted backend.
"""

from __future__ import annotations

import glob
import itertools
import math
import random
from pathlib import Path
from typing import Any

import pytest

from factory.build.command import Build, stages_for
from factory.config.labeling import JudgmentsSpec
from factory.config.loading import load_recipe
from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.judge.protocols import PROTOCOLS
from factory.pipeline.stage import Context, stage_key
from factory.stages.judgments import judge_calls, verdict_fields
from factory.stages.scores import paper_score_rows, score_rows
from factory.warehouse.store import Warehouse

ROOT = Path(__file__).resolve().parent.parent


def _samples(texts: list[str], prompt: str = "p") -> list[dict[str, Any]]:
    return [
        {"sample_id": f"{prompt}-{i}", "prompt_id": prompt, "sample_index": i, "text": t, "error": None}
        for i, t in enumerate(texts)
    ]


def _judged(samples: list[dict[str, Any]], p: Any) -> list[dict[str, Any]]:
    """Judgment rows for the calls factory makes (distinct texts, both orders), P(a wins) = p(text_a, text_b)."""
    prompts = [{"prompt_id": "p", "instruction": "Say something.", "messages": "[]"}]
    spec = JudgmentsSpec(judge="m", protocol="reffree")
    calls, _ = judge_calls(prompts, samples, [], spec, PROTOCOLS["reffree"], {"model": "x"})
    text = {s["sample_id"]: s["text"] for s in samples}
    rows = []
    for c in calls:
        p_a = p(text[c.meta["sample_a"]], text[c.meta["sample_b"]])
        rows.append({**c.meta, "verdict": "a" if p_a > 0.5 else "b", "parse_status": "ok", "p_a": p_a})
    return rows


def _papers_loop(texts: list[str], p: Any) -> dict[str, float]:
    """data_processing.py's averaging, written out: every ordered pair of indices (a copy against a copy too,
    answered here with an arbitrary 0.9, which must not matter), both sides' scores appended per text."""
    per_text: dict[str, list[float]] = {t: [] for t in texts}
    for i, j in itertools.permutations(range(len(texts)), 2):
        a, b = texts[i], texts[j]
        s1 = 0.9 if a == b else p(a, b)
        per_text[a].append(s1)
        per_text[b].append(1.0 - s1)
    return {t: sum(v) / len(v) for t, v in per_text.items()}


def test_the_issues_example_a_a_b_c_d() -> None:
    """Texts A, A, B, C, D where A beats every other text at 0.7: the paper scores A 0.65, factory 0.70."""
    samples = _samples(["A", "A", "B", "C", "D"])

    def p(a: str, b: str) -> float:
        return 0.7 if a == "A" else 0.3 if b == "A" else 0.5

    judgments = _judged(samples, p)
    assert len(judgments) == 4 * 3  # four distinct texts, every ordered pair: the copy is never judged
    merged = {r["sample_id"]: r["score"] for r in score_rows(samples, judgments, "logprob").rows}
    paper = {r["sample_id"]: r["score"] for r in paper_score_rows(samples, judgments, "logprob").rows}
    assert merged["p-0"] == merged["p-1"] == pytest.approx(0.70)
    assert paper["p-0"] == paper["p-1"] == pytest.approx(0.65)
    # 16 entries for A: 12 comparisons with other texts (each copy, both orders) and 4 from the copy pair
    (a_row,) = [r for r in paper_score_rows(samples, judgments, "logprob").rows if r["sample_id"] == "p-0"]
    assert a_row["n_comparisons"] == 16 and a_row["wins"] == 12
    loop = _papers_loop(["A", "A", "B", "C", "D"], p)
    assert paper["p-0"] == pytest.approx(loop["A"]) and paper["p-2"] == pytest.approx(loop["B"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_pooling_equals_the_papers_loop_for_any_copies_and_answers(seed: int) -> None:
    rng = random.Random(seed)
    texts = [rng.choice("ABCD") for _ in range(rng.randint(3, 7))]
    table = {(a, b): rng.random() for a in "ABCD" for b in "ABCD"}  # position bias included: p(a,b) + p(b,a) != 1

    def p(a: str, b: str) -> float:
        return table[(a, b)]

    samples = _samples(texts)
    rows = paper_score_rows(samples, _judged(samples, p), "logprob").rows
    loop = _papers_loop(texts, p)
    if len(set(texts)) < 2:
        assert rows == []  # nothing judged: unscored, as the paper skips a prompt with one candidate
        return
    for r in rows:
        assert r["score"] == pytest.approx(loop[texts[int(r["sample_id"].split("-")[1])]])


def _answer(text: str, tokens: list[str], first: list[tuple[str, float]]) -> dict[str, Any]:
    """A stored judge result with no verdict to read: `first` are the first token's alternatives."""
    tops = [[{"token": t, "logprob": lp} for t, lp in first]] + [[{"token": t, "logprob": 0.0}] for t in tokens[1:]]
    return {"status": "ok", "text": text, "tokens": tokens, "top_logprobs": tops}


def test_an_unparsed_answer_counts_its_first_token_or_half_under_paper() -> None:
    protocol = PROTOCOLS["reffree"].unprefilled()  # the paper's decoding: no prefill, verdict by regex
    silent = _answer("I cannot tell.", ["I", " cannot", " tell."], [("I", -0.1), ("We", -2.0)])
    merged = verdict_fields(silent, protocol, "exact")
    assert (merged["parse_status"], merged["p_a"], merged["p_source"]) == ("no_match", None, "none")
    paper = verdict_fields(silent, protocol, "exact", paper=True)
    assert (paper["parse_status"], paper["verdict"], paper["p_a"], paper["p_source"]) == (
        "no_match",
        None,
        0.5,
        "first_token",
    )
    # a marker among the first token's alternatives is read there, as data_processing.py:70-72 reads it
    leaning = _answer("b is fine", ["b", " is", " fine"], [("b", math.log(0.6)), ("a", math.log(0.2))])
    read = verdict_fields(leaning, protocol, "exact", paper=True)
    assert read["p_a"] == pytest.approx(0.25) and read["p_a_exact"] == pytest.approx(0.25)
    failed = verdict_fields({"status": "error", "error": "HTTP 503"}, protocol, "exact", paper=True)
    assert failed["p_a"] is None  # a failed call is retried, never scored


def test_unparsed_judgments_pull_toward_half_only_under_paper() -> None:
    samples = _samples(["A", "B", "C"])
    judgments = _judged(samples, lambda a, b: 0.9 if a == "A" else 0.1 if b == "A" else 0.5)
    for j in judgments:  # A's comparisons with B, as (A, B): unparsed, 0.5 from the paper's rule
        if (j["sample_a"], j["sample_b"]) == ("p-0", "p-1"):
            j.update(parse_status="no_match", verdict=None, p_a=0.5, p_source="first_token")
    paper = {r["sample_id"]: r["score"] for r in paper_score_rows(samples, judgments, "logprob").rows}
    assert paper["p-0"] == pytest.approx((0.5 + 0.9 + 0.9 + 0.9) / 4)
    # under `scoring: verdict` an unparsed judgment has no verdict: the paper's ½ all the same
    verdict = {r["sample_id"]: r["score"] for r in paper_score_rows(samples, judgments, "verdict").rows}
    assert verdict["p-0"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    # merged leaves a judgment without a soft score out of the mean (verdict_fields gives it none by default)
    for j in judgments:
        if j["parse_status"] == "no_match":
            j["p_a"] = None
    merged = {r["sample_id"]: r["score"] for r in score_rows(samples, judgments, "logprob").rows}
    assert merged["p-0"] == pytest.approx(0.9)


def test_paper_pooling_needs_every_ordered_pair() -> None:
    with pytest.raises(ValueError, match="'paper' averages every ordered pair"):
        JudgmentsSpec(judge="m", protocol="reffree", pooling="paper", orders="forward")
    with pytest.raises(ValueError, match="'paper' averages every ordered pair"):
        JudgmentsSpec(judge="m", protocol="reffree", pooling="paper", schedule="adaptive")


def _keys(path: Path) -> dict[str, str]:
    """The judgments and scores stage keys of a recipe, over fixed keys for their parents."""
    loaded = load_recipe(path)
    parents = {"prompts": "P", "samples": "S", "references": "R", "judgments": "J"}
    ctx = Context(loaded, call=lambda *a: {}, keys=parents)
    stages = {s.name: s for s in stages_for(loaded)}
    return {name: stage_key(stages[name], ctx) for name in ("judgments", "scores")}


def test_a_recipe_without_the_switch_keeps_its_keys_hash_and_rows(tmp_path: Path, kit: Any) -> None:
    default = kit.scripted(tmp_path)
    r = load_recipe(default).recipe
    # The switch is left out of every dump at its default: the recipe hash and the judgments stage's spec
    # are what they were before it existed; set, it is in both.
    assert "pooling" not in r.model_dump(mode="json")["judgments"]
    before = {"judge", "protocol", "template", "reference", "orders", "scoring", "max_tokens", "top_logprobs"}
    assert set(r.judgments.model_dump()) == before | {"prefill", "schedule", "markers"}
    paper = load_recipe(kit.scripted(tmp_path, "p.yaml", **{"judgments.pooling": "paper"})).recipe
    assert paper.model_dump(mode="json")["judgments"]["pooling"] == "paper"
    assert stable_hash(paper.model_dump(mode="json")) != stable_hash(r.model_dump(mode="json"))
    # The scores stage key: a golden value, the hash of the spec the stage had before the switch.
    keys = _keys(default)
    assert keys["scores"] == "ea9cfe3aa4efbcf5ce0f7eca9f9b684a"
    assert keys["scores"] == stable_hash(
        {
            "stage": "scores",
            "version": 2,
            "spec": {"scoring": "logprob", "schedule": "all-pairs"},
            "parents": ["S", "J"],
        }
    )
    assert _keys(kit.scripted(tmp_path, "p.yaml", **{"judgments.pooling": "paper"})) != keys

    # A build: the default, then the paper's pooling (re-read from the call cache: no model call), then the
    # default again, which finds its first version of every stage, rows included.
    wh = Warehouse(tmp_path / "wh")
    first = Build(load_recipe(kit.scripted(tmp_path, **{"samples.n": 4})), wh).run()
    merged_rows = wh.query("SELECT sample_id, score, n_comparisons, wins FROM scores ORDER BY sample_id").to_pylist()
    other = Build(
        load_recipe(kit.scripted(tmp_path, "p.yaml", **{"samples.n": 4, "judgments.pooling": "paper"})), wh
    ).run()
    assert first["model_calls"] > 0 and other["model_calls"] == 0
    again = Build(load_recipe(kit.scripted(tmp_path, **{"samples.n": 4})), wh).run()
    assert [s["stage_key"] for s in again["stages"]] == [s["stage_key"] for s in first["stages"]]
    assert wh.query("SELECT sample_id, score, n_comparisons, wins FROM scores ORDER BY sample_id").to_pylist() == (
        merged_rows
    )


def test_a_paper_pooling_build_scores_unparsed_answers(tmp_path: Path, kit: Any) -> None:
    garbled = {"judgments.prefill": "none", "models.m.script": {"garble_rate": 0.3}, "samples.n": 4}
    wh = Warehouse(tmp_path / "wh")
    Build(load_recipe(kit.scripted(tmp_path, **garbled)), wh).run()
    unread = wh.query("SELECT p_a FROM judgments WHERE parse_status = 'no_match'").to_pylist()
    assert unread and {r["p_a"] for r in unread} == {None}
    run = Build(load_recipe(kit.scripted(tmp_path, "p.yaml", **garbled, **{"judgments.pooling": "paper"})), wh).run()
    assert run["status"] == "ok" and run["model_calls"] == 0
    unread = wh.query("SELECT p_a, p_source FROM judgments WHERE parse_status = 'no_match'").to_pylist()
    assert unread and {(r["p_a"], r["p_source"]) for r in unread} == {(0.5, "first_token")}
    n = wh.query("SELECT count(*) AS n FROM judgments").to_pylist()[0]["n"]
    # every judgment now counts: each ordered pair adds one entry to each side
    total = wh.query("SELECT sum(n_comparisons) AS t FROM scores").to_pylist()[0]["t"]
    assert total >= 2 * n


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "recipes" / "paper" / "*-*b-*.yaml"))))
def test_paper_recipes_pool_as_the_paper(path: str) -> None:
    r = load_recipe(path).recipe
    if r.judgments is not None:
        assert r.judgments.pooling == "paper"


def test_pooling_is_validated_as_a_recipe_field(tmp_path: Path, kit: Any) -> None:
    with pytest.raises(UserInputError, match="pooling"):
        load_recipe(kit.scripted(tmp_path, **{"judgments.pooling": "papers"}))
