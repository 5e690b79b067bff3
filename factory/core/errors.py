"""User-facing errors: the CLI prints their message on one line and exits with their code, no traceback."""

from __future__ import annotations

import contextlib

RUN_ATTRIBUTE = "factory_run_id"  # set by `mark_recorded` on an exception a runs row records


class FactoryError(Exception):
    """An error the user can fix; `exit_code` is what the CLI returns."""

    exit_code = 1


class UserInputError(FactoryError):
    """Bad input (recipe, data file, query): exit code 2, like click's own usage errors."""

    exit_code = 2


class MissingExtraError(FactoryError):
    """An optional dependency is not installed; the message names the extra to install."""

    exit_code = 2

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed; "
            f"install it with: pip install 'factory[{extra}]'"
        )


def mark_recorded(exc: BaseException, run_id: str) -> None:
    """Note on an exception that ended a run that the runs table records it (with status failed or
    interrupted): the CLI's message says so only then, since most commands (sql, ls, show) record no run."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, RUN_ATTRIBUTE, run_id)


def recorded_run(exc: BaseException) -> str | None:
    """The run that recorded this exception (`mark_recorded`), or None when no run did."""
    run_id = getattr(exc, RUN_ATTRIBUTE, None)
    return run_id if isinstance(run_id, str) else None
