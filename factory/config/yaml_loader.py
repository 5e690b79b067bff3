"""The hardened YAML loader of recipes and other YAML/JSON inputs: one-line errors with the line, no duplicate
keys, no non-finite numbers or alias bombs, and the line of any field for error messages."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from factory.core.errors import UserInputError
from factory.core.reading import read_input_text
from factory.core.text import clip_value, dotted, message_line

MAX_EXPANDED_VALUES = 2_000_000
"""YAML aliases may repeat a mapping many times over (a "billion laughs" file); beyond this it is an error."""
YAML_KINDS = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
"""How an error names the kind of a value that should have been a mapping."""


class _RecipeLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, except that an integer too long for Python and an impossible date are YAML
    errors with a line (the safe loader lets their ValueError escape, which would be a traceback)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            size = len(node.value)
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {size} characters is too long", node.start_mark
            ) from None

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"not a valid date {clip_value(node.value)}: {exc}", node.start_mark
            ) from None


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)
_RecipeLoader.add_constructor("tag:yaml.org,2002:timestamp", _RecipeLoader.construct_yaml_timestamp)


def _key_of(key_node: yaml.Node, constructor: yaml.constructor.SafeConstructor) -> Any:
    """A mapping key as `safe_load` would build it (so `1` and `0x1` are the same key); complex keys never match."""
    if isinstance(key_node, yaml.ScalarNode):
        try:
            key = constructor.construct_object(key_node, deep=True)
            hash(key)
            return key
        except (yaml.YAMLError, ValueError, TypeError):
            return (key_node.tag, key_node.value)
    return (key_node.tag, id(key_node))


def _duplicate_key(root: yaml.Node) -> tuple[tuple[Any, ...], yaml.Node, yaml.Node] | None:
    """The first repeated key in the document (by the line of its repeat): its path, first and second key node.

    Checked on the composed tree rather than while constructing: a merge (`<<: *base`) may override merged keys
    on purpose, and the constructor sees merged and own keys mixed together.
    """
    found: list[tuple[tuple[Any, ...], yaml.Node, yaml.Node]] = []
    constructor = yaml.constructor.SafeConstructor()
    visited: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in visited:  # an alias: its anchor was checked already
            continue
        visited.add(id(node))
        children: list[tuple[yaml.Node, tuple[Any, ...]]] = []
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    children.append((value_node, loc))
                    continue
                key = _key_of(key_node, constructor)
                if key in first:
                    found.append(((*loc, key), first[key], key_node))
                else:
                    first[key] = key_node
                children.append((value_node, (*loc, key)))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, (*loc, i)) for i, item in enumerate(node.value)]
        stack.extend(reversed(children))
    return min(found, key=lambda f: f[2].start_mark.index, default=None)


def bad_value(data: Any) -> tuple[tuple[Any, ...], str] | None:
    """The first value (in document order) a recipe may not hold, with the reason: a non-finite number, an alias
    that contains itself, or aliases that expand to too many values. One walk, linear in the YAML's size."""
    sizes: dict[int, int] = {}  # id of a finished container -> values it expands to
    open_: set[int] = set()  # containers being walked: meeting one again is a cycle
    stack: list[tuple[tuple[Any, ...], Any, bool]] = [((), data, False)]
    while stack:
        loc, value, leaving = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                return loc, f"expected a finite number, got {value}"
            continue
        if not isinstance(value, (dict, list, tuple)):
            continue
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        if leaving:
            open_.discard(id(value))
            sizes[id(value)] = 1 + sum(sizes.get(id(v), 1) for _, v in items)
            if sizes[id(value)] > MAX_EXPANDED_VALUES:
                return loc, f"YAML aliases expand this to more than {MAX_EXPANDED_VALUES} values"
            continue
        if id(value) in open_:
            return loc, "a YAML alias that contains itself"
        if id(value) in sizes:  # an alias of a container already walked
            continue
        open_.add(id(value))
        stack.append((loc, value, True))
        stack.extend(reversed([((*loc, k), v, False) for k, v in items]))
    return None


def load_yaml(text: str, path: Path) -> tuple[yaml.Node | None, Any]:
    """The composed node tree (for line numbers) and the data of a recipe's YAML; problems raise UserInputError."""
    loader = None
    try:
        loader = _RecipeLoader(text)  # checks every character at once: a ReaderError may come from here
        node = loader.get_single_node()
        duplicate = _duplicate_key(node) if node is not None else None
        if duplicate is not None:
            loc, first, second = duplicate
            raise UserInputError(
                f"{path}:{second.start_mark.line + 1}: field '{dotted(loc)}': duplicate key {clip_value(loc[-1])} "
                f"(first on line {first.start_mark.line + 1})"
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character  # a code point, for text
        raise UserInputError(f"{path}:{line}: not valid YAML: character {char!r} is not allowed in YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.line + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserInputError(f"{path}:{where} not valid YAML: {message_line(problem)}") from None
    except RecursionError:
        raise UserInputError(f"{path}: not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return node, data


def read_yaml(path: Path, what: str = "file") -> Any:
    """The data of a YAML or JSON input file other than a recipe (judge specs, templates), read with the same
    rules: UTF-8, no duplicate keys, one-line errors naming the file."""
    _, data = load_yaml(read_input_text(path, what), path)
    return data


def yaml_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (or of its nearest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if getattr(k, "value", None) == str(part)]
            if not match:
                return line
            key, node = match[0]
            line = key.start_mark.line + 1  # the key's line: a block value starts on the line after it
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
