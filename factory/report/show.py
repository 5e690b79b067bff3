"""`factory show PROMPT_ID`: one prompt's way through a build, in the terminal, to audit one decision.

The instruction, its references, the samples with their scores, every judgment (both orders of every pair
of samples, per reference) and the resulting preference pair. Rows come from the current views through
`Warehouse.query`, like `factory sql`.

Text from the data reaches the terminal as rich `Text` (never as markup, so `[bold]` in a sample is shown,
not obeyed) with control characters replaced (`factory.core.text.clean`: an answer cannot move the cursor or
recolour the terminal). Long texts are printed as indented paragraphs rather than table cells, so they wrap
at words and stay readable and searchable at any width.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from factory.core.errors import UserInputError
from factory.core.text import clean, one_line, text
from factory.judge.protocols import PROTOCOLS, Protocol
from factory.models.chat_tokens import neutralise_messages
from factory.models.requests import prompt_hash
from factory.warehouse.store import Warehouse

CANDIDATES = 5  # prompts named when a prefix is ambiguous
ANSWER_CHARS = 80  # characters of a judge's raw answer in the judgments table


def literal(text: str) -> str:
    """An SQL string literal (quotes doubled): ids come from the command line."""
    return "'" + text.replace("'", "''") + "'"


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
def show_prompt(
    wh: Warehouse,
    prefix: str,
    recipe: str | None = None,
    console: Console | None = None,
    messages: MessageOptions | None = None,
) -> None:
    """Print one prompt's instruction, references, samples, judgments and pair, recipe by recipe; with
    `messages`, also every judgment's messages as the judge received them (`print_messages`)."""
    wh.require()
    console = console or Console()
    prompts = find_prompt(wh, prefix, recipe)
    tables = rows_of(wh, prompts[0]["prompt_id"])
    for prompt in prompts:
        rows = tables[prompt["recipe"]]
        index = print_recipe(console, prompt, rows)
        if messages is not None:
            sources = protocol_sources(wh, rows["judgments"], messages)
            print_messages(console, prompt, rows, index, sources)
        console.print()


def heading(console: Console, text: str) -> None:
    console.print(Text(text, style="bold cyan"))


def paragraph(console: Console, text: Any, style: str = "") -> None:
    """A text from the data, indented, wrapped at words."""
    console.print(Padding(Text(clean(text), style=style), (0, 0, 0, 4)))


