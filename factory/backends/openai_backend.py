"""OpenAI-compatible HTTP backend: hosted APIs, vLLM's OpenAI server, anything speaking `/chat/completions`.

Plain httpx, so retries, accounting and the error text are ours (no second retry layer underneath):

- the API key is read from the environment variable the recipe names (`api_key_env`), held only in the
  client's headers, and never logged, stored in a row or put in an error message;
- up to `concurrency` requests are in flight at once (a thread pool over one pooled client);
- 429, 5xx, timeouts, dropped connections and malformed JSON are retried up to `max_retries` times with
  exponential backoff and full jitter (a `Retry-After` header is honoured); other 4xx are not retried;
- a request that still fails comes back as a `RequestFailed` in place of its result, so it becomes one
  error row and the rest of the batch stands; every result carries the number of retries it took;
- tokens come from the response's `usage`; cost = tokens × the model's price (the recipe's
  `price_in_per_mtok`/`price_out_per_mtok`, else a small built-in table of list prices, else unknown).
  With n > 1 samples in one request the completion tokens are split evenly between the samples, the
  prompt's cost is shared and the request's retries are recorded on its first sample's row, so the rows
  add up to what the request was billed and how often it was repeated.

Judging uses `logprobs: true, top_logprobs: k` (capped at 20, the OpenAI API's limit), greedy, `max_tokens`.
The prefill (`Output (`) needs the server to continue an assistant message: vLLM's server does, with
`continue_final_message: true, add_generation_prompt: false` and the prefill as a final assistant message.
Whether to use it is decided once per backend by asking the server's `/models` (vLLM lists its models as
`owned_by: "vllm"`) — a property of the endpoint, not a recipe setting. Other endpoints get no prefill: the
model answers `Output (a)` itself; when its answer starts with the prefill on a token boundary those tokens
are dropped so the row looks as if prefilled, otherwise the verdict parser finds the marker in the text (or
reads the first token).
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from factory.backends import Generation, GenerationRequest, JudgeOutput, JudgeRequest, RequestFailed
from factory.errors import UserInputError
from factory.recipe import ModelSpec

T = TypeVar("T")

MAX_TOP_LOGPROBS = 20
"""The OpenAI API rejects `top_logprobs` above 20 (and vLLM's server caps at 20 by default)."""

PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    # USD per million (input, output) tokens: OpenAI list prices (2025). Dated snapshots such as
    # `gpt-4o-2024-08-06` use their family's price. Set `price_in_per_mtok`/`price_out_per_mtok` to override.
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
_SNAPSHOT = re.compile(r"^(?P<family>.+)-\d{4}-\d{2}-\d{2}$")


def model_prices(spec: ModelSpec) -> tuple[float, float] | None:
    """(input, output) USD per million tokens: the recipe's prices, else the built-in table, else None."""
    listed = PRICES_PER_MTOK.get(spec.model)
    if listed is None and (m := _SNAPSHOT.match(spec.model)):
        listed = PRICES_PER_MTOK.get(m.group("family"))
    price_in = spec.price_in_per_mtok if spec.price_in_per_mtok is not None else listed and listed[0]
    price_out = spec.price_out_per_mtok if spec.price_out_per_mtok is not None else listed and listed[1]
    if price_in is None or price_out is None:
        return None
    return float(price_in), float(price_out)


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, malformed body); `retry_after` is the server's hint in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Usage:
    prompt_tokens: int
    completion_tokens: int
    known: bool


def _usage(data: dict[str, Any]) -> _Usage:
    usage = data.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return _Usage(prompt, completion, True)
    return _Usage(0, 0, False)


def _snippet(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:300] + ("…" if len(text) > 300 else "")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: rare from APIs; the exponential backoff applies instead
        return None


