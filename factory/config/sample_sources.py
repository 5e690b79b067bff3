"""Recipe models of the list form of `samples`: several policies, and completions imported without a model call.

A list under `samples` names where a prompt's samples come from; all of a prompt's samples, whatever their
source, are judged against each other as one set. The mapping form (`SamplesSpec`) is one policy, and a list
holding one policy entry is that same policy, with the same request and stage keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from factory.config.base import SAFE_NAME, FieldError, Strict
from factory.config.labeling import SamplesSpec


class PolicySamples(SamplesSpec):
    """One policy of several: a named model with its own number of samples and sampling settings."""

    n: int = Field(4, ge=1, le=1024)
    """Samples per prompt from this policy (the prompt's samples from every source form one set)."""


class ImportedSamples(Strict):
    """Completions that exist already (another run, another serving stack, a dataset such as UltraFeedback):
    read, never generated. A sample's identity is its text and this source's name, so judging it is cached
    like any other sample's."""

    imported: str = Field(pattern=SAFE_NAME)
    """The import source's name: recorded as the `policy` of its samples (`NAME/MODEL` with `model_field`)."""
    field: str = Field(min_length=1)
    """The column holding a prompt's completions: a text, a list of texts, or a list of records (each with
    `response_field` and, optionally, `model_field`, as UltraFeedback's `completions`). A column of the prompt
    source, or of `path` when given."""
    path: str | None = Field(None, min_length=1)
    """A separate JSONL, JSON, Parquet or CSV file or saved dataset folder (relative to the recipe), joined to
    the prompts by `join`; leave out (with `dataset`) to read `field` from the prompt source."""
    dataset: str | None = Field(None, min_length=1)
    """A Hugging Face dataset by name, joined to the prompts by `join` (instead of `path`)."""
    config: str | None = None
    """The dataset configuration name, for `dataset`."""
    split: str = "train"
    """The split to read, for `dataset` and saved dataset folders."""
    join: Literal["instruction", "id"] = "instruction"
    """For `path` or `dataset`: join a row to the prompt with the same instruction text, or the same id (the
    prompt source's `id_field`)."""
    join_field: str | None = None
    """For `path` or `dataset`: the column holding the instruction or id (default: the prompt source's
    `instruction_field` or `id_field`)."""
    response_field: str = "response"
    """In a list of records: the key holding the completion's text."""
    model_field: str | None = None
    """In a list of records: the key naming the model that wrote it (recorded in the sample's `policy`)."""

    @model_validator(mode="after")
    def _file_fields(self) -> ImportedSamples:
        if self.path is not None and self.dataset is not None:
            raise FieldError(("dataset",), "give 'path' or 'dataset', not both")
        if not self.separate and self.join_field is not None:
            raise FieldError(("join_field",), "'join_field' joins a separate file: give 'path' or 'dataset' too")
        return self

    @property
    def separate(self) -> bool:
        """Whether the completions are in a file or dataset of their own (else in the prompt source)."""
        return self.path is not None or self.dataset is not None


def _source_kind(value: Any) -> str:
    """Which entry a list item is: an import when it names `imported`, else a policy (so an error about an
    entry is about the fields of its own kind)."""
    if isinstance(value, dict):
        return "form-imported" if "imported" in value else "form-policy"
    return "form-imported" if isinstance(value, ImportedSamples) else "form-policy"


def one_or_list(value: Any) -> str:
    """Which form a field that takes a mapping or a list of them was given in (`samples`, `judgments`)."""
    return "form-list" if isinstance(value, list) else "form-one"


SampleSource = Annotated[
    Annotated[PolicySamples, Tag("form-policy")] | Annotated[ImportedSamples, Tag("form-imported")],
    Discriminator(_source_kind),
]
"""One entry of the list form of `samples`."""
