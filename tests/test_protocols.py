"""Judge protocols: golden prompts, their structure (docs/DESIGN.md §4), and the verdict / soft-score rules.

The golden files in tests/golden/ hold each protocol's rendered prompt for fixed inputs. After an intended
wording change, regenerate them with `FACTORY_UPDATE_GOLDEN=1 pytest tests/test_protocols.py` and review
the diff.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from factory.core.errors import UserInputError
from factory.judge.protocols import PROTOCOLS, custom_protocol, get_protocol
from factory.judge.verdicts import VERDICT_RE, marker_of, parse_verdict, soft_score

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("FACTORY_UPDATE_GOLDEN") == "1"

INSTRUCTION = "Name the largest planet in the Solar System in one sentence."
REFERENCE = "Jupiter is the largest planet in the Solar System."
OUTPUT_A = "The largest planet is Saturn."
OUTPUT_B = "Jupiter is the largest planet, more than twice as massive as all the others combined."


def messages(name: str, **overrides: str) -> list[dict[str, str]]:
    """A protocol's whole message list for the fixed inputs (reference only where used)."""
    protocol = PROTOCOLS[name]
    values = {"instruction": INSTRUCTION, "output_a": OUTPUT_A, "output_b": OUTPUT_B}
    values["reference"] = REFERENCE if protocol.uses_reference else None
    values.update(overrides)
    return protocol.render(values["instruction"], values["output_a"], values["output_b"], values["reference"])


def render(name: str, **overrides: str) -> str:
    """The user message of a protocol's prompt for the fixed inputs (it follows the system turn)."""
    turns = messages(name, **overrides)
    assert [m["role"] for m in turns] == ["system", "user"]
    return turns[1]["content"]


# ------------------------------------------------------------------------------------------------ goldens


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_rendered_prompt_matches_golden(name: str) -> None:
    """The golden file shows every turn the judge receives, each under a `### role` line."""
    path = GOLDEN / f"{name}.txt"
    text = "".join(f"### {m['role']}\n{m['content']}\n" for m in messages(name))
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"no golden for protocol {name}; run FACTORY_UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(encoding="utf-8"), (
        f"the {name} prompt changed; if intended, run FACTORY_UPDATE_GOLDEN=1 pytest tests/test_protocols.py"
    )


def test_every_golden_belongs_to_a_protocol() -> None:
    assert {p.stem for p in GOLDEN.glob("*.txt")} == set(PROTOCOLS)


# ----------------------------------------------------------------------------------------------- structure


def positions(text: str, *needles: str) -> list[int]:
    """Index of each needle in `text`, failing clearly when one is missing or appears twice."""
    found = []
    for needle in needles:
        assert text.count(needle) == 1, f"{needle!r} appears {text.count(needle)} times in:\n{text}"
        found.append(text.index(needle))
    return found


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_every_protocol_shows_both_outputs_in_order_and_asks_for_the_markers(name: str) -> None:
    text = render(name)
    pos = positions(text, INSTRUCTION, "# Output (a):", OUTPUT_A, "# Output (b):", OUTPUT_B)
    assert pos[1] < pos[2] < pos[3] < pos[4]
    ask = text[pos[4] + len(OUTPUT_B) :]
    assert "Output (a)" in ask and "Output (b)" in ask
    assert not text.endswith((" ", "\n")), "the prompt ends with stray whitespace"
    # The answer the judge is asked for is what the verdict regex reads.
    assert [m.group(1) for m in VERDICT_RE.finditer('"Output (a)" or "Output (b)"')] == ["a", "b"]


def test_refeval_puts_the_reference_between_instruction_and_outputs() -> None:
    text = render("refeval")
    instruction, header, reference, out_a = positions(
        text, INSTRUCTION, "# Reference Output:", REFERENCE, "# Output (a):"
    )
    assert instruction < header < reference < out_a
    lowered = text.lower()
    assert "reference" in lowered[: text.index("# Instruction:")], "the rules should say how to use the reference"


