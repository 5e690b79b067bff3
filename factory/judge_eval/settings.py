"""judge-eval's settings: how judges are asked and how the report is computed (`EvalSettings`), the named
presets (`PRESETS`), and ReIFE's verdict rule (`reife_verdict`)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from factory.core.errors import UserInputError
from factory.core.text import clip_value
from factory.judge_eval.variants import BLOCKS


class EvalSettings(BaseModel):
    """How judges are asked and how the report is computed."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_tokens: int | None = Field(None, ge=1)
    """Tokens a judge may generate in protocols that answer directly; unset: each protocol's own default (8
    after the prefilled `Output (`, 16 with `prefill: none`)."""
    cot_max_tokens: int | None = Field(None, ge=1)
    """Tokens for protocols that reason before answering (cot; custom templates with an empty prefill);
    unset: each protocol's own default."""
    top_logprobs: int = Field(20, ge=2)
    """Top log-probabilities kept per generated token (the soft score reads the marker tokens among them);
    the paper's code keeps 5."""
    prefill: Literal["output", "none"] = "output"
    """`output`: answers start with `Output (`; `none`: the paper's decoding (`Protocol.unprefilled`: no
    prefill, 16 tokens, the verdict by regex, the soft score at its marker token)."""
    markers: Literal["variants", "exact"] = "variants"
    """Which tokens `p_a` counts: marker variants (`a`, ` a`, `A`, ...) or only `a` and `b` (the paper's rule).
    Only the reading changes: the stored answers are re-read, no model call is made."""
    swap: Literal["outputs", "blocks", "both"] = "outputs"
    """The second order: swap the outputs under fixed letters (`swapped`), move each output's block with its
    letter (`swapped_blocks`), or both (position and letter bias apart)."""
    unparsed: Literal["random", "wrong", "half"] = "random"
    """How an unparsed or tied verdict counts in accuracy (a report rule: no model call, not in the stage key)."""
    limit: int | None = Field(None, ge=1)
    """Judge only the first N cases of each data set."""
    bootstrap: int = Field(1000, ge=0)
    """Bootstrap resamples for confidence intervals (0: none)."""
    seed: int = 0
    """Seed of the bootstrap and of the random winner of unparsed verdicts."""
    verdict_rule: Literal["factory", "reife"] = "factory"
    """How the verdict is read from an answer: factory's parser (docs/DESIGN.md §4), or ReIFE's (`reife_verdict`)."""
    preset: Literal["reife"] | None = None
    """The named preset (`PRESETS`) these settings came from; the report says so."""

    @property
    def orders(self) -> tuple[str, ...]:
        """The orders each case is judged in: forward, then the second order(s)."""
        second = {"outputs": ("swapped",), "blocks": (BLOCKS,), "both": ("swapped", BLOCKS)}[self.swap]
        return ("forward", *second)

    def recorded(self) -> dict[str, Any]:
        """The settings as run records and keys hash them: the verdict rule and the preset only when set, so
        runs without them keep the keys they had before these settings existed."""
        data = self.model_dump()
        for name in ("verdict_rule", "preset"):
            if data[name] == EvalSettings.model_fields[name].default:
                del data[name]
        return data


PRESETS: dict[str, dict[str, Any]] = {
    # ReIFE (yale-nlp/ReIFE), the meta-evaluation the paper's Table 1 follows: configs/default/*.yaml,
    # ReIFE/methods/base_pairwise.py, ReIFE/evaluator.py, meta_eval.py. docs/JUDGE_EVAL.md lists the sources.
    "reife": {
        "prefill": "none",  # the prompt files end with the user turn; the answer is generated whole
        "max_tokens": 64,  # configs/default/pairwise_base.yaml:3 (and pairwise_reference.yaml:3)
        "cot_max_tokens": 1024,  # configs/default/pairwise_cot.yaml:3
        "top_logprobs": 4,  # configs/default/pairwise_base.yaml:2 (logprobs: 4)
        "markers": "exact",  # its logprob parser looks up the tokens `a` and `b` exactly (base_pairwise.py:215-217)
        "swap": "blocks",  # pairwise_base_swap.yaml:15 -> prompts/pairwise_vanilla_swap.txt:19-23
        "unparsed": "random",  # base_pairwise.py:47,53 (random winner), evaluator.py:162 (seeded)
        "verdict_rule": "reife",  # base_pairwise.py:38-48; pairwise_base.yaml:14, pairwise_cot.yaml:12,14
    },
}
"""judge-eval's `--preset` values: the settings each one fixes (the CLI refuses them given beside it)."""


def preset_settings(name: str, **rest: Any) -> EvalSettings:
    """Settings of a named preset, with `rest` (limit, bootstrap, seed: what a preset leaves open)."""
    if name not in PRESETS:
        raise UserInputError(f"unknown judge-eval preset {clip_value(name)}; known: {list(PRESETS)}")
    clash = sorted(set(rest) & set(PRESETS[name]))
    if clash:
        raise UserInputError(f"preset {name} sets {clash} itself")
    return EvalSettings(**PRESETS[name], **rest, preset=name)


REIFE_VERDICT_RE = re.compile(r"Output \((\S+)\)")
"""ReIFE's verdict pattern (configs/default/pairwise_base.yaml:14)."""
REIFE_BETTER_RE = re.compile(r"Output \((\S+)\) is better")
"""ReIFE's pattern for answers that reason first (configs/default/pairwise_cot.yaml:14)."""


def reife_verdict(answer: str, reasoning: bool) -> tuple[str | None, str]:
    """(verdict, parse_status) as ReIFE reads an answer (base_pairwise.py:36-57): the first match of its
    pattern, anywhere in the answer (a reasoning answer: the first "Output (x) is better", not its closing
    statement), whose marker must be exactly `a` or `b`; anything else is unparsed."""
    match = (REIFE_BETTER_RE if reasoning else REIFE_VERDICT_RE).search(answer)
    if match is None:
        return None, "no_match"
    marker = match.group(1)
    return (marker, "ok") if marker in ("a", "b") else (None, "invalid_marker")
