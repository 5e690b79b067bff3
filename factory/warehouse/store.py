"""The warehouse: `Warehouse`, the one handle on the files and SQL of a warehouse folder (this package is the
only code that touches them).

Layout under the root (default `warehouse/`):

    calls/<generation_calls|judge_calls>/part-<run>-<seq>.parquet   every model call, appended as it arrives
    calls/<table>/compact-<run>-<seq>.parquet                        parts merged by a build (compaction.py)
    calls/<table>/corrupt/part-*.parquet                              unreadable parts, set aside by a build
    tables/<table>/<recipe>/<stage_key>.parquet                     one materialised version of a stage
    tables/<table>/<recipe>/CURRENT.json                             which version the views show
    tables/<table>/<recipe>/corrupt/                                 unreadable versions and pointers, set aside
    runs/<run_id>.parquet                                            one row per build
    runs/corrupt/<run_id>.parquet                                    unreadable runs rows, set aside by a build
    factory.duckdb                                                   a view per table, for any DuckDB client
    .lock                                                            held (flock) by the build writing here

Every file is written to a temporary name in the same folder and renamed into place, so a reader (or a
resumed build) never sees half a file. Like sqlmesh, each stage version is its own physical file and the
views point at the current one, so going back to an earlier recipe is a pointer change, not a recompute.

A part that is unreadable anyway (a disk filled up, a copy cut short, a file edited by hand) is skipped by
every reader and named in `Warehouse.skipped_parts`; a build moves it to `corrupt/` so its calls are made
again. Stage versions and their CURRENT.json pointers are derived data: a build sets an unreadable one aside
the same way and recomputes the stage (from the call cache); an unreadable runs row goes to runs/corrupt/.
`factory sql` runs in a DuckDB that can read only the files its views read, and only read-only statements
reach it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from factory.core.errors import UserInputError
from factory.core.files import check_folder, exclusive_lock, make_folder
from factory.warehouse.parquet import atomic_write_parquet, to_table
from factory.warehouse.tables import RUNS
from factory.warehouse.views import DB_FILE, Views


class Warehouse(Views):
    """Parquet tables and DuckDB views under one root folder: the one handle other code uses. Its parts are
    `DamageChecks` (damage.py), `CallCache` (call_cache.py), `StageVersions` (versions.py) and `Views`
    (views.py); this class adds the lock, the runs rows and the checks a command makes before using it."""

    # ------------------------------------------------------------------------------------------ locking
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the warehouse for one build, so two builds never interleave their writes (non-blocking)."""
        make_folder(self.root)

        def busy(holder: str) -> str:
            return f"{self.root}: another build is using this warehouse ({holder}); wait for it to finish"

        with exclusive_lock(self.root / ".lock", busy):
            self._holding_lock = True
            try:
                yield
            finally:
                self._holding_lock = False

    def require(self) -> None:
        """For read-only commands: the root must be a warehouse (a folder that a build or judge-eval wrote),
        so a mistyped `--warehouse` is an error rather than a quietly empty answer."""
        check_folder(self.root)
        if not self.root.is_dir():
            raise UserInputError(f"{self.root}: no warehouse here (run `factory build RECIPE` first)")
        if not any((self.root / name).exists() for name in ("runs", "tables", "calls", DB_FILE)):
            raise UserInputError(f"{self.root}: not a factory warehouse (no runs, tables or calls in it)")

    def sweep_temporary(self) -> list[Path]:
        """Remove the temporary files of writes that were killed before their rename (SIGKILL skips every
        `finally`). Call it with the warehouse lock held: then no write is in flight. Readers never saw them."""
        self._check_root()
        swept = []
        for folder in ("calls", "tables", "runs"):
            base = self.root / folder
            for tmp in base.rglob(".*.tmp") if base.is_dir() else []:
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink(missing_ok=True)
                    swept.append(tmp)
        for tmp in self.root.glob(".factory-*.duckdb*") if self.root.is_dir() else []:
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                swept.append(tmp)
        return swept

    # -------------------------------------------------------------------------------------------- runs
    def write_run(self, row: dict[str, Any]) -> None:
        """Record (or update) one build's row in the runs table."""
        self._check_root()
        atomic_write_parquet(self.root / "runs" / f"{row['run_id']}.parquet", to_table([row], RUNS))
