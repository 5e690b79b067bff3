"""The files of one publication as staged in a folder, and what its row says about them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

README = "README.md"


@dataclass
class Staged:
    """The files of one publication, written under `folder`, and what its row says about them."""

    folder: Path
    shards: dict[str, list[str]]  # split -> repo paths of its shards
    rows: dict[str, int]  # split -> rows published
    left_out: list[str]  # empty splits, not published
    export_hash: str
    recipe: str
    recipe_hash: str
    export_key: str

    @property
    def files(self) -> list[str]:
        """Every repo path of the commit: the shards, then the card."""
        return [path for paths in self.shards.values() for path in paths] + [README]
