"""Judge meta-evaluation (`factory judge-eval` / `judge-compare`).

The metric tests judge a small hand-made LLMBar-format set with scripted backends whose answers are fixed
by construction, so every expected number is known without any model; the warehouse, cache and DuckDB are
the real ones. The decoding switches (--prefill, --markers, --top-logprobs), the --unparsed rules and the
--swap kinds are tested the same way. One `model` test runs the embedded judge end to end.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from factory.config.models import ModelSpec
from factory.core.errors import UserInputError
from factory.core.stats import bootstrap_ci
from factory.inputs.data_sources import NamedPath
from factory.inputs.labelled_sets import read_eval_set
from factory.judge.protocols import PROTOCOLS
from factory.judge_eval.command import run_judge_eval
from factory.judge_eval.comparison import compare, compare_stored, mcnemar_exact
from factory.judge_eval.judges import parse_judges
from factory.judge_eval.settings import EvalSettings
from factory.judge_eval.tables import build_report, table1
from factory.judge_eval.templates import builtin_protocol, load_custom_template
from factory.judge_eval.variants import CaseResult, Judged, Unparsed, Variant, coin
from factory.models.requests import JudgeOutput, JudgeRequest, TransientError
from factory.warehouse.store import Warehouse

DOCS = Path(__file__).resolve().parent.parent / "docs" / "JUDGE_EVAL.md"
SETTINGS = EvalSettings(bootstrap=200)
JUDGE = {"scripted": ModelSpec()}

# Ten cases: labels 1,1,1,1,2,2,2,2,2,2 (40% label 1). The better output reads "good-<i>".
LABELS = [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]


def make_rows(labels: Sequence[int] = LABELS) -> list[dict[str, Any]]:
    """LLMBar-format rows whose better output is `good-<i>` and the other `bad-<i>`."""
    rows = []
    for i, label in enumerate(labels):
        good, bad = f"good-{i} " + "x" * (10 + i), f"bad-{i}"
        o1, o2 = (good, bad) if label == 1 else (bad, good)
        rows.append(
            {"id": f"c{i}", "input": f"Task {i}", "output_1": o1, "output_2": o2, "label": label, "reference": good}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "toy.jsonl", make_rows())


# ------------------------------------------------------------------------------------------- backends


def answer(letter: str | None, p_a: float = 0.8) -> JudgeOutput:
    """A judge answer after the prefill `Output (`: `a)` / `b)` with soft score p_a, or an unparseable one."""
    if letter is None:
        return JudgeOutput("unsure", ["unsure"], [[("unsure", -0.1), ("maybe", -3.0)]], tokens_in=50, tokens_out=1)
    tops = [[("a", math.log(p_a)), ("b", math.log(1 - p_a))], [(")", 0.0)]]
    return JudgeOutput(f"{letter})", [letter, ")"], tops, tokens_in=50, tokens_out=2)


def shown(request: JudgeRequest, letter: str) -> str:
    """The text shown as Output (a) or (b) in a rendered judge prompt, wherever its block stands."""
    m = re.search(rf"# Output \({letter}\):\n(.*?)\n\n# ", request.messages[-1]["content"], re.S)
    assert m is not None
    return m.group(1)


def shown_a(request: JudgeRequest) -> str:
    """The text shown as Output (a)."""
    return shown(request, "a")


def blocks_swapped(request: JudgeRequest) -> bool:
    """Whether (b)'s block comes before (a)'s in the prompt."""
    text = request.messages[-1]["content"]
    return text.index("# Output (b):") < text.index("# Output (a):")


class Scripted:
    """A backend that answers each request with `policy(request)`, counting the calls it gets."""

    def __init__(self, policy: Callable[[JudgeRequest], JudgeOutput]) -> None:
        self.policy = policy
        self.calls = 0
        self.requests: list[JudgeRequest] = []

    def judge(self, requests: Sequence[JudgeRequest]) -> list[JudgeOutput]:
        self.calls += len(requests)
        self.requests.extend(requests)
        return [self.policy(r) for r in requests]

    def close(self) -> None:
        pass


def always_a(_: JudgeRequest) -> JudgeOutput:
    return answer("a")


def first_shown(r: JudgeRequest) -> JudgeOutput:
    """A pure position judge: names whichever block the prompt shows first."""
    return answer("b" if blocks_swapped(r) else "a")


def unprefilled(policy: Callable[[JudgeRequest], JudgeOutput]) -> Callable[[JudgeRequest], JudgeOutput]:
    """The same judge, writing `Output (` itself when the request has no prefill (`--prefill none`)."""

    def wrapped(r: JudgeRequest) -> JudgeOutput:
        out = policy(r)
        if r.prefill:
            return out
        tops = [[("Output (", 0.0)], *out.top_logprobs]
        return JudgeOutput("Output (" + out.text, ["Output (", *out.tokens], tops, out.tokens_in, out.tokens_out + 1)

    return wrapped


def oracle(behaviour: dict[int, str]) -> Callable[[JudgeRequest], JudgeOutput]:
    """Right on every case, except: 'wrong' picks the worse output, 'none' answers unparseably, 'a' says a."""

    def policy(r: JudgeRequest) -> JudgeOutput:
        a_text = shown_a(r)
        i = int(re.search(r"-(\d+)", a_text).group(1))  # type: ignore[union-attr]
        a_is_good = a_text.startswith("good")
        how = behaviour.get(i, "right")
        if how == "none":
            return answer(None)
        if how == "a":
            return answer("a")
        right = "a" if a_is_good else "b"
        pick = right if how == "right" else ("b" if right == "a" else "a")
        return answer(pick, 0.9 if pick == "a" else 0.1)

    return policy


def run(
    wh: Warehouse,
    data: Path,
    policy: Callable[[JudgeRequest], JudgeOutput],
    protocols: Sequence[str] = ("reffree",),
    settings: EvalSettings = SETTINGS,
    **read: Any,
) -> tuple[Any, Scripted]:
    backend = Scripted(policy)
    ds = read_eval_set(str(data), **read)
    chosen = [builtin_protocol(p, settings) for p in protocols]
    result = run_judge_eval([ds], JUDGE, chosen, settings, wh, loader=lambda spec: backend)
    return result, backend


def metric_of(rows: list[dict[str, Any]], protocol: str, unparsed: str = "wrong") -> dict[str, Any]:
    """One variant's metrics; `wrong` by default, so the expected numbers below need no coin."""
    report = build_report(rows, SETTINGS.bootstrap, SETTINGS.seed, unparsed)
    (m,) = [m for m in report.metrics if m["protocol"] == protocol]
    return m


