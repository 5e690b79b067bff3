"""Pairwise judge protocols: prompt templates, verdict parsing and soft scores.

Structure follows the paper's protocols (docs/DESIGN.md §4); the wording is the project's own. Every protocol
asks for exactly `Output (a)` or `Output (b)`. Logprob protocols prefill the judge's answer with
`Output (` so the very next token is the verdict marker, which is what the soft score reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from factory.config.vocabulary import CUSTOM
from factory.core.errors import UserInputError
from factory.core.text import one_line

VERDICT_RE = re.compile(r"Output \((\S+)\)")
BETTER_RE = re.compile(
    r"Output \((\S+?)\)\s+(?:is|was)\s+(?:clearly\s+|slightly\s+|much\s+)?(?:the\s+)?"
    r"(?:better|best|preferred|superior)\b",
    re.IGNORECASE,
)
CONCLUSION_RE = re.compile(r"\bTherefore,?\s+" + BETTER_RE.pattern, re.IGNORECASE)
"""A reasoning answer's statement of its choice; CONCLUSION_RE is the closing sentence the cot protocol asks for."""
PLACEHOLDERS = ("{instruction}", "{reference}", "{output_a}", "{output_b}")
AUTHOR_PLACEHOLDERS = {
    "{INSTRUCTION}": "{instruction}",
    "{REFERENCE}": "{reference}",
    "{OUTPUT_1}": "{output_a}",
    "{OUTPUT_2}": "{output_b}",
}
"""The upper-case placeholders of the paper's and ReIFE's prompt files, and the project's names for them."""
SYSTEM = "You are a helpful assistant that judges the quality of AI outputs carefully and impartially."
"""The built-in protocols' system turn. Without one, a chat template such as Qwen2.5's inserts its own
default system prompt into the judge's conversation."""
BLOCK_A = "# Output (a):\n{output_a}"
BLOCK_B = "# Output (b):\n{output_b}"

_ASK = 'Which output is better, Output (a) or Output (b)? Answer with exactly "Output (a)" or "Output (b)".'

_COMMON_RULES = """\
1. The better output follows the instruction precisely: it does what was asked, adds nothing unrelated, and \
leaves no requirement unmet.
2. Check the facts, and numbers above all; an output that states something false is worse.
3. Unless the instruction asks for detail, prefer the output that is brief and still does the job.
4. Judge the content only: which output is shown first must not affect your decision."""

REFFREE = f"""\
You are a careful, impartial judge. Two AI assistants answered the instruction below. Decide which output \
is better.

Rules:
{_COMMON_RULES}

# Instruction:
{{instruction}}

# Output (a):
{{output_a}}

# Output (b):
{{output_b}}

# {_ASK}"""

REFEVAL = f"""\
You are a careful, impartial judge. Two AI assistants answered the instruction below, and an expert wrote \
a reference output for it. Decide which of the two outputs is better.

Rules:
{_COMMON_RULES}
5. Use the reference output to check the facts in each output.
6. Work out why the reference answers the instruction well, then judge how closely each output matches it \
in substance.
7. Content that goes beyond what the reference contains is discouraged unless the instruction asks for it.

# Instruction:
{{instruction}}

# Reference Output:
{{reference}}

# Output (a):
{{output_a}}

# Output (b):
{{output_b}}

# {_ASK}"""

REFMATCH = """\
You are a careful, impartial matcher. Below is a ground-truth reference output for an instruction, and two \
AI outputs for the same instruction. Decide which output is more similar to the reference.

Rules:
1. Similarity means answering the instruction the way the reference does. Shared wording does not count \
when an output fails what the instruction requires.
2. Content that the reference does not contain makes an output less similar.
3. Which output is shown first must not affect your decision.

# Ground-truth Reference Output:
{reference}

# Instruction:
{instruction}

# Output (a):
{output_a}

# Output (b):
{output_b}

# Which output is more similar to the reference, Output (a) or Output (b)? Answer with exactly \
"Output (a)" or "Output (b)"."""

_LLMBAR_RULES = """\
Rules:
1. First, prefer the output that honestly, precisely and closely carries out the instruction.
2. Then weigh helpfulness, accuracy, level of detail and harmlessness.
3. An output should contain neither more nor less than the instruction asks for.
4. Be objective: the order of the outputs must not affect your choice."""

_BLOCKS = """\
# Instruction:
{instruction}

# Output (a):
{output_a}

# Output (b):
{output_b}
"""

