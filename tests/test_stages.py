"""The pure stage functions, on hand-made rows: no files, no SQL, no model."""

from __future__ import annotations

import json
import random
from itertools import permutations
from typing import Any

import pytest

from factory.config.labeling import JudgmentsSpec, PairsSpec
from factory.config.models import ModelSpec
from factory.config.sources import PromptSource, ReferenceSpec
from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.judge.protocols import PROTOCOLS
from factory.models.registry import model_identity
from factory.stages.judgments import judge_calls
from factory.stages.pairs import pair_rows
from factory.stages.prompts import prompt_rows
from factory.stages.references import column_reference_rows
from factory.stages.scores import score_rows

# ------------------------------------------------------------------------------------------------ prompts


def source(**kw: Any) -> PromptSource:
    return PromptSource(inline=[{"instruction": "x"}], **kw)


def test_prompt_rows_dedupe_by_content() -> None:
    raw = [{"instruction": "a"}, {"instruction": "b"}, {"instruction": "a"}, {"instruction": "a "}]
    out = prompt_rows("inline", raw, source())
    assert [r["instruction"] for r in out.rows] == ["a", "b", "a "]
    assert [r["source_row"] for r in out.rows] == [0, 1, 3]
    assert out.notes["duplicates"] == 1
    assert len({r["prompt_id"] for r in out.rows}) == 3
    kept_all = prompt_rows("inline", raw, source(dedupe=False))
    assert len(kept_all.rows) == 4 and kept_all.rows[0]["prompt_id"] == kept_all.rows[2]["prompt_id"]


def test_prompt_id_is_a_hash_of_the_messages() -> None:
    a = prompt_rows("one", [{"instruction": "same", "id": 1}], source()).rows[0]
    b = prompt_rows("two", [{"instruction": "same", "id": 2}], source()).rows[0]
    assert a["prompt_id"] == b["prompt_id"]  # source and provenance do not enter the id
    c = prompt_rows("one", [{"instruction": "same", "sys": "Be brief."}], source(system_field="sys")).rows[0]
    assert c["prompt_id"] != a["prompt_id"]


def test_prompt_rows_render_as_json_dumps_and_hash_as_stable_hash() -> None:
    """The row's texts are rendered by hand for speed: byte for byte what `json.dumps` and `stable_hash` give,
    for text with quotes, escapes, control characters, line separators and characters beyond the BMP."""
    pieces = ["a", '"', "\\", "\n", "\u2028", "é", "\x00", "\U0001f600", " ", "</", "\t", "\x7f"]
    rnd = random.Random(3)
    for _ in range(300):
        text = ["".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 9))) for _ in range(3)]
        text[0] = "q" + text[0]  # never blank: a blank instruction is dropped
        row = {"q": text[0], "sys": text[1], "ref": text[2] if rnd.random() < 0.5 else None}
        got = prompt_rows("s", [row], source(instruction_field="q", system_field="sys", reference_fields=["ref"]))
        (out,) = got.rows
        messages = [{"role": "system", "content": text[1]}, {"role": "user", "content": text[0]}]
        assert out["messages"] == json.dumps(messages, ensure_ascii=False)
        assert out["prompt_id"] == stable_hash(messages, 16)
        assert out["reference_fields"] == json.dumps({"ref": row["ref"]}, ensure_ascii=False)


