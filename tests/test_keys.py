"""`stable_hash` renders only JSON, paths and dates; anything else is refused, never hashed by its `str()`."""

from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path, PurePosixPath

import pytest

from factory.core.keys import canonical_json, stable_hash


@pytest.mark.parametrize(
    "value",
    [
        Path("/data/prompts.jsonl"),
        PurePosixPath("relative/file.txt"),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        datetime(2026, 1, 2, 3, 4, 5, 678),
        date(2026, 1, 2),
    ],
)
def test_paths_and_dates_hash_as_their_str(value: object) -> None:
    # The rendering `default=str` gave them before: keys made before the change stay the same.
    assert stable_hash({"v": value, "n": [1, 2.5, None, True]}) == stable_hash(
        {"v": str(value), "n": [1, 2.5, None, True]}
    )


@pytest.mark.parametrize("value", [{1, 2}, frozenset({"a"}), object(), b"bytes", 1 + 2j])
def test_other_objects_are_refused_naming_their_type(value: object) -> None:
    with pytest.raises(TypeError, match=f"cannot compute a stable key of a {type(value).__name__} object"):
        stable_hash({"nested": [value]})


def test_key_order_does_not_matter() -> None:
    assert canonical_json({"b": 1, "a": {"d": 2, "c": 3}}) == '{"a":{"c":3,"d":2},"b":1}'
    assert stable_hash({"b": 1, "a": 2}) == stable_hash({"a": 2, "b": 1})
