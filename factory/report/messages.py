"""`factory show --messages`: every judgment's messages rebuilt as the judge received them, from the recipe's
protocol or a built-in one, and checked against the stored prompt hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from factory.config.loading import load_recipe
from factory.core.errors import UserInputError
from factory.core.text import text
from factory.judge.protocols import PROTOCOLS, Protocol
from factory.models.chat_tokens import neutralise_messages
from factory.models.requests import prompt_hash
from factory.report.prompt_rows import judgment_order, literal
from factory.report.terminal import heading, paragraph, verbatim
from factory.stages.judgments import judge_protocol
from factory.warehouse.store import Warehouse


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
        out += recipe_sources(path, options.overrides)
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


def recipe_sources(path: Path, overrides: dict[str, Any]) -> list[Source | str]:
    """The judge protocols of a recipe file (with `--set` overrides; one per entry of a panel), or a note on
    why it could not be read."""
    try:
        loaded = load_recipe(path, overrides)
        if loaded.recipe.judgments is None:
            return [f"recipe {path} has no judgments section"]
        protocols = [judge_protocol(loaded, i) for i in range(len(loaded.recipe.judges))]
    except UserInputError as exc:
        return [f"recipe {path} not read: {exc}"]
    out: list[Source | str] = []
    for j, protocol in zip(loaded.recipe.judges, protocols, strict=True):
        label = f"recipe {path}" + (f", template {loaded.resolve(j.template)}" if j.template else "")
        out.append(Source(label, protocol))
    return out


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
