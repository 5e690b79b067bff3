"""Stable content hashes: prompt ids, request keys and stage keys.

A key is the SHA-256 of a canonical JSON rendering, so it is the same across processes, machines and
Python versions (unlike `hash()`), and dict key order never matters.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import PurePath
from typing import Any


def _canonical_value(obj: Any) -> str:
    """The rendering of the only non-JSON values a key may hold: a path or a date/datetime, as `str()` renders
    it. Anything else (a set, a model object, an object whose `str()` holds its address) has no rendering that
    is the same in every process, so it is refused rather than hashed into a key that changes between runs."""
    if isinstance(obj, (PurePath, date)):  # datetime is a date
        return str(obj)
    raise TypeError(f"cannot compute a stable key of a {type(obj).__name__} object: {obj!r}")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_canonical_value)
"""The options `json.dumps` would be given, made once: a build renders millions of keys, and building an encoder
per call was a third of each rendering. `encode` starts every call afresh (its circular-reference check too)."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the one rendering that keys are computed from. Raises
    TypeError on a value that is not JSON, a path or a date."""
    return _ENCODER.encode(obj)


def canonical_object(rendered: dict[str, str]) -> str:
    """The canonical JSON of an object whose values are given already rendered by `canonical_json`: the same
    text as `canonical_json` of the object itself (keys sorted, no whitespace), so a part that several keys
    share (a judge prompt's messages) is rendered once."""
    return "{" + ",".join(f"{_ENCODER.encode(k)}:{v}" for k, v in sorted(rendered.items())) + "}"


def hash_text(text: str, length: int = 32) -> str:
    """Hex digest of an already canonical JSON text, truncated to `length` characters (`stable_hash`'s)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def stable_hash(obj: Any, length: int = 32) -> str:
    """Hex digest of `obj`'s canonical JSON, truncated to `length` characters (128 bits by default)."""
    return hashlib.sha256(_ENCODER.encode(obj).encode("utf-8")).hexdigest()[:length]
