"""What factory writes outside its own tables, and how it tells its own files from a user's.

The rule (docs/RELIABILITY.md, "What factory writes and deletes"): no command deletes, truncates or replaces a
path that factory did not write. Factory recognises its own by a marker:

- a folder it writes (an export, a trained model, a publish dry run, a judge-eval report) holds its kind's
  marker file, a JSON object that lists every file factory put in the folder (`seal`). An existing folder is
  replaced only when it is empty, or holds that marker and no file the marker does not list: a file a user
  added to an export folder stops the next export rather than being lost with the folder;
- a folder is built in a hidden sibling, `.<name>.factory-tmp-<random>`, and renamed into place; the copy it
  replaces is first renamed to `.<name>.factory-old-<random>`. Both carry `LEFTOVER` while they exist, and the
  sweep removes only siblings with such a name *and* that file, so a user's `.<name>-backup` is never touched;
- a single file it writes (a report page, an alpaca_eval outputs file) is replaced only when its content is
  recognisably factory's; a link is never followed or replaced.

Nothing here ever writes into a warehouse's own tables: `check_not_in_warehouse` refuses such targets.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.core.errors import UserInputError
from factory.core.files import check_folder, folder_lock

LEFTOVER = ".factory-leftover"
"""The file inside a half-built or replaced folder that lets a later sweep remove it."""

_LEFTOVER_NAME = re.compile(r"\.(?P<name>.+)\.factory-(?:tmp|old)-[A-Za-z0-9_]+")
# What a warehouse holds that only factory may write (the views' database and the lock included).
WAREHOUSE_OWN = ("tables", "calls", "runs", "factory.duckdb", ".lock")


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder factory writes outside its tables: its marker file and how messages name it."""

    what: str
    """How messages name it, e.g. "export folder"."""
    marker: str
    """The file inside that says factory wrote the folder."""
    option: str
    """The recipe field or command option that chose the path, named in refusals."""