def test_refmatch_puts_the_reference_first() -> None:
    text = render("refmatch")
    header, reference, instruction, out_a = positions(
        text, "# Ground-truth Reference Output:", REFERENCE, INSTRUCTION, "# Output (a):"
    )
    assert header < reference < instruction < out_a
    assert "more similar to the reference" in text


def test_llmbar_ref_appends_the_reference_after_both_outputs() -> None:
    text = render("llmbar-ref")
    out_b, header, reference = positions(
        text, OUTPUT_B, "An answer a strong AI assistant wrote for reference", REFERENCE
    )
    assert out_b < header < reference
    # Same rules as llmbar-base: only the reference block is added.
    base = render("llmbar-base")
    assert text.startswith(base[: base.index("# Which output")])


@pytest.mark.parametrize("name", ["reffree", "llmbar-base", "cot"])
def test_reference_free_protocols_show_no_reference(name: str) -> None:
    assert not PROTOCOLS[name].uses_reference
    text = render(name, reference=REFERENCE)  # even when one is passed, it is not shown
    assert REFERENCE not in text
    assert "Reference Output" not in text and "reference output" not in text


@pytest.mark.parametrize("name", ["refeval", "refmatch", "llmbar-ref"])
def test_reference_protocols_refuse_to_render_without_a_reference(name: str) -> None:
    assert PROTOCOLS[name].uses_reference
    with pytest.raises(ValueError, match="needs a reference"):
        PROTOCOLS[name].render(INSTRUCTION, OUTPUT_A, OUTPUT_B, None)


def test_cot_reasons_first_and_reads_its_conclusion() -> None:
    cot = PROTOCOLS["cot"]
    assert cot.prefill == "" and cot.last_match
    assert "Therefore, Output (a) is better." in render("cot")
    # Every logprob protocol prefills the answer so the next token is the marker.
    assert {p.prefill for n, p in PROTOCOLS.items() if n != "cot"} == {"Output ("}


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_placeholder_like_text_in_inputs_is_not_substituted(name: str) -> None:
    output_a = "Use {reference} and {instruction} here."
    output_b = "Literal {output_a} then {output_b}."
    reference = "See {output_b}." if PROTOCOLS[name].uses_reference else None
    text = render(name, instruction="Echo {output_a}", output_a=output_a, output_b=output_b, reference=reference)
    assert "Echo {output_a}" in text
    assert output_a in text and output_b in text
    if reference is not None:
        assert reference in text
    # Each real placeholder was filled exactly once: the outputs appear once each.
    assert text.count(output_a) == 1 and text.count(output_b) == 1


def test_get_protocol_and_custom_templates() -> None:
    assert get_protocol("refeval") is PROTOCOLS["refeval"]
    with pytest.raises(UserInputError, match="unknown judge protocol 'nope'"):
        get_protocol("nope")
    with pytest.raises(UserInputError, match="output_b"):
        custom_protocol("{instruction} {output_a}")
    custom = custom_protocol("Q: {instruction}\nR: {reference}\nA: {output_a}\nB: {output_b}")
    assert custom.uses_reference
    assert custom.render("q", "x", "y", "r")[0]["content"] == "Q: q\nR: r\nA: x\nB: y"
    assert not custom_protocol("{instruction} {output_a} {output_b}").uses_reference


# ------------------------------------------------------------------------------------------ soft scores


def lp(p: float) -> float:
    return math.log(p)


def test_soft_score_normalises_the_two_markers() -> None:
    p_a, seen = soft_score([("a", -0.5), ("b", -1.5), ("The", -0.1)])
    assert p_a == pytest.approx(math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1.5)))
    assert seen == {"a": ["a"], "b": ["b"]}


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ([("a", lp(0.01)), ("x", lp(0.9))], 1.0),  # only a in the top-k
        ([("b", lp(0.01)), ("x", lp(0.9))], 0.0),  # only b
        ([("x", lp(0.9)), ("y", lp(0.05))], 0.5),  # neither
        ([], 0.5),
    ],
)
def test_soft_score_with_one_or_no_marker(top: list[tuple[str, float]], expected: float) -> None:
    assert soft_score(top)[0] == expected