class OpenAIBackend:
    """Chat generation and logprob judging through an OpenAI-compatible `/chat/completions` endpoint."""

    backoff_base_s = 0.5
    """First retry waits up to this long; each further retry doubles it (full jitter)."""
    backoff_cap_s = 30.0
    """No single wait is longer than this, whatever the attempt number or `Retry-After` says."""

    def __init__(self, spec: ModelSpec) -> None:
        if not spec.base_url:
            raise UserInputError(f"the openai backend for model '{spec.model}' needs 'base_url'")
        self.spec = spec
        headers = {"Content-Type": "application/json"}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise UserInputError(
                    f"the openai backend for model '{spec.model}' reads its API key from the environment "
                    f"variable {spec.api_key_env}, which is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
        self.client = httpx.Client(
            base_url=spec.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(spec.timeout_s),
            limits=limits,
        )
        self.pool = concurrent.futures.ThreadPoolExecutor(spec.concurrency, thread_name_prefix="factory-openai")
        self.prices = model_prices(spec)
        self._rng = random.Random()  # jitter only spreads retries in time; it never changes a result
        self._prefill: bool | None = None
        self._prefill_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ HTTP
    def _request(
        self, method: str, path: str, payload: dict[str, Any] | None, parse: Callable[[Any], T]
    ) -> tuple[T, int]:
        """One logical request, retried on transient failures; returns the parsed body and the retries taken.

        `parse` raising KeyError/TypeError/IndexError/ValueError means a malformed body, which is retried too.
        Raises RequestFailed (with the retry count) when the retries are spent or the request is refused.
        """
        retries = 0
        while True:
            hint: float | None = None
            try:
                response = self.client.request(method, path, json=payload)
                if response.status_code == 429 or response.status_code >= 500:
                    raise _Transient(f"HTTP {response.status_code}: {_snippet(response)}", _retry_after(response))
                if response.status_code >= 400:  # the request itself is wrong: repeating it cannot help
                    raise RequestFailed(f"HTTP {response.status_code}: {_snippet(response)}", retries)
                try:
                    return parse(response.json()), retries
                except (KeyError, TypeError, IndexError, ValueError) as exc:  # JSONDecodeError is a ValueError
                    raise _Transient(f"malformed response ({type(exc).__name__}: {exc})") from exc
            except (_Transient, httpx.TransportError) as exc:  # TransportError covers timeouts and drops
                if isinstance(exc, _Transient):
                    hint = exc.retry_after
                if retries >= self.spec.max_retries:
                    raise RequestFailed(f"{_describe(exc)} (gave up after {retries} retries)", retries) from None
                time.sleep(self._backoff(retries, hint))
                retries += 1

    def _backoff(self, attempt: int, hint: float | None) -> float:
        wait = self._rng.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2**attempt))
        if hint is not None:
            wait = max(wait, hint)
        return min(wait, self.backoff_cap_s)

    def _each(self, items: Sequence[Any], one: Callable[[Any], T]) -> list[T | Exception]:
        """Run `one` on every item with bounded concurrency; a RequestFailed takes that item's place."""

        def guarded(item: Any) -> T | Exception:
            try:
                return one(item)
            except RequestFailed as exc:
                return exc

        return list(self.pool.map(guarded, items))

    # ------------------------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation] | Exception]:
        """One request per conversation (with `n` for several samples), run concurrently."""
        return self._each(requests, self._generate_one)

    def _generate_one(self, r: GenerationRequest) -> list[Generation]:
        wanted = len(r.sample_indices)
        # Greedy outputs are all equal, and vLLM's server refuses n > 1 with temperature 0: ask once, copy.
        n = 1 if r.params.temperature == 0 else wanted
        payload: dict[str, Any] = {
            "model": self.spec.model,
            "messages": r.messages,
            "max_tokens": r.params.max_tokens,
            "temperature": r.params.temperature,
            "top_p": r.params.top_p,
        }
        if n > 1:
            payload["n"] = n  # omitted for one sample: some compatible servers reject the field

        def parse(data: Any) -> list[Generation]:
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            if len(choices) != n:
                raise ValueError(f"{len(choices)} choices for n={n}")
            usage = _usage(data)
            shares = [usage.completion_tokens // n + (i < usage.completion_tokens % n) for i in range(n)]
            out = []
            for choice, tokens_out in zip(choices, shares, strict=True):
                text = choice["message"].get("content") or ""
                reason = "length" if choice.get("finish_reason") == "length" else "stop"
                cost = self._cost(usage.prompt_tokens / n, tokens_out) if usage.known else None
                out.append(Generation(text, reason, usage.prompt_tokens, tokens_out, cost_usd=cost))
            return out

        gens, retries = self._request("POST", "chat/completions", payload, parse)
        gens[0].retries = retries  # counted once per HTTP request, like its cost, so the rows add up
        while len(gens) < wanted:  # greedy: copies of the one answer, which cost nothing more
            first = gens[0]
            gens.append(Generation(first.text, first.finish_reason, first.tokens_in, first.tokens_out))
        return gens

    def _cost(self, tokens_in: float, tokens_out: float) -> float | None:
        if self.prices is None:
            return None
        return (tokens_in * self.prices[0] + tokens_out * self.prices[1]) / 1e6

    # -------------------------------------------------------------------------------------- judging
    def supports_prefill(self) -> bool:
        """Whether the endpoint continues a final assistant message (vLLM's server); asked once."""
        with self._prefill_lock:
            if self._prefill is None:

                def parse(data: Any) -> bool:
                    models = data["data"]
                    return any(m.get("id") == self.spec.model and m.get("owned_by") == "vllm" for m in models)

                try:
                    self._prefill, _ = self._request("GET", "models", None, parse)
                except RequestFailed:  # no model listing: assume a plain OpenAI-style endpoint
                    self._prefill = False
            return self._prefill

    def judge(self, requests: Sequence[JudgeRequest]) -> list[JudgeOutput | Exception]:
        """Greedy judge answers with the top log-probabilities of each token, run concurrently."""
        prefill = any(r.prefill for r in requests) and self.supports_prefill()
        return self._each(requests, lambda r: self._judge_one(r, prefill))

    def _judge_one(self, r: JudgeRequest, prefill: bool) -> JudgeOutput:
        messages = list(r.messages)
        payload: dict[str, Any] = {
            "model": self.spec.model,
            "max_tokens": r.max_tokens,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": min(r.top_logprobs, MAX_TOP_LOGPROBS),
        }
        if prefill and r.prefill:
            messages.append({"role": "assistant", "content": r.prefill})
            payload.update(continue_final_message=True, add_generation_prompt=False)
        payload["messages"] = messages

        def parse(data: Any) -> JudgeOutput:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            entries = (choice.get("logprobs") or {}).get("content") or []
            tokens = [str(e["token"]) for e in entries]
            tops = [[(str(t["token"]), float(t["logprob"])) for t in e.get("top_logprobs") or []] for e in entries]
            usage = _usage(data)
            out = JudgeOutput(text, tokens, tops, usage.prompt_tokens, usage.completion_tokens)
            if usage.known:
                out.cost_usd = self._cost(usage.prompt_tokens, usage.completion_tokens)
            return out if prefill or not r.prefill else _drop_prefill(out, r.prefill)

        out, retries = self._request("POST", "chat/completions", payload, parse)
        out.retries = retries
        return out

    def close(self) -> None:
        """Close the connection pool and the worker threads."""
        self.pool.shutdown(wait=True)
        self.client.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout ({type(exc).__name__})"
    if isinstance(exc, httpx.TransportError):
        return f"connection failed ({type(exc).__name__}: {exc})"
    return str(exc)


def _drop_prefill(out: JudgeOutput, prefill: str) -> JudgeOutput:
    """A judge answer given without prefill, made to look prefilled when its tokens start with the prefill.

    Only whole tokens are dropped: if the prefill ends inside a token, the answer is kept as it is and the
    parser finds the verdict in the text instead.
    """
    joined = ""
    for i, token in enumerate(out.tokens):
        joined += token
        if joined == prefill and out.text.startswith(prefill):
            return JudgeOutput(
                out.text[len(prefill) :],
                out.tokens[i + 1 :],
                out.top_logprobs[i + 1 :],
                out.tokens_in,
                out.tokens_out,
                cost_usd=out.cost_usd,
            )
        if len(joined) >= len(prefill):
            break
    return out
