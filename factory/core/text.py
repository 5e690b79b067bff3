"""Data as printable literal text: what every command prints of a warehouse, a file or an argument.

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
