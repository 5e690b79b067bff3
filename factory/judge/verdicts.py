"""Reading a judge's answer: the verdict marker it names and the soft score from the marker tokens'
log-probabilities (docs/DESIGN.md §4).

Logprob protocols prefill the judge's answer with `Output (` so the very next token is the verdict marker,
which is what the soft score reads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

VERDICT_RE = re.compile(r"Output \((\S+)\)")
BETTER_RE = re.compile(
    r"Output \((\S+?)\)\s+(?:is|was)\s+(?:clearly\s+|slightly\s+|much\s+)?(?:the\s+)?"
    r"(?:better|best|preferred|superior)\b",
    re.IGNORECASE,
)
CONCLUSION_RE = re.compile(r"\bTherefore,?\s+" + BETTER_RE.pattern, re.IGNORECASE)
"""A reasoning answer's statement of its choice; CONCLUSION_RE is the closing sentence the cot protocol asks for."""


@dataclass
class Verdict:
    """What one judge answer says about an ordered pair (a, b). Not frozen: one is made per judgment, and a frozen
    dataclass's __init__ costs three times as much."""

    verdict: str | None
    """'a' or 'b' from the regex; None when the answer names neither. Never guessed."""
    p_a: float | None
    """Soft probability that (a) wins, from the marker tokens' log-probabilities; None if there were none."""
    parse_status: str
    """ok | no_match (no `Output (x)` in the answer) | invalid_marker (`Output (x)` with x not a/b) | error."""
    p_source: str
    """Which token the soft score read: verdict_token | first_token | none."""
    marker_tokens: str
    """JSON of the token variants found for each marker at that position, e.g. {"a": [" a"], "b": ["B"]}."""
    p_a_exact: float | None = None
    """The soft score counting only the tokens that are exactly `a` and `b` (the paper's rule), at the same
    position; `p_a` is the score under the rule the caller asked for."""


@lru_cache(maxsize=4096)
def marker_of(token: str) -> str | None:
    """'a' or 'b' if a token is a variant of a marker (`a`, ` A`, `(a`, `a)`), else None. Cached: a judge's
    answers use a handful of distinct tokens, read several times in each of a build's judgments."""
    core = token.strip().strip("()").strip().lower()
    return core if core in ("a", "b") else None


def soft_score(top_logprobs: Sequence[tuple[str, float]], exact: bool = False) -> tuple[float, dict[str, list[str]]]:
    """p(a) at one position: mass of a-variants over mass of both markers (docs/DESIGN.md §4).

    Only a in the top-k gives 1, only b gives 0, neither gives 0.5. Variants of one marker are summed,
    since a small tokenizer can split the same answer as `a`, ` a` or `A`; `exact` counts only the tokens
    that are `a` and `b` themselves, as the paper's code does.
    """
    p_a, p_exact, seen_a, seen_b = soft_scores(top_logprobs)
    if exact:  # the exact tokens are variants of their marker too, seen in the same order
        return p_exact, {"a": [t for t in seen_a if t == "a"], "b": [t for t in seen_b if t == "b"]}
    return p_a, {"a": list(seen_a), "b": list(seen_b)}


def _conclusion(text: str) -> re.Match[str] | None:
    """A reasoning answer's verdict: the closing "Therefore, Output (x) is better" the cot protocol asks for,
    else its first "Output (x) is better" statement, else its last non-empty line when that line names one
    output and no other (a bare final answer such as "Output (b)")."""
    stated = CONCLUSION_RE.search(text) or BETTER_RE.search(text)
    if stated is not None:
        return stated
    lines = [(m.start(), m.group(0)) for m in re.finditer(r"[^\n]+", text) if m.group(0).strip()]
    if not lines:
        return None
    start, line = lines[-1]
    named = list(VERDICT_RE.finditer(line))
    if len({m.group(1) for m in named}) != 1:
        return None
    return VERDICT_RE.search(text, start)


def _token_at(tokens: Sequence[str], offset: int) -> int | None:
    """Index of the generated token whose characters cover `offset` (offsets count generated text only)."""
    pos = 0
    for i, tok in enumerate(tokens):
        if pos <= offset < pos + len(tok):
            return i
        pos += len(tok)
    return None


