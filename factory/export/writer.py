"""Writing an export folder shard by shard, so memory holds one shard of records, not the dataset, and a build
that adds prompts writes only the new shards' files (docs/DESIGN.md, "Shards").

The folder holds the same rows twice, in files of one build shard each:

- `data/<split>-<shard>.parquet`, for `load_dataset("parquet", data_dir=...)` and the Hub (an empty split has
  none, since `load_dataset` refuses a split without rows);
- `<split>/data-<shard>.arrow` with each split's `state.json` and `dataset_info.json`, and
  `dataset_dict.json`: the `save_to_disk` layout, for `load_from_disk`. `datasets` writes the metadata files
  itself (for an empty split); factory lists its own Arrow files in them, as `save_to_disk(num_shards=...)`
  lists its shards.

The marker names each shard's files under the shard's key (`Context.shard_key`), with its size and the card's
counts. The next export of the same folder takes a shard whose key and files are unchanged as it is (a hard
link into the new folder) instead of writing it again. The folder is built beside its target and renamed into
place with its marker last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from factory.core.files import check_folder
from factory.core.keys import stable_hash
from factory.core.owned import FolderKind, building_beside, check_replaceable, read_marker, replace_folder, seal

MARKER = ".factory-export.json"
EXPORT_FOLDER = FolderKind("export folder", MARKER, "export.path")
SPLITS = ("train", "test")
ARROW_BATCH_ROWS = 1000  # datasets' own writer batch size: what a memory-mapped load reads at a time


def check_export_target(path: Path, wh_root: Path | None = None) -> None:
    """Refuse to export over anything factory did not write: an export replaces only its own folders."""
    check_folder(path)
    check_replaceable(path, EXPORT_FOLDER, wh_root)


def _stamp(file: Path) -> list[int]:
    """What tells a file factory wrote from one changed since: its size and modification time."""
    st = file.stat()
    return [st.st_size, st.st_mtime_ns]


class DatasetWriter:
    """One export folder, written shard by shard: `reuse` takes a shard the folder already holds, `write` adds
    one, `finish` seals the folder into place.

    Leaving the `with` block without `finish` (an error, an interrupt) removes the half-built folder and
    leaves the target as it was."""

    def __init__(self, path: Path, features: Any) -> None:
        self.path = path
        self.features = features
        self.schema: pa.Schema = features.arrow_schema  # carries datasets' feature metadata into the files
        self.rows = dict.fromkeys(SPLITS, 0)
        self.shards: list[dict[str, Any]] = []
        self.reused = 0
        marker = read_marker(path, EXPORT_FOLDER) or {}
        # Only a finished export's shards are taken again: a shard of a build with failed calls keeps its key
        # once the calls succeed, but not its rows.
        previous = marker.get("shards") if marker.get("complete") is True else None
        self._previous = {s["key"]: s for s in previous or [] if isinstance(s, dict) and s.get("key")}
        self._beside: Any = None
        self.tmp = Path()

    def __enter__(self) -> DatasetWriter:
        check_export_target(self.path)
        self._beside = building_beside(self.path)
        self.tmp = self._beside.__enter__()
        for folder in ("data", *SPLITS):
            (self.tmp / folder).mkdir()
        return self

    def _names(self, split: str) -> tuple[str, str]:
        index = len(self.shards)
        return f"data/{split}-{index:05d}.parquet", f"{split}/data-{index:05d}.arrow"

    def reuse(self, key: str | None) -> dict[str, Any] | None:
        """Shard `key`'s counts when the folder being replaced holds its files as factory wrote them (they are
        linked into the new folder as the next shard); None when it must be written."""
        old = self._previous.get(key) if key else None
        if old is None:
            return None
        files: dict[str, list[Any]] = {}
        stamps: dict[str, list[int]] = {}
        try:
            counts = old["counts"]
            if not isinstance(counts, dict):
                raise TypeError("no counts")
            for split, (parquet, arrow, rows) in old["files"].items():
                names = self._names(split)
                for source, name in zip((parquet, arrow), names, strict=True):
                    if _stamp(self.path / source) != old["stamps"][source]:
                        raise ValueError(f"{source} changed since it was written")
                    _link(self.path / source, self.tmp / name)
                    stamps[name] = _stamp(self.tmp / name)
                files[split] = [*names, int(rows)]
        except (OSError, KeyError, TypeError, ValueError):
            for name in stamps:  # a file gone, changed, or a marker of another layout: the shard is written again
                (self.tmp / name).unlink(missing_ok=True)
            return None
        for split, (*_, rows) in files.items():
            self.rows[split] += rows
        self.shards.append({"key": key, "files": files, "stamps": stamps, "counts": counts})
        self.reused += 1
        return counts

    def write(self, key: str | None, splits: dict[str, list[dict[str, Any]]], counts: dict[str, Any]) -> None:
        """Add one shard: its records (dicts with every feature) by split, and what the card counts of it."""
        files, stamps = {}, {}
        for split, records in splits.items():
            if not records:
                continue
            columns = {name: [r[name] for r in records] for name in self.schema.names}
            table = pa.Table.from_pydict(columns, schema=self.schema)
            names = self._names(split)
            _write_files(table, self.tmp, names)
            stamps.update({name: _stamp(self.tmp / name) for name in names})
            files[split] = [*names, table.num_rows]
            self.rows[split] += table.num_rows
        self.shards.append({"key": key, "files": files, "stamps": stamps, "counts": counts})

    def finish(self, readme: str, info: dict[str, Any]) -> None:
        """Write `datasets`' metadata for the `save_to_disk` layout, the card and the marker (`info`, the shards
        and the file list), and move the folder into place."""
        import datasets

        empty = {k: [] for k in self.features}
        meta = self.tmp / ".meta"
        layout = datasets.DatasetDict(
            {split: datasets.Dataset.from_dict(empty, features=self.features, split=split) for split in SPLITS}
        )
        layout.save_to_disk(str(meta), num_shards=dict.fromkeys(SPLITS, 1))
        os.replace(meta / "dataset_dict.json", self.tmp / "dataset_dict.json")
        for split in SPLITS:
            listed = [s["files"][split][1] for s in self.shards if split in s["files"]]
            if not listed:  # an empty split: datasets' own empty file for load_from_disk, no Parquet file
                listed = [f"{split}/data-00000.arrow"]
                os.replace(meta / split / "data-00000-of-00001.arrow", self.tmp / listed[0])
            state = json.loads((meta / split / "state.json").read_text(encoding="utf-8"))
            state["_data_files"] = [{"filename": Path(name).name} for name in listed]
            # Unique to this split of this export: `datasets` caches a `map` over a dataset by its fingerprint.
            state["_fingerprint"] = stable_hash([split, info, [s["key"] for s in self.shards]], 16)
            (self.tmp / split / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
            os.replace(meta / split / "dataset_info.json", self.tmp / split / "dataset_info.json")
        shutil.rmtree(meta)
        (self.tmp / "README.md").write_text(readme, encoding="utf-8")
        seal(self.tmp, EXPORT_FOLDER, {**info, "shards": self.shards})
        replace_folder(self.tmp, self.path, EXPORT_FOLDER)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._beside is not None:
            self._beside.__exit__(kind, exc, tb)


def _write_files(table: pa.Table, folder: Path, names: tuple[str, str]) -> None:
    """One shard of one split, as Parquet and as the Arrow stream `datasets.load_from_disk` memory-maps."""
    parquet, arrow = names
    pq.write_table(table, folder / parquet)
    with pa.OSFile(str(folder / arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
        out.write_table(table, max_chunksize=ARROW_BATCH_ROWS)


def _link(source: Path, target: Path) -> None:
    """`source`'s bytes at `target`: a hard link (no copy), or a copy where the file system has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_dataset_folder(
    path: Path,
    splits: dict[str, list[dict[str, Any]]],
    features: Any,
    readme: str,
    stage_key: str,
    run_id: str,
    complete: bool = True,
) -> None:
    """A whole export folder of one shard from records already in memory (small sets, tests)."""
    with DatasetWriter(path, features) as out:
        out.write(None, splits, {})
        out.finish(readme, {"stage_key": stage_key, "run_id": run_id, "complete": complete})
