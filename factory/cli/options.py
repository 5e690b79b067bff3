"""What every `factory` command shares: the --warehouse option and one-line errors instead of tracebacks."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from factory.core.errors import FactoryError, recorded_run
from factory.core.redact import redact
from factory.core.text import one_line

WAREHOUSE_OPTION = click.option(
    "--warehouse",
    "-w",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("warehouse"),
    show_default=True,
    help="Warehouse root folder (Parquet tables + factory.duckdb).",
)

# Sizes as DuckDB writes them: KB, MB, GB, TB are powers of 1000, KiB, MiB, GiB, TiB powers of 1024.
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", re.I)
_UNITS = {"B": 1, **{f"{p}B": 1000 ** (i + 1) for i, p in enumerate("KMGT")}}
_UNITS |= {f"{p}IB": 1024 ** (i + 1) for i, p in enumerate("KMGT")}


class MemorySize(click.ParamType):
    """A memory size such as 500MB or 4GiB, as (bytes, the text given)."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, str]:
        if isinstance(value, tuple):
            return value
        match = _SIZE.fullmatch(str(value))
        if match is None:
            self.fail(f"{value!r} is not a size such as 500MB, 2GB or 4GiB", param, ctx)
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
        if size <= 0:
            self.fail(f"{value!r} is no memory at all", param, ctx)
        return size, str(value).strip()


MEMORY_SIZE = MemorySize()


def _one_line(text: str, limit: int = 600) -> str:
    """A message as one short line: secrets redacted, newlines folded, control characters made visible (a
    message may quote data: a value, a file name), length capped."""
    return one_line(redact(text, max_chars=None), limit)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print errors as one line on stderr and exit non-zero: users get no tracebacks.

    A FactoryError is the user's to fix and carries its exit code. Anything else is a failure inside
    factory or a backend (exit 1): it is still one line, and FACTORY_DEBUG=1 shows the traceback. Only an
    exception a runs row recorded (`factory.core.errors.mark_recorded`) is said to be recorded or resumable.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FactoryError as exc:
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            if recorded_run(exc):
                click.echo("interrupted: finished calls are saved; run the same command again to resume", err=True)
            else:  # nothing ran that could resume; the exception may say what stopped (a query)
                click.echo("interrupted" + (f": {_one_line(str(exc))}" if str(exc) else ""), err=True)
            sys.exit(130)
        except Exception as exc:
            if os.environ.get("FACTORY_DEBUG"):
                raise
            run_id = recorded_run(exc)
            recorded = f"run {run_id} is recorded as failed; " if run_id else ""
            click.echo(
                f"error: {_one_line(f'{type(exc).__name__}: {exc}')} (an internal or backend failure; {recorded}"
                "FACTORY_DEBUG=1 shows the traceback)",
                err=True,
            )
            sys.exit(1)

    return wrapper
