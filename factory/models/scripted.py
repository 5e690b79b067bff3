"""The `scripted` backend: a deterministic stand-in model for tests, benchmarks and dry runs of a pipeline.

Registered like the real backends and able to play every role, it needs no torch and answers in
microseconds, so a whole build (caching, resume, incomplete runs, export) is tested in milliseconds.
Outputs are a pure function of (script seed, request): the same request always gets the same answer, in
any process, which is what the cache and the kill -9 tests rely on.

- generate: a few pseudo-words whose count depends on the request and sample index (up to max_tokens).
- judge: every text has a latent quality (a hash of the text); p(a) = sigmoid(quality(a) - quality(b) +
  position_bias), so the judge is consistent across orders up to the bias. The answer continues the
  prefill (`a)` after `Output (`), or reasons and concludes when there is no prefill.
- reward: the latent quality of the last message.

Injected trouble (operational: not part of the model's identity, like a flaky network):
- `fail_rate`: each request fails transiently with this probability (an error row; retried next build);
  which requests fail is drawn anew in every process, so retries eventually succeed.
- `crash_after`: after this many requests in one process, raise a non-transient error (the build stops).
- `delay_s`: sleep this long per request (to kill a build mid-stage in tests).
- `garble_rate`: this share of judge answers carry no verdict (parse_status no_match).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from factory.config.models import ModelSpec, ScriptSpec
from factory.core.files import append_line
from factory.core.keys import stable_hash
from factory.core.stats import sigmoid
from factory.models.requests import (
    Generation,
    GenerationRequest,
    JudgeOutput,
    JudgeRequest,
    RequestFailed,
    RewardOutput,
    RewardRequest,
)

WORDS = [
    "alpha",
    "brief",
    "clear",
    "direct",
    "exact",
    "fair",
    "good",
    "honest",
    "ideal",
    "just",
    "kind",
    "lucid",
    "neat",
    "open",
    "plain",
    "quick",
    "right",
    "sound",
]
_BLOCK = re.compile(r"# Output \(a\):\n(?P<a>.*?)\n\n# Output \(b\):\n(?P<b>.*?)(?:\n\n#|\Z)", re.S)


T = TypeVar("T")

CLOCK_ENV = "FACTORY_SCRIPTED_CLOCK"
"""When set to a file name, each scripted backend appends to it, as it closes, one JSON line with the seconds
it spent answering: wall and CPU (its thread's). bench/scale.py subtracts them from a build's times to find
factory's own cost per call; CPU seconds stay honest on a machine that other programs share."""


class ScriptedCrash(RuntimeError):
    """The injected non-transient failure: stands for a programming or configuration error in a backend."""


def unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from any JSON-able parts."""
    return int(stable_hash(list(parts), 12), 16) / 16**12


def words_in(messages: list[dict[str, str]]) -> int:
    """The scripted model's token count: words."""
    return sum(len(m["content"].split()) for m in messages)


def quality(text: str, seed: int) -> float:
    """A text's latent quality, in [-2, 2)."""
    return 4.0 * unit("quality", seed, text) - 2.0


class ScriptedBackend:
    """Deterministic answers from a seed, with optional injected failures and delays."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.script = spec.script or ScriptSpec()
        self.requests_seen = 0
        self._process = [os.getpid(), time.time_ns()]
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    # ------------------------------------------------------------------------------------------ trouble
    def _trouble(self) -> RequestFailed | None:
        """Count one request; crash, delay or fail it as the script says."""
        s = self.script
        self.requests_seen += 1
        if s.crash_after is not None and self.requests_seen > s.crash_after:
            raise ScriptedCrash(f"scripted crash after {s.crash_after} requests")
        if s.delay_s:
            time.sleep(s.delay_s)
        # Drawn anew in every process (the pid is mixed in): which requests fail differs from build to build,
        # so a request that failed once succeeds on a later try, as with a real flaky service. A draw that
        # depended on the request alone would fail the same calls forever.
        if s.fail_rate and unit("fail", s.fail_seed, self._process, self.requests_seen) < s.fail_rate:
            return RequestFailed("scripted transient failure (HTTP 503)", retries=1)
        return None

    def _each(self, requests: Sequence[Any], answer: Callable[[Any], T]) -> list[T | Exception]:
        """One answer per request, or the injected failure in its place."""
        out: list[T | Exception] = []
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            for r in requests:
                failed = self._trouble()
                out.append(failed if failed is not None else answer(r))
        finally:
            self.seconds += time.perf_counter() - wall
            self.cpu_seconds += time.thread_time() - cpu
        return out

    # -------------------------------------------------------------------------------------------- roles
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation] | Exception]:
        """A few pseudo-words per sample index."""
        return self._each(requests, self._generate_one)

    def _generate_one(self, r: GenerationRequest) -> list[Generation]:
        tokens_in = words_in(r.messages)
        gens = []
        for index in r.sample_indices:
            u = unit("gen", self.script.seed, r.messages, r.params.model_dump(), r.seed, index)
            want = 3 + int(u * 12)
            n = min(want, r.params.max_tokens)
            words = [WORDS[int(unit("w", u, i) * len(WORDS))] for i in range(n)]
            text = " ".join(words).capitalize() + ("." if n == want else "")
            gens.append(Generation(text, "stop" if n == want else "length", tokens_in, n))
        return gens

    def judge(self, requests: Sequence[JudgeRequest]) -> list[JudgeOutput | Exception]:
        """A verdict whose soft score follows the latent qualities of the two outputs."""
        return self._each(requests, self._judge_one)

    def _p_a(self, prompt: str) -> float:
        seed = self.script.seed
        match = _BLOCK.search(prompt)
        if match is None:  # a template without the usual blocks: still deterministic, just not comparative
            return unit("p", seed, prompt)
        margin = quality(match["a"].strip(), seed) - quality(match["b"].strip(), seed)
        return sigmoid(margin + self.script.position_bias)

    def _judge_one(self, r: JudgeRequest) -> JudgeOutput:
        prompt = r.messages[-1]["content"]
        tokens_in = words_in(r.messages)
        p_a = min(max(self._p_a(prompt), 1e-6), 1 - 1e-6)
        marker = "a" if p_a >= 0.5 else "b"
        alternatives = [("a", math.log(p_a)), ("b", math.log(1 - p_a)), (" ", -12.0)]
        if unit("garble", self.script.seed, prompt) < self.script.garble_rate:
            tokens = ["I", " cannot", " tell"]
            tops = [[(t, -0.1), ("x", -3.0)] for t in tokens]
        elif r.prefill.endswith("("):
            tokens, tops = [marker, ")"], [alternatives, [(")", -0.01)]]
        else:
            tokens = [
                "Both",
                " are",
                " fine",
                ".",
                " Therefore",
                ",",
                " Output",
                " (",
                marker,
                ")",
                " is",
                " better",
                ".",
            ]
            tops = [[(t, -0.05)] for t in tokens]
            tops[8] = alternatives
        tokens, tops = tokens[: r.max_tokens], tops[: r.max_tokens]
        return JudgeOutput("".join(tokens), tokens, tops, tokens_in, len(tokens))

    def reward(self, requests: Sequence[RewardRequest]) -> list[RewardOutput | Exception]:
        """The latent quality of each conversation's last message."""
        seed = self.script.seed
        return self._each(
            requests, lambda r: RewardOutput(quality(r.messages[-1]["content"], seed), words_in(r.messages))
        )

    def close(self) -> None:
        """Nothing to release; the time spent answering goes to the file `FACTORY_SCRIPTED_CLOCK` names."""
        clock = os.environ.get(CLOCK_ENV)
        if clock and self.requests_seen:
            times = {"requests": self.requests_seen, "wall_s": self.seconds, "cpu_s": self.cpu_seconds}
            append_line(Path(clock), json.dumps(times))
