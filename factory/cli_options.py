"""What every `factory` command shares: the --warehouse option and one-line errors instead of tracebacks."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from factory.errors import FactoryError
from factory.redact import redact

WAREHOUSE_OPTION = click.option(
    "--warehouse",
    "-w",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("warehouse"),
    show_default=True,
    help="Warehouse root folder (Parquet tables + factory.duckdb).",
)


def _one_line(text: str, limit: int = 600) -> str:
    """A message as one short line: secrets redacted, newlines folded, length capped."""
    line = " ".join((redact(text, max_chars=None) or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print errors as one line on stderr and exit non-zero: users get no tracebacks.

    A FactoryError is the user's to fix and carries its exit code. Anything else is a failure inside
    factory or a backend (exit 1): it is still one line, and FACTORY_DEBUG=1 shows the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FactoryError as exc:
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: finished calls are saved; run the same command again to resume", err=True)
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("FACTORY_DEBUG"):
                raise
            click.echo(
                f"error: {_one_line(f'{type(exc).__name__}: {exc}')} (an internal or backend failure; the run is "
                "recorded as failed; FACTORY_DEBUG=1 shows the traceback)",
                err=True,
            )
            sys.exit(1)

    return wrapper
