"""User-facing errors: the CLI prints their message on one line and exits with their code, no traceback."""

from __future__ import annotations


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
