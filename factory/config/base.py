"""The base of every recipe model (`Strict`), the cross-field error its validators raise, and `SAFE_NAME`."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

SAFE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"
"""A name that is also a safe path component: no `/`, not `.` or `..`, not hidden."""


def _number_kinds(annotation: Any) -> set[type]:
    """The number types a field annotation allows (int, float), with bool when it allows booleans too."""
    args = typing.get_args(annotation) or (annotation,)
    found: set[type] = set()
    for a in args:
        if a in (int, float, bool):
            found.add(a)
        elif typing.get_args(a):
            found |= _number_kinds(a) & {bool}
    return found if found & {int, float} else set()


class FieldError(ValueError):
    """A cross-field problem, with the path of the field at fault relative to the model that raised it.

    `load_recipe` appends `loc` to the error's location, so the message names the field and its YAML line.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class Strict(BaseModel):
    """Base for every recipe model: unknown keys are errors, docstrings become field descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`temperature: true` is a typo, not 1.0: pydantic's lax mode would take a boolean as a number."""
        if isinstance(value, bool) and info.field_name is not None:
            kinds = _number_kinds(cls.model_fields[info.field_name].annotation)
            if kinds and bool not in kinds:
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value
