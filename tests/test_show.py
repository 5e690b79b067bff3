"""`factory show PROMPT_ID`: one prompt's instruction, references, scored samples, every judgment in both
orders and its pair, and with `--messages` every judgment's prompt as sent, on a warehouse built with the
`scripted` backend (milliseconds, no torch)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from factory.build.command import Build
from factory.cli.main import main
from factory.config.loading import load_recipe
from factory.judge.prose import SYSTEM
from factory.warehouse.store import Warehouse

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


# ---------------------------------------------------------------------------------------------- --messages


def message_blocks(output: str) -> list[str]:
    """Each judgment's part of the `--messages` section, header line first."""
    section = output[output.index("judge messages (") :]
    return ["judgment " + b for b in section.split("\njudgment ")[1:]]


def test_messages_show_each_judgments_prompt_as_sent_and_check_its_hash(wh: Path) -> None:
    (pair,) = rows(wh, "SELECT * FROM pairs ORDER BY prompt_id LIMIT 1")
    pid = pair["prompt_id"]
    result = show(pid, "-w", wh, "--messages")
    assert result.exit_code == 0, result.output
    (prompt,) = rows(wh, f"SELECT instruction FROM prompts WHERE prompt_id = '{pid}'")
    (ref,) = rows(wh, f"""SELECT text FROM "references" WHERE prompt_id = '{pid}'""")
    samples = {s["sample_id"]: s for s in rows(wh, f"SELECT * FROM samples WHERE prompt_id = '{pid}'")}
    judged = rows(wh, f"SELECT * FROM judgments WHERE prompt_id = '{pid}'")
    blocks = message_blocks(result.output)
    assert len(blocks) == len(judged) == 6
    hashes = {j["prompt_hash"] for j in judged}
    for block in blocks:
        header = block.splitlines()[1]
        digest = header.split()[2]
        assert header.startswith("prompt hash ") and "matches the stored hash" in header and digest in hashes
        named = re.match(r"judgment \d+ of \d+: \(a\) (#\d+), \(b\) (#\d+)", block)
        assert named is not None, block.splitlines()[0]
        a, b = named.groups()
        text_of = {f"#{s['sample_index']}": s["text"] for s in samples.values()}
        system = block.index("### system\n" + SYSTEM + "\n### user\n")
        order = [block.index(x) for x in (prompt["instruction"], ref["text"], text_of[a], text_of[b])]
        assert system < order[0] and order == sorted(order), "instruction, reference, (a), (b) in this order"
        assert block.rstrip().endswith("### assistant (prefill: the judge's answer continues it)\nOutput (")


def test_messages_print_data_literally(wh: Path) -> None:
    (prompt,) = rows(wh, "SELECT prompt_id FROM prompts WHERE instruction LIKE 'Say %'")
    result = show(prompt["prompt_id"], "-w", wh, "--messages")
    assert result.exit_code == 0, result.output
    assert "# Instruction:\nSay [bold]hi[/bold] \ufffd[31mred\n" in result.output and "\x1b" not in result.output


def test_messages_of_a_custom_template_and_a_template_changed_since(tmp_path: Path) -> None:
    template = tmp_path / "mine.txt"
    template.write_text(
        "<|im_start|>system\nBe fair.\n<|im_end|>\n<|im_start|>user\n"
        "Q: {INSTRUCTION}\nA: {OUTPUT_1}\nB: {OUTPUT_2}\nAnswer Output (a) or Output (b).\n<|im_end|>",
        encoding="utf-8",
    )
    recipe = {**RECIPE, "prompts": {"inline": PROMPTS[1:3]}, "references": []}
    recipe["judgments"] = {"judge": "judge", "protocol": "custom", "template": "mine.txt"}
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    assert Build(load_recipe(path), Warehouse(tmp_path / "wh")).run()["status"] == "ok"
    pid = rows(tmp_path / "wh", "SELECT prompt_id FROM judgments LIMIT 1")[0]["prompt_id"]

    ok = show(pid, "-w", tmp_path / "wh", "--messages")
    assert ok.exit_code == 0 and ok.output.count("matches the stored hash") == 6, ok.output
    assert "### system\nBe fair.\n### user\nQ: Name thing number" in ok.output
    assert f"template {template}" in " ".join(ok.output.split())

    template.write_text(template.read_text(encoding="utf-8").replace("Be fair.", "Be kind."), encoding="utf-8")
    changed = show(pid, "-w", tmp_path / "wh", "--messages")
    assert changed.exit_code == 0 and changed.output.count("prompt hash MISMATCH") == 6
    assert "### system\nBe kind.\n" in changed.output  # what the file says now, flagged as not what was sent

    path.unlink()  # without its recipe a custom protocol cannot be rebuilt; the user is told why and how
    gone = show(pid, "-w", tmp_path / "wh", "--messages")
    assert gone.exit_code == 0 and "not read" in gone.output and "give --recipe-file" in gone.output


def test_recipe_file_and_set_go_with_messages(wh: Path) -> None:
    pid = rows(wh, "SELECT prompt_id FROM prompts LIMIT 1")[0]["prompt_id"]
    result = show(pid, "-w", wh, "--set", "judgments.template=x.txt")
    assert result.exit_code == 2 and "go with --messages" in result.output
