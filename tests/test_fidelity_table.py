"""docs/FIDELITY.md's table is machine-readable: every row names its source, and every row with a check holds for
every paper recipe it applies to (recipes/paper/), so the table and the recipes cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from factory.config.loading import load_recipe
from factory.config.recipe import LoadedRecipe
from factory.judge_eval.settings import PRESETS as JUDGE_EVAL_PRESETS
from factory.train.settings import resolved, settings_from

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "FIDELITY.md"
PAPER_RECIPES = sorted((ROOT / "recipes" / "paper").glob("*.yaml"))
COLUMNS = ["area", "setting", "authors' value", "source", "factory default", "paper recipes", "switch", "check"]
CHECK = re.compile(r"(?P<kind>recipe|train-dpo|train-sft|reife):(?P<path>[\w.]+)=(?P<value>.+)")


def table_rows() -> list[dict[str, str]]:
    """The rows of the table under "## The table", as dicts keyed by COLUMNS."""
    section = DOC.read_text(encoding="utf-8").split("## The table", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    assert header == COLUMNS, header
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        assert len(cells) == len(COLUMNS), line
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


def expected(text: str) -> Any:
    """A check's value as YAML, with `5e-7` read as a number (YAML 1.1 wants `5.0e-7`)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def value_at(obj: Any, path: str) -> Any:
    """A dotted path into a pydantic model (attributes, properties included) or a dict."""
    for part in path.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def resolved_value(kind: str, path: str, loaded: LoadedRecipe) -> Any:
    """What the check's kind resolves `path` to for one paper recipe; `pytest.skip`-free: None means n/a."""
    r = loaded.recipe
    if kind == "recipe":
        section = path.split(".", 1)[0]
        return value_at(r, path) if getattr(r, section, None) is not None else None
    if kind == "train-dpo":
        if r.train is None or r.samples is None:
            return None
        layers = [("train", r.train.model_dump(exclude_unset=True))]
        return resolved(settings_from(layers), "dpo").get(path)
    if kind == "train-sft":
        if r.export.sft_reference is None:
            return None  # the SFT step is trained on this recipe's export with the paper preset
        return resolved(settings_from([("preset", {"preset": "paper"})]), "sft").get(path)
    return JUDGE_EVAL_PRESETS["reife"].get(path)


def test_the_table_has_a_source_and_a_switch_or_a_reason_in_every_row() -> None:
    rows = table_rows()
    assert len(rows) >= 40
    for row in rows:
        assert row["source"] and row["source"] != "-", row
        assert row["switch"], row
        assert row["check"] == "-" or CHECK.fullmatch(row["check"]), row["check"]


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=lambda p: p.stem)
def test_every_paper_recipe_resolves_to_the_tables_paper_column(path: Path) -> None:
    loaded = load_recipe(path)
    checked = 0
    for row in table_rows():
        match = CHECK.fullmatch(row["check"])
        if match is None:
            continue
        got = resolved_value(match["kind"], match["path"], loaded)
        if got is None and match["kind"] != "reife":
            continue  # the row's stage is not part of this recipe (an SFT recipe samples nothing)
        want = expected(match["value"])
        assert got == want, f"{path.name}: {row['setting']} ({match['path']}) is {got!r}, the table says {want!r}"
        checked += 1
    assert checked >= 8
