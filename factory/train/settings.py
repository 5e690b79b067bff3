"""Training settings: the layers (preset, YAML `train:` section, `--set`) merged and validated, resolved to every
value the trainer is given, and the step counts derived from them (docs/DESIGN.md §5)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from factory.config.errors import error_field, error_text
from factory.config.training import TrainSettings
from factory.core.errors import UserInputError
from factory.core.text import clip_value
from factory.train.presets import DEFAULTS, DPO_ONLY, PRESETS, Method


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings from the command line, each value read as YAML (numbers, lists, booleans)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"--set {clip_value(pair)}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserInputError(f"--set {clip_value(pair)}: the value is not valid YAML") from None
    return out


def settings_from(layers: list[tuple[str, dict[str, Any]]]) -> TrainSettings:
    """Merge setting layers (later wins) and validate; an error names the layer and the field."""
    merged: dict[str, Any] = {}
    for _, layer in layers:
        merged.update(layer)
    try:
        return TrainSettings.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        origin = next((name for name, layer in reversed(layers) if err["loc"] and err["loc"][0] in layer), "settings")
        message = error_text(
            err, unknown="unknown setting", missing=None, echo_value_errors=True, name_non_finite=False
        )
        raise UserInputError(f"{origin}: field '{error_field(err)}': {message}") from None


def resolved(settings: TrainSettings, method: Method) -> dict[str, Any]:
    """Every training value after preset and defaults: exactly what the trainer is given (the accumulation
    and warm-up steps are derived from these when training starts)."""
    preset = PRESETS[settings.preset][method] if settings.preset else {}
    given = {k: v for k, v in settings.model_dump(exclude_unset=True).items() if k in DEFAULTS and v is not None}
    out = {**DEFAULTS, **preset, **given}
    if "gradient_accumulation" in given and "examples_per_step" not in given:
        out["examples_per_step"] = None  # an accumulation set by hand replaces a preset's examples per step
    if method == "sft":
        for key in DPO_ONLY:
            out.pop(key)
    return out


def betas(values: dict[str, Any]) -> list[float | None]:
    """The β values to train (a sweep is a list); [None] for SFT."""
    beta = values.get("beta")
    if beta is None:
        return [None]
    return list(beta) if isinstance(beta, list) else [beta]


def accumulation(values: dict[str, Any], world_size: int) -> int:
    """Forward passes per optimizer step: `gradient_accumulation`, or derived from `examples_per_step`."""
    per_step = values.get("examples_per_step")
    if not per_step:
        return int(values["gradient_accumulation"])
    per_pass = values["batch_size"] * world_size
    if per_step % per_pass:
        raise UserInputError(
            f"examples_per_step {per_step} is not a multiple of batch_size {values['batch_size']} × {world_size} "
            "device(s); change batch_size or examples_per_step"
        )
    return per_step // per_pass


def optimizer_steps(
    rows: int, batch_size: int, accumulate: int, world_size: int, epochs: float, max_steps: int | None
) -> int:
    """The optimizer steps a training takes: `max_steps`, or the epochs over `rows` examples in batches of
    `batch_size` per device on `world_size` devices, a last short accumulation counting as a step."""
    if max_steps:
        return int(max_steps)
    batches = math.ceil(rows / (batch_size * world_size))
    return math.ceil(epochs * max(math.ceil(batches / accumulate), 1))


def warmup_steps(ratio: float, total: int) -> int:
    """Warm-up steps for a share of `total` optimizer steps, rounded down as the authors' code does
    (`int(warmup_ratio * total_steps)`, dpo.py:156, mle.py:130)."""
    return int(ratio * total)
