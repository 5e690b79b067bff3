"""Where judge-eval's labelled sets and references come from on the command line: `NAME=PATH` values, `--data`
values naming a file, folder, Hub set or preset, and the default name of a set read from a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from factory.inputs.presets import PRESETS

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class NamedPath:
    """`NAME=PATH` or a bare `PATH` from the command line (the name then comes from the path)."""

    name: str | None
    path: str


def split_named(value: str) -> NamedPath:
    """Split `NAME=PATH`; a bare path (or one that exists as written, '=' and all) has no name."""
    if "=" in value and not Path(value).exists():
        name, _, path = value.partition("=")
        if NAME_RE.match(name) and path:
            return NamedPath(name, path)
    return NamedPath(None, value)


@dataclass(frozen=True)
class DataSource:
    """One `--data` value: a file, folder or Hub name in LLMBar format, or a preset (from the Hub when `path`
    is None, else a local file in the preset's Hub layout)."""

    name: str | None
    path: str | None
    preset: str | None = None


def data_source(value: str) -> DataSource:
    """Read a `--data` value: `PRESET` (when no such file exists), `PRESET=FILE`, `NAME=PATH` or `PATH`."""
    named = split_named(value)
    if named.name is None and named.path in PRESETS and not Path(named.path).expanduser().exists():
        return DataSource(named.path, None, named.path)
    if named.name in PRESETS:
        return DataSource(named.name, named.path, named.name)
    return DataSource(named.name, named.path)


def default_name(path: str) -> str:
    stem = Path(path.rstrip("/")).name
    for suffix in (".jsonl", ".json", ".parquet"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem) or "data"
