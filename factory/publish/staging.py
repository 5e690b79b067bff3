"""A publication's files staged in a folder: the export checked and read, each split with rows as the Hub's
Parquet shards, then the card (the layout is in factory/publish/command.py's docstring)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from factory.core.errors import UserInputError
from factory.core.owned import read_marker
from factory.export.content_hash import dataset_hash
from factory.export.writer import EXPORT_FOLDER, MARKER
from factory.publish.card import check_card, hub_card
from factory.publish.staged import README, Staged

# datasets' own `push_to_hub` default: shards the Hub's viewer and loaders handle comfortably.
MAX_SHARD_BYTES = 500 * 2**20


def check_export(path: Path) -> dict[str, Any]:
    """The export marker of `path`, refusing anything but a complete export folder written by factory."""
    if not path.is_dir():
        raise UserInputError(f"{path}: no such folder (EXPORT is an export folder written by `factory build`)")
    marker = read_marker(path, EXPORT_FOLDER)
    if marker is None or not isinstance(marker.get("stage_key"), str):
        raise UserInputError(f"{path}: not an export folder written by factory (no {MARKER} in it)")
    if marker.get("complete", True) is not True:
        raise UserInputError(
            f"{path}: exported by a build that did not finish every call; run `factory build` again until it "
            "completes, then publish"
        )
    missing = [name for name in ("dataset_dict.json", README) if not (path / name).is_file()]
    if missing:
        raise UserInputError(f"{path}: the export is missing {', '.join(missing)}; rebuild it with `factory build`")
    return marker


def load_export(path: Path) -> Any:
    """The export's splits (the save_to_disk copy, memory-mapped)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        dd = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserInputError(f"{path}: the export's dataset cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(dd, datasets.DatasetDict):
        raise UserInputError(f"{path}: the export holds one dataset, not its splits; rebuild it with `factory build`")
    return dd


def export_kind(columns: list[str]) -> str:
    """preference (TRL's chosen/rejected) or sft (prompt/completion)."""
    return "preference" if {"chosen", "rejected"} <= set(columns) else "sft"


def shard_paths(split: str, count: int) -> list[str]:
    """The Hub's shard names for one split: data/<split>-00000-of-00002.parquet, ..."""
    return [f"data/{split}-{i:05d}-of-{count:05d}.parquet" for i in range(count)]


def write_split(ds: Any, split: str, folder: Path, max_shard_bytes: int) -> list[str]:
    """Write one split as contiguous Parquet shards under `folder`; returns their repo paths."""
    count = min(len(ds), max(1, math.ceil(ds.data.nbytes / max_shard_bytes)))
    paths = shard_paths(split, count)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for index, rel in enumerate(paths):
        # datasets' to_parquet keeps the features in the file's metadata, so a load reads them back exactly.
        ds.shard(count, index, contiguous=True).to_parquet(str(folder / rel))
    return paths


def stage(
    export: Path,
    marker: dict[str, Any],
    repo_id: str,
    revision: str,
    folder: Path,
    license_id: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Staged:
    """Write the publication's files (shards, then the card) under `folder`; `marker` is the export's."""
    dd = load_export(export)
    published = {split: ds for split, ds in dd.items() if len(ds)}
    if not published:
        raise UserInputError(f"{export}: every split is empty; there is nothing to publish")
    shards = {split: write_split(ds, split, folder, max_shard_bytes) for split, ds in published.items()}
    rows = {split: len(ds) for split, ds in published.items()}
    first = next(iter(published.values()))
    columns = first.column_names
    staged = Staged(
        folder=folder,
        shards=shards,
        rows=rows,
        left_out=[split for split in dd if split not in published],
        export_hash=dataset_hash(published),
        recipe=str(first[0]["recipe"]) if "recipe" in columns else export.name,
        recipe_hash=str(first[0]["recipe_hash"]) if "recipe_hash" in columns else marker["stage_key"][:16],
        export_key=marker["stage_key"],
    )
    original = (export / README).read_text(encoding="utf-8")
    card = hub_card(original, staged, repo_id, revision, export_kind(columns), license_id)
    check_card(card, folder)
    (folder / README).write_text(card, encoding="utf-8")
    return staged
