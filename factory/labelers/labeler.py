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
    shard_counts: Callable[[Context, int], dict[str, int]] = lambda ctx, i: {}
    """What the card counts of one shard of the build, read from that shard's rows; summed over the shards."""
    card_facts: Callable[[dict[str, int]], tuple[list[tuple[str, int]], list[str]]] = lambda counts: ([], [])
    """From the summed counts: extra rows for the card's counts table, and lines for its scores section."""
