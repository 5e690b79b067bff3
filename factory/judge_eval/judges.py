"""judge-eval's `--judge` values: `BACKEND[:MODEL]` strings or YAML/JSON model spec files, checked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from factory.config.errors import error_field, error_text
from factory.config.models import ModelSpec
from factory.config.yaml_loader import read_yaml
from factory.core.errors import UserInputError
from factory.core.text import clip_value
from factory.models.registry import BACKENDS, backends_for


def parse_judges(values: list[str], **overrides: Any) -> dict[str, ModelSpec]:
    """Judges from `BACKEND[:MODEL]` strings or YAML/JSON model files, by name.

    A file holds one model spec (named after the file) or a mapping of names to specs, as a recipe's
    `models`. `overrides` (batch_size, threads, ...; None = unset) apply to judges given as strings.
    """
    judges: dict[str, ModelSpec] = {}
    origin: dict[str, str] = {}
    extra = {k: v for k, v in overrides.items() if v is not None}
    for value in values:
        path = Path(value).expanduser()
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            data = read_yaml(path, "judge spec file")
            if not isinstance(data, dict) or not data:
                raise UserInputError(f"{path}: expected a model spec or a mapping of names to model specs")
            # A mapping of names holds mappings; anything else is one spec (so a typo in a key is named).
            single = not all(isinstance(v, dict) for v in data.values())
            entries = {path.stem: data} if single else data
            for name, spec in entries.items():
                origin[str(name)] = str(path)
                try:
                    judges[str(name)] = ModelSpec.model_validate(spec)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    message = error_text(err, unknown=None, missing=None, keep_prefix=True, echo=False)
                    raise UserInputError(
                        f"{path}: judge {clip_value(name)}: field '{error_field(err)}': {message}"
                    ) from None
            continue
        backend, _, model = value.partition(":")
        if backend not in BACKENDS:
            raise UserInputError(
                f"--judge {clip_value(value)}: expected BACKEND[:MODEL] with a backend in {list(BACKENDS)}, "
                "or a YAML/JSON model spec file"
            )
        fields: dict[str, Any] = {"backend": backend, **extra}
        if model:
            fields["model"] = model
        try:
            judges[value] = ModelSpec.model_validate(fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = f"field '{error_field(err)}': " if err["loc"] else ""
            raise UserInputError(
                f"--judge {clip_value(value)}: {where}{error_text(err, unknown=None, missing=None, echo=False)} "
                "(give such a judge as a YAML/JSON model spec file)"
            ) from None
    if not judges:
        raise UserInputError("give at least one --judge")
    for name, spec in judges.items():
        where = f"{origin[name]}: judge {clip_value(name)}" if name in origin else f"--judge {clip_value(name)}"
        if "judge" not in BACKENDS[spec.backend].roles:
            raise UserInputError(
                f"{where}: backend '{spec.backend}' cannot judge; backends that can: {backends_for('judge')}"
            )
        if spec.api_key_env and not os.environ.get(spec.api_key_env):
            raise UserInputError(f"{where}: the environment variable {spec.api_key_env} (api_key_env) is not set")
    return judges