# LLMBar's structure: task, rules, an instruction to answer with the marker alone (no explanation, never "both"
# or "neither"), then the instruction and the outputs, then the question.
_LLMBAR_INTRO = f"""\
You evaluate AI outputs for an instruction. Select the output, Output (a) or Output (b), that is better for \
the instruction. Two different AI chatbots wrote them.

{_LLMBAR_RULES}

Give no explanation for your choice, and do not say that both or neither output is good. Reply with only \
"Output (a)" or "Output (b)", and no other words.

{_BLOCKS}"""

LLMBAR_BASE = _LLMBAR_INTRO + f"\n# {_ASK}"

LLMBAR_REF = _LLMBAR_INTRO + "\n# An answer a strong AI assistant wrote for reference:\n{reference}\n" + f"\n# {_ASK}"

HREF_REF = f"""\
You are a careful, impartial judge. Two AI assistants answered the instruction below. A human expert also \
answered it; that answer is one good response, not the only acceptable one. Decide which output is better.

Rules:
{_COMMON_RULES}
5. Compare each output with the human answer to see what a good response covers, but do not reward wording \
that merely copies it.

# Instruction:
{{instruction}}

# A human-written answer:
{{reference}}

# Output (a):
{{output_a}}

# Output (b):
{{output_b}}

# {_ASK}"""

# ReIFE's chain-of-thought structure (the paper's CoT): LLMBar's task and rules, reasoning before the choice,
# and a fixed closing sentence that the parser reads (`CONCLUSION_RE`).
COT = f"""\
You evaluate AI outputs for an instruction. Explain your evaluation briefly, then select the output, Output (a) \
or Output (b), that is better for the instruction. Two different AI chatbots wrote them.

{_LLMBAR_RULES}

Reason first: do not open with "Output (a) is better" or "Output (b) is better". Do not say that both or \
neither output is good. Always end with exactly "Therefore, Output (a) is better." or "Therefore, Output (b) \
is better.", and write nothing after it.

{_BLOCKS}
# Decision (a brief explanation, calling the outputs "Output (a)" and "Output (b)", then exactly \
"Therefore, Output (a) is better." or "Therefore, Output (b) is better." as the last sentence):"""


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
        if self.uses_reference and reference is None:
            raise ValueError(f"protocol {self.name} needs a reference")
        template = self.template
        if swap_blocks:
            if template.count(BLOCK_A) != 1 or template.count(BLOCK_B) != 1:
                raise UserInputError(f"protocol {self.name}: its output blocks cannot be swapped (no standard blocks)")
            template = template.replace(BLOCK_A, "\0").replace(BLOCK_B, BLOCK_A).replace("\0", BLOCK_B)
        values = {
            "{instruction}": instruction,
            "{reference}": reference or "",
            "{output_a}": output_a,
            "{output_b}": output_b,
        }
        pattern = "|".join(re.escape(p) for p in PLACEHOLDERS)
        # One pass over each turn, so a placeholder-like string inside an output is never substituted.
        messages = [] if self.system is None else [("system", self.system)]
        messages.append(("user", template))
        return [
            {"role": role, "content": re.sub(pattern, lambda m: values[m.group(0)], text)} for role, text in messages
        ]

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


def template_turns(text: str, where: str) -> tuple[str | None, str]:
    """The system turn (None: none) and the user turn of a template file, in factory's placeholders.

    A file with ChatML markers is the authors' format (`chatml_turns`); any other text is factory's own format,
    one user turn whose placeholders are replaced literally (braces need no escaping)."""
    if CHATML_START in text:
        turns = chatml_turns(text, where)
        system, user = turns.get("system"), turns["user"]
    else:
        system, user = None, text
    missing = [p for p in ("{instruction}", "{output_a}", "{output_b}") if p not in user]
    if missing:
        raise UserInputError(f"{where}: lacks the placeholder(s) {missing}")
    return system, user


CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"
FIELDS = {
    **{upper.strip("{}"): lower for upper, lower in AUTHOR_PLACEHOLDERS.items()},
    **{p.strip("{}"): p for p in PLACEHOLDERS},
}
"""The placeholder names a ChatML prompt file may use (the authors' and factory's), and factory's for each."""


