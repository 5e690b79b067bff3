"""The protocols judge-eval runs: the registered ones decoded as its settings say, and custom templates read
from a file, each with the tokens its judge may write (`EvalProtocol`)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.config.errors import error_field, error_text
from factory.config.yaml_loader import read_yaml
from factory.core.errors import UserInputError
from factory.core.reading import read_input_text
from factory.core.text import clip_value
from factory.judge.protocols import PROTOCOLS, Protocol, custom_protocol
from factory.judge_eval.settings import EvalSettings

DEFAULT_PROTOCOLS = tuple(PROTOCOLS)
"""Every registered protocol, in the registry's order (the paper's Table 1)."""


class CustomTemplate(BaseModel):
    """A custom judge protocol read from a YAML/JSON file (a plain text file is just the template)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Shown as `custom:<name>` in the table and the report."""
    template: str
    """The prompt, with the placeholders {instruction}, {output_a}, {output_b} and optionally {reference}."""
    prefill: str = "Output ("
    """Text the judge's answer starts with; empty when the template asks for reasoning first."""
    last_match: bool = False
    """Read the last `Output (x)` in the answer instead of the first (for reasoning templates)."""
    max_tokens: int | None = Field(None, ge=1)
    """Tokens the judge may generate; default from the settings (by whether the prefill is empty)."""


@dataclass(frozen=True)
class EvalProtocol:
    """A protocol as judge-eval runs it: the template and how many tokens the judge may write."""

    protocol: Protocol
    max_tokens: int

    @property
    def name(self) -> str:
        """The protocol's name in rows and reports."""
        return self.protocol.name


def builtin_protocol(name: str, settings: EvalSettings) -> EvalProtocol:
    """A registered protocol, decoded as `settings.prefill` says, with the token budget its answer style needs."""
    if name not in PROTOCOLS:
        raise UserInputError(
            f"unknown judge protocol {clip_value(name)}; known: {list(PROTOCOLS)} (or --custom-template)"
        )
    p = PROTOCOLS[name]
    budget = settings.max_tokens if p.prefill else settings.cot_max_tokens  # by the registered answer style
    if settings.prefill == "none":
        p = p.unprefilled()
    return EvalProtocol(p, budget or p.default_max_tokens)


def load_custom_template(path: str | Path, settings: EvalSettings) -> EvalProtocol:
    """A custom protocol from a text file (the template) or a YAML/JSON file (a `CustomTemplate`)."""
    path = Path(path)
    text = read_input_text(path, "custom template file")
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        data = read_yaml(path, "custom template file")
        try:
            spec = CustomTemplate.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            message = error_text(err, unknown=None, missing=None, keep_prefix=True, echo=False)
            raise UserInputError(f"{path}: field '{error_field(err)}': {message}") from None
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem) or "template"
        spec = CustomTemplate(name=name, template=text)
    protocol = custom_protocol(spec.template, prefill=spec.prefill, last_match=spec.last_match, where=str(path))
    protocol = dataclasses.replace(protocol, name=f"custom:{spec.name}")
    default = settings.max_tokens if spec.prefill else settings.cot_max_tokens
    if settings.prefill == "none":
        protocol = protocol.unprefilled()
    return EvalProtocol(protocol, spec.max_tokens or default or protocol.default_max_tokens)
