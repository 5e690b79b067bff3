"""Eval-set presets (`--data PRESET`, `--data PRESET=FILE`): each mapping on a small local file in its Hub
layout (tests/data/evalsets/, invented rows), the Hub path with the loader stubbed, and the one error line
when the Hub cannot be reached. Fast: no model, no network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from factory.core.errors import UserInputError
from factory.inputs.labelled_sets import DataSource, data_source, read_eval_set
from factory.inputs.presets import INSTRUSUM_INSTRUCTION, PRESETS

DATA = Path(__file__).resolve().parent / "data" / "evalsets"
FILES = {
    "llmbar-natural": "llmbar_natural.jsonl",
    "llmbar-adversarial": "llmbar_adversarial.jsonl",
    "mtbench": "mt_bench_human_judgments.jsonl",
    "instrusum": "instrusum_human_eval_pairwise.json",
    "href": "href_preference.jsonl",
}


def load(preset: str, **kw: Any) -> Any:
    return read_eval_set(str(DATA / FILES[preset]), preset=preset, **kw)


def test_every_preset_has_a_fixture_and_the_cli_knows_them() -> None:
    from factory.cli.judge_eval import PRESET_NAMES

    assert list(PRESETS) == list(FILES) == list(PRESET_NAMES)
    assert (DATA / "README.md").read_text(encoding="utf-8").count("invented") >= 1


def test_data_values() -> None:
    assert data_source("mtbench") == DataSource("mtbench", None, "mtbench")
    assert data_source("mtbench=some/file.jsonl") == DataSource("mtbench", "some/file.jsonl", "mtbench")
    assert data_source("toy=a.jsonl") == DataSource("toy", "a.jsonl", None)
    assert data_source("a.jsonl") == DataSource(None, "a.jsonl", None)
    assert data_source("owner/name") == DataSource(None, "owner/name", None)  # a Hub name in LLMBar format
    existing = str(DATA / FILES["href"])
    assert data_source(existing) == DataSource(None, existing, None)


def test_llmbar_presets_read_the_format_as_is() -> None:
    natural = load("llmbar-natural")
    assert natural.name == "llmbar-natural" and [c.label for c in natural.cases] == [2, 1, 1]
    assert natural.cases[0].instruction == "Name a primary colour." and natural.notes == []
    adversarial = load("llmbar-adversarial")  # ReIFE's spelling: instruction / winner
    assert [c.label for c in adversarial.cases] == [1, 2, 1] and adversarial.cases[1].output_2 == "Paris"


def test_mtbench_first_turn_majority_ties_dropped() -> None:
    ds = load("mtbench")
    assert [c.case_id for c in ds.cases] == ["901-gpt-4-llama-13b", "902-claude-v1-vicuna-13b-v1.2"]
    first, second = ds.cases
    # 901: gpt-4 wins three votes (one cast with the models the other way round) against one tie
    assert first.label == 1 and first.instruction == "Describe a sunrise in two sentences."
    assert first.output_1.startswith("The sky warms") and first.output_2 == "Sunrise is when the sun rises."
    assert second.label == 2 and second.output_2 == "12 x 11 = 132."
    (note,) = ds.notes
    assert "first turn only (1 later-turn" in note and "2 pair(s) tied or without a majority dropped" in note


def test_instrusum_article_and_requirement_make_the_instruction() -> None:
    ds = load("instrusum")
    assert [c.label for c in ds.cases] == [1, 2, 1]
    assert ds.cases[0].case_id == "0-gpt-4-0314-text-davinci-002"
    assert ds.cases[0].instruction == INSTRUSUM_INSTRUCTION.format(
        article="The town council met on Monday. It approved a new cycle lane on Mill Road and delayed a vote on "
        "parking fees until May.",
        requirement="Summarize the decisions about transport.",
    )
    assert ds.cases[0].instruction.startswith("Here is an article:\n")


def test_href_majority_of_annotations_and_the_human_reference() -> None:
    ds = load("href")
    assert [(c.case_id, c.label) for c in ds.cases] == [("0", 1), ("1", 2), ("4", 2)]
    assert ds.reference_names == ["reference"]
    assert ds.cases[2].references["reference"] == "A spider has eight legs."
    assert ds.cases[1].output_1 == "Because it reflects the sea."  # output_a is output_1
    (note,) = ds.notes
    assert "2 of 5 pair(s)" in note


def test_a_file_in_another_layout_is_one_error_line(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"not in the mtbench layout: no column 'question_id'") as info:
        read_eval_set(str(DATA / FILES["llmbar-natural"]), preset="mtbench")
    assert "\n" not in str(info.value)
    with pytest.raises(UserInputError, match="unknown data set preset"):
        read_eval_set(None, preset="nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "x", "output_a": "a", "output_b": "b", "annotations": [3], "reference": "r"}\n',
        encoding="utf-8",
    )
    with pytest.raises(UserInputError, match="votes 0, 1 or 2"):
        read_eval_set(str(bad), preset="href")
    tied = tmp_path / "tied.jsonl"
    tied.write_text(
        '{"instruction": "x", "output_a": "a", "output_b": "b", "annotations": [1, 2], "reference": "r"}\n',
        encoding="utf-8",
    )
    with pytest.raises(UserInputError, match="no case left"):
        read_eval_set(str(tied), preset="href")


def test_hub_load_reads_every_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import factory.inputs.presets

    asked: list[tuple[str, str | None, str | None]] = []

    def fake(where: str, *, folder: Any, split: str | None, config: str | None) -> list[dict[str, Any]]:
        asked.append((where, config, split))
        return [{"input": f"{split} task {i}", "output_1": "x", "output_2": "y", "label": 1 + i % 2} for i in range(2)]

    monkeypatch.setattr(factory.inputs.presets, "read_dataset", fake)
    ds = read_eval_set(None, preset="llmbar-adversarial", limit=5)
    assert [a[2] for a in asked] == list(PRESETS["llmbar-adversarial"].splits)
    assert {a[:2] for a in asked} == {("princeton-nlp/LLMBar", "LLMBar")}
    assert [c.case_id for c in ds.cases] == [
        "Adversarial_Neighbor-0",
        "Adversarial_Neighbor-1",
        "Adversarial_GPTInst-0",
        "Adversarial_GPTInst-1",
        "Adversarial_GPTOut-0",
    ]
    assert ds.name == "llmbar-adversarial" and ds.source == "princeton-nlp/LLMBar (llmbar-adversarial)"

    def down(where: str, **_: Any) -> list[dict[str, Any]]:
        raise UserInputError(f"{where}: could not load the dataset: Couldn't reach '{where}' on the Hub (Offline)")

    monkeypatch.setattr(factory.inputs.presets, "read_dataset", down)
    with pytest.raises(UserInputError) as info:
        read_eval_set(None, preset="mtbench")
    message = str(info.value)
    assert message.startswith("--data mtbench: could not load lmsys/mt_bench_human_judgments (split human)")
    assert "Hugging Face Hub" in message and "mtbench=FILE" in message and "\n" not in message


def test_cli_judges_a_preset_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--data href=FILE` through judge-eval with a scripted judge that follows the human reference."""
    import factory.judge_eval.command
    from factory.cli.main import main
    from factory.models.requests import JudgeOutput, JudgeRequest

    def follow_reference(r: JudgeRequest) -> JudgeOutput:
        text = r.messages[-1]["content"]
        import re

        ref = re.search(r"# A human-written answer:\n(.*?)\n\n# Output \(a\):", text, re.S).group(1)  # type: ignore[union-attr]
        a = re.search(r"# Output \(a\):\n(.*?)\n\n# Output \(b\):", text, re.S).group(1)  # type: ignore[union-attr]
        letter = "a" if set(a.lower().split()) & set(ref.lower().split()) - {"a", "the", "is"} else "b"
        return JudgeOutput(f"{letter})", [letter, ")"], [[(letter, -0.1)], [(")", 0.0)]], 40, 2)

    class Backend:
        def judge(self, requests: list[JudgeRequest]) -> list[JudgeOutput]:
            return [follow_reference(r) for r in requests]

        def close(self) -> None:
            pass

    monkeypatch.setattr(factory.judge_eval.command, "load_backend", lambda spec: Backend())
    args = ["judge-eval", "--data", f"href={DATA / FILES['href']}", "--protocol", "href-ref", "--bootstrap", "20"]
    result = CliRunner().invoke(main, [*args, "-w", str(tmp_path / "wh"), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "2 of 5 pair(s)" in " ".join(result.output.split())
    assert "| href-ref | " in (tmp_path / "out" / "table1.md").read_text()


def test_unreachable_hub_is_one_error_line(tmp_path: Path) -> None:
    """The real loader, offline: exit 2 and one line naming the set and the way round."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "from factory.cli.main import main; main()"
    args = [sys.executable, "-c", code, "judge-eval", "--data", "mtbench", "-w", str(tmp_path / "wh"), "-q"]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [x for x in (result.stdout + result.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --data mtbench: could not load"), lines
    assert "Hugging Face Hub" in lines[0] and "mtbench=FILE" in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "wh").exists()