def chatml_turns(text: str, where: str) -> dict[str, str]:
    """The turns of a ChatML prompt file, read as the authors' code reads it (`prompt_to_chatml` in RLRR's
    scoring.py and ReIFE's methods/utils.py), and checked where their code would fail or silently drop text.

    The file, stripped, must start with `<|im_start|>` and end with `<|im_end|>`. It is split at each
    `<|im_start|>`: a turn's first line is its role, its content runs to its `<|im_end|>`, or, when it has none
    (RLRR's refmatch.txt closes no system turn), to the next `<|im_start|>`; contents are stripped of surrounding
    whitespace. A system turn is sent as written; the user turn is filled like `str.format_map` (RLRR fills
    only the last turn), so `{{` and `}}` are literal braces and its placeholders are renamed to factory's. The
    judge's own chat template renders the turns, so the file's markers never reach it."""
    body = text.strip()
    if not body.startswith(CHATML_START):
        raise UserInputError(
            f"{where}: text before the first '{CHATML_START}'; a ChatML prompt file starts with a turn"
        )
    if not body.endswith(CHATML_END):
        raise UserInputError(f"{where}: the file does not end with '{CHATML_END}'; its last turn must be closed")
    turns: dict[str, str] = {}
    for part in body.split(CHATML_START)[1:]:
        header, newline, rest = part.partition("\n")
        role = header.strip()
        content, end, after = rest.partition(CHATML_END)
        if not newline or role not in ("system", "user"):
            shown = one_line(role, 40)
            raise UserInputError(
                f"{where}: a '{shown}' turn; a judge prompt file holds a 'system' turn and a 'user' turn, "
                "each with its role alone on the '<|im_start|>' line"
            )
        if role in turns:
            raise UserInputError(f"{where}: two '{role}' turns; expected one of each")
        if end and after.strip():
            raise UserInputError(
                f"{where}: text after the {role} turn's '{CHATML_END}' ({one_line(after, 40)!r}); it would be "
                "dropped, so move it into a turn or remove it"
            )
        turns[role] = content.strip()
    if "user" not in turns:
        raise UserInputError(f"{where}: no 'user' turn; a judge prompt file needs '<|im_start|>user' with the prompt")
    if list(turns)[-1] != "user":
        raise UserInputError(f"{where}: the last turn must be the 'user' turn (the one the judge answers)")
    system = turns.get("system")
    if system is not None and any(f"{{{name}}}" in system for name in FIELDS):
        raise UserInputError(
            f"{where}: a placeholder in the system turn; the paper's code sends the system turn unfilled, ReIFE's "
            "fills it: put the placeholders in the user turn"
        )
    turns["user"] = _format_fields(turns["user"], where)
    return turns


def _format_fields(text: str, where: str) -> str:
    """A user turn in `str.format` syntax rewritten in factory's: `{{`/`}}` become literal braces and each
    field becomes factory's placeholder. An unknown field, a format spec or a lone brace is refused, as
    `format_map` would fail on it."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise UserInputError(
            f"{where}: the user turn is not a valid format string ({exc}); write a literal brace as '{{{{' or '}}}}'"
        ) from None
    out: list[str] = []
    filled = dict.fromkeys(PLACEHOLDERS, 0)
    for literal, field, spec, conversion in parsed:
        out.append(literal)
        if field is None:
            continue
        if field not in FIELDS or spec or conversion:
            shown = one_line(
                "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}", 40
            )
            raise UserInputError(f"{where}: unknown placeholder {shown} in the user turn; known: {sorted(FIELDS)}")
        out.append(FIELDS[field])
        filled[FIELDS[field]] += 1
    user = "".join(out)
    # Escaped braces unescape to literal text; `{{reference}}` would then read as factory's placeholder.
    clash = next((p for p in PLACEHOLDERS if user.count(p) != filled[p]), None)
    if clash is not None:
        raise UserInputError(f"{where}: the literal text '{clash}' in the user turn would be read as a placeholder")
    return user


@dataclass(frozen=True)
class Verdict:
    """What one judge answer says about an ordered pair (a, b)."""

    verdict: str | None
    """'a' or 'b' from the regex; None when the answer names neither. Never guessed."""
    p_a: float | None
    """Soft probability that (a) wins, from the marker tokens' log-probabilities; None if there were none."""
    parse_status: str
    """ok | no_match (no `Output (x)` in the answer) | invalid_marker (`Output (x)` with x not a/b) | error."""
    p_source: str
    """Which token the soft score read: verdict_token | first_token | none."""
    marker_tokens: str
    """JSON of the token variants found for each marker at that position, e.g. {"a": [" a"], "b": ["B"]}."""
    p_a_exact: float | None = None
    """The soft score counting only the tokens that are exactly `a` and `b` (the paper's rule), at the same
    position; `p_a` is the score under the rule the caller asked for."""


def marker_of(token: str) -> str | None:
    """'a' or 'b' if a token is a variant of a marker (`a`, ` A`, `(a`, `a)`), else None."""
    core = token.strip().strip("()").strip().lower()
    return core if core in ("a", "b") else None


