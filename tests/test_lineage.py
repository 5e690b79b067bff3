"""One recipe's data followed through the tables: the export's rows, its publication and a training on it join
on the recipe hash (each command's runs row carries it) and on the rows' content hash (`export_hash` =
`dataset_hash`), whatever computes the recipe hash: the test reads it from the export's rows, never recomputes it.

A scripted build (no model), `factory publish --dry-run`, and for the training one real DPO step of the embedded
model (marked `model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from factory.cli.main import main
from factory.config.loading import load_recipe
from factory.core.owned import LEFTOVER
from factory.warehouse.store import Warehouse

REPO = "factory-tests/lineage"


def ok(*args: str | Path) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def export_recipe_hash(export: Path) -> str:
    """The one recipe hash the export's rows carry."""
    import datasets

    hashes = {h for ds in datasets.load_from_disk(str(export)).values() for h in ds["recipe_hash"]}
    assert len(hashes) == 1, hashes
    return hashes.pop()


def built_and_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kit: Any) -> tuple[Path, Path]:
    """A scripted build and a publish dry run of its export: (warehouse, export). The export's rows carry the
    recipe's own hash (`Recipe.content_hash`), the one every table that records a recipe hash gets."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a dry run needs no network and no token
    wh = tmp_path / "wh"
    recipe = kit.scripted(tmp_path)
    ok("build", recipe, "-w", wh, "-q")
    export = wh / "exports" / "scripted"
    assert export_recipe_hash(export) == load_recipe(recipe).recipe.content_hash
    ok("publish", export, "--repo-id", REPO, "-w", wh, f"--dry-run={tmp_path / 'preview'}")
    return wh, export


def one(rows: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(rows) == 1, rows
    return rows[0]


def test_a_publication_joins_its_export_on_the_recipe_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kit: Any
) -> None:
    wh, export = built_and_published(tmp_path, monkeypatch, kit)
    recipe_hash = export_recipe_hash(export)
    store = Warehouse(wh)
    row = one(
        store.query(
            "SELECT p.repo_id, r.recipe_hash FROM publications p JOIN runs r USING (run_id) "
            f"WHERE r.recipe_hash = '{recipe_hash}'"
        ).to_pylist()
    )
    assert row["repo_id"] == REPO
    # The build that made the export carries the same hash.
    assert one(store.query(f"SELECT count(*) AS n FROM runs WHERE recipe_hash = '{recipe_hash}'").to_pylist())["n"] == 2


@pytest.mark.model
def test_trainings_publications_and_the_export_join_on_the_recipe_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded_dir: Path, kit: Any
) -> None:
    wh, export = built_and_published(tmp_path, monkeypatch, kit)
    recipe_hash = export_recipe_hash(export)
    # What a replaced model folder leaves when its removal fails: the next training sweeps it.
    old = wh / "models" / ".scripted-dpo.factory-old-0123abcd"
    old.mkdir(parents=True)
    (old / LEFTOVER).write_bytes(b"")
    ok("train", export, "--preset", "cpu", "--set", "max_steps=1", "-w", wh, "-q")
    assert not old.exists()
    assert sorted(p.name for p in (wh / "models").iterdir() if ".factory-" in p.name) == []

    joined = one(
        Warehouse(wh)
        .query(
            "SELECT t.training_name, p.repo_id, tr.recipe_hash FROM trainings t "
            "JOIN runs tr ON tr.run_id = t.run_id "
            "JOIN publications p ON p.export_hash = t.dataset_hash "
            "JOIN runs pr ON pr.run_id = p.run_id AND pr.recipe_hash = tr.recipe_hash "
            "WHERE t.selected"
        )
        .to_pylist()
    )
    assert joined == {"training_name": "scripted-dpo", "repo_id": REPO, "recipe_hash": recipe_hash}
