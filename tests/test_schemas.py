"""schemas/ is generated from the code (`python -m factory.warehouse.schemas`); a stale file fails here."""

from __future__ import annotations

import json

from factory.warehouse.schemas import SCHEMAS_DIR, rendered


def test_schema_files_are_up_to_date() -> None:
    expected = rendered()
    assert expected, "factory.warehouse.schemas.rendered() produced no files"
    for name, text in expected.items():
        path = SCHEMAS_DIR / name
        assert path.is_file(), f"schemas/{name} is missing; run `python -m factory.warehouse.schemas`"
        assert path.read_text(encoding="utf-8") == text, (
            f"schemas/{name} is stale; run `python -m factory.warehouse.schemas`"
        )


def test_no_stray_schema_files() -> None:
    on_disk = {p.name for p in SCHEMAS_DIR.iterdir() if p.is_file()}
    assert on_disk == set(rendered()), "schemas/ holds files the generator does not write"


def test_schemas_describe_the_recipe_and_every_table() -> None:
    files = rendered()
    recipe = json.loads(files["recipe.schema.json"])
    assert {"name", "models", "prompts"} <= set(recipe["required"])
    assert {"samples", "judgments", "rewards", "similarity"} <= set(recipe["properties"])
    # Field docstrings become descriptions: the schema documents the recipe.
    assert recipe["$defs"]["JudgmentsSpec"]["properties"]["protocol"]["description"]
    tables = json.loads(files["tables.json"])
    assert {"prompts", "references", "samples", "judgments", "scores", "pairs", "runs"} <= set(tables)
    judgment_columns = {c["name"] for c in tables["judgments"]}
    assert {"sample_a", "sample_b", "verdict", "p_a", "parse_status", "request_key"} <= judgment_columns
