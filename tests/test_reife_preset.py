"""`factory judge-eval --preset reife` (issue 19, item 6): ReIFE's decoding, block swap, verdict rule and
counting in one switch.

ReIFE (yale-nlp/ReIFE) decodes without a prefill, 64 tokens (1024 for its CoT prompt), keeps 4 log-probabilities,
judges the second order with the output blocks swapped under fixed letters, reads the verdict as the first
match of `Output \\((\\S+)\\)` (a CoT answer: of `Output \\((\\S+)\\) is better`) whose marker is exactly `a` or `b`,
and gives an unparsed answer a seeded random winner. A scripted judge on a hand-made LLMBar-format set shows
each setting in the stored rows and the report; the real warehouse, cache and CLI run.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_metaeval import Scripted, data_file, make_rows, shown, write_jsonl  # noqa: F401 (data_file: a fixture)

from factory.config.models import ModelSpec
from factory.core.keys import stable_hash
from factory.inputs.labelled_sets import read_eval_set
from factory.judge_eval.settings import PRESETS, EvalSettings, preset_settings, reife_verdict
from factory.judge_eval.templates import builtin_protocol
from factory.judge_eval.units import Unit, unit_calls, unit_key
from factory.models.registry import model_identity
from factory.models.requests import JudgeOutput, JudgeRequest
from factory.warehouse.store import Warehouse


def asks_reasoning(r: JudgeRequest) -> bool:
    """Whether the prompt is the cot protocol's: it asks to close with "Therefore, Output (x) is better"."""
    return "Therefore, Output (a) is better" in r.messages[-1]["content"]


def reife_style(r: JudgeRequest) -> JudgeOutput:
    """A judge that writes its whole answer (no prefill). Direct protocols: `Output (x)` naming the better
    output, except case 5, which answers `Output (A)`. `cot`: first calls the worse output better in passing,
    then concludes for the better one, so ReIFE's first-statement rule and factory's conclusion rule differ."""
    a_text = shown(r, "a")
    i = int(re.search(r"-(\d+)", a_text).group(1))  # type: ignore[union-attr]
    right = "a" if a_text.startswith("good") else "b"
    wrong = "b" if right == "a" else "a"
    verdict = [(right, math.log(0.9)), (wrong, math.log(0.1))]
    if asks_reasoning(r):
        head = f"Output ({wrong}) is better at length, yet it misses the task. Therefore, Output ("
        tokens = [head, right, ") is better."]
    else:
        tokens = ["Output (", "A" if i == 5 else right, ")"]
    tops = [[(tokens[0], 0.0)], verdict, [(tokens[2], 0.0)]]
    return JudgeOutput("".join(tokens), tokens, tops, tokens_in=60, tokens_out=3)


def test_reife_verdict_rule() -> None:
    # the first `Output (x)` anywhere, its marker exactly a or b
    assert reife_verdict("Output (b)", reasoning=False) == ("b", "ok")
    assert reife_verdict("I pick Output (a), not Output (b).", reasoning=False) == ("a", "ok")
    assert reife_verdict("Output (A)", reasoning=False) == (None, "invalid_marker")
    assert reife_verdict("Output (a))", reasoning=False) == (None, "invalid_marker")
    assert reife_verdict("Neither.", reasoning=False) == (None, "no_match")
    # a reasoning answer: the first "Output (x) is better", wherever it stands, not the conclusion
    cot = "Output (b) is better at length, yet it misses the task. Therefore, Output (a) is better."
    assert reife_verdict(cot, reasoning=True) == ("b", "ok")
    assert reife_verdict("Output (a) was better.", reasoning=True) == (None, "no_match")


def test_preset_settings_and_names_agree_with_the_cli() -> None:
    from factory.cli.judge_eval import JUDGE_PRESET_NAMES, PRESET_OPTIONS

    assert tuple(PRESETS) == JUDGE_PRESET_NAMES
    s = preset_settings("reife", bootstrap=10)
    assert (s.prefill, s.max_tokens, s.cot_max_tokens, s.top_logprobs) == ("none", 64, 1024, 4)
    assert (s.markers, s.swap, s.unparsed, s.verdict_rule, s.preset) == ("exact", "blocks", "random", "reife", "reife")
    assert set(PRESETS["reife"]) - {"verdict_rule"} == set(PRESET_OPTIONS)
    assert builtin_protocol("reffree", s).max_tokens == 64 and builtin_protocol("cot", s).max_tokens == 1024
    # the defaults are what they were: no preset, factory's verdict rule
    assert (EvalSettings().preset, EvalSettings().verdict_rule, EvalSettings().swap) == (None, "factory", "outputs")


def test_default_unit_key_and_run_hash_keep_their_form(data_file: Path) -> None:  # noqa: F811
    """Without the preset a unit's key hashes exactly the fields it hashed before the verdict rule existed."""
    ds = read_eval_set(str(data_file))
    settings = EvalSettings()
    p = builtin_protocol("reffree", settings)
    unit = Unit(ds, "scripted", p, None)
    calls, _ = unit_calls(unit, model_identity(ModelSpec(backend="scripted")), settings)
    before = {
        "stage": "eval_judgments",
        "version": 2,
        "dataset": ds.name,
        "judge": "scripted",
        "protocol": "reffree",
        "reference": None,
        "prefill": p.protocol.prefill,
        "markers": "variants",
        "top_logprobs": 20,
        "swap": "outputs",
        "calls": [(c.key, c.meta) for c in calls],
    }
    assert unit_key(unit, calls, settings) == stable_hash(before)
    assert unit_key(unit, calls, settings.model_copy(update={"verdict_rule": "reife"})) != stable_hash(before)
    assert settings.recorded() == {
        k: v for k, v in settings.model_dump().items() if k not in ("verdict_rule", "preset")
    }


