"""Stable content hashes: prompt ids, request keys and stage keys.

A key is the SHA-256 of a canonical JSON rendering, so it is the same across processes, machines and
Python versions (unlike `hash()`), and dict key order never matters.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from json.encoder import encode_basestring
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


_STRING = encode_basestring
"""How the encoder writes a string with ensure_ascii off (the C function where Python has it)."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the one rendering that keys are computed from. Raises
    TypeError on a value that is not JSON, a path or a date."""
    return _ENCODER.encode(obj)


def canonical_messages(messages: Any) -> str:
    """`canonical_json(messages)`, faster for the usual chat messages (dicts of a string `role` and a string
    `content`, nothing else): each string is escaped by the encoder's own string function and set into the
    text the encoder writes around them (keys sorted: content, role). Anything else goes to `canonical_json`."""
    parts = []
    for m in messages if type(messages) is list else ():
        if type(m) is not dict or len(m) != 2 or type(m.get("content")) is not str or type(m.get("role")) is not str:
            return _ENCODER.encode(messages)
        parts.append(f'{{"content":{_STRING(m["content"])},"role":{_STRING(m["role"])}}}')
    if type(messages) is not list:
        return _ENCODER.encode(messages)
    return "[" + ",".join(parts) + "]"


def json_string_body(text: str) -> str:
    """`text` as canonical JSON writes it, without its quotes. JSON escapes each character on its own, so the
    bodies of several texts, joined, are the body of their join: a text made of recurring pieces (a judge
    prompt's template and values) is escaped piece by piece, each piece once."""
    return _STRING(text)[1:-1]


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
