"""What every `factory` command shares: the --warehouse option and one-line errors instead of tracebacks."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from factory.errors import FactoryError

WAREHOUSE_OPTION = click.option(
    "--warehouse",
    "-w",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("warehouse"),
    show_default=True,
    help="Warehouse root folder (Parquet tables + factory.duckdb).",
)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a FactoryError as one line on stderr and exit with its code: users get no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FactoryError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: finished calls are saved; run the same command again to resume", err=True)
            sys.exit(130)

    return wrapper