# ------------------------------------------------------------------------------------------- metrics


def test_always_a_judge_scores_share_of_each_label(tmp_path: Path, data_file: Path) -> None:
    result, backend = run(Warehouse(tmp_path / "wh"), data_file, always_a)
    assert backend.calls == 20 and len(result.rows) == 20
    m = metric_of(result.rows, "reffree")
    assert m["cases"] == 10
    assert m["acc_forward"] == pytest.approx(0.4)  # share of label 1
    assert m["acc_swapped"] == pytest.approx(0.6)  # share of label 2
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["consistency"] == 0.0
    assert m["first_position_rate"] == 1.0
    assert m["parse_failure_rate"] == 0.0
    # p(a) = 0.8 in both orders: P(label wins) averages to exactly 0.5 in every case, a tie, counted wrong.
    assert m["acc_soft"] == 0.0 and m["soft_unscored"] == 10
    assert m["judgments"] == 20 and m["tokens_in"] == 1000 and m["tokens_out"] == 40


def test_lookup_judge_accuracy_known_by_construction(tmp_path: Path, data_file: Path) -> None:
    # case 0 (label 1) wrong both orders; case 5 (label 2) unparsed both orders; case 6 (label 2) says "a":
    # right only in swapped order (the good output is shown as (a) there). Every other case right.
    result, _ = run(Warehouse(tmp_path / "wh"), data_file, oracle({0: "wrong", 5: "none", 6: "a"}))
    m = metric_of(result.rows, "reffree")
    assert m["acc_forward"] == pytest.approx(7 / 10)
    assert m["acc_swapped"] == pytest.approx(8 / 10)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["parse_failure_rate"] == pytest.approx(2 / 20)
    assert m["consistency"] == pytest.approx(8 / 10)  # all but case 5 (unparsed) and case 6 (a, a)
    # parsed verdicts: 18; (a) chosen where the good output is first (forward: label-1 cases) ...
    firsts = sum(1 for r in result.rows if r["verdict"] == "a")
    assert m["first_position_rate"] == pytest.approx(firsts / 18)
    # soft: right cases 0.9 / 0.1 toward the good one; case 0 wrong; case 5 p=0.5 (no marker) -> tie;
    # case 6: p_a 0.8 both orders -> tie.
    assert m["acc_soft"] == pytest.approx(7 / 10)
    assert m["ci_low"] <= m["accuracy"] <= m["ci_high"]
    # the judge's chosen outputs are longer on average (the good ones carry padding)
    assert m["len_preferred"] > m["len_other"]
    assert {r["parse_status"] for r in result.rows} == {"ok", "no_match"}


def test_cot_verdict_read_from_its_conclusion(tmp_path: Path, data_file: Path) -> None:
    def reason(r: JudgeRequest) -> JudgeOutput:
        assert r.prefill == "" and r.max_tokens == PROTOCOLS["cot"].default_max_tokens
        if shown_a(r).endswith("-3") or "good-3 " in shown_a(r):  # case 3: no verdict at all
            return JudgeOutput("Both are fine.", ["Both", " are fine."], [[("a", -0.1)], [("x", 0.0)]], 80, 2)
        right = "a" if shown_a(r).startswith("good") else "b"
        wrong = "b" if right == "a" else "a"
        tokens = [f"Output ({wrong}) looks long, but ", "Therefore, Output (", right, ") is better."]
        tops = [[("x", 0.0)], [("T", 0.0)], [(right, -0.1), (wrong, -2.5)], [(")", 0.0)]]
        return JudgeOutput("".join(tokens), tokens, tops, tokens_in=80, tokens_out=4)

    result, _ = run(Warehouse(tmp_path / "wh"), data_file, reason, protocols=("cot",))
    m = metric_of(result.rows, "cot")
    assert m["accuracy"] == pytest.approx(0.9) and m["parse_failure_rate"] == pytest.approx(0.1)
    # no soft score from the first token of an explanation: case 3 has none, so it is wrong there too
    assert m["acc_soft"] == pytest.approx(0.9)
    unparsed = [r for r in result.rows if r["case_id"] == "c3"]
    assert {(r["parse_status"], r["p_source"], r["p_a"]) for r in unparsed} == {("no_match", "none", None)}
    assert {r["p_source"] for r in result.rows if r["case_id"] != "c3"} == {"verdict_token"}