def test_prompt_rows_system_field() -> None:
    raw = [{"q": "hi", "sys": "Be brief."}, {"q": "yo", "sys": None}, {"q": "hey", "sys": ""}]
    out = prompt_rows("inline", raw, source(instruction_field="q", system_field="sys"))
    messages = [json.loads(r["messages"]) for r in out.rows]
    assert messages[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert messages[1] == [{"role": "user", "content": "yo"}]
    assert messages[2] == [{"role": "user", "content": "hey"}]


def test_prompt_rows_limit_after_shuffle() -> None:
    raw = [{"instruction": f"q{i}"} for i in range(30)]
    in_order = prompt_rows("s", raw, source(limit=5)).rows
    assert [r["instruction"] for r in in_order] == [f"q{i}" for i in range(5)]
    full = [r["instruction"] for r in prompt_rows("s", raw, source(shuffle=True, seed=7)).rows]
    again = [r["instruction"] for r in prompt_rows("s", raw, source(shuffle=True, seed=7)).rows]
    other = [r["instruction"] for r in prompt_rows("s", raw, source(shuffle=True, seed=8)).rows]
    assert full == again, "the same seed gives the same order"
    assert full != other and full != [f"q{i}" for i in range(30)]
    assert sorted(full) == sorted(r["instruction"] for r in prompt_rows("s", raw, source()).rows)
    limited = prompt_rows("s", raw, source(shuffle=True, seed=7, limit=5))
    assert [r["instruction"] for r in limited.rows] == full[:5]
    assert limited.notes["kept"] == 5


def test_prompt_rows_provenance_and_reference_fields() -> None:
    raw = [{"instruction": "q", "id": 17, "ref": "answer", "other_ref": None}]
    row = prompt_rows("file.jsonl", raw, source(id_field="id", reference_fields=["ref", "other_ref"])).rows[0]
    assert (row["source"], row["source_row"], row["source_id"]) == ("file.jsonl", 0, "17")
    assert json.loads(row["reference_fields"]) == {"ref": "answer", "other_ref": None}


@pytest.mark.parametrize("field", ["instruction", "question"])
def test_missing_instruction_column_names_the_column(field: str) -> None:
    raw = [{field: "fine"}, {"prompt": "no instruction here"}]
    with pytest.raises(UserInputError, match=f"missing column '{field}'") as info:
        prompt_rows("inline", raw, source(instruction_field=field))
    assert "row 1" in str(info.value)


def test_non_text_instruction_is_an_error() -> None:
    with pytest.raises(UserInputError, match="must be text"):
        prompt_rows("inline", [{"instruction": 42}], source())


def test_empty_instructions_are_skipped_and_an_empty_set_is_an_error() -> None:
    out = prompt_rows("inline", [{"instruction": "  "}, {"instruction": "ok"}], source())
    assert [r["instruction"] for r in out.rows] == ["ok"] and out.notes["empty"] == 1
    with pytest.raises(UserInputError, match="no usable prompts"):
        prompt_rows("inline", [{"instruction": ""}, {"instruction": "\n"}], source())
    with pytest.raises(UserInputError, match=r"^recipe\.yaml:6: field 'prompts\.inline'"):
        prompt_rows("inline", [], source(), where="recipe.yaml:6: field 'prompts.inline'")


# --------------------------------------------------------------------------------------------- references


def prompt(pid: str, instruction: str = "Q?", reference: str | None = "R.") -> dict[str, Any]:
    return {"prompt_id": pid, "instruction": instruction, "reference_fields": json.dumps({"reference": reference})}


def test_column_references_mark_missing_ones() -> None:
    prompts = [prompt("p1", reference="Paris."), prompt("p2", reference=None), prompt("p3", reference="  ")]
    prompts.append({"prompt_id": "p4", "instruction": "Q", "reference_fields": "{}"})
    out = column_reference_rows(prompts, ReferenceSpec(name="human", kind="column"), "reference")
    assert [(r["prompt_id"], r["status"], r["text"]) for r in out.rows] == [
        ("p1", "ok", "Paris."),
        ("p2", "missing", None),
        ("p3", "missing", None),
        ("p4", "missing", None),
    ]
    assert {r["reference_name"] for r in out.rows} == {"human"}
    assert {r["source_kind"] for r in out.rows} == {"human"}
    assert out.notes["missing"] == 3


# ---------------------------------------------------------------------------------------------- judgments

IDENTITY = {"backend": "embedded", "model": "smol"}


def sample(
    pid: str, index: int, text: str | None = None, error: str | None = None, n_tokens: int = 10, n_prompt: int = 20
) -> dict[str, Any]:
    return {
        "sample_id": f"{pid}-s{index}",
        "prompt_id": pid,
        "sample_index": index,
        "text": None if error else (text or f"answer {index} to {pid}"),
        "error": error,
        "n_tokens": n_tokens,
        "n_prompt_tokens": n_prompt,
    }


def reference(pid: str, text: str = "R.", name: str = "human", status: str = "ok") -> dict[str, Any]:
    return {"prompt_id": pid, "reference_name": name, "text": text if status == "ok" else None, "status": status}


def judgments_spec(protocol: str = "refeval", **kw: Any) -> JudgmentsSpec:
    ref = "human" if PROTOCOLS[protocol].uses_reference else None
    return JudgmentsSpec(judge="smol", protocol=protocol, reference=ref, **kw)


def calls_for(
    protocol: str = "refeval",
    prompts: list[dict[str, Any]] | None = None,
    samples: list[dict[str, Any]] | None = None,
    references: list[dict[str, Any]] | None = None,
    identity: dict[str, Any] = IDENTITY,
    **kw: Any,
) -> tuple[list[Any], dict[str, Any]]:
    prompts = prompts if prompts is not None else [prompt("p1")]
    samples = samples if samples is not None else [sample("p1", i) for i in range(3)]
    references = references if references is not None else [reference(p["prompt_id"]) for p in prompts]
    spec = judgments_spec(protocol, **kw)
    return judge_calls(prompts, samples, references, spec, PROTOCOLS[protocol], identity)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_both_orders_judge_every_ordered_pair(n: int) -> None:
    calls, _ = calls_for(samples=[sample("p1", i) for i in range(n)])
    assert len(calls) == n * (n - 1)
    pairs = [(c.meta["sample_a"], c.meta["sample_b"]) for c in calls]
    assert set(pairs) == set(permutations([f"p1-s{i}" for i in range(n)], 2))
    assert len({c.key for c in calls}) == len(calls)
    orders = [c.meta["order"] for c in calls]
    assert orders.count("forward") == orders.count("swapped") == n * (n - 1) // 2


@pytest.mark.parametrize("n", [2, 3, 5])
def test_forward_order_judges_each_pair_once(n: int) -> None:
    calls, _ = calls_for(samples=[sample("p1", i) for i in range(n)], orders="forward")
    assert len(calls) == n * (n - 1) // 2
    assert {c.meta["order"] for c in calls} == {"forward"}
    assert all(c.meta["sample_a"] < c.meta["sample_b"] for c in calls)


def test_judge_call_shows_sample_a_as_output_a() -> None:
    calls, _ = calls_for(samples=[sample("p1", 0, "FIRST"), sample("p1", 1, "SECOND")])
    by_order = {c.meta["order"]: c.request.messages[-1]["content"] for c in calls}
    forward, swapped = by_order["forward"], by_order["swapped"]
    assert forward.index("FIRST") < forward.index("# Output (b):") < forward.index("SECOND")
    assert swapped.index("SECOND") < swapped.index("# Output (b):") < swapped.index("FIRST")
    assert "R." in forward
    assert calls[0].request.prefill == "Output ("


def test_errored_samples_are_not_judged() -> None:
    samples = [sample("p1", 0), sample("p1", 1, error="timeout"), sample("p1", 2), sample("p1", 3)]
    calls, _ = calls_for(samples=samples)
    assert len(calls) == 3 * 2
    assert "p1-s1" not in {c.meta["sample_a"] for c in calls} | {c.meta["sample_b"] for c in calls}


def test_prompts_without_reference_are_skipped_and_counted() -> None:
    prompts = [prompt("p1"), prompt("p2"), prompt("p3")]
    samples = [sample(p, i) for p in ("p1", "p2", "p3") for i in range(2)]
    references = [reference("p1"), reference("p2", status="missing"), reference("p3", name="other")]
    calls, notes = calls_for("refeval", prompts, samples, references)
    assert {c.meta["prompt_id"] for c in calls} == {"p1"}
    assert notes["prompts_without_reference"] == 2
    free, free_notes = calls_for("reffree", prompts, samples, references)
    assert {c.meta["prompt_id"] for c in free} == {"p1", "p2", "p3"}
    assert free_notes["prompts_without_reference"] == 0


def test_request_keys_change_with_the_protocol() -> None:
    keys = {name: {c.key for c in calls_for(name)[0]} for name in PROTOCOLS if name != "cot"}
    for a in keys:
        for b in keys:
            if a != b:
                assert not keys[a] & keys[b], f"{a} and {b} share request keys"


def test_request_keys_change_with_what_changes_the_output() -> None:
    base = {c.key for c in calls_for()[0]}
    assert {c.key for c in calls_for()[0]} == base, "keys are deterministic"
    assert not base & {c.key for c in calls_for(max_tokens=16)[0]}
    assert not base & {c.key for c in calls_for(references=[reference("p1", "Other.")])[0]}
    assert not base & {c.key for c in calls_for(identity={**IDENTITY, "model": "bigger"})[0]}


def test_request_keys_do_not_depend_on_operational_settings() -> None:
    small = model_identity(ModelSpec(backend="transformers", model="m", batch_size=1, threads=1))
    large = model_identity(ModelSpec(backend="transformers", model="m", batch_size=64, threads=8, device="cuda"))
    assert {c.key for c in calls_for(identity=small)[0]} == {c.key for c in calls_for(identity=large)[0]}
    # Neither do the scoring rule nor the parser: re-scoring reuses every judge call.
    assert {c.key for c in calls_for(scoring="verdict")[0]} == {c.key for c in calls_for(scoring="logprob")[0]}
    revised = model_identity(ModelSpec(backend="transformers", model="m", revision="v2"))
    assert not {c.key for c in calls_for(identity=small)[0]} & {c.key for c in calls_for(identity=revised)[0]}


# --------------------------------------------------------------------------------------- scores and pairs


def judgment(a: str, b: str, p_a: float | None, verdict: str | None = None, status: str = "ok") -> dict[str, Any]:
    return {"sample_a": a, "sample_b": b, "p_a": p_a, "verdict": verdict, "parse_status": status}


def test_score_is_the_mean_soft_win_probability() -> None:
    samples = [sample("p1", i) for i in range(3)]
    s0, s1, s2 = (s["sample_id"] for s in samples)
    judgments = [
        judgment(s0, s1, 0.8, "a"),
        judgment(s1, s0, 0.3, "b"),
        judgment(s0, s2, 0.6, "a"),
        judgment(s2, s0, None, None, "error"),  # a failed call carries no information
        judgment(s1, s2, 0.5, None, "no_match"),  # soft score from the first token still counts
    ]
    out = score_rows(samples, judgments, "logprob")
    scores = {r["sample_id"]: r for r in out.rows}
    assert scores[s0]["score"] == pytest.approx((0.8 + 0.7 + 0.6) / 3)
    assert scores[s1]["score"] == pytest.approx((0.2 + 0.3 + 0.5) / 3)
    assert scores[s2]["score"] == pytest.approx((0.4 + 0.5) / 2)
    assert {k: v["n_comparisons"] for k, v in scores.items()} == {s0: 3, s1: 3, s2: 2}
    assert {k: v["wins"] for k, v in scores.items()} == {s0: 3, s1: 0, s2: 0}


def test_unjudged_samples_get_no_score() -> None:
    samples = [sample("p1", 0), sample("p1", 1), sample("p1", 2)]
    judgments = [judgment("p1-s0", "p1-s1", 0.9, "a"), judgment("p1-s2", "p1-s0", None, None, "error")]
    out = score_rows(samples, judgments, "logprob")
    assert {r["sample_id"] for r in out.rows} == {"p1-s0", "p1-s1"}
    assert out.notes["unscored_samples"] == 1


def test_verdict_scoring_counts_parsed_verdicts_only() -> None:
    samples = [sample("p1", 0), sample("p1", 1), sample("p1", 2)]
    judgments = [
        judgment("p1-s0", "p1-s1", 0.4, "a"),  # verdict scoring ignores p_a
        judgment("p1-s1", "p1-s0", 0.9, "a"),
        judgment("p1-s0", "p1-s2", 0.9, None, "no_match"),
        judgment("p1-s2", "p1-s0", 0.9, None, "invalid_marker"),
    ]
    scores = {r["sample_id"]: r for r in score_rows(samples, judgments, "verdict").rows}
    assert scores["p1-s0"]["score"] == pytest.approx(0.5)
    assert scores["p1-s1"]["score"] == pytest.approx(0.5)
    assert scores["p1-s0"]["n_comparisons"] == 2
    logprob = {r["sample_id"]: r for r in score_rows(samples, judgments, "logprob").rows}
    assert logprob["p1-s0"]["n_comparisons"] == 4


def score(s: dict[str, Any], value: float) -> dict[str, Any]:
    return {"sample_id": s["sample_id"], "prompt_id": s["prompt_id"], "score": value}


def test_pairs_best_vs_worst() -> None:
    samples = [sample("p1", i) for i in range(4)]
    scores = [score(s, v) for s, v in zip(samples, [0.4, 0.9, 0.1, 0.6], strict=True)]
    out = pair_rows(samples, scores, PairsSpec())
    assert out.rows == [
        {
            "prompt_id": "p1",
            "chosen_sample_id": "p1-s1",
            "rejected_sample_id": "p1-s2",
            "chosen_score": 0.9,
            "rejected_score": 0.1,
            "margin": pytest.approx(0.8),
        }
    ]


def test_ties_and_small_margins_are_dropped_and_counted() -> None:
    samples = [sample(p, i) for p in ("tie", "close", "clear") for i in range(3)]
    values = {"tie": [0.5, 0.5, 0.5], "close": [0.5, 0.55, 0.52], "clear": [0.2, 0.9, 0.5]}
    scores = [score(s, values[s["prompt_id"]][s["sample_index"]]) for s in samples]
    out = pair_rows(samples, scores, PairsSpec())
    assert {r["prompt_id"] for r in out.rows} == {"close", "clear"}
    assert out.notes["ties_or_small_margin"] == 1
    wider = pair_rows(samples, scores, PairsSpec(min_margin=0.1))
    assert {r["prompt_id"] for r in wider.rows} == {"clear"}
    assert wider.notes["ties_or_small_margin"] == 2


def test_over_length_samples_dropped_and_thin_prompts_counted() -> None:
    samples = [
        sample("p1", 0, n_tokens=10, n_prompt=20),
        sample("p1", 1, n_tokens=90, n_prompt=20),  # 110 > 100: dropped, although it scores best
        sample("p1", 2, n_tokens=80, n_prompt=20),  # exactly 100: kept
        sample("p2", 0, n_tokens=200),
        sample("p2", 1, n_tokens=5),
        sample("p3", 0),
    ]
    values = {"p1-s0": 0.2, "p1-s1": 0.9, "p1-s2": 0.7, "p2-s0": 0.8, "p2-s1": 0.1, "p3-s0": 0.5}
    scores = [score(s, values[s["sample_id"]]) for s in samples]
    out = pair_rows(samples, scores, PairsSpec(max_tokens=100))
    assert [(r["prompt_id"], r["chosen_sample_id"], r["rejected_sample_id"]) for r in out.rows] == [
        ("p1", "p1-s2", "p1-s0")
    ]
    assert out.notes["over_length_samples"] == 2
    assert out.notes["too_few_samples"] == 2  # p2 after the length filter, p3 with one sample
    unlimited = pair_rows(samples, scores, PairsSpec())
    assert {r["chosen_sample_id"] for r in unlimited.rows} == {"p1-s1", "p2-s0"}
    assert unlimited.notes["over_length_samples"] == 0


def test_equal_scores_break_ties_by_sample_index_whatever_the_input_order() -> None:
    samples = [sample("p1", i) for i in range(5)]
    values = [0.5, 0.9, 0.9, 0.1, 0.1]
    scores = [score(s, v) for s, v in zip(samples, values, strict=True)]
    results = set()
    rng = random.Random(0)
    for _ in range(10):
        shuffled = scores[:]
        rng.shuffle(shuffled)
        (row,) = pair_rows(list(reversed(samples)), shuffled, PairsSpec()).rows
        results.add((row["chosen_sample_id"], row["rejected_sample_id"]))
    # Highest score with the lowest index wins; lowest score with the highest index loses.
    assert results == {("p1-s1", "p1-s4")}


# ----------------------------------------------------------------------------------- multi-reference voting


def test_each_voting_reference_is_one_more_judgment_per_pair() -> None:
    prompts = [prompt("p1"), prompt("p2")]
    samples = [sample(p, i) for p in ("p1", "p2") for i in range(2)]
    # p2 has only the human reference: it is judged once per pair, and the missing one is counted.
    references = [reference("p1"), reference("p1", "G.", name="gpt4"), reference("p2")]
    spec = JudgmentsSpec(judge="smol", protocol="refeval", reference=["human", "gpt4"])
    calls, notes = judge_calls(prompts, samples, references, spec, PROTOCOLS["refeval"], IDENTITY)
    by_ref = {(c.meta["prompt_id"], c.meta["reference_name"]) for c in calls}
    assert by_ref == {("p1", "human"), ("p1", "gpt4"), ("p2", "human")}
    assert len(calls) == 3 * 2 and notes["prompts_without_reference"] == 1
    assert len({c.key for c in calls}) == len(calls)  # the reference is in the prompt, hence in the key


def test_references_vote_by_mean_soft_score_or_majority_verdict() -> None:
    samples = [sample("p1", i) for i in range(2)]
    s0, s1 = (s["sample_id"] for s in samples)
    votes = [
        judgment(s0, s1, 0.9, "a"),
        judgment(s0, s1, 0.6, "a"),
        judgment(s0, s1, 0.3, "b"),
        judgment(s1, s0, 0.5, "a"),
        judgment(s1, s0, 0.5, "b"),  # a tied vote is no verdict: never guessed
    ]
    soft = {r["sample_id"]: r for r in score_rows(samples, votes, "logprob").rows}
    assert soft[s0]["score"] == pytest.approx(((0.9 + 0.6 + 0.3) / 3 + (1 - 0.5)) / 2)
    assert soft[s0]["n_comparisons"] == 2 and soft[s0]["wins"] == 1 and soft[s1]["wins"] == 0
    hard = {r["sample_id"]: r for r in score_rows(samples, votes, "verdict").rows}
    assert hard[s0]["score"] == 1.0 and hard[s0]["n_comparisons"] == 1  # the tied pair carries nothing
