"""How `factory show` writes data to the terminal: headings, indented paragraphs wrapped at words, and turns
written verbatim, every text from the data with its control characters made visible.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.text import Text

from factory.core.text import clean


def heading(console: Console, text: str) -> None:
    console.print(Text(text, style="bold cyan"))


def paragraph(console: Console, text: Any, style: str = "") -> None:
    """A text from the data, indented, wrapped at words."""
    console.print(Padding(Text(clean(text), style=style), (0, 0, 0, 4)))


def verbatim(console: Console, value: str) -> None:
    """A turn's text written as is, with only control characters made visible (`clean`): no markup, wrapping or
    tab expansion, so the prompt on screen is the prompt that was sent, character for character."""
    console.file.write(clean(value) + "\n")
    console.file.flush()
