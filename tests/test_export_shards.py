"""The export written shard by shard (factory/export/writer.py): prompts added at the end write only the new
shards' files, and the folder then loads, with both loaders, exactly as one exported from scratch; a shard
whose files changed since, or an export of an unfinished build, is written again. Real builds on the
`scripted` backend, real Parquet and `datasets`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets
import pytest
from click.testing import CliRunner

from factory.cli.main import main
from factory.core.owned import read_marker
from factory.export.writer import EXPORT_FOLDER, META

PROMPTS = [
    {"instruction": f"Name thing number {i}.", "ref": f"Thing {i}."} for i in range(6)
]  # six shards of one prompt


def build(recipe: Path, wh: Path, ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Build, and return the export stage's notes."""
    result = CliRunner().invoke(main, ["build", str(recipe), "-w", str(wh), "-q"])
    assert result.exit_code in ok, result.output
    from factory.warehouse.store import Warehouse

    stages = Warehouse(wh).query("SELECT stages FROM runs ORDER BY started_at DESC LIMIT 1").to_pylist()[0]["stages"]
    (export,) = [s for s in stages if s["stage"] == "export"]
    return json.loads(export["notes"])


def recipe(tmp_path: Path, kit: Any, prompts: list[dict[str, str]], **changes: Any) -> Path:
    """The scripted recipe, a shard per prompt, reading `prompts` from a file: what a recipe's text holds is
    in every row's recipe hash, so prompts written inline would change every shard."""
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    data = kit.edited(kit.scripted_data, **{"run.shard_prompts": 1, "export.test_fraction": 0.5, **changes})
    data["prompts"] = {"path": str(source), "reference_fields": ["ref"]}
    return kit.write(tmp_path / "r.yaml", data)


def loaded(folder: Path) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Both loaders' rows by split, in file order."""
    datasets.disable_progress_bars()
    on_disk = datasets.load_from_disk(str(folder))
    cache = folder.parents[2] / "hf-cache"
    parquet = datasets.load_dataset("parquet", data_dir=str(folder / "data"), cache_dir=str(cache))
    return {s: on_disk[s].to_list() for s in on_disk}, {s: parquet[s].to_list() for s in parquet}


def inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in (folder / "data").glob("*.parquet")}


def test_added_prompts_write_only_their_shards_and_load_as_an_export_from_scratch(tmp_path: Path, kit: Any) -> None:
    wh, folder = tmp_path / "wh", tmp_path / "wh" / "exports" / "scripted"
    path = recipe(tmp_path, kit, PROMPTS[:4])
    first = build(path, wh)
    assert first["shards_reused"] == 0
    before = inodes(folder)

    recipe(tmp_path, kit, PROMPTS)
    more = build(path, wh)
    assert more["shards_reused"] == 4 and more["complete"]
    after = inodes(folder)
    assert {name: after[name] for name in before} == before  # the first four shards' files, linked, not rewritten
    assert len(after) > len(before)

    fresh = tmp_path / "fresh"
    assert build(path, fresh)["shards_reused"] == 0
    from_scratch = fresh / "exports" / "scripted"
    grown, new = loaded(folder), loaded(from_scratch)
    assert grown == new
    assert sum(len(rows) for rows in grown[0].values()) == more["train_rows"] + more["test_rows"]
    assert [len(grown[0][s]) for s in ("train", "test")] == [len(grown[1][s]) for s in ("train", "test")]
    for name in META:  # taken from the replaced folder, as `datasets` made them for the export from scratch
        grown_meta, new_meta = (json.loads((f / name).read_text()) for f in (folder, from_scratch))
        assert {**grown_meta, "_fingerprint": None} == {**new_meta, "_fingerprint": None}, name
    card, scratch_card = (f / "README.md" for f in (folder, from_scratch))
    strip = [line for line in card.read_text().splitlines() if "stage key" not in line]
    assert strip == [line for line in scratch_card.read_text().splitlines() if "stage key" not in line]


def test_a_changed_shard_file_is_written_again(tmp_path: Path, kit: Any) -> None:
    wh, folder = tmp_path / "wh", tmp_path / "wh" / "exports" / "scripted"
    path = recipe(tmp_path, kit, PROMPTS[:4])
    build(path, wh)
    original = loaded(folder)
    shard = next(s for s in read_marker(folder, EXPORT_FOLDER)["shards"] if s["files"])
    changed = folder / next(iter(shard["files"].values()))[0]
    changed.write_bytes(changed.read_bytes()[:-1] + b"?")  # same size, new modification time

    recipe(tmp_path, kit, PROMPTS[:5])
    notes = build(path, wh)
    assert notes["shards_reused"] == 3  # of four: the changed one is written again, and the new one
    grown = loaded(folder)
    for i in (0, 1):
        assert all(grown[i][s][: len(rows)] == rows for s, rows in original[i].items())


def test_an_unfinished_builds_export_is_not_taken_again(tmp_path: Path, kit: Any) -> None:
    wh = tmp_path / "wh"
    failing = recipe(tmp_path, kit, PROMPTS[:3], **{"models.m.script": {"fail_rate": 0.4, "fail_seed": 1}})
    notes = build(failing, wh, ok=(0, 1, 2, 3))
    assert notes["complete"] is False
    again = build(recipe(tmp_path, kit, PROMPTS[:3]), wh)
    assert again["shards_reused"] == 0 and again["complete"] is True


@pytest.mark.skipif(not hasattr(os, "link"), reason="needs hard links")
def test_an_export_left_as_it_was_when_the_new_one_fails(tmp_path: Path, kit: Any, monkeypatch: Any) -> None:
    """A failure while the new folder is built (here: writing a new shard) leaves the old export whole: the
    files linked from it are only new names for the same bytes, never written through."""
    wh, folder = tmp_path / "wh", tmp_path / "wh" / "exports" / "scripted"
    path = recipe(tmp_path, kit, PROMPTS[:3])
    build(path, wh)
    original = loaded(folder)

    import factory.export.writer as writer

    def broken(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(writer, "_write_files", broken)
    recipe(tmp_path, kit, PROMPTS[:4])
    result = CliRunner().invoke(main, ["build", str(path), "-w", str(wh), "-q"])
    assert result.exit_code != 0
    assert loaded(folder) == original
    assert sorted(p.name for p in folder.parent.iterdir()) == [".scripted.lock", "scripted"]  # nothing half-built


def test_a_marker_not_as_factory_wrote_it_makes_every_shard_again(tmp_path: Path, kit: Any) -> None:
    wh, folder = tmp_path / "wh", tmp_path / "wh" / "exports" / "scripted"
    path = recipe(tmp_path, kit, PROMPTS[:3])
    build(path, wh)
    marker = folder / EXPORT_FOLDER.marker
    data = json.loads(marker.read_text())
    for shard in data["shards"]:
        shard["files"] = {"train": "not a list"}
    marker.write_text(json.dumps(data))

    recipe(tmp_path, kit, PROMPTS[:4])
    notes = build(path, wh)
    assert notes["shards_reused"] == 0 and notes["complete"]
    assert sum(len(rows) for rows in loaded(folder)[0].values()) == notes["train_rows"] + notes["test_rows"]
