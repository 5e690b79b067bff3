"""Stable content hashes: prompt ids, request keys and stage keys.

A key is the SHA-256 of a canonical JSON rendering, so it is the same across processes, machines and
Python versions (unlike `hash()`), and dict key order never matters.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the one rendering that keys are computed from."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stable_hash(obj: Any, length: int = 32) -> str:
    """Hex digest of `obj`'s canonical JSON, truncated to `length` characters (128 bits by default)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]
