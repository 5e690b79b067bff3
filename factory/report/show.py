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

from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from factory.core.text import clean, one_line
from factory.report.messages import MessageOptions, print_messages, protocol_sources
from factory.report.prompt_rows import find_prompt, judgment_order, policy_figures, rows_of
from factory.report.terminal import heading, paragraph
from factory.warehouse.store import Warehouse

ANSWER_CHARS = 80  # characters of a judge's raw answer in the judgments table


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
        print_policies(console, policy_figures(wh, prompt["recipe"]))
        if messages is not None:
            sources = protocol_sources(wh, rows["judgments"], messages)
            print_messages(console, prompt, rows, index, sources)
        console.print()


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
    several = len({s["policy"] for s in samples}) > 1  # name each sample's source when they differ
    for s in samples:
        index[s["sample_id"]] = f"#{s['sample_index']}"
        line = Text(f"  #{s['sample_index']}  ", style="bold")
        line.append(clean(s["sample_id"]), style="dim")
        line.append(f"  {score_text(s)}  {s['n_tokens'] or 0} tokens, {clean(s['finish_reason'])}")
        if several:
            line.append(f", {clean(s['policy'])}")
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
    panel = len(judges) > 1  # a panel: each row names its judge
    for column in ("order", "(a)", "(b)", "ref", *(["judge"] if panel else []), "verdict", "winner", "p(a)", "parse"):
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
            *([f"{clean(j['judge'])} {clean(j['protocol'])}"] if panel else []),
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


def print_policies(console: Console, figures: list[dict[str, Any]]) -> None:
    """The recipe's figures per policy (or import source), over all its prompts; only when it has several."""
    if len(figures) < 2:
        return
    heading(console, f"policies of the recipe ({len(figures)}), over all its prompts")
    table = Table(header_style="bold", box=None, padding=(0, 1), pad_edge=False)
    for column in ("policy", "samples", "chosen", "rejected", "mean score", "mean length"):
        table.add_column(column, no_wrap=column != "policy")
    for f in figures:
        score = "—" if f["mean_score"] is None else f"{f['mean_score']:.3f}"
        length = "—" if f["mean_length"] is None else f"{f['mean_length']:.0f}"
        cells = (clean(f["policy"]), str(f["samples"]), str(f["chosen"]), str(f["rejected"]), score, length)
        table.add_row(*(Text(x) for x in cells))
    console.print(Padding(table, (0, 0, 0, 2)))