def read_marker(folder: Path, kind: FolderKind) -> dict[str, Any] | None:
    """`kind`'s marker in `folder` as a dict; None when the folder holds no readable one."""
    try:
        data = json.loads((folder / kind.marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _files(folder: Path) -> list[str]:
    """Every file and link under `folder`, as sorted relative POSIX paths (folders themselves left out)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink() or not p.is_dir())


def seal(built: Path, kind: FolderKind, info: dict[str, Any]) -> None:
    """Write `kind`'s marker into `built`: `info` plus the list of the files in it, the last thing written."""
    files = [f for f in _files(built) if f not in (kind.marker, LEFTOVER)]
    (built / kind.marker).write_text(json.dumps({**info, "files": files}, sort_keys=True), encoding="utf-8")


def foreign_files(folder: Path, kind: FolderKind) -> list[str] | None:
    """The files in `folder` that factory did not write; None when it holds no marker of `kind` at all.

    A marker written before markers listed their files (no "files" key) vouches for the whole folder."""
    marker = None if (folder / kind.marker).is_symlink() else read_marker(folder, kind)
    if marker is None:
        return None
    listed = marker.get("files")
    if not isinstance(listed, list):
        return []
    ours = {*map(str, listed), kind.marker, LEFTOVER}
    return [f for f in _files(folder) if f not in ours]


def _is_empty(folder: Path) -> bool:
    return not any(folder.iterdir())


def check_not_in_warehouse(path: Path, wh_root: Path | None, option: str) -> None:
    """Refuse a target that is a warehouse's root or lies among its own files (tables, calls, runs, views)."""
    if wh_root is None:
        return
    target, root = path.resolve(), wh_root.resolve()
    if target == root or any(target == root / own or root / own in target.parents for own in WAREHOUSE_OWN):
        raise UserInputError(f"{option} {path}: inside the warehouse's own files ({root}); choose a path outside them")


def _check_not_home(path: Path, option: str) -> None:
    """Refuse the working folder, a folder that holds it, and the home folder: replacing one loses everything."""
    target = path.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents or target == Path.home().resolve():
        raise UserInputError(f"{option} {path}: the working folder or one that holds it; choose a folder of its own")


def check_replaceable(target: Path, kind: FolderKind, wh_root: Path | None = None) -> None:
    """Refuse, with one line, a `target` folder that factory may not replace: a file or link, a protected folder,
    the warehouse's own files, or a folder with content and without `kind`'s marker."""
    check_folder(target.parent)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserInputError(f"{kind.option} {target}: exists and is not a folder; choose another path")
    _check_not_home(target, kind.option)
    check_not_in_warehouse(target, wh_root, kind.option)
    if not target.is_dir() or _is_empty(target):
        return
    foreign = foreign_files(target, kind)
    if foreign is None:
        raise UserInputError(
            f"{kind.option} {target}: a folder that factory did not write (no {kind.marker} in it); "
            "choose another path, or move it away yourself"
        )
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserInputError(
            f"{kind.option} {target}: holds files factory did not write ({foreign[0]}{more}); "
            "move them away, then run the command again"
        )


def new_folder_beside(target: Path) -> Path:
    """An empty hidden folder beside `target` to build it in, marked as a leftover until it is moved into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"{target.parent}: cannot create this folder ({exc.strerror})") from None
    built = Path(tempfile.mkdtemp(prefix=f".{target.name}.factory-tmp-", dir=target.parent))
    (built / LEFTOVER).write_bytes(b"")
    return built


@contextlib.contextmanager
def building_beside(target: Path) -> Iterator[Path]:
    """A new folder beside `target` (`new_folder_beside`), removed on the way out unless it was moved into place."""
    built = new_folder_beside(target)
    try:
        yield built
    finally:
        discard(built)


@contextlib.contextmanager
def writing(target: Path, what: str) -> Iterator[None]:
    """Hold `target`'s lock (the file `.<name>.lock` beside it) and sweep what a killed writer left there."""
    with folder_lock(target, what):
        sweep_leftovers(target)
        yield


def discard(built: Path) -> None:
    """Remove a folder `new_folder_beside` made (after a failure); anything else is left alone."""
    if _is_leftover(built):
        _remove_leftover(built)


def _remove_leftover(folder: Path) -> None:
    """Remove a marked leftover folder, its `LEFTOVER` file last: a removal that fails part-way leaves a folder
    the next command's sweep still recognises, never an unmarked one it must leave alone."""
    for path in folder.iterdir():
        if path.name == LEFTOVER:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    with contextlib.suppress(OSError):
        (folder / LEFTOVER).unlink()
        folder.rmdir()


def _is_leftover(path: Path) -> bool:
    return (
        _LEFTOVER_NAME.fullmatch(path.name) is not None
        and path.is_dir()
        and not path.is_symlink()
        and (path / LEFTOVER).is_file()
    )


def sweep_leftovers(target: Path) -> list[Path]:
    """Remove what a killed command left beside `target` (folders named and marked by factory); returns them.

    Call it while holding the target's lock, so a live writer's folder is never swept."""
    if not target.parent.is_dir():
        return []
    swept = []
    for path in target.parent.iterdir():
        match = _LEFTOVER_NAME.fullmatch(path.name)
        if match and match.group("name") == target.name and _is_leftover(path):
            _remove_leftover(path)
            swept.append(path)
    return swept


def replace_folder(built: Path, target: Path, kind: FolderKind, wh_root: Path | None = None) -> None:
    """Move `built` (from `new_folder_beside`, holding `kind`'s marker) to `target`, replacing factory's own
    folder there; checked again just before the swap, so a folder a user filled meanwhile is left as it is."""
    check_replaceable(target, kind, wh_root)
    if target.exists():
        # Marked before it moves aside: a kill after this point leaves an old copy the next sweep recognises.
        (target / LEFTOVER).write_bytes(b"")
        old = target.with_name(f".{target.name}.factory-old-{secrets.token_hex(4)}")
        os.rename(target, old)
        try:
            os.rename(built, target)
        except OSError:
            os.rename(old, target)
            raise
        _remove_leftover(old)  # what a failed removal leaves, the next command's sweep (`writing`) removes
    else:
        os.rename(built, target)
    with contextlib.suppress(FileNotFoundError):
        (target / LEFTOVER).unlink()


# ------------------------------------------------------------------------------------------------- files
def check_output_file(path: Path, option: str, ours: Callable[[Path], bool], wh_root: Path | None = None) -> None:
    """Refuse, with one line, an output file factory may not write: a link, a folder, a file whose content is
    not recognisably factory's (`ours`), or a path among a warehouse's own files."""
    check_folder(path.parent)
    if path.is_symlink():
        raise UserInputError(f"{option} {path}: is a symbolic link; factory does not write through links")
    if path.is_dir():
        raise UserInputError(f"{option} {path}: is a folder; name a file")
    check_not_in_warehouse(path, wh_root, option)
    if path.exists() and not ours(path):
        raise UserInputError(
            f"{option} {path}: a file that factory did not write; choose another path, or move it away yourself"
        )


def head(path: Path, size: int = 4096) -> bytes:
    """The first `size` bytes of a file (b"" when it cannot be read), to recognise factory's own files."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""
