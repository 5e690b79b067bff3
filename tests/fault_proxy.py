"""A fault-injecting HTTP reverse proxy for the openai backend's tests (loopback only, bounded, self-stopping).

It sits between the backend and an upstream server on 127.0.0.1 and answers each POST according to a
seeded schedule: a 429 burst, 500s, dropped connections, slow answers, stalls past the client's timeout and
truncated JSON, then plain forwarding. GET requests (the backend's `/models` probe) are always forwarded.
A request whose body contains `poison` is refused with 500 every time, to test a request that never gets
through. With `echo_headers` every injected error repeats the request's headers (the API key included)
in its body, as a careless gateway might, to test that no error text keeps the key. The proxy counts what
it did, serves at most `max_requests`, and shuts itself down after `lifetime_s` even if a test forgets to.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("429", "500", "drop", "slow", "stall", "bad_json")


def schedule(seed: int, window: int, faults: dict[str, int], burst_429: int = 0) -> list[str]:
    """Fault kinds for the first `window` POSTs ('ok' where none): `faults` counts per kind at seeded
    places, plus one burst of `burst_429` consecutive 429s at a seeded start."""
    plan = ["ok"] * window
    rng = random.Random(seed)
    if burst_429:
        start = rng.randrange(0, window - burst_429 + 1)
        plan[start : start + burst_429] = ["429"] * burst_429
    free = [i for i, kind in enumerate(plan) if kind == "ok"]
    picks = [kind for kind, count in sorted(faults.items()) for _ in range(count)]
    if len(picks) > len(free):
        raise ValueError("more faults than free places in the window")
    for kind, i in zip(picks, rng.sample(free, len(picks)), strict=True):
        plan[i] = kind
    return plan


@dataclass
class ProxyLog:
    """What the proxy did: the kind served for each POST, in arrival order, and totals per kind."""

    served: list[str] = field(default_factory=list)
    poisoned: int = 0
    forwarded: int = 0

    @property
    def counts(self) -> Counter[str]:
        """How many POSTs got each kind of answer."""
        return Counter(self.served)

    @property
    def faults(self) -> int:
        """POSTs answered with a fault (poisoned ones included): each one costs the client one retry."""
        return sum(kind != "ok" for kind in self.served) + self.poisoned


class FaultProxy:
    """The proxy server. `with FaultProxy(upstream_port, plan) as proxy:` then use `proxy.url`."""

    def __init__(
        self,
        upstream_port: int,
        plan: list[str],
        *,
        poison: str | None = None,
        slow_s: float = 1.0,
        stall_s: float = 3.0,
        max_requests: int = 2000,
        lifetime_s: float = 1800.0,
        echo_headers: bool = False,
    ) -> None:
        unknown = set(plan) - {"ok", *FAULT_KINDS}
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self.upstream_port = upstream_port
        self.plan = plan
        self.poison = poison.encode() if poison else None
        self.slow_s, self.stall_s = slow_s, stall_s
        self.max_requests = max_requests
        self.echo_headers = echo_headers
        self.log = ProxyLog()
        self._lock = threading.Lock()
        self._requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        # A short poll: `stop` waits for the next one (the default is half a second).
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, name="fault-proxy", daemon=True
        )
        self._deadline = threading.Timer(lifetime_s, self.stop)
        self._deadline.daemon = True

    @property
    def port(self) -> int:
        """The proxy's port on 127.0.0.1."""
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        """The proxy's OpenAI-style base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultProxy:
        """Serve in a background thread until `stop` (or the lifetime runs out)."""
        self._thread.start()
        self._deadline.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._deadline.cancel()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next(self, body: bytes) -> str:
        """The answer kind for the next POST: poison first, then the schedule, then 'ok'."""
        with self._lock:
            self._requests += 1
            if self._requests > self.max_requests:
                return "over_limit"
            if self.poison is not None and self.poison in body:
                self.log.poisoned += 1
                return "poison"
            kind = self.plan[len(self.log.served)] if len(self.log.served) < len(self.plan) else "ok"
            self.log.served.append(kind)
            return kind

    def _forward(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=600)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            with self._lock:
                self.log.forwarded += 1
            return response.status, data, response.getheader("Content-Type", "application/json")
        finally:
            conn.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures, not traffic
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _headers(self) -> dict[str, str]:
                keep = ("Content-Type", "Authorization", "Accept")
                return {k: v for k, v in self.headers.items() if k in keep}

            def _send(self, status: int, data: bytes, content_type: str = "application/json", **extra: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in extra.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, **extra: str) -> None:
                if proxy.echo_headers:
                    message += f"; request headers: {dict(self.headers.items())}"
                self._send(status, json.dumps({"error": {"message": message, "code": status}}).encode(), **extra)

            def _drop(self) -> None:
                # Close without a byte of response: the client sees the server disconnect.
                self.close_connection = True
                with contextlib.suppress(OSError):  # the client may have hung up already (after a stall)
                    self.connection.shutdown(socket.SHUT_RDWR)

            def do_GET(self) -> None:
                status, data, ctype = proxy._forward("GET", self.path, b"", self._headers())
                self._send(status, data, ctype)

            def do_POST(self) -> None:
                body = self._body()
                kind = proxy._next(body)
                try:
                    if kind == "429":
                        self._error(429, "rate limited (injected)", Retry_After="0")
                    elif kind in ("500", "poison"):
                        self._error(500, f"server error (injected {kind})")
                    elif kind == "over_limit":
                        self._error(503, "fault proxy request limit reached")
                    elif kind == "drop":
                        self._drop()
                    elif kind == "stall":
                        time.sleep(proxy.stall_s)  # longer than the client's timeout: it gives up first
                        self._drop()
                    else:
                        if kind == "slow":
                            time.sleep(proxy.slow_s)
                        status, data, ctype = proxy._forward("POST", self.path, body, self._headers())
                        if kind == "bad_json":
                            data = data[: max(1, len(data) // 2)]  # cut mid-document: no longer valid JSON
                        self._send(status, data, ctype)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on us: nothing to answer
                    self.close_connection = True

        return Handler
