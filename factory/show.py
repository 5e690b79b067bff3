"""`factory show PROMPT_ID`: one prompt's way through a build, in the terminal, to audit one decision.

The instruction, its references, the samples with their scores, every judgment (both orders of every pair
of samples, per reference) and the resulting preference pair. Rows come from the current views through
`Warehouse.query`, like `factory sql`.

Text from the data reaches the terminal as rich `Text` (never as markup, so `[bold]` in a sample is shown,
not obeyed) with control characters replaced (so an answer cannot move the cursor or recolour the
terminal). Long texts are printed as indented paragraphs rather than table cells, so they wrap at words
and stay readable and searchable at any width.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from factory.errors import UserInputError
from factory.warehouse import Warehouse

CANDIDATES = 5  # prompts named when a prefix is ambiguous
ANSWER_CHARS = 80  # characters of a judge's raw answer in the judgments table
# C0 and C1 control characters except tab and newline: escape sequences from data must not reach a terminal.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(value: Any) -> str:
    """Data as printable text: None is empty, control characters become �."""
    return "" if value is None else CONTROL.sub("\ufffd", str(value))


def literal(text: str) -> str:
    """An SQL string literal (quotes doubled): ids come from the command line."""
    return "'" + text.replace("'", "''") + "'"


def one_line(text: Any, limit: int) -> str:
    line = " ".join(clean(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -------------------------------------------------------------------------------------------------- rows
def find_prompt(wh: Warehouse, prefix: str, recipe: str | None) -> list[dict[str, Any]]:
    """The prompts rows (one per recipe) of the one prompt whose id starts with `prefix`.

    UserInputError when no prompt matches, when several do (naming a few), or when `recipe` is unknown.
    """
    if not prefix.strip():
        raise UserInputError('give a prompt id or a prefix of one (factory sql "SELECT prompt_id FROM prompts")')
    where = f"starts_with(prompt_id, {literal(prefix)})"
    if recipe is not None:
        check_recipe(wh, recipe)
        where += f" AND recipe = {literal(recipe)}"
    rows = wh.query(
        f"SELECT recipe, prompt_id, instruction, source, source_row, source_id FROM prompts WHERE {where} "
        "ORDER BY prompt_id, recipe"
    ).to_pylist()
    ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    if not ids:
        scope = f" in recipe '{recipe}'" if recipe else ""
        raise UserInputError(
            f"no prompt id starts with '{clean(prefix)}'{scope} in {wh.root} "
            '(factory sql "SELECT prompt_id, instruction FROM prompts" lists them)'
        )
    if len(ids) > 1:
        first = {r["prompt_id"]: r["instruction"] for r in reversed(rows)}
        named = "; ".join(f"{i} ({one_line(first[i], 40)})" for i in ids[:CANDIDATES])
        more = f" and {len(ids) - CANDIDATES} more" if len(ids) > CANDIDATES else ""
        raise UserInputError(
            f"'{clean(prefix)}' is ambiguous: {len(ids)} prompts match: {named}{more}; give more of the id"
        )
    return rows


def check_recipe(wh: Warehouse, recipe: str) -> None:
    recipes = [r["recipe"] for r in wh.query("SELECT DISTINCT recipe FROM prompts ORDER BY recipe").to_pylist()]
    if recipe not in recipes:
        raise UserInputError(f"no recipe '{clean(recipe)}' in {wh.root}; recipes with prompts: {recipes}")


def rows_of(wh: Warehouse, prompt_id: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """recipe → table → rows for one prompt: references, samples (with their scores), judgments, pairs."""
    pid = literal(prompt_id)
    queries = {
        "references": f'SELECT * FROM "references" WHERE prompt_id = {pid} ORDER BY reference_name',
        "samples": (
            "SELECT s.*, sc.labeler, sc.score, sc.n_comparisons, sc.wins FROM samples s LEFT JOIN scores sc "
            f"ON sc.recipe = s.recipe AND sc.sample_id = s.sample_id WHERE s.prompt_id = {pid} ORDER BY s.sample_index"
        ),
        "judgments": f"SELECT * FROM judgments WHERE prompt_id = {pid}",
        "pairs": f"SELECT * FROM pairs WHERE prompt_id = {pid}",
    }
    out: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for table, sql in queries.items():
        for row in wh.query(sql).to_pylist():
            out[row["recipe"]][table].append(row)
    return out


# ------------------------------------------------------------------------------------------------ output
def show_prompt(wh: Warehouse, prefix: str, recipe: str | None = None, console: Console | None = None) -> None:
    """Print one prompt's instruction, references, samples, judgments and pair, recipe by recipe."""
    wh.require()
    console = console or Console()
    prompts = find_prompt(wh, prefix, recipe)
    tables = rows_of(wh, prompts[0]["prompt_id"])
    for prompt in prompts:
        print_recipe(console, prompt, tables[prompt["recipe"]])


def heading(console: Console, text: str) -> None:
    console.print(Text(text, style="bold cyan"))


def paragraph(console: Console, text: Any, style: str = "") -> None:
    """A text from the data, indented, wrapped at words."""
    console.print(Padding(Text(clean(text), style=style), (0, 0, 0, 4)))