def test_soft_score_sums_the_variants_of_one_marker() -> None:
    p_a, seen = soft_score([("a", lp(0.3)), (" A", lp(0.2)), ("(a", lp(0.1)), (" b", lp(0.2)), ("B", lp(0.2))])
    assert p_a == pytest.approx(0.6 / 1.0)
    assert seen == {"a": ["a", " A", "(a"], "b": [" b", "B"]}


@pytest.mark.parametrize(
    ("token", "marker"),
    [
        ("a", "a"),
        ("A", "a"),
        (" a", "a"),
        ("(a", "a"),
        ("a)", "a"),
        ("(A)", "a"),
        ("b", "b"),
        (" B", "b"),
        ("b)", "b"),
        ("c", None),
        ("ab", None),
        ("", None),
        (" ", None),
        ("()", None),
        ("Output", None),
    ],
)
def test_marker_variants(token: str, marker: str | None) -> None:
    assert marker_of(token) == marker


# ------------------------------------------------------------------------------------------ parse_verdict


def test_parse_reads_the_verdict_token() -> None:
    v = parse_verdict("Output (", "a)", ["a", ")"], [[("a", lp(0.7)), ("b", lp(0.3))], [(")", 0.0)]])
    assert (v.verdict, v.parse_status, v.p_source) == ("a", "ok", "verdict_token")
    assert v.p_a == pytest.approx(0.7)
    assert json.loads(v.marker_tokens) == {"a": ["a"], "b": ["b"]}


def test_parse_without_regex_match_uses_the_first_token() -> None:
    tops = [[("I", lp(0.5)), (" b", lp(0.3)), ("a", lp(0.1))], [(" think", 0.0)]]
    v = parse_verdict("Output (", "I think", ["I", " think"], tops)
    assert v.verdict is None
    assert v.parse_status == "no_match"
    assert v.p_source == "first_token"
    assert v.p_a == pytest.approx(0.1 / 0.4)
    assert json.loads(v.marker_tokens) == {"a": ["a"], "b": [" b"]}


def test_parse_a_spaced_marker_records_the_variants() -> None:
    # " A)" after the prefill does not match the regex (no space allowed): the first token is read.
    tops = [[(" A", lp(0.5)), ("B", lp(0.3)), ("(a", lp(0.1)), ("a)", lp(0.05))], [(")", 0.0)]]
    v = parse_verdict("Output (", " A)", [" A", ")"], tops)
    assert v.parse_status == "no_match" and v.verdict is None
    assert v.p_a == pytest.approx(0.65 / 0.95)
    assert json.loads(v.marker_tokens) == {"a": [" A", "(a", "a)"], "b": ["B"]}


def test_parse_an_uppercase_marker_is_a_verdict() -> None:
    v = parse_verdict("Output (", "B)", ["B", ")"], [[("B", lp(0.6)), (" a", lp(0.2))], [(")", 0.0)]])
    assert (v.verdict, v.parse_status, v.p_source) == ("b", "ok", "verdict_token")
    assert v.p_a == pytest.approx(0.25)
    assert json.loads(v.marker_tokens) == {"a": [" a"], "b": ["B"]}


def test_parse_an_unknown_marker_is_invalid() -> None:
    tops = [[("c", lp(0.6)), ("a", lp(0.1)), ("b", lp(0.3))], [(")", 0.0)]]
    v = parse_verdict("Output (", "c)", ["c", ")"], tops)
    assert v.verdict is None
    assert v.parse_status == "invalid_marker"
    assert v.p_a == pytest.approx(0.25)


def test_parse_finds_the_marker_token_when_tokens_do_not_line_up_with_text() -> None:
    # A decode quirk: an empty-looking token before the marker shifts character offsets.
    tops = [[("▁", 0.0)], [("b", lp(0.9)), ("a", lp(0.1))], [(")", 0.0)]]
    v = parse_verdict("Output (", "b)", ["▁", "b", ")"], tops)
    assert (v.verdict, v.parse_status, v.p_source) == ("b", "ok", "verdict_token")
    assert v.p_a == pytest.approx(0.1)


