"""`--set KEY=VALUE` overrides: applying dotted keys over a recipe's data, and which key set a field."""

from __future__ import annotations

import copy
from typing import Any

from factory.core.errors import UserInputError
from factory.core.text import dotted


def override_of(loc: tuple[Any, ...], overrides: dict[str, Any]) -> str | None:
    """The `--set` key that set the field at `loc` or a field inside it, if any."""
    parts = tuple(str(p) for p in loc)
    for key in overrides:
        segments = tuple(key.split("."))
        n = min(len(segments), len(parts))
        if n and segments[:n] == parts[:n]:
            return key
    return None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe's data with each dotted `--set` key set to its value (`judgments.template`, `references.0.name`):
    missing mappings on the way are created, a list is indexed by number. The file's data is not changed."""
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        segments = key.split(".")
        if not all(segments):
            raise UserInputError(f"--set {dotted(tuple(segments))}: expected a dotted key such as judgments.template")
        node: Any = out
        for i, part in enumerate(segments):
            last = i == len(segments) - 1
            slot: str | int
            if isinstance(node, dict):
                slot = part
                if not last and node.get(part) is None:  # absent or null: a section the override starts
                    node[part] = {}
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                slot = int(part)
            else:
                kind = "a list (give an index below its length)" if isinstance(node, list) else "not a mapping"
                parent = ".".join(segments[:i]) or "(top level)"
                where = ".".join(segments[: i + 1])
                raise UserInputError(
                    f"--set {dotted(tuple(segments))}: '{parent}' is {kind}, so '{where}' cannot be set"
                )
            if last:
                node[slot] = value
            else:
                node = node[slot]
    return out
