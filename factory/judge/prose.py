"""The built-in judge protocols' wording: the prompt templates' text, their system turn and placeholders.

Structure follows the paper's protocols (docs/DESIGN.md §4); the wording is the project's own. Every protocol
asks for exactly `Output (a)` or `Output (b)`. The registry that gives each template its facts is
`factory/judge/protocols.py`.
"""

from __future__ import annotations

PLACEHOLDERS = ("{instruction}", "{reference}", "{output_a}", "{output_b}")
"""The placeholders a template holds, filled by `Protocol.render`."""
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
