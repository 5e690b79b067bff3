"""The paper authors' prompt files as judge templates: read as their code reads them (RLRR's scoring.py and
ReIFE's `prompt_to_chatml` + `format_map`), built through a recipe on the scripted backend, and the exact
messages the judge received checked against golden files; `--set` on `factory build`; the structure-faithful
built-in wording (LLMBar's answer-only lines, CoT on LLMBar's rules).

The fixtures in tests/data/author_prompts/ copy the authors' layouts in the project's own words (its README).
After an intended change, regenerate the goldens with `FACTORY_UPDATE_GOLDEN=1 pytest tests/test_author_prompts.py`
and review the diff.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from factory.cli.main import main
from factory.core.errors import UserInputError
from factory.judge.protocols import PROTOCOLS, custom_protocol, with_template
from factory.warehouse.store import Warehouse

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "data" / "author_prompts"
GOLDEN = Path(__file__).parent / "golden" / "templates"
UPDATE = os.environ.get("FACTORY_UPDATE_GOLDEN") == "1"

INSTRUCTION = "Name the largest planet in the Solar System in one sentence."
REFERENCE = "Jupiter is the largest planet in the Solar System."

# fixture → (the recipe's protocol, whether it shows a reference, the order its user turn shows the inputs in)
CASES: dict[str, tuple[str, bool, list[str]]] = {
    "rlrr_refeval": ("custom", True, ["instruction", "reference", "a", "b"]),
    "rlrr_base": ("custom", False, ["instruction", "a", "b"]),
    "rlrr_refmatch": ("custom", True, ["reference", "instruction", "a", "b"]),
    "reife_vanilla": ("custom", False, ["instruction", "a", "b"]),
    "reife_vanilla_swap": ("custom", False, ["instruction", "b", "a"]),
    "reife_reference": ("custom", True, ["instruction", "a", "b", "reference"]),
    "reife_cot": ("cot", False, ["instruction", "a", "b"]),  # a reasoning file runs as `cot`: no prefill
}


def fixture_text(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text(encoding="utf-8")


def file_system_turn(text: str) -> str:
    """The system turn as the file holds it: after its role line, up to its end marker or the next turn."""
    body = text.split("<|im_start|>system\n", 1)[1]
    return re.split(r"<\|im_end\|>|<\|im_start\|>", body, maxsplit=1)[0].strip()


def recipe_file(tmp_path: Path, **judgments: Any) -> Path:
    data = {
        "name": "authors",
        "models": {
            "pol": {"backend": "scripted", "script": {"seed": 1}},
            "judge": {"backend": "scripted", "script": {"seed": 2}},
        },
        "prompts": {"inline": [{"instruction": INSTRUCTION, "ref": REFERENCE}], "reference_fields": ["ref"]},
        "references": [{"name": "human", "kind": "column"}],
        "samples": {"policy": "pol", "n": 2, "params": {"max_tokens": 12}},
        "judgments": {"judge": "judge", **judgments},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def cli(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env={"COLUMNS": "200", **(env or {})}).invoke(main, [str(a) for a in args])


def first_judgment_block(output: str) -> str:
    """The messages `factory show --messages` printed for its first judgment, after the hash line."""
    start = output.index("judgment 1 of ")
    end = output.find("\njudgment 2 of ", start)
    block = output[start : end if end > 0 else len(output)]
    return block.split(" matches the stored hash", 1)[1].split("\n", 1)[1].rstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------ the reading


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_authors_file_reads_as_their_code_reads_it(name: str) -> None:
    text = fixture_text(name)
    protocol = custom_protocol(text, where=name)
    assert protocol.uses_reference == CASES[name][1]
    # The system turn is the file's own, sent as written (RLRR's refmatch layout closes none: it ends where
    # the user turn starts).
    assert protocol.system == file_system_turn(text)
    assert "<|im_start|>" not in protocol.template and "<|im_end|>" not in protocol.template
    assert not re.search(r"\{[A-Z_0-9]+\}", protocol.template), "an authors' placeholder was left unrenamed"
    messages = protocol.render("INSTR", "OUT-A", "OUT-B", "REF" if protocol.uses_reference else None)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    shown = {"instruction": "INSTR", "reference": "REF", "a": "OUT-A", "b": "OUT-B"}
    positions = [user.index(shown[k]) for k in CASES[name][2]]
    assert positions == sorted(positions), f"{name}: inputs out of the file's order"


def test_the_user_turn_is_filled_like_format_map_and_the_system_turn_is_sent_as_written() -> None:
    text = (
        "<|im_start|>system\nKeep {braces} here.\n<|im_end|>\n<|im_start|>user\n"
        'Reply as JSON {{"pick": "a"}}.\n{INSTRUCTION}\n{OUTPUT_1}\n{OUTPUT_2}\n<|im_end|>'
    )
    protocol = custom_protocol(text, where="t.txt")
    system, user = protocol.render("I {x}", "A {OUTPUT_2}", "B", None)
    assert system["content"] == "Keep {braces} here."  # RLRR fills only the last turn
    # `{{`/`}}` are literal braces; a placeholder-like text inside the data is never filled.
    assert user["content"] == 'Reply as JSON {"pick": "a"}.\nI {x}\nA {OUTPUT_2}\nB'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<|im_start|>user\n{QUESTION} {OUTPUT_1} {OUTPUT_2}<|im_end|>", r"unknown placeholder \{QUESTION\}"),
        ("<|im_start|>user\n{INSTRUCTION!r} {OUTPUT_1} {OUTPUT_2}<|im_end|>", "unknown placeholder"),
        ("<|im_start|>user\n{INSTRUCTION} {OUTPUT_1} {OUTPUT_2} }<|im_end|>", "not a valid format string"),
        ("<|im_start|>user\n{{instruction}} {INSTRUCTION} {OUTPUT_1} {OUTPUT_2}<|im_end|>", "literal text"),
        ("<|im_start|>system\nJudge {INSTRUCTION}<|im_end|>\n<|im_start|>user\n{OUTPUT_1}<|im_end|>", "system turn"),
        ("<|im_start|>user\n{INSTRUCTION} {OUTPUT_1} {OUTPUT_2}<|im_end|>\nstray words", "does not end with"),
        ("<|im_start|>user\n{INSTRUCTION} {OUTPUT_1} {OUTPUT_2}<|im_end|>\n<|im_start|>user\nx<|im_end|>", "two"),
        ("<|im_start|>system\nS<|im_end|>\nlost text\n<|im_start|>user\n{INSTRUCTION}<|im_end|>", "text after"),
        ("<|im_start|>system name=example_user\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>", "'system name"),
        ("<|im_start|>user\n{INSTRUCTION} {OUTPUT_1} {OUTPUT_2}<|im_end|>\n<|im_start|>system\nS<|im_end|>", "last"),
        ("preamble\n<|im_start|>user\n{INSTRUCTION} {OUTPUT_1} {OUTPUT_2}<|im_end|>", "before the first"),
        ("<|im_start|>system\nonly a system turn<|im_end|>", "no 'user' turn"),
        ("<|im_start|>assistant\nOutput (<|im_end|>\n<|im_start|>user\n{INSTRUCTION}<|im_end|>", "'assistant' turn"),
        ("<|im_start|>user\n{INSTRUCTION} {OUTPUT_1}<|im_end|>", "lacks the placeholder"),
    ],
)
def test_a_file_the_authors_code_would_fail_on_or_cut_is_refused(text: str, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        custom_protocol(text, where="t.txt")


def test_a_template_beside_a_built_in_protocol_keeps_that_protocols_facts() -> None:
    cot = with_template(PROTOCOLS["cot"], fixture_text("reife_cot"), "reife_cot.txt")
    assert (cot.name, cot.prefill, cot.last_match, cot.default_max_tokens) == ("cot", "", True, 1024)
    assert cot.system == file_system_turn(fixture_text("reife_cot"))
    refeval = with_template(PROTOCOLS["refeval"], fixture_text("rlrr_refeval"), "refeval.txt")
    assert refeval.prefill == "Output (" and refeval.uses_reference
    with pytest.raises(UserInputError, match=r"'refeval' shows a reference, but the template has no \{reference\}"):
        with_template(PROTOCOLS["refeval"], fixture_text("rlrr_base"), "base.txt")
    with pytest.raises(UserInputError, match=r"'reffree' shows no reference"):
        with_template(PROTOCOLS["reffree"], fixture_text("rlrr_refeval"), "refeval.txt")
    # Factory's own format has one user turn: no system turn is sent, the built-in one included.
    plain = with_template(PROTOCOLS["reffree"], "{instruction} {output_a} {output_b}", "plain.txt")
    assert [m["role"] for m in plain.render("i", "a", "b")] == ["user"]


# ------------------------------------------------------------------------------ built through a recipe


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_authors_file_in_a_recipe_sends_the_golden_messages(tmp_path: Path, name: str) -> None:
    """`protocol: custom` (or the built-in whose reading the file needs) + `template: FILE`, built on the scripted
    backend; `factory show --messages` rebuilds each judgment's messages and checks them against the hash
    stored when they were sent, so the golden holds what the judge received."""
    protocol, uses_reference, _ = CASES[name]
    fields: dict[str, Any] = {"protocol": protocol, "template": str(FIXTURES / f"{name}.txt")}
    if uses_reference:
        fields["reference"] = "human"
    recipe = recipe_file(tmp_path, **fields)
    wh = tmp_path / "wh"
    built = cli("build", recipe, "-w", wh, "-q")
    assert built.exit_code == 0, built.output
    judgments = Warehouse(wh).query("SELECT * FROM judgments").to_pylist()
    assert len(judgments) == 2 and {j["parse_status"] for j in judgments} == {"ok"}
    assert {j["prefill"] for j in judgments} == {"" if protocol == "cot" else "Output ("}

    shown = cli("show", judgments[0]["prompt_id"], "-w", wh, "--messages")
    assert shown.exit_code == 0, shown.output
    assert shown.output.count("matches the stored hash") == 2 and "MISMATCH" not in shown.output
    block = first_judgment_block(shown.output)
    system = file_system_turn(fixture_text(name))
    assert block.startswith(f"### system\n{system}\n### user\n")
    assert INSTRUCTION in block and (REFERENCE in block) == uses_reference

    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(block, encoding="utf-8")
    assert path.is_file(), f"no golden for {name}; run FACTORY_UPDATE_GOLDEN=1 pytest {__file__}"
    assert block == path.read_text(encoding="utf-8"), f"the messages for {name} changed; review, then update"


def test_every_template_golden_belongs_to_a_fixture() -> None:
    assert {p.stem for p in GOLDEN.glob("*.txt")} == set(CASES)


# ---------------------------------------------------------------------------------------------- --set


def test_one_set_points_a_refeval_recipe_at_the_authors_wording(tmp_path: Path) -> None:
    recipe = recipe_file(tmp_path, protocol="refeval", reference="human")
    template = FIXTURES / "rlrr_refeval.txt"
    wh = tmp_path / "wh"
    assert cli("build", recipe, "-w", wh, "-q").exit_code == 0
    built = cli("build", recipe, "-w", wh, "-q", "--set", f"judgments.template={template}")
    assert built.exit_code == 0, built.output
    rows = Warehouse(wh).query("SELECT protocol, prompt_id, prompt_hash FROM judgments").to_pylist()
    assert {r["protocol"] for r in rows} == {"refeval"}  # the protocol's facts stay; only the wording changed
    pid = rows[0]["prompt_id"]

    # The build's --set is not in the recipe file: show names the mismatch until it is given the same --set.
    plain = cli("show", pid, "-w", wh, "--messages")
    assert plain.exit_code == 0 and plain.output.count("MISMATCH") == 2 and "give show the same --set" in plain.output
    same = cli("show", pid, "-w", wh, "--messages", "--set", f"judgments.template={template}")
    assert same.exit_code == 0 and same.output.count("matches the stored hash") == 2
    assert f"### system\n{file_system_turn(template.read_text(encoding='utf-8'))}\n### user\n" in same.output


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("judgments.protocol=nope", "--set judgments.protocol: field 'judgments.protocol': Input should be"),
        ("judgments.template=missing.txt", "--set judgments.template: "),
        ("judgments.template=" + str(FIXTURES / "rlrr_base.txt"), "'refeval' shows a reference, but the template"),
        ("samples.n=1", "--set samples.n: field 'samples.n'"),
        ("judgments.bogus=1", "--set judgments.bogus: field 'judgments.bogus': unknown key"),
        ("references.3.name=x", "'references' is a list"),
        ("samples.n.x=1", "'samples.n' is not a mapping"),
        ("judgments..x=1", "expected a dotted key"),
        ("novalue", "expected KEY=VALUE"),
    ],
)
def test_a_bad_set_is_one_line_naming_the_key(tmp_path: Path, override: str, message: str) -> None:
    recipe = recipe_file(tmp_path, protocol="refeval", reference="human")
    result = cli("validate", recipe, "--set", override)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and result.output.count("\n") == 1
    assert message in result.output, result.output


@pytest.mark.parametrize("name", ["llama3-8b-refeval", "qwen2.5-7b-refeval"])
def test_the_paper_recipes_take_the_authors_prompt_file_with_one_set(name: str) -> None:
    recipe = ROOT / "recipes" / "paper" / f"{name}.yaml"
    env = {"DEEPSEEK_API_KEY": "x"}
    ok = cli("validate", recipe, "--set", f"judgments.template={FIXTURES / 'rlrr_refeval.txt'}", env=env)
    assert ok.exit_code == 0, ok.output
    plan = cli("build", recipe, "--dry-run", "--set", f"judgments.template={FIXTURES / 'rlrr_refeval.txt'}", env=env)
    assert plan.exit_code == 0 and "worded by rlrr_refeval.txt" in " ".join(plan.output.split()).replace("│", "")
    wrong = cli("validate", recipe, "--set", f"judgments.template={FIXTURES / 'rlrr_base.txt'}", env=env)
    assert wrong.exit_code == 2 and "--set judgments.template" in wrong.output and "{reference}" in wrong.output


# ------------------------------------------------------------------------------------- built-in wording


@pytest.mark.parametrize("name", ["llmbar-base", "llmbar-ref"])
def test_llmbar_protocols_ask_for_the_marker_alone_before_the_outputs(name: str) -> None:
    """LLMBar's structure: no explanation, never "both" or "neither", only the marker — said before the
    instruction and outputs, not only in the closing question."""
    user = PROTOCOLS[name].render("I", "A", "B", "R" if PROTOCOLS[name].uses_reference else None)[1]["content"]
    rules = user[: user.index("# Instruction:")]
    assert "no explanation" in rules and "both or neither" in rules and 'only "Output (a)" or "Output (b)"' in rules


def test_cot_uses_llmbars_rules_and_reasons_before_it_chooses() -> None:
    cot, base = (PROTOCOLS[n].render("I", "A", "B")[1]["content"] for n in ("cot", "llmbar-base"))
    rules = base[base.index("Rules:") : base.index("\n\n", base.index("Rules:"))]
    assert rules in cot, "cot should carry LLMBar's rules, as ReIFE's CoT prompt does"
    head = cot[: cot.index("# Instruction:")]
    assert "Reason first" in head and "both or" in head and "Therefore, Output (a) is better." in head
    assert cot.rstrip().endswith("as the last sentence):")
