"""Python shipped with a model runs only when the recipe opts in (`trust_remote_code` on its model entry).

A model folder or Hub repo whose `config.json` has an `auto_map` brings its own modeling code; transformers and
vLLM import it when asked to trust remote code. factory passes the model entry's `trust_remote_code` (default
false) to every loader, so a model that needs its code fails to load unless the recipe says so, and this module
turns the loader's refusal into one line naming the option. Light: no heavy imports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from factory.core.errors import UserInputError

RECIPE_OPT_IN = "set trust_remote_code: true on the model entry in the recipe (it runs Python shipped with the model)"
TRAIN_OPT_IN = "set trust_remote_code: true in the training settings (it runs Python shipped with the model)"


def asks_for_remote_code(exc: BaseException) -> bool:
    """Whether a loader's error is its refusal to run a model's own code (transformers and vLLM name the flag)."""
    text = str(exc)
    return "trust_remote_code" in text or "trust-remote-code" in text


@contextlib.contextmanager
def remote_code_refused(model: str, trusted: bool, opt_in: str = RECIPE_OPT_IN) -> Iterator[None]:
    """Load a model inside this block: a refusal to run its code becomes one `UserInputError` naming the
    option. With the option set, the loader's own error (whatever it is) passes through unchanged."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as exc:
        if trusted or not asks_for_remote_code(exc):
            raise
        raise UserInputError(f"model '{model}' loads only with the code it ships: {opt_in}") from None
