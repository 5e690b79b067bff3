"""Secrets out of any text before it is stored, logged or printed.

An error body, an exception's text or a log line can carry a credential: a server that echoes the request's
`Authorization` header in its 500 page, a URL with `?api_key=...`, a token pasted into a prompt. `redact`
removes two kinds of secret:

- the current values of secret environment variables: HF_TOKEN, HUGGING_FACE_HUB_TOKEN, OPENAI_API_KEY and
  every name given to `register_secret_env` (the openai backend registers its recipe's `api_key_env`);
  values shorter than `MIN_SECRET_CHARS` are left alone, since replacing `1` or `dev` everywhere would
  mangle ordinary text and such a value protects nothing anyway;
- what looks like a credential whatever its origin: `Bearer <token>`, `sk-...` keys, `hf_...` tokens and
  `api_key=...` / `"api_key": "..."` style values.

Each secret becomes `[redacted]`. The result is also capped at `MAX_CHARS` characters by default, so an HTML
error page cannot fill a calls table. The functions only read the environment and a module-level set of
names; they hold no other state and do no I/O.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable

REDACTED = "[redacted]"
"""What a secret is replaced with."""

MAX_CHARS = 2000
"""Default cap on a redacted text's length: enough for any useful error message, not for a whole web page."""

MIN_SECRET_CHARS = 8
"""Environment values shorter than this are not treated as secrets (see the module docstring)."""

DEFAULT_SECRET_ENVS = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY"})
"""Variables that hold credentials whether or not anything registered them."""

_registered: set[str] = set()
_registered_lock = threading.Lock()  # backends are constructed from worker threads too

# Characters a bearer token is made of (RFC 6750's b64token).
_TOKEN = r"[A-Za-z0-9._~+/=-]"


def _key_value(match: re.Match[str]) -> str:
    value = match.group("value")
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match.group('name')}{quote}{REDACTED}{quote}"


_PATTERNS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    # `Bearer <token>`, any case. "bearer" is also an English word ("the bearer of this letter"), so the
    # token needs a digit or 20+ characters: a random token of 8+ characters almost always has a digit.
    (
        re.compile(rf"\b(bearer)(\s+)(?:(?={_TOKEN}*[0-9]){_TOKEN}{{8,}}|{_TOKEN}{{20,}})", re.IGNORECASE),
        rf"\1\2{REDACTED}",
    ),
    # OpenAI-style keys (sk-..., sk-proj-...); not inside a longer word such as `task-...`.
    (re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_-]{16,}"), REDACTED),
    # Hugging Face tokens.
    (re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}"), REDACTED),
    # `api_key=...`, `"api_key": "..."`, `x-api-key: ...` and the like: the name stays, the value goes.
    (
        re.compile(
            r"""(?P<name>(?<![A-Za-z0-9])["']?(?:x-)?(?:api[_-]?key|access[_-]?token|secret[_-]?key|client[_-]?secret)"""
            r"""["']?\s*[:=]\s*)(?!\[redacted\])(?P<value>"[^"]*"|'[^']*'|[^\s"'&,;}\]]+)""",
            re.IGNORECASE,
        ),
        _key_value,
    ),
)


def register_secret_env(name: str) -> None:
    """Treat environment variable `name` as a secret: `redact` replaces its current value wherever it appears."""
    with _registered_lock:
        _registered.add(name)


def secret_env_names() -> frozenset[str]:
    """The variable names whose values `redact` removes: the defaults and every registered one."""
    with _registered_lock:
        return DEFAULT_SECRET_ENVS | _registered


def redact(text: str | None, max_chars: int | None = MAX_CHARS) -> str | None:
    """`text` without secrets (see the module docstring), cut to `max_chars` characters; None stays None.

    The cap applies after redaction, so a secret is never half-kept at the cut; the result, marker included,
    is at most `max_chars` long. `max_chars=None` keeps the whole text.
    """
    if text is None:
        return None
    # Longest values first, so a secret that contains another secret is removed whole.
    values = {os.environ.get(name) for name in secret_env_names()}
    for value in sorted((v for v in values if v and len(v) >= MIN_SECRET_CHARS), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    if max_chars is not None and len(text) > max_chars:
        # The marker counts towards the cap, so redacting a redacted text changes nothing.
        marker = f"… [cut, {len(text)} characters in all]"
        text = text[: max(0, max_chars - len(marker))] + marker
    return text