def test_parse_without_logprobs_gives_no_soft_score() -> None:
    v = parse_verdict("Output (", "a)", ["a", ")"], [])
    assert v.verdict == "a" and v.parse_status == "ok"
    assert v.p_a is None and v.p_source == "none"


COT_TOKENS = [
    "Output",
    " (",
    "a",
    ")",
    " looks fine but is wrong.",
    " Therefore,",
    " Output",
    " (",
    "b",
    ")",
    " is better.",
]


def cot_tops() -> list[list[tuple[str, float]]]:
    tops: list[list[tuple[str, float]]] = [[(t, 0.0)] for t in COT_TOKENS]
    tops[2] = [("a", lp(0.9)), ("b", lp(0.1))]
    tops[8] = [("b", lp(0.8)), ("a", lp(0.2))]
    return tops


def test_cot_reads_the_conclusion_not_the_first_mention() -> None:
    text = "".join(COT_TOKENS)
    v = parse_verdict("", text, COT_TOKENS, cot_tops(), last_match=True)
    assert (v.verdict, v.parse_status, v.p_source) == ("b", "ok", "verdict_token")
    assert v.p_a == pytest.approx(0.2)
    first = parse_verdict("", text, COT_TOKENS, cot_tops(), last_match=False)
    assert first.verdict == "a" and first.p_a == pytest.approx(0.9)


def test_reasoning_answer_without_a_verdict_has_no_soft_score() -> None:
    # Without a prefill the first token starts an explanation, not a choice: it is not read as a verdict.
    tokens = ["The", " first"]
    tops = [[("The", -0.1), ("a", -3.0), ("b", -4.0)], [(" first", -0.2)]]
    v = parse_verdict("", "The first output", tokens, tops, last_match=True)
    assert (v.verdict, v.p_a, v.parse_status, v.p_source) == (None, None, "no_match", "none")


# How reasoning answers are read: the conclusion, not the last (or first) mention of an output. None means no
# verdict: the answer was cut off or never chose, and nothing is guessed.
COT_ANSWERS = [
    ("Output (a) is concise and correct. Therefore, Output (a) is better than Output (b).", "a"),
    ("Output (a) is better at format, but Output (b) is better at facts. Therefore, Output (b) is better.", "b"),
    ("Output (b) is wrong about the date.\nTherefore Output (a) is better.", "a"),
    ("Both are fine, but Output (b) is clearly better.", "b"),
    ("Output (a) was the better of the two.", "a"),
    ("therefore, output (b) is the better one", "b"),
    ("Comparing Output (a) and Output (b): the second is right.\nOutput (b)", "b"),
    ("Output (a) is longer. Output (b) is", None),  # cut off before a conclusion
    ("Comparing Output (a) and Output (b), the second", None),
    ("Output (a) and Output (b) are equally good.", None),
    ("", None),
]


@pytest.mark.parametrize(("answer", "expected"), COT_ANSWERS)
def test_cot_answers_are_read_from_their_conclusion(answer: str, expected: str | None) -> None:
    tokens = [answer] if answer else []
    v = PROTOCOLS["cot"].parse(answer, tokens, [[("x", 0.0)]] * len(tokens))
    assert v.verdict == expected
    assert v.parse_status == ("ok" if expected else "no_match")
    if expected is None:
        assert v.p_a is None  # no soft score is read off an answer that never chose


def test_cot_soft_score_is_read_at_the_concluding_marker() -> None:
    tokens = ["Output (", "b", ") looks long, but ", "Therefore, Output (", "a", ") is better than Output (b)."]
    tops = [[("x", 0.0)], [("b", -0.1), ("a", -3.0)], [("x", 0.0)], [("x", 0.0)], [("a", -0.2), ("b", -2.0)]]
    tops.append([("x", 0.0)])
    v = PROTOCOLS["cot"].parse("".join(tokens), tokens, tops)
    assert v.verdict == "a" and v.p_source == "verdict_token" and v.p_a > 0.5
