"""Recipe models of labelling: the policy's samples, the three labelers' sections (judgments, rewards,
similarity) and how scored samples become pairs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from factory.config.base import FieldError, Strict
from factory.config.models import SamplingParams
from factory.config.vocabulary import PROTOCOL_FACTS, UNPREFILLED_MAX_TOKENS, ProtocolName


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
        protocol = PROTOCOL_FACTS.get(self.protocol)
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
        if self.max_tokens:
            return self.max_tokens
        protocol = PROTOCOL_FACTS.get(self.protocol)
        if protocol is None:
            return 8 if self.prefill == "output" else UNPREFILLED_MAX_TOKENS
        if self.prefill == "none" and protocol.prefilled:
            return UNPREFILLED_MAX_TOKENS
        return protocol.default_max_tokens


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
