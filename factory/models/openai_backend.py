"""OpenAI-compatible HTTP backend: hosted APIs, vLLM's OpenAI server, anything speaking `/chat/completions`.

Plain httpx, so retries, accounting and the error text are ours (no second retry layer underneath):

- the API key is read from the environment variable the recipe names (`api_key_env`), held only in the
  client's headers, and never logged, stored in a row or put in an error message: that variable is
  registered with `factory.core.redact`, and every error text this module makes goes through `redact()`, so a
  server that echoes the request's headers in its error body cannot put the key into the warehouse;
- up to `concurrency` requests are in flight at once (a thread pool over one pooled client);
- failures come in the two kinds of `factory.models.requests`. Transient: 408, 409, 429, 5xx, timeouts, dropped
  connections and malformed JSON, retried up to `max_retries` times with exponential backoff and full
  jitter (a `Retry-After` header is honoured); a request that still fails comes back as a `RequestFailed`
  in place of its result, so it becomes one error row and the rest of the batch stands. Any other 4xx
  means the request or the recipe is wrong (a bad key, an unknown model or URL, a refused parameter):
  repeating it cannot help and recording it as "failed, run again" would hide it, so it raises a
  `FactoryError` (`UserInputError` for the key, model name or URL) out of `generate`/`judge` with one line
  naming the model, the endpoint and the status, and the build stops. Every result carries the number of
  retries it took;
- tokens come from the response's `usage`; cost = tokens × the model's price (the recipe's
  `price_in_per_mtok`/`price_out_per_mtok`, else a small built-in table of list prices, else unknown).
  With n > 1 samples in one request the completion tokens are split evenly between the samples, the
  prompt's cost is shared and the request's retries are recorded on its first sample's row, so the rows
  add up to what the request was billed and how often it was repeated.

Chat control tokens in message contents arrive neutralised (`factory.models.requests` breaks the well-known markers
before keying, `factory.models.chat_tokens`), so the server's tokenizer never reads data as turn markers.

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
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from factory.config.models import ModelSpec
from factory.core.errors import FactoryError, UserInputError
from factory.core.redact import redact, register_secret_env
from factory.core.text import one_line
from factory.models.pricing import model_prices, token_cost
from factory.models.requests import Generation, GenerationRequest, JudgeOutput, JudgeRequest, RequestFailed

T = TypeVar("T")

MAX_TOP_LOGPROBS = 20
"""The OpenAI API rejects `top_logprobs` above 20 (and vLLM's server caps at 20 by default)."""

TRANSIENT_STATUSES = frozenset({408, 409, 429})
"""4xx statuses that may pass on their own (timeout, conflict, rate limit); every 5xx is transient too."""

SNIPPET_CHARS = 300
"""How much of an error body goes into a message: enough for the server's reason, not a whole page."""


class _Transient(Exception):
    """A failure worth retrying (429, 5xx, malformed body); `retry_after` is the server's hint in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Aborted(Exception):
    """Another request of the batch failed for good: this one stops retrying, its result is not wanted."""


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
    """The body's gist on one line, redacted: an OpenAI-style `error.message` if there is one, else the text.

    The whole body is redacted before it is cut, so a secret is never half-kept at the cut.
    """
    text = response.text
    try:
        data = response.json()
        # OpenAI nests the message under `error`; vLLM's server puts it at the top level.
        error = data.get("error", data)
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message.strip():
            text = message
    except (ValueError, AttributeError):  # not JSON, or JSON without a message: keep the raw text
        pass
    text = " ".join((redact(text, max_chars=None) or "").split())
    return text[:SNIPPET_CHARS] + ("…" if len(text) > SNIPPET_CHARS else "")


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
            # Before reading it: from now on its value is scrubbed from every text `redact()` sees.
            register_secret_env(spec.api_key_env)
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
        self._local = threading.local()  # the batch's abort event, for the worker thread running a request

    # ------------------------------------------------------------------------------------------ HTTP
    def _request(
        self, method: str, path: str, payload: dict[str, Any] | None, parse: Callable[[Any], T]
    ) -> tuple[T, int]:
        """One logical request, retried on transient failures; returns the parsed body and the retries taken.

        `parse` raising KeyError/TypeError/IndexError/ValueError means a malformed body, which is retried too.
        Raises RequestFailed (with the retry count) when the retries are spent, and FactoryError when the
        endpoint refuses the request (a non-transient 4xx), which no retry and no rerun can fix.
        """
        abort: threading.Event | None = getattr(self._local, "abort", None)
        retries = 0
        while True:
            hint: float | None = None
            try:
                response = self.client.request(method, path, json=payload)
                status = response.status_code
                if status in TRANSIENT_STATUSES or status >= 500:
                    raise _Transient(f"HTTP {status}: {_snippet(response)}", _retry_after(response))
                if status >= 400:
                    raise self._refused(method, path, response)
                try:
                    return parse(response.json()), retries
                except (KeyError, TypeError, IndexError, ValueError) as exc:  # JSONDecodeError is a ValueError
                    raise _Transient(f"malformed response ({type(exc).__name__}: {exc})") from exc
            except httpx.UnsupportedProtocol as exc:  # a TransportError, but the URL is wrong, not the network
                raise UserInputError(self._one_line(f"{method} {path}: {exc}; check base_url")) from None
            except (_Transient, httpx.TransportError, httpx.DecodingError) as exc:  # timeouts and drops included
                if isinstance(exc, _Transient):
                    hint = exc.retry_after
                if retries >= self.spec.max_retries:
                    message = redact(f"{_describe(exc)} (gave up after {retries} retries)") or ""
                    raise RequestFailed(message, retries) from None
                wait = self._backoff(retries, hint)
                if abort is None:
                    time.sleep(wait)
                elif abort.wait(wait):  # the batch is lost already: stop waiting and stop retrying
                    raise _Aborted() from None
                retries += 1

    def _one_line(self, detail: str) -> str:
        """A message naming this model and endpoint, on one line and redacted."""
        text = f"openai model '{self.spec.model}' at {self.spec.base_url}: {detail}"
        return redact(one_line(text)) or ""

    def _refused(self, method: str, path: str, response: httpx.Response) -> FactoryError:
        """The error for a non-transient 4xx: the request or the recipe is wrong, so the build must stop."""
        status = response.status_code
        if status in (401, 403):
            where = f"the key in {self.spec.api_key_env}" if self.spec.api_key_env else "api_key_env (no key is sent)"
            hint, kind = f"check {where} and its access to the model", UserInputError
        elif status == 404:
            hint, kind = "check the model name and base_url", UserInputError
        else:  # 400, 413, 422, ...: the endpoint refused a parameter (a token budget, a sampling setting)
            hint, kind = "the endpoint refused the request; check the model's settings in the recipe", FactoryError
        detail = f"{method} {path}: HTTP {status} {response.reason_phrase}: {_snippet(response)}; {hint}"
        return kind(self._one_line(detail))

    def _backoff(self, attempt: int, hint: float | None) -> float:
        wait = self._rng.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2**attempt))
        if hint is not None:
            wait = max(wait, hint)
        return min(wait, self.backoff_cap_s)

    def _each(self, items: Sequence[Any], one: Callable[[Any], T]) -> list[T | Exception]:
        """Run `one` on every item with bounded concurrency; a RequestFailed takes that item's place.

        Any other exception (a refused request, a bug) is raised here as soon as it happens: the requests
        not started yet are cancelled and those retrying stop at their next wait, so a bad key costs
        one round of requests, not `max_retries` rounds of backoff.
        """
        abort = threading.Event()
        failures: list[BaseException] = []  # filled before `abort` is set, so the waiter always finds one

        def guarded(item: Any) -> T | Exception:
            if abort.is_set():
                raise _Aborted()
            self._local.abort = abort
            try:
                return one(item)
            except RequestFailed as exc:
                return exc
            except _Aborted:
                raise
            except BaseException as exc:
                failures.append(exc)  # list.append is atomic: no lock needed
                abort.set()
                raise
            finally:
                self._local.abort = None

        futures = [self.pool.submit(guarded, item) for item in items]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
        if abort.is_set():
            for future in futures:
                future.cancel()
            raise failures[0]  # the first to fail; the others only stopped because of it
        return [future.result() for future in futures]

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
                cost = token_cost(self.prices, usage.prompt_tokens / n, tokens_out) if usage.known else None
                out.append(Generation(text, reason, usage.prompt_tokens, tokens_out, cost_usd=cost))
            return out

        gens, retries = self._request("POST", "chat/completions", payload, parse)
        gens[0].retries = retries  # counted once per HTTP request, like its cost, so the rows add up
        while len(gens) < wanted:  # greedy: copies of the one answer, which cost nothing more
            first = gens[0]
            gens.append(Generation(first.text, first.finish_reason, first.tokens_in, first.tokens_out))
        return gens

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
                except (RequestFailed, FactoryError):
                    # No model listing (some endpoints have none, or hide it): assume a plain OpenAI-style
                    # endpoint. A wrong key or URL is reported by the chat requests that follow.
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
                out.cost_usd = token_cost(self.prices, usage.prompt_tokens, usage.completion_tokens)
            return out if prefill or not r.prefill else _drop_prefill(out, r.prefill)

        out, retries = self._request("POST", "chat/completions", payload, parse)
        out.retries = retries
        return out

    def close(self) -> None:
        """Close the connection pool and the worker threads."""
        self.pool.shutdown(wait=True, cancel_futures=True)
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