def parse_verdict(
    prefill: str,
    generated: str,
    tokens: Sequence[str],
    top_logprobs: Sequence[Sequence[tuple[str, float]]],
    *,
    last_match: bool = False,
    markers: str = "variants",
) -> Verdict:
    """Read a judge's answer: the regex verdict, and the soft score at the verdict's marker token.

    `generated` is the text after `prefill`; `tokens[i]` is the i-th generated token and
    `top_logprobs[i]` its top-k alternatives. A prefilled answer's verdict is its first `Output (x)`; with
    no match the first generated token is read. A reasoning answer (`last_match`) mentions both outputs
    while it argues, so its verdict is, as ReIFE reads one, the first statement that an output is better
    ("Therefore, Output (a) is better than Output (b)." is a), else a final line naming one output alone;
    an answer cut off before either has no verdict (never a guess).
    """
    tokens = tuple(tokens)
    read = _read_text if len(tokens) <= _CACHED_TOKENS else _read_text.__wrapped__
    verdict, status, p_source, step = read(prefill, generated, tokens, last_match)
    if step is None or step >= len(top_logprobs):
        return Verdict(verdict, None, status, "none", _seen_json((), ()))
    p_a, p_exact, seen_a, seen_b = soft_scores(top_logprobs[step])
    chosen = p_exact if markers == "exact" else p_a
    return Verdict(verdict, chosen, status, p_source, _seen_json(seen_a, seen_b), p_exact)


_CACHED_TOKENS = 32
"""Answers of at most this many tokens have their text read through `_read_text`'s cache: a prefilled judge's
answers are a handful of short strings (`a)`, `b)`), each read thousands of times in a build; a reasoning
answer is long and unique, and would only fill the cache."""


@lru_cache(maxsize=4096)
def _read_text(
    prefill: str, generated: str, tokens: tuple[str, ...], last_match: bool
) -> tuple[str | None, str, str, int | None]:
    """What an answer's text and tokens say (`parse_verdict`): the verdict, parse status, which token the soft
    score reads (p_source) and that token's index (None: no soft score)."""
    text = prefill + generated
    match = _conclusion(text) if last_match else VERDICT_RE.search(text)
    step: int | None = None
    if match is not None:
        marker = marker_of(match.group(1))
        verdict = marker
        status = "ok" if marker else "invalid_marker"
        offset = match.start(1) - len(prefill)
        step = _token_at(tokens, offset)
        if step is not None and marker_of(tokens[step]) is None:
            # Tokens did not line up with the text (tokenizer decode quirks): take the marker token nearest
            # to where the text says the verdict is.
            starts = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
            candidates = [i for i, t in enumerate(tokens) if marker_of(t) is not None]
            step = min(candidates, key=lambda i: abs(starts[i] - offset)) if candidates else None
        p_source = "verdict_token"
    else:
        verdict, status, p_source = None, "no_match", "first_token"
    if step is None:
        if not prefill:
            # A reasoning answer with no verdict: its first token starts the explanation, not a choice.
            return verdict, status, "none", None
        step, p_source = 0, "first_token"
    return verdict, status, p_source, step


def soft_scores(
    top_logprobs: Sequence[tuple[str, float]],
) -> tuple[float, float, tuple[str, ...], tuple[str, ...]]:
    """`soft_score` at one position under both rules in one pass: p(a) over the marker variants, p(a) over
    the exact tokens, and the variants seen of each marker, in the order of `top_logprobs`."""
    mass_a = mass_b = exact_a = exact_b = 0.0
    seen_a: list[str] = []
    seen_b: list[str] = []
    exact_seen_a = exact_seen_b = False
    for token, logprob in top_logprobs:
        m = marker_of(token)
        if m is None:
            continue
        p = math.exp(logprob)
        if m == "a":
            mass_a += p
            seen_a.append(token)
            if token == "a":
                exact_a += p
                exact_seen_a = True
        else:
            mass_b += p
            seen_b.append(token)
            if token == "b":
                exact_b += p
                exact_seen_b = True
    return (
        _share(mass_a, mass_b, bool(seen_a), bool(seen_b)),
        _share(exact_a, exact_b, exact_seen_a, exact_seen_b),
        tuple(seen_a),
        tuple(seen_b),
    )


def _share(mass_a: float, mass_b: float, seen_a: bool, seen_b: bool) -> float:
    """`soft_score`'s reading of the two masses."""
    if seen_a and seen_b:
        return mass_a / (mass_a + mass_b)
    if seen_a:
        return 1.0
    if seen_b:
        return 0.0
    return 0.5


@lru_cache(maxsize=4096)
def _seen_json(a: tuple[str, ...], b: tuple[str, ...]) -> str:
    """`marker_tokens`: the marker variants seen, as JSON (cached: the same few lists recur in every answer)."""
    return json.dumps({"a": list(a), "b": list(b)}, ensure_ascii=False)
