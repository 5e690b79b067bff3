"""Recipe models of the inputs: where prompts come from (`PromptSource`) and named references (`ReferenceSpec`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from factory.config.base import SAFE_NAME, FieldError, Strict
from factory.config.models import SamplingParams


class PromptSource(Strict):
    """Where instructions come from: exactly one of `path`, `dataset` or `inline`."""

    path: str | None = Field(None, min_length=1)
    """A JSONL, JSON, Parquet or CSV file, or a folder saved by `datasets.save_to_disk`; relative to the recipe."""
    dataset: str | None = Field(None, min_length=1)
    """A Hugging Face dataset by name (downloaded through `datasets.load_dataset`)."""
    config: str | None = None
    """The dataset configuration name, for `dataset`."""
    split: str = "train"
    """The split to read, for `dataset` and saved dataset folders."""
    inline: list[dict[str, Any]] | None = None
    """Rows written directly in the recipe, each a mapping with at least the instruction field."""
    instruction_field: str = "instruction"
    """Column holding the user instruction."""
    system_field: str | None = None
    """Optional column holding a system prompt."""
    reference_fields: list[str] = Field([])
    """Columns holding human-written references, kept for `references` of kind `column`."""
    id_field: str | None = None
    """Optional column with the source's own row id, kept as provenance."""
    limit: int | None = Field(None, ge=1)
    """Keep at most this many prompts (after de-duplication and shuffling)."""
    shuffle: bool = False
    """Shuffle rows (with `seed`) before applying `limit`."""
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1)
    """Seed for shuffling."""
    dedupe: bool = True
    """Drop rows whose messages repeat an earlier row's exactly."""

    @model_validator(mode="after")
    def _one_source(self) -> PromptSource:
        given = [name for name in ("path", "dataset", "inline") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, dataset or inline (got {given or 'none'})")
        return self


class ReferenceSpec(Strict):
    """One named reference source."""

    name: str = Field(pattern=SAFE_NAME)
    """Name used by `judgments.reference` and stored in every row."""
    kind: Literal["column", "model"]
    """`column`: human-written, read from the prompt source; `model`: a named model writes it."""
    field: str | None = None
    """For `column`: the source column (must be listed in `prompts.reference_fields`); defaults to the only one."""
    model: str | None = None
    """For `model`: the name of an entry in `models`."""
    params: SamplingParams = SamplingParams(temperature=0.0, max_tokens=512)
    """For `model`: generation settings (greedy by default)."""
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1)
    """For `model`: sampling seed."""

    @model_validator(mode="after")
    def _kind_fields(self) -> ReferenceSpec:
        if self.kind == "model" and not self.model:
            raise FieldError(("model",), "a reference of kind 'model' needs 'model' (a name from 'models')")
        if self.kind == "column" and self.model:
            raise FieldError(("model",), "a reference of kind 'column' takes no 'model'")
        return self