def print_recipe(console: Console, prompt: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> None:
    source = clean(prompt["source"])
    if prompt["source_row"] is not None:
        source += f", row {prompt['source_row']}"
    console.rule(Text(f"prompt {prompt['prompt_id']} · recipe {clean(prompt['recipe'])}", style="bold"))
    console.print(Text(f"source: {source}", style="dim"))
    heading(console, "instruction")
    paragraph(console, prompt["instruction"])
    print_references(console, rows["references"])
    index = print_samples(console, rows["samples"], rows["pairs"])
    print_judgments(console, rows["judgments"], index)
    print_pair(console, rows["pairs"], index)
    console.print()


def print_references(console: Console, references: list[dict[str, Any]]) -> None:
    heading(console, f"references ({len(references)})")
    if not references:
        paragraph(console, "none", "dim")
    for ref in references:
        kind = clean(ref["source_kind"]) + (f" {clean(ref['model'])}" if ref["model"] else "")
        status = "" if ref["status"] == "ok" else f", {clean(ref['status'])}: {one_line(ref['error'], 200)}"
        console.print(Padding(Text(f"{clean(ref['reference_name'])} ({kind}{status})", style="bold"), (0, 0, 0, 2)))
        paragraph(console, ref["text"] if ref["text"] is not None else "(no text)")


def print_samples(console: Console, samples: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> dict[str, str]:
    """Each sample with its score; returns sample id → `#index`, how the judgments name them."""
    chosen = {p["chosen_sample_id"] for p in pairs}
    rejected = {p["rejected_sample_id"] for p in pairs}
    labeler = next((s["labeler"] for s in samples if s["labeler"]), None)
    heading(console, f"samples ({len(samples)})" + (f", scored by {clean(labeler)}" if labeler else ""))
    if not samples:
        paragraph(console, "none (a references-only recipe, or samples not built yet)", "dim")
    index = {}
    for s in samples:
        index[s["sample_id"]] = f"#{s['sample_index']}"
        line = Text(f"  #{s['sample_index']}  ", style="bold")
        line.append(clean(s["sample_id"]), style="dim")
        line.append(f"  {score_text(s)}  {s['n_tokens'] or 0} tokens, {clean(s['finish_reason'])}")
        if s["sample_id"] in chosen:
            line.append("  ← chosen", style="bold green")
        if s["sample_id"] in rejected:
            line.append("  ← rejected", style="bold red")
        console.print(line)
        paragraph(console, s["text"] if s["error"] is None else f"(error: {one_line(s['error'], 200)})")
    return index


def score_text(sample: dict[str, Any]) -> str:
    if sample["score"] is None:
        return "no score"
    wins = f", {sample['wins']}/{sample['n_comparisons']} wins" if sample["n_comparisons"] else ""
    return f"score {sample['score']:.3f}{wins}"


def print_judgments(console: Console, judgments: list[dict[str, Any]], index: dict[str, str]) -> None:
    """Every judgment, the two orders of each pair (per reference) next to each other."""
    judges = sorted({f"judge {clean(j['judge'])}, protocol {clean(j['protocol'])}" for j in judgments})
    heading(console, f"judgments ({len(judgments)})" + (f": {'; '.join(judges)}" if judges else ""))
    if not judgments:
        paragraph(console, "none (this recipe's labeler makes no pairwise judgments)", "dim")
        return

    def order_key(j: dict[str, Any]) -> tuple[Any, ...]:
        pair = sorted((index.get(j["sample_a"], j["sample_a"]), index.get(j["sample_b"], j["sample_b"])))
        return (*pair, j["reference_name"] or "", j["order"] != "forward", j["judge"], j["protocol"])

    table = Table(header_style="bold", box=None, padding=(0, 1), pad_edge=False)
    for column in ("order", "(a)", "(b)", "ref", "verdict", "winner", "p(a)", "parse"):
        table.add_column(column, no_wrap=True)
    table.add_column("answer", min_width=16, overflow="fold")
    previous = None
    for j in sorted(judgments, key=order_key):
        a, b = index.get(j["sample_a"], "?"), index.get(j["sample_b"], "?")
        pair = (*sorted((a, b)), j["reference_name"])
        if previous is not None and pair != previous:
            table.add_row()  # a blank line between pairs: each pair's two orders read as one block
        previous = pair
        verdict = j["verdict"] if j["verdict"] in ("a", "b") else None
        cells = (
            clean(j["order"]),
            a,
            b,
            clean(j["reference_name"]) or "—",
            verdict or "—",
            {"a": a, "b": b}.get(verdict or "", "—"),
            "" if j["p_a"] is None else f"{j['p_a']:.3f}",
            clean(j["parse_status"]),
            one_line(j["raw_output"] if j["error"] is None else j["error"], ANSWER_CHARS),
        )
        table.add_row(*(Text(x) for x in cells))
    console.print(Padding(table, (0, 0, 0, 2)))


def print_pair(console: Console, pairs: list[dict[str, Any]], index: dict[str, str]) -> None:
    heading(console, "pair")
    if not pairs:
        paragraph(
            console,
            "none: fewer than two usable samples, or the best and worst scores differ by no more than "
            "pairs.min_margin (the pairs stage's notes in `runs` count each case)",
            "dim",
        )
    for p in pairs:
        chosen, rejected = index.get(p["chosen_sample_id"], "?"), index.get(p["rejected_sample_id"], "?")
        console.print(
            Padding(
                Text(
                    f"chosen {chosen} (score {p['chosen_score']:.3f})  rejected {rejected} "
                    f"(score {p['rejected_score']:.3f})  margin {p['margin']:.3f}"
                ),
                (0, 0, 0, 4),
            )
        )
