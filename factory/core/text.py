"""Data as printable literal text: what every command prints of a warehouse, a file or an argument, and
messages made fit for one line of an error (`clip_value`, `message_line`, `dotted`, `first_line`).

Text that comes from data (a prompt, a judge's name, a file name, a value quoted in an error) must reach the
terminal as itself: rich markup in it is shown, not obeyed (`[bold red]` stays those ten characters), and
control characters are replaced by U+FFFD, so data cannot move the cursor, clear the screen, set the window
title or write the clipboard (OSC 52). Tab and newline are kept. This module imports only the standard library
at load time (rich when `text` is called), so `import factory.cli.main` stays light.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.text import Text

# C0 controls except tab and newline, DEL, and C1 controls (U+009B is a one-character CSI, U+009D an OSC).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
VISIBLE = "\ufffd"
# What JSON text may still carry raw: json.dumps escapes C0 controls but not DEL or C1 ones.
_JSON_RAW_CONTROL = re.compile(r"[\x7f-\x9f]")
ECHO_LIMIT = 80
"""Input echoed in an error message is cut to about this many characters: a bad value can be megabytes long."""
MESSAGE_LIMIT = 300
"""A message built elsewhere (pydantic, a validator, a library) is cut to about this many characters."""
_QUOTED = re.compile(r"'([^']*)'")


def clean(value: Any) -> str:
    """Data as printable text: None is empty, control characters become �."""
    return "" if value is None else CONTROL.sub(VISIBLE, str(value))


def one_line(value: Any, limit: int | None = None) -> str:
    """Data as one printable line (whitespace runs folded), cut to `limit` characters with an ellipsis."""
    line = " ".join(clean(value).split())
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def text(value: Any, style: str = "") -> Text:
    """Data as a rich Text: rich prints it literally (no markup, no :emoji: codes), controls made visible."""
    from rich.text import Text

    return Text(clean(value), style=style)


def json_escape_controls(line: str) -> str:
    """JSON text with DEL and C1 controls written as \\u escapes (still the same JSON value)."""
    return _JSON_RAW_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


# ------------------------------------------------------------------------------------------ error messages


def clip_value(value: Any, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters with an ellipsis and the full size.

    repr keeps the echo on one line (newlines come out escaped): `'aaaa…' (300000 characters)`.
    """
    shown = repr(value)
    if len(shown) <= limit:
        return shown
    if isinstance(value, str):
        return f"{shown[: limit - 1]}…{shown[0]} ({len(value)} characters)"
    if isinstance(value, (list, tuple, dict, set)):
        return f"{shown[:limit]}… ({len(value)} items)"
    return f"{shown[:limit]}… ({len(shown)} characters)"


def message_line(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message we did not build (pydantic, a model validator, a library's exception) made fit to print as one
    short line: long quoted values clipped like `clip_value`, newlines escaped, the whole cut to about `limit`."""
    if len(message) > limit:
        message = _QUOTED.sub(lambda m: clip_value(m.group(1)) if len(m.group(1)) > ECHO_LIMIT else m.group(0), message)
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    if len(message) > limit:
        message = f"{message[:limit]}… ({len(message)} characters)"
    return message


def dotted(loc: tuple[Any, ...]) -> str:
    """A field path such as `samples.params.temperature`, each part cut to `ECHO_LIMIT` (keys can be huge too)."""
    parts = [message_line(str(p)) for p in loc]
    return ".".join(p if len(p) <= ECHO_LIMIT else f"{p[: ECHO_LIMIT - 1]}…" for p in parts)


def first_line(exc: BaseException) -> str:
    """An exception's message as its first non-blank line (a library's message may span lines), or its type's
    name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
