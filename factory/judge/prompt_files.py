"""Judge prompt files: a user's template, in factory's placeholders or in the paper's and ReIFE's ChatML
format, read into a system turn and a user turn in factory's placeholders (docs/DESIGN.md §4).
"""

from __future__ import annotations

import string

from factory.core.errors import UserInputError
from factory.core.text import one_line
from factory.judge.prose import PLACEHOLDERS

AUTHOR_PLACEHOLDERS = {
    "{INSTRUCTION}": "{instruction}",
    "{REFERENCE}": "{reference}",
    "{OUTPUT_1}": "{output_a}",
    "{OUTPUT_2}": "{output_b}",
}
"""The upper-case placeholders of the paper's and ReIFE's prompt files, and the project's names for them."""


CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"
FIELDS = {
    **{upper.strip("{}"): lower for upper, lower in AUTHOR_PLACEHOLDERS.items()},
    **{p.strip("{}"): p for p in PLACEHOLDERS},
}
"""The placeholder names a ChatML prompt file may use (the authors' and factory's), and factory's for each."""


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
