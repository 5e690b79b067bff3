"""Recipe models of what follows the pairs: the export, held-out evaluation, self-improvement rounds, and how
a build runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from factory.config.base import FieldError, Strict
from factory.config.models import SamplingParams
from factory.config.sources import PromptSource
from factory.config.training import TrainSettings
from factory.config.vocabulary import CUSTOM, PROTOCOL_FACTS, ProtocolName


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
            raise FieldError(("protocol",), f"eval takes a built-in protocol: {list(PROTOCOL_FACTS)}")
        if PROTOCOL_FACTS[self.protocol].uses_reference and self.reference_column is None:
            raise FieldError(("reference",), f"protocol '{self.protocol}' needs 'reference' (a column)")
        return self

    @property
    def reference_column(self) -> str | None:
        """The column the judge sees as the reference (None for protocols without one)."""
        if not PROTOCOL_FACTS[self.protocol].uses_reference:
            return None
        return self.reference or self.baseline

    @property
    def generation_tokens(self) -> int:
        """The judge's token budget."""
        return self.max_tokens or PROTOCOL_FACTS[self.protocol].default_max_tokens


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
    shard_prompts: int = Field(1000, ge=1, le=10_000_000)
    """Prompts per shard: a build takes its prompts this many at a time through every stage, so its memory
    follows this number, not the prompt count (docs/DESIGN.md, "Shards"). Changing it re-cuts the shards: their
    stage versions are remade from the call cache, with no model call."""
