"""`factory show PROMPT_ID`: one prompt's instruction, references, scored samples, every judgment in both
orders and its pair, on a warehouse built with the `scripted` backend (milliseconds, no torch)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from factory.build import Build
from factory.cli import main
from factory.recipe import load_recipe
from factory.warehouse import Warehouse

# Rich markup and a terminal escape in the data: both must be shown as text, never obeyed.
ODD = "Say [bold]hi[/bold] \x1b[31mred"
# Seventeen prompts: by the pigeonhole principle two ids share their first hex digit (an ambiguous prefix).
PROMPTS = [{"instruction": ODD, "ref": "Hi."}] + [
    {"instruction": f"Name thing number {i}.", "ref": f"Thing {i}."} for i in range(16)
]
RECIPE: dict[str, Any] = {
    "name": "audit",
    "models": {
        "pol": {"backend": "scripted", "script": {"seed": 1}},
        "judge": {"backend": "scripted", "script": {"seed": 2, "position_bias": 0.8, "garble_rate": 0.2}},
    },
    "prompts": {"inline": PROMPTS, "reference_fields": ["ref"]},
    "references": [{"name": "human", "kind": "column"}],
    "samples": {"policy": "pol", "n": 3, "params": {"max_tokens": 12}},
    "judgments": {"judge": "judge", "reference": "human"},
}


@pytest.fixture(scope="module")
def wh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("show")
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(RECIPE, sort_keys=False), encoding="utf-8")
    run = Build(load_recipe(path), Warehouse(root / "wh")).run()
    assert run["status"] == "ok"
    return root / "wh"


def rows(wh: Path, sql: str) -> list[dict[str, Any]]:
    return Warehouse(wh).query(sql).to_pylist()


def show(*args: str | Path) -> Result:
    # A wide terminal, so each judgment is one line the test can read back cell by cell.
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, ["show", *(str(a) for a in args)])


def judgment_lines(output: str) -> set[tuple[str, ...]]:
    """(order, a, b, reference, verdict, winner, p(a), parse) of every judgment row printed."""
    out = set()
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] in ("forward", "swapped"):
            out.add(tuple(cells[:8]))
    return out


def test_show_prints_the_whole_decision(wh: Path) -> None:
    (pair,) = rows(wh, "SELECT * FROM pairs ORDER BY prompt_id LIMIT 1")
    pid = pair["prompt_id"]
    result = show(pid[:8], "-w", wh)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    (prompt,) = rows(wh, f"SELECT instruction FROM prompts WHERE prompt_id = '{pid}'")
    samples = {s["sample_id"]: s for s in rows(wh, f"SELECT * FROM samples WHERE prompt_id = '{pid}'")}
    assert " ".join(prompt["instruction"].split()) in flat
    assert " ".join(samples[pair["chosen_sample_id"]]["text"].split()) in flat
    chosen, rejected = (f"#{samples[pair[k]]['sample_index']}" for k in ("chosen_sample_id", "rejected_sample_id"))
    assert f"chosen {chosen} (score {pair['chosen_score']:.3f}) rejected {rejected}" in flat
    assert f"margin {pair['margin']:.3f}" in flat

    judged = rows(wh, f"SELECT * FROM judgments WHERE prompt_id = '{pid}'")
    expected = set()
    for j in judged:
        a, b = (f"#{samples[j[k]]['sample_index']}" for k in ("sample_a", "sample_b"))
        verdict = j["verdict"] if j["parse_status"] == "ok" else "—"
        winner = {"a": a, "b": b}.get(verdict, "—")
        expected.add((j["order"], a, b, j["reference_name"], verdict, winner, f"{j['p_a']:.3f}", j["parse_status"]))
    assert len(judged) == 6 and judgment_lines(result.output) == expected
    # Both orders of every pair of samples are there.
    assert {(o, *sorted((a, b))) for o, a, b, *_ in expected} == {
        (o, *p) for o in ("forward", "swapped") for p in (("#0", "#1"), ("#0", "#2"), ("#1", "#2"))
    }


def test_data_is_shown_as_text_never_as_markup_or_escapes(wh: Path) -> None:
    (prompt,) = rows(wh, "SELECT prompt_id FROM prompts WHERE instruction LIKE 'Say %'")
    result = show(prompt["prompt_id"], "-w", wh, "--recipe", "audit")
    assert result.exit_code == 0, result.output
    assert "Say [bold]hi[/bold] \ufffd[31mred" in result.output and "\x1b" not in result.output


def test_unparsed_judgments_are_listed_with_their_status(wh: Path) -> None:
    garbled = rows(wh, "SELECT prompt_id FROM judgments WHERE parse_status <> 'ok' ORDER BY prompt_id LIMIT 1")
    assert garbled, "the scripted judge garbled nothing: raise garble_rate"
    result = show(garbled[0]["prompt_id"], "-w", wh)
    assert result.exit_code == 0 and "no_match" in result.output


def test_unknown_ambiguous_and_bad_arguments_are_one_error_line(wh: Path, tmp_path: Path) -> None:
    ids = sorted(r["prompt_id"] for r in rows(wh, "SELECT prompt_id FROM prompts"))
    shared = next(a[0] for a, b in itertools.pairwise(ids) if a[0] == b[0])
    matching = [i for i in ids if i.startswith(shared)]

    ambiguous = show(shared, "-w", wh)
    assert ambiguous.exit_code == 2 and ambiguous.output.startswith("error:") and ambiguous.output.count("\n") == 1
    assert f"{len(matching)} prompts match" in ambiguous.output
    assert all(i in ambiguous.output for i in matching[:5])

    unknown = show("zzzz", "-w", wh)
    assert unknown.exit_code == 2 and unknown.output.count("\n") == 1
    assert "no prompt id starts with 'zzzz'" in unknown.output

    quoted = show("x' OR '1'='1", "-w", wh)  # the id reaches SQL as a quoted literal, not as SQL
    assert quoted.exit_code == 2 and "no prompt id starts with" in quoted.output

    recipe = show(ids[0], "-w", wh, "--recipe", "nope")
    assert recipe.exit_code == 2 and "no recipe 'nope'" in recipe.output and "['audit']" in recipe.output

    nowhere = show(ids[0], "-w", tmp_path / "nothing")
    assert nowhere.exit_code == 2 and "no warehouse here" in nowhere.output
