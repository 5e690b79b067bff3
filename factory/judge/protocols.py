"""Pairwise judge protocols in a registry keyed by name: each protocol's template and the facts about it.

The wording lives in `factory/judge/prose.py`, prompt files in `factory/judge/prompt_files.py`, and the
reading of answers in `factory/judge/verdicts.py`. Logprob protocols prefill the judge's answer with
`Output (` so the very next token is the verdict marker, which is what the soft score reads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from factory.config.vocabulary import CUSTOM
from factory.core.errors import UserInputError
from factory.judge.prompt_files import template_turns
from factory.judge.prose import (
    BLOCK_A,
    BLOCK_B,
    COT,
    HREF_REF,
    LLMBAR_BASE,
    LLMBAR_REF,
    PLACEHOLDERS,
    REFEVAL,
    REFFREE,
    REFMATCH,
    SYSTEM,
)
from factory.judge.verdicts import Verdict, parse_verdict

_PLACEHOLDER = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")")
"""Any placeholder (captured, so splitting on it keeps it)."""

_OUTPUT_SLOTS = {"{output_a}": 0, "{output_b}": 1}
"""The placeholders a prompt's pairs fill differently (`Protocol.pair_turns`), and their slots."""


@lru_cache(maxsize=64)
def _pieces(text: str) -> tuple[str, ...]:
    """A template cut into its literal text and its placeholders, once per template: a build renders a judge
    prompt per ordered pair. Odd positions hold placeholders, even ones text (a text equal to a placeholder's
    name cannot occur between two matches, so `render` may look every piece up)."""
    return tuple(_PLACEHOLDER.split(text))


@dataclass(frozen=True)
class Protocol:
    """A judge protocol and every fact about it: the template, whether it shows a reference, how many tokens
    its answer needs, how the answer is read, and how a card or plan describes it. Builds, judge-eval and
    the CLI read these facts from `PROTOCOLS`; the recipe schema checks them from `factory/config/vocabulary.py`."""

    name: str
    template: str
    uses_reference: bool
    prefill: str = "Output ("
    """Text the judge's answer starts with; empty for protocols that reason first."""
    last_match: bool = False
    """A reasoning answer (chain of thought): read its conclusion, not its first mention of an output
    (`parse_verdict`)."""
    default_max_tokens: int = 8
    """The judge's token budget when a recipe or judge-eval leaves it unset."""
    description: str = ""
    """One line for dataset cards, plans and `--help`."""
    system: str | None = SYSTEM
    """The system turn (None: the judge's conversation has a user turn only)."""

    def render(
        self,
        instruction: str,
        output_a: str,
        output_b: str,
        reference: str | None = None,
        *,
        swap_blocks: bool = False,
    ) -> list[dict[str, str]]:
        """The chat messages (system, user) for one ordered pair.

        `swap_blocks` shows Output (b)'s block before Output (a)'s, each output keeping its letter (ReIFE's
        swap templates): a verdict still names the same output, only its position moved. Swapping `output_a`
        and `output_b` instead moves the outputs under fixed letters. Judging both ways separates a judge's
        position bias from its letter bias.
        """
        return [
            {"role": role, "content": "".join(pieces)}
            for role, pieces in self.turns(instruction, output_a, output_b, reference, swap_blocks=swap_blocks)
        ]

    def turns(
        self,
        instruction: str,
        output_a: str,
        output_b: str,
        reference: str | None = None,
        *,
        swap_blocks: bool = False,
    ) -> list[tuple[str, list[str]]]:
        """`render`'s messages as (role, pieces): each content is its pieces joined, the template's own text
        and the values in between. A build keys one judge prompt per ordered pair, and the pieces recur across
        them (the template's text in every prompt, a sample's text in every pair it is in), so a caller can do
        per piece, once, what it would otherwise do per prompt (`factory.models.requests.JudgeCaller`)."""
        return self.pair_turns(instruction, reference, swap_blocks=swap_blocks)(output_a, output_b)

    def pair_turns(
        self, instruction: str, reference: str | None = None, *, swap_blocks: bool = False
    ) -> Callable[[str, str], list[tuple[str, list[str]]]]:
        """`turns` for one instruction (and reference) and any pair of outputs: `pair_turns(i, r)(a, b)` is
        `turns(i, a, b, r)`. The text between the outputs is joined once for all of a prompt's pairs."""
        if self.uses_reference and reference is None:
            raise ValueError(f"protocol {self.name} needs a reference")
        template = self.template
        if swap_blocks:
            if template.count(BLOCK_A) != 1 or template.count(BLOCK_B) != 1:
                raise UserInputError(f"protocol {self.name}: its output blocks cannot be swapped (no standard blocks)")
            template = template.replace(BLOCK_A, "\0").replace(BLOCK_B, BLOCK_A).replace("\0", BLOCK_B)
        values = {"{instruction}": instruction, "{reference}": reference or ""}
        messages = [] if self.system is None else [("system", self.system)]
        messages.append(("user", template))
        # Each turn is filled in one pass over its pieces, so a placeholder-like string inside a value is never
        # substituted. A turn is kept as its texts with slots between them: 0 for output (a), 1 for output (b).
        layout: list[tuple[str, list[str | int]]] = []
        for role, text in messages:
            items: list[str | int] = []
            run: list[str] = []
            for p in _pieces(text):
                slot = _OUTPUT_SLOTS.get(p)
                if slot is None:
                    run.append(values.get(p, p))
                else:
                    items += ["".join(run), slot]
                    run = []
            items.append("".join(run))
            layout.append((role, items))

        def fill(output_a: str, output_b: str) -> list[tuple[str, list[str]]]:
            outputs = (output_a, output_b)
            return [(role, [outputs[i] if type(i) is int else i for i in items]) for role, items in layout]

        return fill

    def parse(
        self,
        generated: str,
        tokens: Sequence[str],
        top_logprobs: Sequence[Sequence[tuple[str, float]]],
        markers: str = "variants",
    ) -> Verdict:
        """Read one answer of this protocol's judge (the text after the prefill, with its tokens)."""
        return parse_verdict(self.prefill, generated, tokens, top_logprobs, last_match=self.last_match, markers=markers)

    def unprefilled(self) -> Protocol:
        """This protocol decoded as the paper's code does: no prefill, 16 greedy tokens, the verdict found by
        regex and the soft score read at its marker token."""
        if not self.prefill:
            return self
        return dataclasses.replace(self, prefill="", default_max_tokens=16)