def test_multi_reference_vote(tmp_path: Path) -> None:
    rows = make_rows()
    for r in rows:
        r["ref_bad"] = r["output_1"] if r["label"] == 2 else r["output_2"]  # points at the worse output
    data = write_jsonl(tmp_path / "toy.jsonl", rows)
    refs = tmp_path / "third.jsonl"
    write_jsonl(refs, [{"id": r["id"], "output": r["reference"]} for r in reversed(rows)])  # aligned by id

    def follow_reference(r: JudgeRequest) -> JudgeOutput:
        text = r.messages[-1]["content"]
        ref = re.search(r"# Reference Output:\n(.*?)\n\n# Output \(a\):", text, re.S).group(1)  # type: ignore[union-attr]
        return answer("a" if shown_a(r) == ref else "b")

    wh = Warehouse(tmp_path / "wh")
    read = {"reference_columns": ["reference", "ref_bad"], "reference_files": [NamedPath("third", str(refs))]}
    result, backend = run(wh, data, follow_reference, protocols=("refeval",), **read)
    # 10 cases x 2 orders x 3 references; the third reference repeats the first's text, so its 20
    # requests are the first's, answered from the call cache
    assert backend.calls == 40 and result.cached_calls == 20 and len(result.rows) == 60
    report = build_report(result.rows, 100, 0)
    acc = {m["protocol"]: m["accuracy"] for m in report.metrics}
    assert acc == {"refeval@reference": 1.0, "refeval@ref_bad": 0.0, "refeval@third": 1.0, "refeval@vote": 1.0}
    vote_sql = docs_sql("vote")
    assert wh.query(vote_sql).to_pylist()[0]["accuracy"] == pytest.approx(1.0)
    # with only the good and the bad reference, every vote ties: no verdict, counted by the rule (½ here)
    two = [r for r in result.rows if r["reference_name"] != "third"]
    vote = next(m for m in build_report(two, 100, 0, "half").metrics if m["protocol"] == "refeval@vote")
    assert vote["accuracy"] == 0.5 and vote["parse_failure_rate"] == 1.0


def test_mcnemar_exact_known_tables() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 0) == pytest.approx(0.25)  # 2 * (1/2)^3
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 0.0385742...
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(5, 5) == 1.0


def test_bootstrap_ci_is_seeded_and_contains_the_mean() -> None:
    values = [1.0, 0.5, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.5, 1.0]
    mean = sum(values) / len(values)
    lo, hi = bootstrap_ci(values, 500, seed=7)
    assert lo <= mean <= hi and lo < hi
    assert bootstrap_ci(values, 500, seed=7) == (lo, hi)
    assert bootstrap_ci([1.0] * 5, 100, seed=0) == (1.0, 1.0)


def _variant(protocol: str, right: dict[str, tuple[bool, bool]]) -> Variant:
    """A variant whose case `cid` is right in (forward, swapped) as given; every label is 1."""
    v = Variant("toy", "j", protocol)
    for cid, (f, s) in right.items():
        case = CaseResult(cid, 1)
        case.judged["forward"] = Judged("a" if f else "b", None, "ok", 1, 1)
        case.judged["swapped"] = Judged("b" if s else "a", None, "ok", 1, 1)
        v.cases[cid] = case
    return v


def test_compare_counts_discordant_judgments() -> None:
    a = _variant("A", {f"c{i}": (True, True) for i in range(10)})
    b = _variant("B", {f"c{i}": (i >= 5, i >= 3) for i in range(10)})
    c = compare(a, b, resamples=300, seed=1)
    assert (c.only_a_right, c.only_b_right) == (5 + 3, 0)
    assert c.acc_a == 1.0 and c.acc_b == pytest.approx((5 + 7) / 20)
    assert c.diff == pytest.approx(1.0 - 0.6)
    assert c.p_value == pytest.approx(2 * 0.5**8)
    assert c.diff_ci_low <= c.diff <= c.diff_ci_high
    assert compare(a, b, resamples=300, seed=1) == c


def test_table1_layout_and_average() -> None:
    ms = [
        {"dataset": "d1", "judge": "j", "protocol": "refeval", "accuracy": 0.8},
        {"dataset": "d2", "judge": "j", "protocol": "refeval", "accuracy": 0.6},
        {"dataset": "d1", "judge": "j", "protocol": "reffree", "accuracy": 0.5},
        {"dataset": "d2", "judge": "j", "protocol": "reffree", "accuracy": 0.7},
    ]
    columns, rows = table1(ms)
    assert columns == ["judge", "protocol", "d1", "d2", "Avg."]
    assert rows[0] == {"judge": "j", "protocol": "refeval", "d1": 80.0, "d2": 60.0, "Avg.": 70.0}
    assert rows[1]["Avg."] == 60.0


def test_agreement_between_judges(tmp_path: Path, data_file: Path) -> None:
    ds = read_eval_set(str(data_file))
    # a second model identity (never loaded: the scripted loader answers), so its calls are its own
    judges = {"j1": ModelSpec(), "j2": ModelSpec(backend="transformers", model="some/judge")}
    backends = {"j1": Scripted(always_a), "j2": Scripted(oracle({}))}
    specs = {id(s): name for name, s in judges.items()}
    proto = [builtin_protocol("llmbar-base", SETTINGS)]
    wh = Warehouse(tmp_path / "wh")
    result = run_judge_eval([ds], judges, proto, SETTINGS, wh, loader=lambda s: backends[specs[id(s)]])
    report = build_report(result.rows, 50, 0)
    (agree,) = report.agreement
    # the oracle says (a) exactly when the good output is first: forward for label 1, swapped for label 2
    assert agree["judgments"] == 20 and agree["agreement"] == pytest.approx(10 / 20)
    assert len(report.table1) == 3  # one row per judge, then the mean over judges
    assert report.table1[-1]["judge"] == "mean over judges"


