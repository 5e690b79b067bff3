"""Labelers: what turns a policy's samples into scores, and every fact about each one.

A labeler is a recipe section (`judgments`, `rewards`, `similarity`) that adds stages ending in a `scores`
table, names the model it calls and the role that model must play, and says how the export's provenance
columns, the dataset card and the dry-run plan describe it (`factory.labelers.labeler.Labeler`). Each one is
declared in its own file; the build, the export and the CLI read them from `LABELERS`. The recipe schema,
a layer below, checks the same sections from `factory/config/vocabulary.py` (tests/test_vocabulary.py holds
the two equal). Adding a labeler adds its file, an entry here and in the vocabulary, and its tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from factory.labelers.judge import JUDGE
from factory.labelers.labeler import Labeler
from factory.labelers.reward import REWARD
from factory.labelers.similarity import SIMILARITY

if TYPE_CHECKING:
    from factory.config.recipe import Recipe

LABELERS: dict[str, Labeler] = {labeler.name: labeler for labeler in (JUDGE, REWARD, SIMILARITY)}


def labeler_of(recipe: Recipe) -> Labeler | None:
    """The recipe's labeler, if it has samples to label."""
    return LABELERS[recipe.labeler] if recipe.labeler else None
