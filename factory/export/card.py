"""The preference dataset's card (README.md), and the counts it is made from.

The counts are taken shard by shard (`shard_tally`) and kept with each shard's files in the export's marker,
so an export that takes most shards as they were still has every count without reading those shards again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from factory.labelers.registry import labeler_of
from factory.pipeline.stage import Context


@dataclass
class Tally:
    """What the card says of an export, summed over its shards."""

    prompts: int = 0
    samples: int = 0
    dropped: int = 0
    margins: list[float] = field(default_factory=lambda: [0, 0.0, math.inf, -math.inf])
    """Over the exported pairs: [count, sum, min, max] of the margin."""
    sources: dict[str, list[int]] = field(default_factory=dict)
    """Per policy or import source: [samples, chosen, rejected]."""
    labeler: dict[str, int] = field(default_factory=dict)
    """The labeler's own counts (`Labeler.shard_counts`)."""

    def add(self, shard: dict[str, Any]) -> None:
        """Add one shard's counts (`shard_tally`, or as a marker kept them)."""
        self.prompts += shard["prompts"]
        self.samples += shard["samples"]
        self.dropped += shard["dropped"]
        n, total, low, high = shard["margins"]
        if n:
            m = self.margins
            self.margins = [m[0] + n, m[1] + total, min(m[2], low), max(m[3], high)]
        for name, counts in shard["sources"].items():
            mine = self.sources.setdefault(name, [0, 0, 0])
            self.sources[name] = [a + b for a, b in zip(mine, counts, strict=True)]
        for name, n in shard["labeler"].items():
            self.labeler[name] = self.labeler.get(name, 0) + n


def shard_tally(
    ctx: Context, i: int, prompts: int, samples: list[dict[str, Any]], records: list[dict[str, Any]], dropped: int
) -> dict[str, Any]:
    """The card's counts of shard `i` (as JSON, for the marker): its prompts, samples, exported pairs and margins,
    per-source counts, and the labeler's own."""
    labeler = labeler_of(ctx.recipe)
    assert labeler is not None
    sources: dict[str, list[int]] = {}
    for s in samples:
        sources.setdefault(s.get("policy") or "?", [0, 0, 0])[0] += 1
    for rec in records:
        sources.setdefault(rec["chosen_policy"] or "?", [0, 0, 0])[1] += 1
        sources.setdefault(rec["rejected_policy"] or "?", [0, 0, 0])[2] += 1
    margins = [rec["margin"] for rec in records]
    return {
        "prompts": prompts,
        "samples": len(samples),
        "dropped": dropped,
        "margins": [len(margins), math.fsum(margins), min(margins), max(margins)] if margins else [0, 0.0, 0.0, 0.0],
        "sources": sources,
        "labeler": labeler.shard_counts(ctx, i),
    }


def source_names(r: Any) -> list[str]:
    """The recipe's sample sources by name: each policy's model name, each import's name."""
    return [getattr(s, "policy", None) or s.imported for s in r.sample_sources]


def _source_lines(r: Any) -> list[str]:
    """How the card names where the samples came from: one line per policy or import source."""
    lines = []
    for s in r.sample_sources:
        if hasattr(s, "imported"):
            separate = s.path or (s.dataset and f"hf:{s.dataset}")
            where = f"column `{s.field}`" + (f" of `{separate}`, joined by {s.join}" if separate else " of the prompts")
            lines.append(f"- Imported completions `{s.imported}`: {where} (no model call)")
            continue
        m = r.models[s.policy]
        lines.append(
            f"- Policy: `{s.policy}` ({m.backend}: {m.model}), {s.n} samples per prompt, "
            f"temperature {s.params.temperature}, top_p {s.params.top_p}"
        )
    return lines


def card(ctx: Context, rows: dict[str, int], tally: Tally, notes: dict[str, Any]) -> str:
    """The dataset card: what was built, from what, with which labeler, and how it came out."""
    r = ctx.recipe
    labeler = labeler_of(r)
    assert labeler is not None
    counts, score_lines = labeler.card_facts(tally.labeler)
    files = [f"  - split: {s}\n    path: data/{s}-*.parquet" for s, n in rows.items() if n]
    lines = [
        "---",
        "tags: [dpo, preference, factory]",
        *(["configs:", "- config_name: default", "  data_files:", *files] if files else []),
        "---",
        "",
        f"# {r.name}",
        "",
        r.description or "A preference dataset built by factory (reference-guided pairwise judging).",
        "",
        "## How it was built",
        "",
        f"- Prompts: {tally.prompts} from `{r.prompts.path or r.prompts.dataset or 'inline'}`",
        *_source_lines(r),
        labeler.card_line(r),
        f"- Pairs: {r.pairs.method}, min margin {r.pairs.min_margin}, max tokens {r.pairs.max_tokens}",
        f"- Run `{notes['run_id']}`, export stage key `{notes['stage_key']}`, recipe hash "
        f"`{r.content_hash if rows['train'] else ''}`",
        "",
        "## Counts",
        "",
        "| what | n |",
        "| --- | --- |",
        f"| samples | {tally.samples} |",
        *[f"| {what} | {n} |" for what, n in counts],
        *[f"| pairs in {s} | {n} |" for s, n in rows.items()],
        f"| pairs dropped for a chat control token in their text | {tally.dropped} |",
        "",
        "## Sources",
        "",
        "| policy or import source | samples | chosen | rejected |",
        "| --- | --- | --- | --- |",
        *[f"| `{name}` | {n[0]} | {n[1]} | {n[2]} |" for name, n in sorted(tally.sources.items())],
        "",
        "## Scores",
        "",
        *score_lines,
    ]
    n, total, low, high = tally.margins
    if n:
        lines.append(f"- Margin (chosen − rejected score): mean {total / n:.3f}, min {low:.3f}, max {high:.3f}")
    lines += ["", "## Recipe", "", "```yaml", ctx.loaded.text.rstrip(), "```", ""]
    return "\n".join(lines)