# ------------------------------------------------------------------------------ switches and rules


def test_unparsed_rules_on_known_unparsed_answers(tmp_path: Path, data_file: Path) -> None:
    # as in the lookup test: case 5 (label 2) unparsed in both orders; cases 5 and 6 tie on the soft score
    result, _ = run(Warehouse(tmp_path / "wh"), data_file, oracle({0: "wrong", 5: "none", 6: "a"}))
    wrong, half, rnd = (metric_of(result.rows, "reffree", rule) for rule in ("wrong", "half", "random"))
    assert (wrong["unparsed"], half["unparsed"], rnd["unparsed"]) == ("wrong", "half", "random")
    assert wrong["parse_failure_rate"] == half["parse_failure_rate"] == rnd["parse_failure_rate"] == 0.1
    assert wrong["accuracy"] == pytest.approx(0.75)
    assert half["accuracy"] == pytest.approx(0.75 + 2 * 0.5 / 20)
    assert (half["acc_forward"], half["acc_swapped"]) == (pytest.approx(0.75), pytest.approx(0.85))
    # random: the seeded coin of (data set, case, order) names output 1 or 2; right when it names the label
    draws = [coin(SETTINGS.seed, "toy", "c5", o) for o in ("forward", "swapped")]
    assert rnd["accuracy"] == pytest.approx(0.75 + sum(d == 2 for d in draws) / 20)
    assert rnd["acc_forward"] == pytest.approx(0.7 + (draws[0] == 2) / 10)
    # soft ties (cases 5 and 6, both label 2) count by the same rule, with the coin of the order `soft`
    assert wrong["acc_soft"] == pytest.approx(0.7) and half["acc_soft"] == pytest.approx(0.8)
    soft_draws = [coin(SETTINGS.seed, "toy", c, "soft") for c in ("c5", "c6")]
    assert rnd["acc_soft"] == pytest.approx(0.7 + sum(d == 2 for d in soft_draws) / 10)
    # deterministic per case and order, and a function of the seed
    assert [coin(0, "toy", "c5", o) for o in ("forward", "swapped")] == draws
    assert {coin(s, "toy", "c5", "forward") for s in range(16)} == {1, 2}


def test_a_judge_that_never_parses(tmp_path: Path, data_file: Path) -> None:
    result, _ = run(Warehouse(tmp_path / "wh"), data_file, lambda r: answer(None))
    expected = sum(
        coin(0, "toy", f"c{i}", o) == label for i, label in enumerate(LABELS) for o in ("forward", "swapped")
    )
    got = {rule: metric_of(result.rows, "reffree", rule) for rule in ("wrong", "half", "random")}
    assert got["wrong"]["accuracy"] == 0.0 and got["half"]["accuracy"] == 0.5
    assert got["random"]["accuracy"] == pytest.approx(expected / 20)
    assert all(m["parse_failure_rate"] == 1.0 for m in got.values())
    # the rule is named in the report's caption and in the Markdown files
    report = build_report(result.rows, 50, 7, "random")
    assert "random winner (seed 7)" in report.caption
    assert report.files()["table1.md"].startswith(report.caption)
    assert "count as wrong" in build_report(result.rows, 50, 0, "wrong").files()["metrics.md"].splitlines()[0]
    assert "count ½" in Unparsed("half").describe()
    with pytest.raises(UserInputError, match="unknown --unparsed rule"):
        Unparsed("coin")


def test_compare_under_half_keeps_half_credits_out_of_mcnemar() -> None:
    a = _variant("A", {f"c{i}": (True, True) for i in range(4)})
    b = _variant("B", {f"c{i}": (True, True) for i in range(4)})
    for cid in ("c0", "c1"):  # B has no verdict in the forward order of two cases
        b.cases[cid].judged["forward"] = Judged(None, None, "no_match", 1, 1)
    c = compare(a, b, resamples=100, seed=0, unparsed="half")
    assert (c.only_a_right, c.only_b_right) == (0, 0) and c.acc_b == pytest.approx(1 - 2 * 0.5 / 8)
    w = compare(a, b, resamples=100, seed=0, unparsed="wrong")
    assert (w.only_a_right, w.only_b_right) == (2, 0) and w.acc_b == pytest.approx(0.75)


def variant_marker_judge(r: JudgeRequest) -> JudgeOutput:
    """Right by content, but its winning marker comes mostly as a variant token (` A`): the variants rule reads
    the right side, the exact rule (only `a` and `b`) the wrong one."""
    right = "a" if shown_a(r).startswith("good") else "b"
    other = "b" if right == "a" else "a"
    tops = [[(right, math.log(0.2)), (f" {right.upper()}", math.log(0.5)), (other, math.log(0.3))], [(")", 0.0)]]
    return JudgeOutput(f"{right})", [right, ")"], tops, tokens_in=50, tokens_out=2)


