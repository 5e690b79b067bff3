"""What a labeler is: one way to turn a policy's samples into scores, declared as data (`Labeler`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from factory.config.vocabulary import Role
from factory.pipeline.stage import Context, Stage

if TYPE_CHECKING:
    from factory.config.recipe import Recipe


@dataclass(frozen=True)
class Labeler:
    """One way to score samples, declared as data."""

    name: str
    """The recipe section, and the `labeler` value of its rows in `scores`."""
    summary: str
    """One line for `--help` and docs."""
    model_field: str | None
    """The field of its section that names a model (None: it calls no model)."""
    role: Role | None
    """What that model must be able to do."""
    stages: Callable[[], list[Stage]]
    """The stages it adds after `samples`; the last one writes `scores`."""
    provenance: Callable[[Recipe], dict[str, str | None]]
    """The export's `judge`, `protocol` and `reference_name` columns."""
    card_line: Callable[[Recipe], str]
    """How the dataset card names it."""
    card_facts: Callable[[Context], tuple[list[tuple[str, int]], list[str]]] = lambda ctx: ([], [])
    """Extra rows for the card's counts table, and lines for its scores section."""
