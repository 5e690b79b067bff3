"""judge-eval's report folder: the marker that makes it factory's, the adoption of an earlier release's
folder, and the files written into it as one folder renamed into place (docs/RELIABILITY.md)."""

from __future__ import annotations

from pathlib import Path

from factory.core.owned import FolderKind, building_beside, replace_folder, seal, writing

REPORT_FOLDER_MARKER = ".factory-judge-eval.json"


def report_folder_kind() -> FolderKind:
    """judge-eval's report folder as factory recognises it (its marker lists the files it wrote)."""
    return FolderKind("judge-eval report folder", REPORT_FOLDER_MARKER, "--out")


LEGACY_REPORT_FILES = frozenset(
    f"{name}.{ext}" for name in ("table1", "metrics", "agreement", "bias") for ext in ("csv", "md")
)


def adopt_legacy_report_folder(folder: Path) -> None:
    """Mark the default report folder of a release that wrote no marker as factory's, when it holds nothing but
    the files judge-eval writes: it lies inside the warehouse and factory wrote it, so it stays replaceable."""
    if folder.is_symlink() or not folder.is_dir() or (folder / REPORT_FOLDER_MARKER).exists():
        return
    entries = list(folder.iterdir())
    if entries and all(p.is_file() and not p.is_symlink() and p.name in LEGACY_REPORT_FILES for p in entries):
        seal(folder, report_folder_kind(), {"files_written_by": "factory judge-eval (an earlier release)"})


def write_files(folder: Path, files: dict[str, str], wh_root: Path) -> list[Path]:
    """Write the report files (CSV, Markdown) as one folder, built beside `folder` and renamed into place; an
    existing folder is replaced only when an earlier judge-eval wrote it (docs/RELIABILITY.md)."""
    kind = report_folder_kind()
    with writing(folder, kind.what), building_beside(folder) as built:
        for name, text in files.items():
            (built / name).write_text(text, encoding="utf-8")
        seal(built, kind, {"files_written_by": "factory judge-eval"})
        replace_folder(built, folder, kind, wh_root)
    return [folder / name for name in files]