def test_markers_switch_rereads_stored_answers(tmp_path: Path, data_file: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    first, b1 = run(wh, data_file, variant_marker_judge)
    exact = EvalSettings(bootstrap=200, markers="exact")
    again, b2 = run(wh, data_file, variant_marker_judge, settings=exact)
    assert b1.calls == 20 and b2.calls == 0 and again.cached_calls == 20  # only the reading changed
    assert {r["markers"] for r in first.rows} == {"variants"} and {r["markers"] for r in again.rows} == {"exact"}
    keys = {r["stage_key"] for r in first.rows}, {r["stage_key"] for r in again.rows}
    assert len(keys[0]) == len(keys[1]) == 1 and keys[0] != keys[1]
    assert {r["request_key"] for r in first.rows} == {r["request_key"] for r in again.rows}
    row = next(r for r in first.rows if r["order"] == "forward" and r["label"] == 1)
    assert row["p_a"] == pytest.approx(0.7) and row["p_a_exact"] == pytest.approx(0.4)
    assert all(r["p_a"] == r["p_a_exact"] for r in again.rows)
    # both marker rules, side by side, in either run
    m = metric_of(first.rows, "reffree")
    assert (m["acc_soft"], m["acc_soft_exact"], m["markers"]) == (1.0, 0.0, "variants")
    m = metric_of(again.rows, "reffree")
    assert (m["acc_soft"], m["acc_soft_exact"], m["markers"]) == (0.0, 0.0, "exact")


def test_top_logprobs_and_prefill_are_recorded_and_keyed(tmp_path: Path, data_file: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    base, _ = run(wh, data_file, unprefilled(oracle({})))
    top5, b5 = run(wh, data_file, unprefilled(oracle({})), settings=EvalSettings(bootstrap=200, top_logprobs=5))
    assert b5.calls == 20 and {r.top_logprobs for r in b5.requests} == {5}  # other requests
    assert {r["top_logprobs"] for r in base.rows} == {20} and {r["top_logprobs"] for r in top5.rows} == {5}
    none, bn = run(wh, data_file, unprefilled(oracle({})), settings=EvalSettings(bootstrap=200, prefill="none"))
    assert bn.calls == 20 and {(r.prefill, r.max_tokens) for r in bn.requests} == {("", 16)}
    assert {r["prefill"] for r in base.rows} == {"Output ("} and {r["prefill"] for r in none.rows} == {""}
    assert all(r["raw_output"].startswith("Output (") and r["p_source"] == "verdict_token" for r in none.rows)
    assert metric_of(none.rows, "reffree")["accuracy"] == 1.0
    assert metric_of(none.rows, "reffree")["prefill"] == ""
    keys = [{r["stage_key"] for r in x.rows} for x in (base, top5, none)]
    assert all(len(k) == 1 for k in keys) and len(set.union(*keys)) == 3
    # cot never prefills: --prefill none leaves it as it is
    assert builtin_protocol("cot", EvalSettings(prefill="none")).protocol == PROTOCOLS["cot"]
    assert builtin_protocol("reffree", EvalSettings(prefill="none", max_tokens=12)).max_tokens == 12


def test_swap_blocks_shows_b_first_and_maps_verdicts_back(tmp_path: Path, data_file: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    outputs, _ = run(wh, data_file, oracle({}))
    blocks = EvalSettings(bootstrap=200, swap="blocks")
    result, backend = run(wh, data_file, oracle({}), settings=blocks)
    assert backend.calls == 10 and result.cached_calls == 10  # the forward calls are the same requests
    assert {r["order"] for r in result.rows} == {"forward", "swapped_blocks"}
    assert {r["stage_key"] for r in result.rows} != {r["stage_key"] for r in outputs.rows}
    cases = {r["id"]: r for r in make_rows()}
    for req in backend.requests:
        assert blocks_swapped(req)  # (b)'s block comes first, and each output keeps its letter
        i = int(re.search(r"-(\d+)", shown_a(req)).group(1))  # type: ignore[union-attr]
        assert (shown_a(req), shown(req, "b")) == (cases[f"c{i}"]["output_1"], cases[f"c{i}"]["output_2"])
    for r in result.rows:  # a verdict `a` still names output_1
        assert r["verdict"] == ("a" if r["label"] == 1 else "b")
        if r["order"] == "swapped_blocks":
            assert r["len_a"] == len(cases[r["case_id"]]["output_1"])
    m = metric_of(result.rows, "reffree+blocks")
    assert (m["accuracy"], m["consistency"], m["swap"]) == (1.0, 1.0, "blocks")
    # a judge that always names the block shown first: right in one order of every case, and always first
    pos, _ = run(Warehouse(tmp_path / "wh2"), data_file, first_shown, settings=blocks)
    m = metric_of(pos.rows, "reffree+blocks")
    assert (m["accuracy"], m["first_position_rate"], m["consistency"]) == (0.5, 1.0, 0.0)
    assert {(r["order"], r["verdict"]) for r in pos.rows} == {("forward", "a"), ("swapped_blocks", "b")}


@pytest.mark.parametrize(
    ("policy", "position", "letter"),
    [(first_shown, 1.0, 0.5), (always_a, 0.5, 1.0), (oracle({}), 0.5, 0.5)],
)
def test_swap_both_separates_position_and_letter_bias(
    tmp_path: Path, data_file: Path, policy: Callable[[JudgeRequest], JudgeOutput], position: float, letter: float
) -> None:
    both = EvalSettings(bootstrap=100, swap="both")
    result, backend = run(Warehouse(tmp_path / "wh"), data_file, policy, settings=both)
    assert backend.calls == 30 and {r["order"] for r in result.rows} == {"forward", "swapped", "swapped_blocks"}
    report = build_report(result.rows, 100, 0, "wrong")
    assert [m["protocol"] for m in report.metrics] == ["reffree", "reffree+blocks"]
    (b,) = report.bias
    assert (b["protocol"], b["cases"]) == ("reffree", 10)
    assert (b["position_first_rate"], b["letter_a_rate"]) == (position, letter)
    # the outputs swap alone cannot tell the two apart: both biased judges always pick (a), shown first
    assert b["first_position_rate"] == (0.5 if policy not in (first_shown, always_a) else 1.0)
    assert "bias.csv" in report.files()


def test_blocks_need_the_standard_output_blocks(tmp_path: Path, data_file: Path) -> None:
    text = tmp_path / "inline.txt"
    text.write_text("Task: {instruction}\nA: {output_a}\nB: {output_b}\nWhich is better, Output (a) or Output (b)?")
    blocks = EvalSettings(swap="blocks")
    p = load_custom_template(text, blocks)
    backend = Scripted(always_a)
    ds = read_eval_set(str(data_file))
    with pytest.raises(UserInputError, match="cannot be swapped"):
        run_judge_eval([ds], JUDGE, [p], blocks, Warehouse(tmp_path / "wh"), loader=lambda s: backend)
    assert backend.calls == 0


def test_cli_states_the_rules_and_writes_bias(tmp_path: Path, data_file: Path, monkeypatch: Any) -> None:
    import factory.judge_eval.command
    from factory.cli.main import main

    backend = Scripted(oracle({5: "none"}))
    monkeypatch.setattr(factory.judge_eval.command, "load_backend", lambda spec: backend)
    out = tmp_path / "report"
    args = ["judge-eval", "--data", f"toy={data_file}", "--protocol", "reffree", "-w", str(tmp_path / "wh")]
    args += ["--out", str(out), "-q", "--bootstrap", "50", "--swap", "both"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "random winner (seed 0)" in flat and "position bias vs letter bias" in flat
    assert "prefill output, top-20, swap both" in flat and "soft (variants)" in flat and "soft (exact)" in flat
    assert (out / "table1.md").read_text().startswith("Accuracy (%), both orders averaged; unparsed or tied")
    assert (out / "bias.csv").is_file()
    import csv

    with open(out / "metrics.csv", encoding="utf-8") as f:
        written = list(csv.DictReader(f))
    assert {(r["protocol"], r["unparsed"], r["swap"], r["markers"], r["top_logprobs"]) for r in written} == {
        ("reffree", "random", "outputs", "variants", "20"),
        ("reffree+blocks", "random", "blocks", "variants", "20"),
    }
    again = CliRunner().invoke(main, [*args, "--unparsed", "wrong", "--seed", "3"])
    assert again.exit_code == 0 and "model calls 0" in again.output
    assert "count as wrong" in " ".join(again.output.split())
    compare_args = ["judge-compare", "--protocol-a", "reffree", "--protocol-b", "reffree+blocks"]
    compared = CliRunner().invoke(main, [*compare_args, "-w", str(tmp_path / "wh"), "--unparsed", "half"])
    assert compared.exit_code == 0, compared.output
    assert "count ½" in " ".join(compared.output.split())


# ----------------------------------------------------------------------------------- cache and storage


def test_rerun_makes_no_calls(tmp_path: Path, data_file: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    first, b1 = run(wh, data_file, always_a, protocols=("reffree", "llmbar-base"))
    assert b1.calls == 40 and first.model_calls == 40
    again, b2 = run(wh, data_file, always_a, protocols=("reffree", "llmbar-base"))
    assert b2.calls == 0 and again.model_calls == 0
    assert again.rows == first.rows
    # without the stored tables the call cache still answers every request
    import shutil

    shutil.rmtree(wh.root / "tables")
    cached, b3 = run(wh, data_file, always_a, protocols=("reffree", "llmbar-base"))
    assert b3.calls == 0 and cached.model_calls == 0 and cached.cached_calls == 40
    assert [r["verdict"] for r in cached.rows] == [r["verdict"] for r in first.rows]
    # a longer run adds only the new cases' calls
    more, b4 = run(wh, write_jsonl(tmp_path / "toy.jsonl", make_rows([*LABELS, 1, 2])), always_a)
    assert b4.calls == 4 and more.cached_calls == 20


def test_failed_calls_are_rows_and_retried(tmp_path: Path, data_file: Path) -> None:
    wh = Warehouse(tmp_path / "wh")

    def down(_: JudgeRequest) -> JudgeOutput:
        raise TransientError("backend down (HTTP 503)")

    result, _ = run(wh, data_file, down)
    assert result.status == "incomplete"
    m = metric_of(result.rows, "reffree")
    assert m["accuracy"] == 0.0 and m["call_errors"] == 20 and m["parse_failure_rate"] == 1.0
    retry, backend = run(wh, data_file, always_a)
    assert backend.calls == 20 and retry.status == "ok"


def test_a_non_transient_failure_stops_the_run_and_is_not_stored(tmp_path: Path, data_file: Path) -> None:
    wh = Warehouse(tmp_path / "wh")

    def buggy(_: JudgeRequest) -> JudgeOutput:
        raise KeyError("a programming error in a backend")

    with pytest.raises(KeyError):
        run(wh, data_file, buggy)
    (row,) = wh.query("SELECT status, error FROM runs").to_pylist()
    assert row["status"] == "failed" and "KeyError" in row["error"]
    assert wh.query("SELECT count(*) AS n FROM judge_calls").to_pylist() == [{"n": 0}]
    retry, backend = run(wh, data_file, always_a)
    assert backend.calls == 20 and retry.status == "ok"


def docs_sql(name: str) -> str:
    """The SQL block after `<!-- sql:NAME -->` in docs/JUDGE_EVAL.md."""
    text = DOCS.read_text(encoding="utf-8")
    m = re.search(rf"<!-- sql:{name} -->\s*```sql\n(.*?)```", text, re.S)
    assert m is not None, f"docs/JUDGE_EVAL.md lacks the sql:{name} block"
    return m.group(1)


@pytest.mark.parametrize(("rule", "swap"), [("random", "outputs"), ("wrong", "outputs"), ("half", "blocks")])
def test_printed_numbers_equal_sql_over_the_table(
    tmp_path: Path, data_file: Path, monkeypatch: Any, rule: str, swap: str
) -> None:
    import factory.judge_eval.command
    from factory.cli.main import main

    backend = Scripted(oracle({0: "wrong", 5: "none", 6: "a", 8: "a"}))
    monkeypatch.setattr(factory.judge_eval.command, "load_backend", lambda spec: backend)
    wh_dir, out = tmp_path / "wh", tmp_path / "report"
    args = ["judge-eval", "--data", f"toy={data_file}", "--protocol", "reffree", "--protocol", "refeval"]
    args += ["--unparsed", rule, "--swap", swap]
    result = CliRunner().invoke(main, [*args, "-w", str(wh_dir), "--out", str(out), "-q", "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    assert backend.calls == 40
    second = "swapped_blocks" if swap == "blocks" else "swapped"
    sql = docs_sql("metrics").replace(
        "'random' AS unparsed, 'swapped' AS second", f"'{rule}' AS unparsed, '{second}' AS second"
    )
    sql_rows = Warehouse(wh_dir).query(sql).to_pylist()
    assert len(sql_rows) == 2
    import csv

    with open(out / "metrics.csv", encoding="utf-8") as f:
        written = {r["protocol"]: r for r in csv.DictReader(f)}
    suffix = "+blocks" if swap == "blocks" else ""
    for s in sql_rows:
        w = written[s["protocol"] + suffix]
        assert int(w["cases"]) == s["cases"] == 10
        for col in (
            "acc_forward",
            "acc_swapped",
            "accuracy",
            "consistency",
            "parse_failure_rate",
            "first_position_rate",
        ):
            assert float(w[col]) == pytest.approx(s[col], abs=1e-12), col
            assert f"{100 * s[col]:.1f}" in result.output
    table1_md = (out / "table1.md").read_text()
    assert "| judge | protocol | toy | Avg. |" in table1_md
    # the same numbers again from the stored table: a rerun makes no call and prints the same report
    again = CliRunner().invoke(main, [*args, "-w", str(wh_dir), "--out", str(out), "-q", "--bootstrap", "100"])
    assert again.exit_code == 0 and backend.calls == 40 and "model calls 0" in again.output


def test_judge_compare_cli(tmp_path: Path, data_file: Path, monkeypatch: Any) -> None:
    import factory.judge_eval.command
    from factory.cli.main import main

    def policy(r: JudgeRequest) -> JudgeOutput:
        has_ref = "# Reference Output:" in r.messages[-1]["content"]
        return oracle({})(r) if has_ref else always_a(r)

    monkeypatch.setattr(factory.judge_eval.command, "load_backend", lambda spec: Scripted(policy))
    wh = tmp_path / "wh"
    args = ["judge-eval", "--data", str(data_file), "--protocol", "refeval", "--protocol", "reffree", "-q"]
    assert CliRunner().invoke(main, [*args, "-w", str(wh)]).exit_code == 0
    result = CliRunner().invoke(
        main, ["judge-compare", "--protocol-a", "refeval", "--protocol-b", "reffree", "-w", str(wh)]
    )
    assert result.exit_code == 0, result.output
    rows = Warehouse(wh).current_rows("eval_judgments")
    (c,), _ = compare_stored(rows, "refeval", "reffree", None, [], 1000, 0)
    assert (c.only_a_right, c.only_b_right) == (10, 0) and c.acc_a == 1.0 and c.acc_b == 0.5
    assert f"{c.p_value:.4g}" in result.output and "100.0" in result.output and "50.0" in result.output
    bad = CliRunner().invoke(main, ["judge-compare", "--protocol-a", "cot", "--protocol-b", "reffree", "-w", str(wh)])
    assert bad.exit_code == 2 and bad.output.startswith("error:") and "cot" in bad.output


def test_judge_names_are_printed_literally(tmp_path: Path, data_file: Path) -> None:
    """A judge named with rich markup and escape sequences (a spec file's key) is shown as text in every table
    judge-eval and judge-compare print: the markup is not obeyed, the escapes are made visible."""
    from factory.cli.main import main

    name = "[bold red]j[/] \x1b]52;c;aGk=\x07 \x1b[2J"
    spec = tmp_path / "judges.json"
    spec.write_text(json.dumps({name: {"backend": "scripted", "script": {"seed": 2}}}), encoding="utf-8")
    wh = str(tmp_path / "wh")
    args = ["judge-eval", "--data", str(data_file), "--judge", str(spec), "-q", "--bootstrap", "50", "-w", wh]
    judged = CliRunner().invoke(main, [*args, "--protocol", "refeval", "--protocol", "reffree"])
    compare = ["judge-compare", "--protocol-a", "refeval", "--protocol-b", "reffree", "-w", wh]
    compared = CliRunner().invoke(main, compare)
    for result in (judged, compared):
        assert result.exit_code == 0, result.output
        assert "[bold red]j[/] \ufffd]52;c;aGk=\ufffd \ufffd[2J" in result.output
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", result.output), result.output


# --------------------------------------------------------------------------------------------- input


def test_reads_llmbar_variants_and_aligns_references(tmp_path: Path) -> None:
    rows = make_rows()
    plain = [
        {"instruction": r["input"], "output_1": r["output_1"], "output_2": r["output_2"], "winner": str(r["label"])}
        for r in rows
    ]
    data = tmp_path / "plain.json"
    data.write_text(json.dumps(plain), encoding="utf-8")
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps([r["reference"] for r in rows]), encoding="utf-8")
    ds = read_eval_set(str(data), reference_files=[NamedPath(None, str(refs))], limit=4)
    assert ds.name == "plain" and ds.reference_names == ["refs"] and len(ds.cases) == 4
    assert [c.label for c in ds.cases] == LABELS[:4] and ds.cases[2].case_id == "2"
    assert ds.cases[3].references["refs"] == rows[3]["reference"]
    # misaligned by position: an item naming another instruction
    shifted = tmp_path / "shifted.jsonl"
    write_jsonl(shifted, [{"instruction": f"Task {i + 1}", "output": "x"} for i in range(10)])
    with pytest.raises(UserInputError, match="misaligned"):
        read_eval_set(str(data), reference_files=[NamedPath(None, str(shifted))])
    short = tmp_path / "short.jsonl"
    write_jsonl(short, [{"output": "x"}] * 3)
    with pytest.raises(UserInputError, match="3 references for 10 cases"):
        read_eval_set(str(data), reference_files=[NamedPath(None, str(short))])


def test_reads_a_saved_hf_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(make_rows()).save_to_disk(str(tmp_path / "saved"))
    ds = read_eval_set(str(tmp_path / "saved"))
    assert ds.name == "saved" and len(ds.cases) == 10 and ds.reference_names == ["reference"]


def test_custom_templates_and_judge_specs(tmp_path: Path, data_file: Path) -> None:
    text = tmp_path / "mine.txt"
    text.write_text("Q: {instruction}\n\n# Output (a):\n{output_a}\n\n# Output (b):\n{output_b}\n\nBetter?")
    p = load_custom_template(text, SETTINGS)
    assert p.name == "custom:mine" and not p.protocol.uses_reference and p.max_tokens == 8
    backend = Scripted(oracle({}))
    ds = read_eval_set(str(data_file))
    out = run_judge_eval([ds], JUDGE, [p], SETTINGS, Warehouse(tmp_path / "wh2"), loader=lambda s: backend)
    assert metric_of(out.rows, "custom:mine")["accuracy"] == 1.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntemplate: '{instruction}'\ncolour: red\n")
    with pytest.raises(UserInputError, match="colour"):
        load_custom_template(bad, SETTINGS)
    spec = tmp_path / "judges.yaml"
    spec.write_text("small: {backend: embedded, threads: 1}\nbig: {backend: transformers, model: some/model}\n")
    judges = parse_judges([str(spec), "embedded"], batch_size=4)
    assert set(judges) == {"small", "big", "embedded"} and judges["embedded"].batch_size == 4
    with pytest.raises(UserInputError, match="BACKEND"):
        parse_judges(["nope:gpt-4"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "missing.jsonl"], "no such file"),
        (["--data", "{bad_label}"], "label must be 1 or 2"),
        (["--data", "{good}", "--protocol", "nope"], "unknown judge protocol"),
        (["--data", "{no_ref}", "--protocol", "refeval"], "needs references"),
        (["--data", "{good}", "--judge", "nope:model"], "BACKEND"),
        (["--data", "{good}", "--reference-column", "gold"], "no reference column 'gold'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    from factory.cli.main import main

    rows = make_rows()
    files = {
        "good": write_jsonl(tmp_path / "good.jsonl", rows),
        "bad_label": write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "label": 3}]),
        "no_ref": write_jsonl(
            tmp_path / "noref.jsonl", [{k: v for k, v in r.items() if k != "reference"} for r in rows]
        ),
    }
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    result = CliRunner().invoke(main, ["judge-eval", *args, "-w", str(tmp_path / "wh"), "-q"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_import_factory_cli_stays_light() -> None:
    code = (
        "import sys, factory.cli.main as c; "
        "assert {'judge-eval', 'judge-compare'} <= set(c.main.commands), c.main.commands; "
        "heavy = {'torch', 'transformers', 'datasets', 'duckdb'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------- real model


@pytest.mark.model
def test_embedded_judge_on_llmbar_cases(tmp_path: Path, embedded_dir: Path) -> None:
    """Two real LLMBar-Natural cases through the embedded judge: rows in both orders, then a free rerun."""
    from factory.cli.main import main

    # The shared LLMBar-Natural set lies beside the repository (in CI too); a made-up pair stands in elsewhere.
    natural = Path(__file__).resolve().parents[2] / "shared" / "data" / "llmbar" / "natural.jsonl"
    if not natural.is_file():
        natural = write_jsonl(tmp_path / "natural.jsonl", make_rows()[:2])
    args = ["judge-eval", "--data", str(natural), "--limit", "2", "--protocol", "reffree", "--protocol", "refeval"]
    args += ["--threads", "1", "-w", str(tmp_path / "wh"), "-q", "--bootstrap", "50"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code in (0, 1), first.output
    rows = Warehouse(tmp_path / "wh").current_rows("eval_judgments")
    assert len(rows) == 8 and {r["order"] for r in rows} == {"forward", "swapped"}
    assert all(r["raw_output"].startswith("Output (") for r in rows if r["parse_status"] != "error")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == first.exit_code and "model calls 0" in again.output