def _judge_eval(tmp_path: Path, data: Path, monkeypatch: Any, *extra: str) -> tuple[Any, Scripted, Path]:
    import factory.judge_eval.command
    from factory.cli.main import main

    backend = Scripted(reife_style)
    monkeypatch.setattr(factory.judge_eval.command, "load_backend", lambda spec: backend)
    out = tmp_path / "report"
    args = ["judge-eval", "--data", f"toy={data}", "--protocol", "reffree", "--protocol", "cot"]
    args += ["-w", str(tmp_path / "wh"), "--out", str(out), "-q", "--bootstrap", "50", *extra]
    return CliRunner().invoke(main, args), backend, out


def test_judge_eval_preset_reife(tmp_path: Path, data_file: Path, monkeypatch: Any) -> None:  # noqa: F811
    result, backend, out = _judge_eval(tmp_path, data_file, monkeypatch, "--preset", "reife")
    assert result.exit_code == 0, result.output
    # decoding: no prefill, 64 tokens (1024 for cot), top-4; the second order swaps the blocks
    budgets = {("cot" if asks_reasoning(r) else "direct", r.max_tokens) for r in backend.requests}
    assert budgets == {("direct", 64), ("cot", 1024)}
    assert {(r.prefill, r.top_logprobs) for r in backend.requests} == {("", 4)}
    rows = Warehouse(tmp_path / "wh").current_rows("eval_judgments")
    assert len(rows) == 2 * 10 * 2
    assert {(r["prefill"], r["markers"], r["top_logprobs"]) for r in rows} == {("", "exact", 4)}
    assert {r["order"] for r in rows} == {"forward", "swapped_blocks"}
    # verdicts read as ReIFE reads them: case 5's `Output (A)` is unparsed; cot's first "is better" statement
    direct = [r for r in rows if r["protocol"] == "reffree"]
    assert {r["parse_status"] for r in direct if r["case_id"] == "c5"} == {"invalid_marker"}
    assert {r["parse_status"] for r in direct if r["case_id"] != "c5"} == {"ok"}
    cot = [r for r in rows if r["protocol"] == "cot"]
    for r in cot:
        first = re.search(r"Output \((\S+)\) is better", r["raw_output"])
        assert first is not None and r["verdict"] == first.group(1) and r["parse_status"] == "ok"
    good = {f"c{i}": (1 if row["label"] == 1 else 2) for i, row in enumerate(make_rows())}
    assert all(r["verdict"] != ("a" if good[r["case_id"]] == 1 else "b") for r in cot)  # always the worse one
    # the report names the preset: the printed Table 1, table1.md and table1.csv
    flat = " ".join(result.output.split())
    assert "preset reife" in flat and "random winner (seed 0)" in flat
    assert "prefill none, top-4, swap blocks" in flat
    assert "Preset: reife." in (out / "table1.md").read_text().splitlines()[0]
    with open(out / "table1.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert {r["protocol"] for r in table} == {"reffree+blocks", "cot+blocks"}
    assert {r["preset"] for r in table} == {"reife"}
    cot_row = next(r for r in table if r["protocol"] == "cot+blocks")
    assert float(cot_row["toy"]) == 0.0  # factory's conclusion rule would have scored this judge 100
    # a rerun with the preset makes no model call
    again, backend2, _ = _judge_eval(tmp_path, data_file, monkeypatch, "--preset", "reife")
    assert again.exit_code == 0 and backend2.calls == 0 and "model calls 0" in again.output


def test_factory_rule_reads_the_same_answers_differently(tmp_path: Path, data_file: Path, monkeypatch: Any) -> None:  # noqa: F811
    """The same decoding given option by option, without the preset: factory's verdict rule, and no preset in
    the report."""
    options = ["--prefill", "none", "--max-tokens", "64", "--cot-max-tokens", "1024", "--top-logprobs", "4"]
    options += ["--markers", "exact", "--swap", "blocks"]
    result, _, out = _judge_eval(tmp_path, data_file, monkeypatch, *options)
    assert result.exit_code == 0, result.output
    rows = Warehouse(tmp_path / "wh").current_rows("eval_judgments")
    assert {r["parse_status"] for r in rows} == {"ok"}  # `Output (A)` read as a; cot read at its conclusion
    assert "preset" not in " ".join(result.output.split())
    assert "Preset" not in (out / "table1.md").read_text()
    with open(out / "table1.csv", encoding="utf-8") as f:
        assert "preset" not in next(csv.reader(f))
    # the same calls: the preset then re-reads them from the cache
    preset, backend2, _ = _judge_eval(tmp_path, data_file, monkeypatch, "--preset", "reife")
    assert preset.exit_code == 0 and backend2.calls == 0


@pytest.mark.parametrize("given", [["--swap", "outputs"], ["--max-tokens", "16"], ["--unparsed", "random"]])
def test_options_the_preset_sets_are_refused_beside_it(
    tmp_path: Path,
    data_file: Path,  # noqa: F811
    monkeypatch: Any,
    given: list[str],
) -> None:
    result, backend, _ = _judge_eval(tmp_path, data_file, monkeypatch, "--preset", "reife", *given)
    assert result.exit_code == 2 and backend.calls == 0
    assert result.output.startswith("error:") and f"--preset reife sets {given[0]}" in result.output


def test_options_the_preset_leaves_open_are_taken(tmp_path: Path, monkeypatch: Any) -> None:
    data = write_jsonl(tmp_path / "toy.jsonl", make_rows())
    result, backend, _ = _judge_eval(tmp_path, data, monkeypatch, "--preset", "reife", "--limit", "3", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert backend.calls == 2 * 3 * 2 and "seed 7" in " ".join(result.output.split())
