"""Fidelity to the paper's own protocols (docs/JUDGE_EVAL.md, differences from the paper's code): the
authors' prompt-file format, decoding switches recorded in rows, swappable output blocks, exact markers,
identical samples judged once, and the paper recipes' settings. Fast: the scripted backend, no torch."""

from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import Any

import pytest

from factory.build.command import Build
from factory.config.labeling import JudgmentsSpec, PairsSpec
from factory.config.loading import load_recipe
from factory.judge.protocols import PROTOCOLS, custom_protocol
from factory.judge.verdicts import soft_score
from factory.stages.judgments import judge_calls, judge_protocol
from factory.stages.pairs import pair_rows
from factory.stages.scores import score_rows
from factory.warehouse.store import Warehouse

ROOT = Path(__file__).resolve().parent.parent

# A prompt file in the format of the paper's code and ReIFE (ChatML turns, upper-case placeholders), worded
# here for the test.
RLRR_STYLE = """<|im_start|>system
You compare two answers for a judge study.<|im_end|>
<|im_start|>user
Task: {INSTRUCTION}

Expert answer: {REFERENCE}

Output (a): {OUTPUT_1}

Output (b): {OUTPUT_2}

Reply with "Output (a)" or "Output (b)".<|im_end|>
"""


def test_an_authors_format_prompt_file_renders_as_system_and_user_turns() -> None:
    protocol = custom_protocol(RLRR_STYLE, where="t.txt")
    assert protocol.uses_reference
    turns = protocol.render("Name a color.", "Red.", "Blue is {OUTPUT_2}", "Blue.")
    assert [t["role"] for t in turns] == ["system", "user"]
    assert turns[0]["content"] == "You compare two answers for a judge study."
    user = turns[1]["content"]
    assert "Task: Name a color." in user and "Expert answer: Blue." in user
    assert "Output (b): Blue is {OUTPUT_2}" in user  # text inside an output is never substituted
    assert "<|im_start|>" not in user and "<|im_end|>" not in user


def test_a_recipe_with_an_authors_format_template_builds_end_to_end(tmp_path: Path, kit: Any) -> None:
    (tmp_path / "rlrr_refeval.txt").write_text(RLRR_STYLE, encoding="utf-8")
    path = kit.scripted(tmp_path, **{"judgments.protocol": "custom", "judgments.template": "rlrr_refeval.txt"})
    loaded = load_recipe(path)
    assert judge_protocol(loaded).system == "You compare two answers for a judge study."
    wh = Warehouse(tmp_path / "wh")
    run = Build(loaded, wh).run()
    assert run["status"] == "ok"
    rows = wh.query("SELECT parse_status, protocol FROM judgments").to_pylist()
    assert rows and {r["protocol"] for r in rows} == {"custom"}
    assert wh.query("SELECT count(*) AS n FROM pairs").to_pylist()[0]["n"] > 0


def test_swapped_blocks_keep_each_output_with_its_letter() -> None:
    user = PROTOCOLS["refeval"].render("I", "first", "second", "R", swap_blocks=True)[1]["content"]
    assert user.index("# Output (b):\nsecond") < user.index("# Output (a):\nfirst")


def test_exact_markers_count_only_the_bare_tokens() -> None:
    tops = [("a", -1.0), (" A", -0.1), ("b", -0.5)]
    variants, _ = soft_score(tops)
    exact, seen = soft_score(tops, exact=True)
    assert seen == {"a": ["a"], "b": ["b"]}
    assert exact == pytest.approx(1 / (1 + math.exp(0.5)))
    assert variants > exact  # ` A` adds to (a)'s mass only under the variants rule


def _rows(wh: Warehouse, table: str) -> list[dict[str, Any]]:
    return wh.query(f'SELECT * FROM "{table}"').to_pylist()


def test_decoding_switches_are_recorded_and_markers_rereads_without_calls(tmp_path: Path, kit: Any) -> None:
    wh = Warehouse(tmp_path / "wh")
    first = Build(load_recipe(kit.scripted(tmp_path, **{"judgments.prefill": "none"})), wh).run()
    rows = _rows(wh, "judgments")
    assert {(r["prefill"], r["markers"], r["top_logprobs"]) for r in rows} == {("", "variants", 20)}
    spec = load_recipe(kit.scripted(tmp_path, **{"judgments.prefill": "none"})).recipe.judgments
    assert spec.generation_tokens == 16
    exact = Build(
        load_recipe(kit.scripted(tmp_path, **{"judgments.prefill": "none", "judgments.markers": "exact"})), wh
    )
    again = exact.run()
    assert first["model_calls"] > 0 and again["model_calls"] == 0  # the reading changed, not the question
    assert {r["markers"] for r in _rows(wh, "judgments")} == {"exact"}
    assert all(r["p_a"] == r["p_a_exact"] for r in _rows(wh, "judgments"))


def _sample(prompt: str, index: int, text: str) -> dict[str, Any]:
    return {"sample_id": f"{prompt}-{index}", "prompt_id": prompt, "sample_index": index, "text": text, "error": None}


def test_identical_samples_are_judged_once_scored_alike_and_never_paired() -> None:
    prompts = [{"prompt_id": "p", "instruction": "Say hi.", "messages": "[]"}]
    samples = [_sample("p", 0, "Hi."), _sample("p", 1, "Hello there."), _sample("p", 2, "Hi."), _sample("p", 3, "Hey")]
    for s in samples:
        s.update(n_tokens=3, n_prompt_tokens=5)
    spec = JudgmentsSpec(judge="m", protocol="reffree")
    calls, notes = judge_calls(prompts, samples, [], spec, PROTOCOLS["reffree"], {"model": "x"})
    assert notes["merged_samples"] == 1
    assert len(calls) == 3 * 2  # 3 distinct texts, every ordered pair
    assert all("p-2" not in (c.meta["sample_a"], c.meta["sample_b"]) for c in calls)
    # p-0 wins every comparison: its copy p-2 carries the same score, and only p-0 can be chosen.
    judgments = [
        {**c.meta, "verdict": None, "parse_status": "ok", "p_a": 1.0 if c.meta["sample_a"] == "p-0" else 0.5}
        for c in calls
    ]
    for j in judgments:
        if j["sample_b"] == "p-0":
            j["p_a"] = 0.0
    scores = score_rows(samples, judgments, "logprob").rows
    by_id = {r["sample_id"]: r["score"] for r in scores}
    assert len(scores) == 4 and by_id["p-2"] == by_id["p-0"] == 1.0
    pairs = pair_rows(samples, scores, PairsSpec()).rows
    assert pairs[0]["chosen_sample_id"] == "p-0" and pairs[0]["rejected_sample_id"] != "p-2"


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "recipes" / "paper" / "*-*b-*.yaml"))))
def test_paper_recipes_use_the_papers_settings(path: str) -> None:
    r = load_recipe(path).recipe
    assert r.pairs.max_tokens == 2048
    if r.judgments is not None:
        j = r.judgments
        assert (j.prefill, j.markers, j.top_logprobs, j.generation_tokens) == ("none", "exact", 5, 16)
    assert r.train is not None and r.train.preset == "paper"
    assert r.eval is not None and r.eval.baseline == "output"