def print_recipe(console: Console, prompt: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """One recipe's part of the prompt's way; returns sample id → `#index`, how the judgments name samples."""
    source = clean(prompt["source"])
    if prompt["source_row"] is not None:
        source += f", row {prompt['source_row']}"
    console.rule(Text(f"prompt {clean(prompt['prompt_id'])} · recipe {clean(prompt['recipe'])}", style="bold"))
    console.print(Text(f"source: {source}", style="dim"))
    heading(console, "instruction")
    paragraph(console, prompt["instruction"])
    print_references(console, rows["references"])
    index = print_samples(console, rows["samples"], rows["pairs"])
    print_judgments(console, rows["judgments"], index)
    print_pair(console, rows["pairs"], index)
    return index


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

    table = Table(header_style="bold", box=None, padding=(0, 1), pad_edge=False)
    for column in ("order", "(a)", "(b)", "ref", "verdict", "winner", "p(a)", "parse"):
        table.add_column(column, no_wrap=True)
    table.add_column("answer", min_width=16, overflow="fold")
    previous = None
    for j in sorted(judgments, key=lambda j: judgment_order(j, index)):
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


# ---------------------------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class MessageOptions:
    """Where `--messages` finds the protocol a judgment was rendered with."""

    recipe_file: Path | None = None
    """The recipe to read; default: the one each judgment's run recorded (`runs.recipe_path`)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """`--set` values the build was given (`judgments.template=PATH`), applied over that recipe."""


@dataclass(frozen=True)
class Source:
    """A protocol that may have rendered a judgment, and where it came from (said beside the hash check)."""

    label: str
    protocol: Protocol


def protocol_sources(wh: Warehouse, judgments: list[dict[str, Any]], options: MessageOptions) -> list[Source | str]:
    """The protocols to rebuild judgments with, most specific first: the recipe's (its template included),
    then the built-in protocol the rows name. A string is a note saying why a source could not be read."""
    if not judgments:
        return []
    out: list[Source | str] = []
    path = options.recipe_file or recorded_recipe(wh, {j["run_id"] for j in judgments})
    if path is not None:
        out.append(recipe_source(path, options.overrides))
    names = {j["protocol"] for j in judgments}
    prefills = {j["prefill"] for j in judgments}
    for name in sorted(names & set(PROTOCOLS)):
        protocol = PROTOCOLS[name]
        for prefill in sorted(prefills):
            variant = protocol.unprefilled() if prefill == "" and protocol.prefill else protocol
            out.append(
                Source(f"built-in protocol {name}" + (" (no prefill)" if variant is not protocol else ""), variant)
            )
    return out


def recorded_recipe(wh: Warehouse, run_ids: set[str]) -> Path | None:
    """The recipe file the runs that wrote these judgments were built from, if one is recorded."""
    if not run_ids:
        return None
    ids = ", ".join(literal(r) for r in sorted(run_ids))
    rows = wh.query(f"SELECT recipe_path FROM runs WHERE run_id IN ({ids}) ORDER BY started_at DESC").to_pylist()
    paths = [r["recipe_path"] for r in rows if r["recipe_path"]]
    return Path(paths[0]) if paths else None


def recipe_source(path: Path, overrides: dict[str, Any]) -> Source | str:
    """The judge protocol of a recipe file (with `--set` overrides), or a note on why it could not be read."""
    from factory.config.recipe import load_recipe
    from factory.stages.judgments import judge_protocol

    try:
        loaded = load_recipe(path, overrides)
        if loaded.recipe.judgments is None:
            return f"recipe {path} has no judgments section"
        protocol = judge_protocol(loaded)
    except UserInputError as exc:
        return f"recipe {path} not read: {exc}"
    j = loaded.recipe.judgments
    label = f"recipe {path}" + (f", template {loaded.resolve(j.template)}" if j.template else "")
    return Source(label, protocol)


def rebuild(
    judgment: dict[str, Any], prompt: dict[str, Any], texts: dict[str, str], refs: dict[str, str], sources: list[Source]
) -> tuple[Source, list[dict[str, str]], str, int] | None:
    """The messages a judgment sent, rebuilt by the first source whose hash matches the stored one (else by
    the first source that can render it): (source, messages as sent, their hash, how many contents had chat
    control markers neutralised). None when no source can render it."""
    first = None
    reference = refs.get(judgment["reference_name"] or "")
    for source in sources:
        if source.protocol.uses_reference and reference is None:
            continue
        messages = source.protocol.render(
            prompt["instruction"], texts[judgment["sample_a"]], texts[judgment["sample_b"]], reference
        )
        sent, neutralised = neutralise_messages(messages)
        digest = prompt_hash(sent)
        if digest == judgment["prompt_hash"]:
            return source, sent, digest, neutralised
        first = first or (source, sent, digest, neutralised)
    return first


def print_messages(
    console: Console,
    prompt: dict[str, Any],
    rows: dict[str, list[dict[str, Any]]],
    index: dict[str, str],
    sources: list[Source | str],
) -> None:
    """Every judgment's messages exactly as the backend received them (chat control markers in the data
    already neutralised), each turn under a `### role` line, then the prefill, and whether they hash to the
    judgment's stored `prompt_hash`."""
    judgments = rows["judgments"]
    heading(console, f"judge messages ({len(judgments)})")
    for note in (s for s in sources if isinstance(s, str)):
        paragraph(console, f"note: {note}", "dim")
    usable = [s for s in sources if isinstance(s, Source)]
    texts = {s["sample_id"]: s["text"] for s in rows["samples"] if s["text"] is not None}
    refs = {r["reference_name"]: r["text"] for r in rows["references"] if r["status"] == "ok"}
    for n, j in enumerate(sorted(judgments, key=lambda j: judgment_order(j, index)), 1):
        a, b = index.get(j["sample_a"], "?"), index.get(j["sample_b"], "?")
        ref = f" · reference {j['reference_name']}" if j["reference_name"] else ""
        console.print(text(f"judgment {n} of {len(judgments)}: (a) {a}, (b) {b} · order {j['order']}{ref}", "bold"))
        built = rebuild(j, prompt, texts, refs, usable) if {j["sample_a"], j["sample_b"]} <= texts.keys() else None
        if built is None:
            paragraph(
                console, "cannot be rebuilt: no recipe or built-in protocol renders it (give --recipe-file)", "red"
            )
            continue
        source, sent, digest, neutralised = built
        console.print(hash_line(digest, j["prompt_hash"], source), soft_wrap=True)
        if neutralised:
            note = f"{neutralised} turn(s) hold chat control markers from the data, sent broken by a zero-width space"
            console.print(text(note, "dim"))
        for message in sent:
            console.print(text(f"### {message['role']}", "cyan"))
            verbatim(console, message["content"])
        shown = (
            "### assistant (prefill: the judge's answer continues it)" if j["prefill"] else "### assistant (no prefill)"
        )
        console.print(text(shown, "cyan"))
        if j["prefill"]:
            verbatim(console, j["prefill"])
        console.print()


def hash_line(digest: str, stored: str, source: Source) -> Text:
    """Whether the rebuilt messages hash to the judgment's stored `prompt_hash`, and what rebuilt them."""
    if digest == stored:
        return text(f"prompt hash {digest} matches the stored hash (rebuilt from {source.label})", "green")
    return text(
        f"prompt hash MISMATCH: stored {stored}, rebuilt {digest} from {source.label}: these are not the messages "
        "this judgment sent (its template, recipe or factory's wording changed since, or the build had --set "
        "overrides: give show the same --set)",
        "bold red",
    )


def verbatim(console: Console, value: str) -> None:
    """A turn's text written as is, with only control characters made visible (`clean`): no markup, wrapping or
    tab expansion, so the prompt on screen is the prompt that was sent, character for character."""
    console.file.write(clean(value) + "\n")
    console.file.flush()


def judgment_order(j: dict[str, Any], index: dict[str, str]) -> tuple[Any, ...]:
    """The judgments table's order: pair by pair, each pair's two orders together, per reference."""
    pair = sorted((index.get(j["sample_a"], j["sample_a"]), index.get(j["sample_b"], j["sample_b"])))
    return (*pair, j["reference_name"] or "", j["order"] != "forward", j["judge"], j["protocol"])
