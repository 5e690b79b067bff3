"""What a stage asks of a model and what comes back: the types below both the stages and the backends.

Stages turn rows into keyed `Call`s; backends turn requests into outputs; `calls.py` runs the one through
the other. Nothing here imports a backend, a stage or the warehouse, so every layer can depend on it.

Failure has two kinds (docs/DESIGN.md, "No silent failure"):
- transient: the network, a timeout, a rate limit, an engine error the backend marks retryable. A backend
  raises `TransientError` for a whole batch, or returns a `RequestFailed` in place of one request's result.
  Each becomes an error row in the calls table; the run ends `incomplete` and the next build retries it.
- anything else (a user error such as a token budget the engine refuses, a programming error) propagates:
  the build stops with one line and a non-zero exit code, and nothing is recorded as a failed call, so it
  cannot hide behind "incomplete, run again".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from factory.core.keys import (
    canonical_json,
    canonical_messages,
    canonical_object,
    hash_text,
    json_string_body,
    stable_hash,
)
from factory.models.chat_tokens import may_hold_marker, neutralise_messages

if TYPE_CHECKING:
    from factory.config.models import SamplingParams


# The requests and `Call` are plain dataclasses, not frozen ones: a build makes one of each per model call (millions),
# a frozen dataclass's __init__ sets every field through object.__setattr__ (three times the cost), and nothing
# assigns to them after they are made.
@dataclass
class GenerationRequest:
    """Chat generation for one conversation: one output per entry of `sample_indices`."""

    messages: list[dict[str, str]]
    params: SamplingParams
    seed: int
    sample_indices: tuple[int, ...] = (0,)


@dataclass
class Generation:
    """One generated output."""

    text: str
    finish_reason: str
    """stop (the model ended its turn) or length (hit max_tokens)."""
    tokens_in: int
    tokens_out: int
    retries: int = 0
    """Attempts repeated before this result came back (HTTP backends; 0 for local engines)."""
    cost_usd: float | None = None
    """Price of this output for priced APIs; None when unknown or free (local engines)."""


@dataclass
class JudgeRequest:
    """A greedy judge call that keeps the top log-probabilities of every generated token."""

    messages: list[dict[str, str]]
    prefill: str
    """Text the assistant turn starts with (e.g. `Output (`); the generated text continues it."""
    max_tokens: int
    top_logprobs: int


@dataclass
class JudgeOutput:
    """The judge's continuation, token by token, with each position's top-k log-probabilities."""

    text: str
    tokens: list[str]
    top_logprobs: list[list[tuple[str, float]]]
    tokens_in: int
    tokens_out: int = field(default=0)
    retries: int = 0
    """Attempts repeated before this result came back (HTTP backends; 0 for local engines)."""
    cost_usd: float | None = None
    """Price of this call for priced APIs; None when unknown or free (local engines)."""


@dataclass
class RewardRequest:
    """A whole conversation (ending with the assistant's answer) for a reward model to score."""

    messages: list[dict[str, str]]


@dataclass
class RewardOutput:
    """The reward model's scalar score for one conversation."""

    reward: float
    tokens_in: int


class TransientError(Exception):
    """A whole batch failed for a reason that may pass (network, timeout, rate limit, a retryable engine
    error). Its calls become error rows and the next build retries them; any other exception stops the build.
    """

    def __init__(self, message: str, retries: int = 0) -> None:
        super().__init__(message)
        self.retries = retries


class RequestFailed(TransientError):
    """One request of a batch failed transiently for good (after `retries` retries); the rest of the batch
    stands. A backend returns it *in place of* that request's result, so one bad request costs one error row.
    """


@dataclass
class Call:
    """One model call a stage needs: its request key, the request, and the row fields it will fill."""

    key: str
    request: Any
    meta: dict[str, Any]
    neutralised: int = 0
    """Message contents whose chat control tokens were neutralised (`factory.models.chat_tokens`); a stage's notes
    count them."""
    group: str = ""
    """A generation call's `request_group`, rendered with its key (empty: rendered from the request when needed)."""


def request_key(kind: str, identity: dict[str, Any], payload: dict[str, Any]) -> str:
    """Hash of exactly what changes a call's output (docs/DESIGN.md, caching); batch sizes and timeouts
    stay out, and so does the verdict parser, so re-reading stored answers is free."""
    return stable_hash({"kind": kind, "model": identity, **payload})


def generation_call(
    identity: dict[str, Any], messages: list[dict[str, str]], params: SamplingParams, seed: int, index: int, **meta: Any
) -> Call:
    """The call for sample `index` of one conversation (backends group a prompt's indices into one request)."""
    return GenerationCaller(identity, params, seed).calls(messages, (index,), meta)[0]


class GenerationCaller:
    """Makes the generation calls of one stage: `calls(messages, indices, meta)` is `generation_call(identity,
    messages, params, seed, i, **meta)` for each sample index i, with what the calls share rendered once."""

    def __init__(self, identity: dict[str, Any], params: SamplingParams, seed: int) -> None:
        self.params, self.seed = params, seed
        # Rendered once per stage, and set into each prompt's payload: the very text `request_key` renders.
        self._identity = canonical_json(identity)
        self._params = canonical_json(params.model_dump())
        self._seed = canonical_json(seed)

    def calls(
        self, messages: list[dict[str, str]], indices: Sequence[int], meta: dict[str, Any], index_field: str = ""
    ) -> list[Call]:
        """One call per sample index of one conversation, whose payload is rendered once (the index aside);
        `index_field`, when given, is the meta field each call's index goes in."""
        messages, neutralised = neutralise_messages(messages)
        sent = canonical_messages(messages)
        # The payload with a NUL for its index (canonical JSON writes any NUL inside a string as an escape).
        rendered = {
            "kind": _GENERATE,
            "model": self._identity,
            "messages": sent,
            "params": self._params,
            "seed": self._seed,
            "sample_index": "\0",
        }
        before, after = canonical_object(rendered).split("\0")
        group = f"[{sent},{self._params},{self._seed}]"  # request_group's text, from the same renderings
        return [
            Call(
                hash_text(before + canonical_json(i) + after),
                GenerationRequest(messages, self.params, self.seed, (i,)),
                {**meta, index_field: i} if index_field else {**meta},
                neutralised,
                group,
            )
            for i in indices
        ]


_GENERATE = canonical_json("generate")


def request_group(request: GenerationRequest) -> str:
    """What a generation request asks, sample index aside: requests that share it are one n-sample request.
    The canonical JSON itself (not its hash): a dict key needs no digest."""
    return canonical_json([request.messages, request.params.model_dump(), request.seed])


def judge_call(
    identity: dict[str, Any],
    messages: list[dict[str, str]],
    prefill: str,
    max_tokens: int,
    top_logprobs: int,
    **meta: Any,
) -> Call:
    """The call for one rendered judge prompt; builds and judge-eval key it the same way, so they share a cache.

    Chat control tokens in the rendered contents (an output that writes `<|im_start|>assistant`) are
    neutralised before keying, so the key and the prompt hash describe what the judge is sent."""
    return judge_caller(identity, prefill, max_tokens, top_logprobs)(messages, **meta)


def judge_caller(identity: dict[str, Any], prefill: str, max_tokens: int, top_logprobs: int) -> JudgeCaller:
    """`judge_call` with the arguments every call of a stage shares rendered once: `make(messages, **meta)`."""
    return JudgeCaller(identity, prefill, max_tokens, top_logprobs)


class JudgeCaller:
    """Makes the judge calls of one stage: `caller(messages, **meta)` is `judge_call(identity, messages, prefill,
    max_tokens, top_logprobs, **meta)`, and `caller.from_turns(turns, **meta)` the same call for messages given
    as pieces (`Protocol.turns`)."""

    def __init__(self, identity: dict[str, Any], prefill: str, max_tokens: int, top_logprobs: int) -> None:
        self.prefill, self.max_tokens, self.top_logprobs = prefill, max_tokens, top_logprobs
        # The messages are rendered once for both hashes, and set into the rest of the payload's rendering: the
        # very text `request_key` renders, so the key is unchanged.
        self._before, self._after = _judge_frame(canonical_json(identity), prefill, max_tokens, top_logprobs)
        # Per piece of a turn (`from_turns`), its JSON body, or None when it may hold a chat marker.
        self._bodies: dict[str, str | None] = {}

    def __call__(self, messages: list[dict[str, str]], **meta: Any) -> Call:
        messages, neutralised = neutralise_messages(messages)
        return self._call(messages, canonical_messages(messages), neutralised, meta)

    def from_turns(self, turns: list[tuple[str, list[str]]], **meta: Any) -> Call:
        """The call for the messages [{"role": role, "content": "".join(pieces)}, ...], keyed as `__call__` keys
        them. A stage's prompts are made of recurring pieces (the template's text in every prompt, a sample's
        text in each of its pairs), so each piece is checked for chat markers and escaped once, and the
        rendering is the pieces' bodies joined: escaping and the marker check go character by character, so
        this is the text `canonical_messages` writes. A piece that may hold a marker takes the plain path,
        which neutralises the joined text."""
        messages = [{"role": role, "content": "".join(pieces)} for role, pieces in turns]
        bodies = self._bodies
        rendered = []
        for role, pieces in turns:
            parts = []
            for piece in (role, *pieces):
                body = bodies.get(piece)
                if body is None:
                    if piece in bodies or type(piece) is not str:
                        return self(messages, **meta)
                    body = bodies[piece] = None if may_hold_marker(piece) else json_string_body(piece)
                    if body is None:
                        return self(messages, **meta)
                parts.append(body)
            rendered.append(f'{{"content":"{"".join(parts[1:])}","role":"{parts[0]}"}}')
        return self._call(messages, "[" + ",".join(rendered) + "]", 0, meta)

    def _call(self, messages: list[dict[str, str]], sent: str, neutralised: int, meta: dict[str, Any]) -> Call:
        """The call for `messages` as sent (neutralised), `sent` being their canonical JSON."""
        request = JudgeRequest(messages, self.prefill, self.max_tokens, self.top_logprobs)
        meta["prompt_hash"] = hash_text(sent, PROMPT_HASH_LENGTH)  # `meta` is the caller's keywords: a dict of its own
        return Call(hash_text(self._before + sent + self._after), request, meta, neutralised)


@lru_cache(maxsize=64)
def _judge_frame(identity: str, prefill: str, max_tokens: int, top_logprobs: int) -> tuple[str, str]:
    """The canonical JSON of a judge request's payload before and after its messages (`identity` rendered).
    Split at a NUL character: canonical JSON writes a NUL inside any string as an escape, so the only raw one
    is the stand-in for the messages."""
    rendered = {
        "kind": canonical_json("judge"),
        "model": identity,
        "messages": "\0",
        "prefill": canonical_json(prefill),
        "max_tokens": canonical_json(max_tokens),
        "top_logprobs": canonical_json(top_logprobs),
    }
    before, after = canonical_object(rendered).split("\0")
    return before, after


def prompt_hash(sent: list[dict[str, str]]) -> str:
    """The `prompt_hash` of a judgment row: a short hash of its messages as sent (after `neutralise_messages`),
    which `factory show --messages` recomputes to check a rebuilt prompt."""
    return stable_hash(sent, PROMPT_HASH_LENGTH)


PROMPT_HASH_LENGTH = 16


def reward_call(identity: dict[str, Any], messages: list[dict[str, str]], **meta: Any) -> Call:
    """The call that scores one whole conversation with a reward model."""
    messages, neutralised = neutralise_messages(messages)
    return Call(request_key("reward", identity, {"messages": messages}), RewardRequest(messages), meta, neutralised)
