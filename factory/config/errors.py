"""Pydantic validation errors as one-line messages: the one formatter of the recipe loader, `factory train`'s
settings, judge-eval's model and template files, and `--judge` / `--set` options."""

from __future__ import annotations

import math
from typing import Any

from pydantic_core import ErrorDetails

from factory.config.base import FieldError
from factory.core.text import clip_value, message_line

FORM_TAG = "form-"
"""How the tags of a field that takes one of several forms start (`samples` as a mapping or a list): pydantic
puts the tag in an error's location, and a message names the field as the user wrote it, without it."""

NUMERIC_ERRORS = ("float", "int", "greater", "less", "finite", "multiple")
"""Error types whose failed check is a number's: a non-finite input is named as the cause instead."""


def error_loc(err: ErrorDetails) -> tuple[str | int, ...]:
    """The error's field location, without pydantic's validator names, and with the path a `FieldError` adds."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", FORM_TAG))))
    cause = err.get("ctx", {}).get("error")
    return loc + cause.loc if isinstance(cause, FieldError) else loc


def error_field(err: ErrorDetails) -> str:
    """The error's location as written in messages: `a.b.0`, or `(top level)`."""
    return ".".join(str(p) for p in err["loc"]) or "(top level)"


def _non_finite_text(value: Any) -> bool:
    """Whether `value` is a string that pydantic reads as a non-finite float ('inf', 'NaN', '1e999', ...)."""
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        return not math.isfinite(float(value))
    except ValueError:
        return False


def error_text(
    err: ErrorDetails,
    *,
    unknown: str | None = "unknown key",
    missing: str | None = "required field is missing",
    keep_prefix: bool = False,
    echo: bool = True,
    echo_value_errors: bool = False,
    name_non_finite: bool = True,
) -> str:
    """The message for one pydantic error, fit for one short line (values in it may be huge or hold newlines).

    `unknown` and `missing` replace pydantic's words for an unknown key and a missing field (None keeps them);
    `keep_prefix` keeps pydantic's `Value error, `; `echo` appends `; got VALUE` for a value of the wrong type
    or out of bounds (a validator's own error only with `echo_value_errors`). With `name_non_finite`, a number
    check failed by a non-finite string (`top_p: nan`: a bound fails, but NaN is the cause) names that cause.
    """
    kind = err["type"]
    if kind == "extra_forbidden" and unknown is not None:
        return unknown
    if kind == "missing" and missing is not None:
        return missing
    message = str(err["msg"])
    message = message_line(message if keep_prefix else message.removeprefix("Value error, "))
    if not echo:
        return message
    if name_non_finite and kind.startswith(NUMERIC_ERRORS) and _non_finite_text(err.get("input")):
        return f"expected a finite number, got {clip_value(err['input'])}"
    quiet = ("missing", "extra_forbidden") if echo_value_errors else ("missing", "extra_forbidden", "value_error")
    if kind not in quiet and "input" in err:
        message += f"; got {clip_value(err['input'])}"
    return message
