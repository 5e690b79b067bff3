"""Writing an export folder shard by shard, so memory holds one shard of records, not the dataset, and a build
that adds prompts writes only the new shards' files (docs/DESIGN.md, "Shards").

The folder holds the same rows twice, in files of one build shard each:

- `data/<split>-<shard>.parquet`, for `load_dataset("parquet", data_dir=...)` and the Hub (an empty split has
  none, since `load_dataset` refuses a split without rows);
- `<split>/data-<shard>.arrow` with each split's `state.json` and `dataset_info.json`, and
  `dataset_dict.json`: the `save_to_disk` layout, for `load_from_disk`. `datasets` writes the metadata files
  itself (for an empty split); factory lists its own Arrow files in them, as `save_to_disk(num_shards=...)`
  lists its shards. An export of the same columns and `datasets` release takes them from the folder it
  replaces.

The marker names each shard's files under the shard's key (`Context.shard_key`), with its size and the card's
counts. The next export of the same folder takes a shard whose key and files are unchanged as it is (a hard
link into the new folder) instead of writing it again. The folder is built beside its target and renamed into
place with its marker last.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
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


@dataclass(frozen=True)
class Layout:
    """What an export's rows are: a name and version for its columns (bumped when they change), and how
    `datasets` types them (given the `datasets` module: it is imported only when something needs it)."""

    name: str
    version: int
    features: Callable[[Any], Any]

    def ident(self) -> str:
        """What an export's metadata files depend on: these columns, and the `datasets` release writing them."""
        return f"{self.name}/{self.version}/datasets-{metadata.version('datasets')}"


META = ("dataset_dict.json", *(f"{split}/{name}" for split in SPLITS for name in ("state.json", "dataset_info.json")))
"""`datasets`' metadata of the `save_to_disk` layout."""


def _stamp(file: Path) -> list[int]:
    """What tells a file factory wrote from one changed since: its size and modification time."""
    st = file.stat()
    return [st.st_size, st.st_mtime_ns]


class DatasetWriter:
    """One export folder, written shard by shard: `reuse` takes a shard the folder already holds, `write` adds
    one, `finish` seals the folder into place.

    Leaving the `with` block without `finish` (an error, an interrupt) removes the half-built folder and
    leaves the target as it was."""

    def __init__(self, path: Path, layout: Layout) -> None:
        self.path = path
        self.layout = layout
        self.rows = dict.fromkeys(SPLITS, 0)
        self.shards: list[dict[str, Any]] = []
        self.reused = 0
        marker = read_marker(path, EXPORT_FOLDER) or {}
        # Only a finished export's shards are taken again: a shard of a build with failed calls keeps its key
        # once the calls succeed, but not its rows.
        previous = marker.get("shards") if marker.get("complete") is True else None
        self._previous = {s["key"]: s for s in previous or [] if isinstance(s, dict) and s.get("key")}
        # The metadata files and the schema of an export of the same layout serve again as they are, so an
        # export that writes a shard or two does not import `datasets` (half a second) to make them anew.
        self._old_meta = marker.get("meta") if marker.get("layout") == layout.ident() else None
        self._schema: pa.Schema | None = None
        self._beside: Any = None
        self.tmp = Path()

    @property
    def schema(self) -> pa.Schema:
        """The files' Arrow schema, with `datasets`' feature metadata: read from a file of the export being
        replaced when it has the same layout, else made by `datasets`."""
        if self._schema is None:
            self._schema = self._old_schema() or self._features().arrow_schema
        return self._schema

    def _features(self) -> Any:
        import datasets  # heavy; only when the files' metadata must be made anew

        datasets.disable_progress_bars()  # the build shows its own progress
        return self.layout.features(datasets)

    def _old_schema(self) -> pa.Schema | None:
        if not isinstance(self._old_meta, dict):
            return None
        for shard in self._previous.values():
            try:
                for _, arrow, _ in shard["files"].values():
                    if _stamp(self.path / arrow) == shard["stamps"][arrow]:
                        with pa.memory_map(str(self.path / arrow)) as source:
                            return pa.ipc.open_stream(source).schema
            except (OSError, KeyError, TypeError, ValueError, pa.ArrowInvalid):
                continue  # a marker or file not as factory wrote it: another shard's file, or `datasets`
        return None

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
        """Write `datasets`' metadata for the `save_to_disk` layout, the card and the marker (`info`, the shards,
        the layout and the file list), and move the folder into place."""
        meta = self._meta()
        (self.tmp / "dataset_dict.json").write_text(meta["dataset_dict.json"], encoding="utf-8")
        for split in SPLITS:
            listed = [s["files"][split][1] for s in self.shards if split in s["files"]]
            if not listed:  # an empty split: a file of no rows for load_from_disk, and no Parquet file
                listed = [f"{split}/data-00000.arrow"]
                with pa.OSFile(str(self.tmp / listed[0]), "wb") as sink, pa.ipc.new_stream(sink, self.schema):
                    pass
            state = json.loads(meta[f"{split}/state.json"])
            state["_data_files"] = [{"filename": Path(name).name} for name in listed]
            # Unique to this split of this export: `datasets` caches a `map` over a dataset by its fingerprint.
            state["_fingerprint"] = stable_hash([split, info, [s["key"] for s in self.shards]], 16)
            (self.tmp / split / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
            info_file = f"{split}/dataset_info.json"
            (self.tmp / info_file).write_text(meta[info_file], encoding="utf-8")
        (self.tmp / "README.md").write_text(readme, encoding="utf-8")
        stamps = {name: _stamp(self.tmp / name) for name in META}
        layout = {"layout": self.layout.ident(), "meta": stamps}
        seal(self.tmp, EXPORT_FOLDER, {**info, **layout, "shards": self.shards})
        replace_folder(self.tmp, self.path, EXPORT_FOLDER)

    def _meta(self) -> dict[str, str]:
        """The text of each metadata file: the replaced export's where it has the same layout and the files are
        as factory wrote them, else what `datasets` writes for empty splits of these features."""
        old = self._old_meta
        try:
            if isinstance(old, dict) and all(_stamp(self.path / name) == old[name] for name in META):
                return {name: (self.path / name).read_text(encoding="utf-8") for name in META}
        except (OSError, KeyError, TypeError):
            pass
        import datasets

        features = self._features()
        made = self.tmp / ".meta"
        empty = {k: [] for k in features}
        splits = {split: datasets.Dataset.from_dict(empty, features=features, split=split) for split in SPLITS}
        datasets.DatasetDict(splits).save_to_disk(str(made), num_shards=dict.fromkeys(SPLITS, 1))
        texts = {name: (made / name).read_text(encoding="utf-8") for name in META}
        shutil.rmtree(made)
        return texts

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
    layout: Layout,
    readme: str,
    stage_key: str,
    run_id: str,
    complete: bool = True,
) -> None:
    """A whole export folder of one shard from records already in memory (small sets, tests)."""
    with DatasetWriter(path, layout) as out:
        out.write(None, splits, {})
        out.finish(readme, {"stage_key": stage_key, "run_id": run_id, "complete": complete})
