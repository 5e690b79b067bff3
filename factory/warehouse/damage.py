"""Damage checks shared by every reader of the warehouse: which files are unreadable, skipping them (and
naming them in a warning), or setting them aside into the corrupt/ folder beside them while a build holds the
lock, so that what they held is made again (docs/RELIABILITY.md)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from factory.core.files import check_folder
from factory.core.text import clean
from factory.warehouse.parquet import data_problem, footer_problem

# The columns `cached_calls` relies on; a calls part without them cannot be a cache entry.
CALL_KEY_COLUMNS = ("request_key", "status", "created_at")
CORRUPT_FOLDER = "corrupt"


class DamageChecks:
    """The root folder and what this instance found damaged; the base of every part of `Warehouse`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        # Unreadable files this instance skipped (read-only paths never move files): the CLI names them in a
        # warning. A build moves them to corrupt/ instead (see quarantine_corrupt_parts, quarantine_damaged_tables).
        self.skipped_parts: list[Path] = []
        self.skip_reasons: dict[Path, str] = {}
        # Where each file this instance moved to corrupt/ used to be, in order, so a run can name them.
        self.set_aside: list[Path] = []
        # Checks already made, keyed by (path, size, mtime_ns): a file that changes is checked again.
        self._checked: dict[tuple[str, int, int], str | None] = {}
        self._holding_lock = False  # set by `Warehouse.lock`

    def _check_root(self) -> None:
        check_folder(self.root)

    def _stat_key(self, path: Path) -> tuple[str, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (str(path), st.st_size, st.st_mtime_ns)

    def _is_call_part(self, path: Path) -> bool:
        return path.parent.parent == self.root / "calls"

    def _is_stage_file(self, path: Path) -> bool:
        """A stage version or its CURRENT.json (tables/<table>/<unit>/...)."""
        return path.parent.parent.parent == self.root / "tables"

    def _may_set_aside(self, path: Path) -> bool:
        """Whether a build may move this file to corrupt/: what it held is made again (calls, stage versions,
        pointers) or was only a record (a runs row). Anything else is skipped, never moved."""
        return self._is_call_part(path) or self._is_stage_file(path) or path.parent == self.root / "runs"

    def _problem(self, path: Path) -> str | None:
        """The cached footer check of one file (calls parts need the cache's columns); None if it looks fine."""
        key = self._stat_key(path)
        if key is None:
            return "cannot be read"
        if key not in self._checked:
            self._checked[key] = footer_problem(path, CALL_KEY_COLUMNS if self._is_call_part(path) else ())
        return self._checked[key]

    def _mark_bad(self, path: Path, problem: str) -> None:
        """Remember a file as unusable until it changes (a deeper check found what the footer hid)."""
        key = self._stat_key(path)
        if key is not None:
            self._checked[key] = problem

    def _reject(self, path: Path, problem: str) -> None:
        """A file a full read found bad: skip it, or set it aside while a build holds the lock (`_usable`)."""
        self._mark_bad(path, problem)
        self._usable([str(path)])

    def _skip(self, path: Path, problem: str) -> None:
        if path not in self.skip_reasons:
            self.skipped_parts.append(path)
        self.skip_reasons[path] = problem

    def _usable(self, paths: Iterable[str]) -> list[str]:
        """The files that pass the footer check; the others are skipped (or set aside while building)."""
        good = []
        for p in paths:
            path = Path(p)
            problem = self._problem(path)
            if problem is not None and not os.path.lexists(path):
                continue  # removed since it was listed: nothing to read, skip or move
            if problem is None:
                good.append(p)
            elif self._holding_lock and self._may_set_aside(path):
                self._quarantine(path)
            else:
                self._skip(path, problem)
        return good

    def _quarantine(self, part: Path) -> Path:
        """Move a damaged file to the corrupt/ folder beside it, where no reader's glob looks (calls parts,
        stage versions and pointers, runs rows); the file is kept, never deleted."""
        folder = part.parent / CORRUPT_FOLDER
        folder.mkdir(exist_ok=True)
        target, n = folder / part.name, 1
        while target.exists():  # the same name set aside before: keep both
            target, n = folder / f"{part.stem}.{n}{part.suffix}", n + 1
        os.replace(part, target)
        self.set_aside.append(part)
        if self._is_stage_file(part) and part.suffix == ".parquet":
            # The empty marker would claim a complete version that is no longer there.
            part.with_suffix(".complete").unlink(missing_ok=True)
        if part in self.skip_reasons:
            del self.skip_reasons[part]
            self.skipped_parts.remove(part)
        return target

    def skipped_warning(self) -> str | None:
        """One line naming the unreadable files that reads skipped, or None when there were none."""
        if not self.skipped_parts:
            return None
        names = ", ".join(clean(p) for p in self.skipped_parts)  # a file name can hold anything: made printable
        # Say what the answer lacks: a skipped stage version or CURRENT.json leaves its table short, not empty.
        return (
            f"warning: skipped {len(self.skipped_parts)} unreadable file(s), so their rows are missing here (the "
            f"next build sets them aside and remakes the stage tables and calls among them): {names}"
        )

    @staticmethod
    def _vanished(files: Sequence[str]) -> bool:
        """Whether some file a read was given is gone: a build compacting the call cache removed it after
        the read listed it, so the read must list its files again (call_cache.CallCache._listing)."""
        return not all(os.path.lexists(f) for f in files)

    def _set_aside_named(self, message: str, files: Sequence[str], search_all: bool = True) -> bool:
        """After a DuckDB read error: find the bad files among `files`, skip or set them aside; any found?

        Files the message names are read in full first; if none of them is bad and `search_all`, every file
        is (one by one), since DuckDB does not always say which file it was reading.
        """
        named = [f for f in files if f in message]
        rest = [f for f in files if f not in named] if search_all else []
        for candidates in (named, rest):
            found = False
            for f in candidates:
                problem = data_problem(Path(f))
                if problem is not None:
                    found = True
                    self._reject(Path(f), problem)
            if found:
                return True
        return False