def soft_score(top_logprobs: Sequence[tuple[str, float]], exact: bool = False) -> tuple[float, dict[str, list[str]]]:
    """p(a) at one position: mass of a-variants over mass of both markers (docs/DESIGN.md §4).

    Only a in the top-k gives 1, only b gives 0, neither gives 0.5. Variants of one marker are summed,
    since a small tokenizer can split the same answer as `a`, ` a` or `A`; `exact` counts only the tokens
    that are `a` and `b` themselves, as the paper's code does.
    """
    mass = {"a": 0.0, "b": 0.0}
    seen: dict[str, list[str]] = {"a": [], "b": []}
    for token, logprob in top_logprobs:
        m = (token if token in ("a", "b") else None) if exact else marker_of(token)
        if m is not None:
            mass[m] += math.exp(logprob)
            seen[m].append(token)
    if seen["a"] and seen["b"]:
        return mass["a"] / (mass["a"] + mass["b"]), seen
    if seen["a"]:
        return 1.0, seen
    if seen["b"]:
        return 0.0, seen
    return 0.5, seen


def _conclusion(text: str) -> re.Match[str] | None:
    """A reasoning answer's verdict: the closing "Therefore, Output (x) is better" the cot protocol asks for,
    else its first "Output (x) is better" statement, else its last non-empty line when that line names one
    output and no other (a bare final answer such as "Output (b)")."""
    stated = CONCLUSION_RE.search(text) or BETTER_RE.search(text)
    if stated is not None:
        return stated
    lines = [(m.start(), m.group(0)) for m in re.finditer(r"[^\n]+", text) if m.group(0).strip()]
    if not lines:
        return None
    start, line = lines[-1]
    named = list(VERDICT_RE.finditer(line))
    if len({m.group(1) for m in named}) != 1:
        return None
    return VERDICT_RE.search(text, start)


def _token_at(tokens: Sequence[str], offset: int) -> int | None:
    """Index of the generated token whose characters cover `offset` (offsets count generated text only)."""
    pos = 0
    for i, tok in enumerate(tokens):
        if pos <= offset < pos + len(tok):
            return i
        pos += len(tok)
    return None


def parse_verdict(
    prefill: str,
    generated: str,
    tokens: Sequence[str],
    top_logprobs: Sequence[Sequence[tuple[str, float]]],
    *,
    last_match: bool = False,
    markers: str = "variants",
) -> Verdict:
    """Read a judge's answer: the regex verdict, and the soft score at the verdict's marker token.

    `generated` is the text after `prefill`; `tokens[i]` is the i-th generated token and
    `top_logprobs[i]` its top-k alternatives. A prefilled answer's verdict is its first `Output (x)`; with
    no match the first generated token is read. A reasoning answer (`last_match`) mentions both outputs
    while it argues, so its verdict is, as ReIFE reads one, the first statement that an output is better
    ("Therefore, Output (a) is better than Output (b)." is a), else a final line naming one output alone;
    an answer cut off before either has no verdict (never a guess).
    """
    text = prefill + generated
    match = _conclusion(text) if last_match else VERDICT_RE.search(text)
    step: int | None = None
    if match is not None:
        marker = marker_of(match.group(1))
        verdict = marker
        status = "ok" if marker else "invalid_marker"
        offset = match.start(1) - len(prefill)
        step = _token_at(tokens, offset)
        if step is not None and marker_of(tokens[step]) is None:
            # Tokens did not line up with the text (tokenizer decode quirks): take the marker token nearest
            # to where the text says the verdict is.
            starts = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
            candidates = [i for i, t in enumerate(tokens) if marker_of(t) is not None]
            step = min(candidates, key=lambda i: abs(starts[i] - offset)) if candidates else None
        p_source = "verdict_token"
    else:
        verdict, status, p_source = None, "no_match", "first_token"
    if step is None:
        if not prefill:
            # A reasoning answer with no verdict: its first token starts the explanation, not a choice.
            return Verdict(verdict, None, status, "none", json.dumps({"a": [], "b": []}))
        step, p_source = 0, "first_token"
    if step >= len(top_logprobs):
        return Verdict(verdict, None, status, "none", json.dumps({"a": [], "b": []}))
    p_a, seen = soft_score(top_logprobs[step])
    p_exact, _ = soft_score(top_logprobs[step], exact=True)
    chosen = p_exact if markers == "exact" else p_a
    return Verdict(verdict, chosen, status, p_source, json.dumps(seen, ensure_ascii=False), p_exact)
