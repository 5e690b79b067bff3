"""Loading a recipe: read, apply `--set` overrides, validate; any problem is one `UserInputError` naming file,
field and line (or the option). Only reads: nothing is written before the recipe is known to be good."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from factory.config.base import FieldError
from factory.config.errors import error_loc, error_text
from factory.config.overrides import apply_overrides, override_of
from factory.config.recipe import LoadedRecipe, Recipe
from factory.config.yaml_loader import YAML_KINDS, bad_value, load_yaml, yaml_line
from factory.core.errors import UserInputError
from factory.core.reading import read_input_text
from factory.core.text import clip_value, dotted


def _field_error(path: Path, node: yaml.Node | None, loc: tuple[Any, ...], message: str) -> UserInputError:
    """`FILE:LINE: field 'a.b': message`, the line found from the YAML nodes."""
    field = dotted(loc) or "(top level)"
    return UserInputError(f"{path}:{yaml_line(node, loc) or '?'}: field '{field}': {message}")


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> LoadedRecipe:
    """Read and validate a recipe file, with `overrides` (dotted `--set` keys) applied over it first; any problem
    raises `UserInputError` naming file, field and line, or the `--set` key that caused it.

    Only reads: nothing is written before the recipe (and, in the build, its prompt data) is known to be good.
    """
    path = Path(path)
    overrides = dict(overrides or {})
    text = read_input_text(path, "recipe file")
    node, data = load_yaml(text, path)
    if node is None:
        raise UserInputError(f"{path}: the recipe is empty; expected a mapping of recipe fields (name, models, ...)")
    if not isinstance(data, dict):
        kind = YAML_KINDS.get(type(data), "a number" if isinstance(data, (int, float)) else type(data).__name__)
        raise UserInputError(
            f"{path}:{node.start_mark.line + 1}: expected a mapping of recipe fields at the top level, got {kind}"
        )
    data = apply_overrides(data, overrides)

    def fail(loc: tuple[Any, ...], message: str) -> UserInputError:
        key = override_of(loc, overrides)
        if key is None:
            return _field_error(path, node, loc, message)
        return UserInputError(
            f"--set {dotted(tuple(key.split('.')))}: field '{dotted(loc) or '(top level)'}': {message}"
        )

    # Non-finite numbers pass most pydantic bounds (and NaN compares false to all), so they are refused here,
    # for every field at once, before validation can report them in its own words.
    bad = bad_value(data)
    if bad is not None:
        raise fail(*bad)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        loc, message = error_loc(errors[0]), error_text(errors[0])
        raise fail(loc, f"{message}{more}") from None
    # Strings such as 'inf' or '1e999' become non-finite floats only in validation: check the result too.
    bad = bad_value(recipe.model_dump())
    if bad is not None:
        raise fail(*bad)
    return LoadedRecipe(recipe=recipe, path=path.resolve(), text=text, overrides=overrides)


def with_eval_overrides(loaded: LoadedRecipe, **overrides: str | None) -> LoadedRecipe:
    """The recipe with its `eval` section's fields replaced from the command line (`factory eval --judge`);
    a recipe without that section, or an override the recipe rejects, is one clear error."""
    r = loaded.recipe
    if r.eval is None:
        raise UserInputError(f"{loaded.path}: no 'eval' section; add one naming the held-out prompts and the judge")
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return loaded
    data = r.model_dump()
    data["eval"].update(given)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = err.get("ctx", {}).get("error")
        message = str(cause) if isinstance(cause, FieldError) else error_text(err, echo=False)
        options = ", ".join(f"--{k} {clip_value(v)}" for k, v in given.items())
        raise UserInputError(f"{options}: {message}") from None
    return LoadedRecipe(recipe=recipe, path=loaded.path, text=loaded.text, overrides=loaded.overrides)