# A reasoning answer needs room: 256 tokens cut many explanations before their conclusion.
_REASONING = {"prefill": "", "last_match": True, "default_max_tokens": 1024}

# In the order of the paper's Table 1: judge-eval reports them so.
PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("llmbar-base", LLMBAR_BASE, False, description="LLMBar's vanilla rules, no reference"),
        Protocol("reffree", REFFREE, False, description="reference-free judge (the paper's baseline)"),
        Protocol(
            "cot",
            COT,
            False,
            **_REASONING,
            description="LLMBar's rules, no reference; explains first, then concludes (ReIFE's chain of thought)",
        ),
        Protocol(
            "llmbar-ref",
            LLMBAR_REF,
            True,
            description="LLMBar's rules with a reference appended after the outputs, without guidance on its use",
        ),
        Protocol(
            "href-ref",
            HREF_REF,
            True,
            description="HREF's reference-guided judge: a human-written answer shown before the outputs as one "
            "good response among many",
        ),
        Protocol(
            "refmatch",
            REFMATCH,
            True,
            description="similarity to a ground-truth reference, conditioned on the instruction being met",
        ),
        Protocol(
            "refeval",
            REFEVAL,
            True,
            description="reference-guided judge: the reference sits between instruction and outputs and anchors "
            "facts and scope (the paper's method)",
        ),
    )
}


def get_protocol(name: str) -> Protocol:
    """A registered protocol by name."""
    if name not in PROTOCOLS:
        shown = name if len(name) <= 80 else f"{name[:79]}… ({len(name)} characters)"
        raise UserInputError(f"unknown judge protocol '{shown}'; known: {list(PROTOCOLS)}")
    return PROTOCOLS[name]


def custom_protocol(
    template: str, *, prefill: str = "Output (", last_match: bool = False, where: str = "custom judge template"
) -> Protocol:
    """A user template with the placeholders {instruction}, {reference}, {output_a}, {output_b}; or a prompt
    file in the format of the paper's code and ReIFE (`chatml_turns`), whose system turn is kept."""
    system, user = template_turns(template, where)
    return Protocol(
        CUSTOM,
        user,
        "{reference}" in user,
        prefill=prefill,
        last_match=last_match,
        default_max_tokens=8 if prefill else 1024,
        description="a user template",
        system=system,
    )


def with_template(protocol: Protocol, text: str, where: str) -> Protocol:
    """A built-in protocol worded by a template file (`judgments.template` beside a built-in `protocol`): the
    file's turns replace the wording, system turn included (none when the file has no system turn), while the
    protocol keeps its facts: prefill, how its answer is read, its token budget and its reference rule. So the
    authors' `refeval.txt` runs as `refeval` and ReIFE's `pairwise_cot.txt` as `cot`, each read as theirs."""
    system, user = template_turns(text, where)
    if ("{reference}" in user) != protocol.uses_reference:
        need = (
            "shows a reference, but the template has no"
            if protocol.uses_reference
            else "shows no reference, but the template has a"
        )
        raise UserInputError(f"{where}: protocol '{protocol.name}' {need} {{reference}} placeholder")
    return dataclasses.replace(protocol, template=user, system=system)
