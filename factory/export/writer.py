"""Writing an export folder as its rows come, shard by shard, so memory holds one shard of records, not the
dataset (docs/DESIGN.md, "Shards").

The folder holds the same rows twice: `data/<split>.parquet` (for `load_dataset("parquet", ...)` and the
Hub), written batch by batch while the shards stream in, and the `save_to_disk` layout (train/, test/,
dataset_dict.json) for `load_from_disk`, which `datasets` makes from those Parquet files through a
memory-mapped cache. It is built beside its target and renamed into place with its marker last.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from factory.core.files import check_folder
from factory.core.owned import FolderKind, building_beside, check_replaceable, replace_folder, seal

MARKER = ".factory-export.json"
EXPORT_FOLDER = FolderKind("export folder", MARKER, "export.path")
SPLITS = ("train", "test")


def check_export_target(path: Path, wh_root: Path | None = None) -> None:
    """Refuse to export over anything factory did not write: an export replaces only its own folders."""
    check_folder(path)
    check_replaceable(path, EXPORT_FOLDER, wh_root)


class DatasetWriter:
    """One export folder, written split by split: `write` appends records, `finish` seals it into place.

    Leaving the `with` block without `finish` (an error, an interrupt) removes the half-built folder and
    leaves the target as it was."""

    def __init__(self, path: Path, features: Any) -> None:
        self.path = path
        self.features = features
        self.schema: pa.Schema = features.arrow_schema  # carries datasets' feature metadata into the files
        self.rows = dict.fromkeys(SPLITS, 0)
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._beside: Any = None
        self.tmp = Path()

    def __enter__(self) -> DatasetWriter:
        check_export_target(self.path)
        self._beside = building_beside(self.path)
        self.tmp = self._beside.__enter__()
        (self.tmp / "data").mkdir()
        for split in SPLITS:
            self._writers[split] = pq.ParquetWriter(self.tmp / "data" / f"{split}.parquet", self.schema)
        return self

    def write(self, split: str, records: list[dict[str, Any]]) -> None:
        """Append records (dicts with every feature) to one split."""
        if records:
            columns = {name: [r[name] for r in records] for name in self.schema.names}
            self._writers[split].write_table(pa.Table.from_pydict(columns, schema=self.schema))
            self.rows[split] += len(records)

    def _close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def finish(self, readme: str, info: dict[str, Any]) -> None:
        """Make the `save_to_disk` layout from the Parquet files, write the card and the marker (`info` plus
        the file list), and move the folder into place."""
        import datasets

        self._close()
        cache = self.tmp / ".cache"
        parts = {}
        for split in SPLITS:
            file = self.tmp / "data" / f"{split}.parquet"
            if self.rows[split]:
                parts[split] = datasets.Dataset.from_parquet(str(file), features=self.features, cache_dir=str(cache))
            else:  # an empty Parquet file has no row group for datasets to read; from_dict keeps the columns
                parts[split] = datasets.Dataset.from_dict({k: [] for k in self.features}, features=self.features)
        dd = datasets.DatasetDict(parts)
        # An empty split saved with datasets' default shard count gets zero shards, and load_from_disk then
        # fails on it (IndexError in concat_tables); one explicit (empty) shard loads as a 0-row split.
        dd.save_to_disk(str(self.tmp), num_shards={split: 1 for split, ds in dd.items() if len(ds) == 0})
        del dd, parts
        shutil.rmtree(cache, ignore_errors=True)
        (self.tmp / "README.md").write_text(readme, encoding="utf-8")
        seal(self.tmp, EXPORT_FOLDER, info)
        replace_folder(self.tmp, self.path, EXPORT_FOLDER)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._close()
        if self._beside is not None:
            self._beside.__exit__(kind, exc, tb)


def write_dataset_folder(
    path: Path,
    splits: dict[str, list[dict[str, Any]]],
    features: Any,
    readme: str,
    stage_key: str,
    run_id: str,
    complete: bool = True,
) -> None:
    """A whole export folder from records already in memory (small sets, tests)."""
    with DatasetWriter(path, features) as out:
        for split, records in splits.items():
            out.write(split, records)
        out.finish(readme, {"stage_key": stage_key, "run_id": run_id, "complete": complete})
