"""factory.core.redact: secrets out of every text that is stored, logged or printed; ordinary text untouched."""

from __future__ import annotations

import pytest

from factory.core import redact as redact_module
from factory.core.redact import MAX_CHARS, REDACTED, redact, register_secret_env, secret_env_names


@pytest.fixture(autouse=True)
def _no_registered_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from the default secret names only, and no default secret set in the environment."""
    monkeypatch.setattr(redact_module, "_registered", set())
    for name in redact_module.DEFAULT_SECRET_ENVS:
        monkeypatch.delenv(name, raising=False)


ORDINARY = [
    "HTTP 500: server error (injected poison)",
    "The bearer of this letter is a friend; the task-force met at 10:00.",
    "Bearer EMPTY",  # vLLM's placeholder key protects nothing
    "max_tokens=16, temperature 0.8, top_p 1.0, n=3",
    "sk-short and hf_short are not keys; neither is risk-assessment-of-the-year",
    '{"error": {"message": "model stub-model not found", "code": 404}}',
    "Name a color. Output (a) is better",
    "",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_untouched(text: str) -> None:
    assert redact(text) == text


def test_none_stays_none() -> None:
    assert redact(None) is None


def test_a_registered_variable_s_value_is_removed_wherever_it_appears(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "zz-plainkey-42"  # matches none of the patterns: only the registration can catch it
    monkeypatch.setenv("MY_API_KEY", secret)
    assert redact(f"you sent {secret}!") == f"you sent {secret}!"  # not registered yet
    register_secret_env("MY_API_KEY")
    assert "MY_API_KEY" in secret_env_names()
    assert redact(f"you sent {secret}! and {secret}") == f"you sent {REDACTED}! and {REDACTED}"
    # The value is read at redaction time, so a key rotated after registration is caught too.
    monkeypatch.setenv("MY_API_KEY", "rotated-value-7")
    assert redact("x rotated-value-7 y") == f"x {REDACTED} y"


@pytest.mark.parametrize("name", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY"])
def test_well_known_secret_variables_are_always_secret(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "plain-secret-value")
    assert redact("token plain-secret-value here") == f"token {REDACTED} here"


def test_short_values_are_not_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Replacing "dev" or "1" everywhere would mangle ordinary text, and such a value guards nothing.
    monkeypatch.setenv("OPENAI_API_KEY", "dev")
    assert redact("a dev server on port 8000") == "a dev server on port 8000"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc123def456ghi", f"Authorization: Bearer {REDACTED}"),
        ("authorization: bearer eyJhbGciOi.J9.eyJzdWIi0", f"authorization: bearer {REDACTED}"),
        ("BEARER ABCDEFGHIJKLMNOPQRSTUVWXYZ", f"BEARER {REDACTED}"),  # long enough without a digit
        ("key sk-" + "a1B2" * 8 + " leaked", f"key {REDACTED} leaked"),
        ("sk-proj-" + "x_y-" * 5, REDACTED),
        ("token=hf_" + "Ab3" * 10 + ".", f"token={REDACTED}."),
        ("https://host/v1?api_key=s3cr3t&model=x", f"https://host/v1?api_key={REDACTED}&model=x"),
        ('{"api_key": "abc def", "model": "m"}', f'{{"api_key": "{REDACTED}", "model": "m"}}'),
        ("x-api-key: 12345678", f"x-api-key: {REDACTED}"),
        ("API-KEY='hunter2'", f"API-KEY='{REDACTED}'"),
        ("access_token=abc.def", f"access_token={REDACTED}"),
    ],
)
def test_credential_patterns_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_the_echoed_header_of_a_registered_key_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-" + "7" * 24
    monkeypatch.setenv("FACTORY_TEST_KEY", secret)
    register_secret_env("FACTORY_TEST_KEY")
    out = redact(f'{{"error": "bad", "you_sent": {{"Authorization": "Bearer {secret}"}}}}')
    assert out is not None and secret not in out and "Bearer sk-" not in out and "7777" not in out


def test_long_text_is_capped_after_redaction() -> None:
    page = "<html>" + "x" * 10_000 + " sk-" + "k" * 40 + "</html>"
    out = redact(page)
    assert out is not None and len(out) <= MAX_CHARS and out.startswith("<html>xxx")
    assert f"{len(page) - 40 - 3 + len(REDACTED)} characters in all" in out
    assert redact(out) == out  # idempotent: the marker counts towards the cap
    assert redact(page, max_chars=None) == "<html>" + "x" * 10_000 + f" {REDACTED}</html>"


def test_redaction_is_fast_on_a_large_body() -> None:
    import time

    body = ("lorem ipsum dolor sit amet, bearer of news 1234 " * 20_000)[:1_000_000]
    t0 = time.perf_counter()
    redact(body)
    assert time.perf_counter() - t0 < 1.0
