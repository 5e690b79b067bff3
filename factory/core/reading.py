"""Reading an input file (a recipe, prompts, a template, a labelled set): every problem is one line naming the file.

Only reads: a bad input is reported before anything is written anywhere.
"""

from __future__ import annotations

import stat
from pathlib import Path

from factory.core.errors import UserInputError
from factory.core.text import MESSAGE_LIMIT, clip_value


def shown_path(path: Path | str) -> str:
    """A path for an error message: whole (users need to find the file) unless absurdly long, then clipped."""
    text = str(path)
    return text if len(text) <= 4 * MESSAGE_LIMIT else clip_value(text)


def read_input_bytes(path: Path, what: str = "file") -> bytes:
    """The bytes of an input file (read only); missing, a folder, unreadable or not a regular file raise a
    one-line UserInputError naming the file."""
    shown = shown_path(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UserInputError(f"{shown}: is a folder; expected a {what}")
        if not stat.S_ISREG(mode):  # a FIFO or a device could block forever or never end
            raise UserInputError(f"{shown}: not a regular file; expected a {what}")
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise UserInputError(f"{shown}: {what} not found") from None
    except PermissionError:
        raise UserInputError(f"{shown}: cannot read the {what}: permission denied") from None
    except OSError as exc:
        raise UserInputError(f"{shown}: cannot read the {what}: {exc.strerror or type(exc).__name__}") from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        raise UserInputError(f"{shown}: not a usable file name ({exc})") from None


def decode_utf8(data: bytes, path: Path) -> str:
    """`data` decoded as UTF-8 (a leading byte-order mark dropped); other bytes raise a one-line UserInputError
    with the line and byte offset of the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserInputError(
            f"{shown_path(path)}:{line}: not valid UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # some Windows editors start UTF-8 files with a BOM: not content


def read_input_text(path: Path, what: str = "file") -> str:
    """The text of a UTF-8 input file; any problem raises a one-line UserInputError naming the file."""
    return decode_utf8(read_input_bytes(path, what), path)
