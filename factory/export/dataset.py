"""Export: pairs → a Hugging Face preference dataset in TRL's conversational format, plus a dataset card.

Written to one folder (`factory.export.writer`): `data/<split>.parquet` for `load_dataset("parquet", ...)`
and the Hub, the same rows in `datasets.save_to_disk` layout for `load_from_disk`, and README.md. Records are
made and written one shard of the build at a time, so the export holds one shard, never the dataset.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.core.keys import stable_hash
from factory.core.owned import read_marker, writing
from factory.export.writer import EXPORT_FOLDER, DatasetWriter
from factory.labelers.registry import labeler_of
from factory.pipeline.stage import Context

if TYPE_CHECKING:
    from factory.config.recipe import LoadedRecipe

# Chat-template control tokens that must never survive into exported text: a trainer's tokenizer parses them
# as special tokens, so the template's own BOS/EOS would be doubled and DPO would learn from a broken turn.
# (`<s>` and `</s>` are left out: they are also ordinary text, HTML strikethrough for one.)
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>", "<|end|>")


@dataclass
class ExportResult:
    """How many pairs went where, and the card's numbers."""

    rows: int
    notes: dict[str, Any] = field(default_factory=dict)


def preference_features(datasets: Any) -> Any:
    """Explicit column types, so an empty split still has the right schema."""
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    text, number = datasets.Value("string"), datasets.Value("float64")
    return datasets.Features(
        {
            "prompt": datasets.List(message),
            "chosen": datasets.List(message),
            "rejected": datasets.List(message),
            "prompt_id": text,
            "chosen_sample_id": text,
            "rejected_sample_id": text,
            "chosen_score": number,
            "rejected_score": number,
            "margin": number,
            "policy": text,
            "chosen_policy": text,
            "rejected_policy": text,
            "judge": text,
            "protocol": text,
            "reference_name": text,
            "recipe": text,
            "recipe_hash": text,
        }
    )


def without_special_tokens(
    records: list[dict[str, Any]], columns: tuple[str, ...] = ("prompt", "chosen", "rejected")
) -> tuple[list[dict[str, Any]], int]:
    """Records whose messages carry no chat control token, and how many were dropped for carrying one."""
    kept = [rec for rec in records if not any(_has_special(m["content"]) for col in columns for m in rec[col])]
    return kept, len(records) - len(kept)


_SHARED = "<|"
assert all(_SHARED in tok for tok in SPECIAL_TOKENS)  # what makes `_has_special`'s first test exact


def _has_special(text: str) -> bool:
    """Whether a text holds a special token: one substring test for the text of nearly every record, which
    holds none of what all of them share."""
    return _SHARED in text and any(tok in text for tok in SPECIAL_TOKENS)


def preference_records(
    ctx: Context, prompts: list[dict[str, Any]], samples: list[dict[str, Any]], pairs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One TRL conversational preference row per pair (of one shard: its prompts, samples and pairs), with
    provenance columns."""
    recipe = ctx.recipe
    found = labeler_of(recipe)
    assert recipe.samples is not None and found is not None
    labeler = found.provenance(recipe)
    messages = {p["prompt_id"]: p["messages"] for p in prompts}
    texts = {s["sample_id"]: s["text"] for s in samples}
    # Where each sample came from: its policy, or its import source (`NAME/MODEL` with a model field).
    source = {s["sample_id"]: s.get("policy") for s in samples}
    policy = recipe.policy or "+".join(source_names(recipe))
    recipe_hash = recipe.content_hash
    records = []
    for pair in pairs:
        records.append(
            {
                "prompt": json.loads(messages[pair["prompt_id"]]),
                "chosen": [{"role": "assistant", "content": texts[pair["chosen_sample_id"]]}],
                "rejected": [{"role": "assistant", "content": texts[pair["rejected_sample_id"]]}],
                "prompt_id": pair["prompt_id"],
                "chosen_sample_id": pair["chosen_sample_id"],
                "rejected_sample_id": pair["rejected_sample_id"],
                "chosen_score": pair["chosen_score"],
                "rejected_score": pair["rejected_score"],
                "margin": pair["margin"],
                "policy": policy,
                "chosen_policy": source[pair["chosen_sample_id"]],
                "rejected_policy": source[pair["rejected_sample_id"]],
                **labeler,
                "recipe": recipe.name,
                "recipe_hash": recipe_hash,
            }
        )
    return records


def split_of(prompt_id: str, fraction: float, seed: int) -> str:
    """Train or test, by a hash of (seed, prompt_id): stable when prompts are added or removed."""
    u = int(stable_hash([seed, prompt_id], 8), 16) / 16**8
    return "test" if u < fraction else "train"


def split_records(records: list[dict[str, Any]], fraction: float, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Records by split (`split_of`)."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    of: dict[str, str] = {}  # a prompt's pairs share its split: one hash per prompt
    for rec in records:
        pid = rec["prompt_id"]
        split = of.get(pid)
        if split is None:
            split = of[pid] = split_of(pid, fraction, seed)
        splits[split].append(rec)
    return splits


@dataclass
class Tally:
    """What the card says of an export, counted while its shards stream past."""

    prompts: int = 0
    samples: int = 0
    dropped: int = 0
    margins: list[float] = field(default_factory=list)
    """One float per pair (8 bytes: 60K pairs are half a MiB)."""
    sources: dict[str, list[int]] = field(default_factory=dict)
    """Per policy or import source: [samples, chosen, rejected]."""

    def count(self, samples: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
        """Add one shard's samples and exported pairs to the per-source counts."""
        for s in samples:
            self.sources.setdefault(s.get("policy") or "?", [0, 0, 0])[0] += 1
        for rec in records:
            self.sources.setdefault(rec["chosen_policy"] or "?", [0, 0, 0])[1] += 1
            self.sources.setdefault(rec["rejected_policy"] or "?", [0, 0, 0])[2] += 1


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
    margins = tally.margins
    counts, score_lines = labeler.card_facts(ctx)
    lines = [
        "---",
        "tags: [dpo, preference, factory]",
        "configs:",
        "- config_name: default",
        "  data_files:",
        *[f"  - split: {s}\n    path: data/{s}.parquet" for s in rows],
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
    if margins:
        lines.append(
            f"- Margin (chosen − rejected score): mean {statistics.fmean(margins):.3f}, "
            f"min {min(margins):.3f}, max {max(margins):.3f}"
        )
    lines += ["", "## Recipe", "", "```yaml", ctx.loaded.text.rstrip(), "```", ""]
    return "\n".join(lines)


def _current_rows(path: Path, stage_key: str) -> int | None:
    """The pairs `path` holds when it holds this export, written from complete inputs (an export of an
    incomplete run has the same key, so it is rewritten once the run completes); None when it does not."""
    marker = read_marker(path, EXPORT_FOLDER)
    if marker is None or marker.get("stage_key") != stage_key or marker.get("complete", True) is not True:
        return None
    return int(marker.get("rows") or 0)


def export_path(loaded: LoadedRecipe, wh_root: Path) -> Path:
    """Where a recipe's preference dataset goes: `export.path`, else `<warehouse>/exports/<name>` (its SFT
    data goes beside it, with `-sft` appended)."""
    r = loaded.recipe
    return loaded.resolve(r.export.path) if r.export.path else wh_root / "exports" / r.name


def export_dataset(path: Path, ctx: Context, stage_key: str) -> ExportResult:
    """Write the preference dataset folder at `path` from the build's shards (skipped when it already holds
    this export stage key)."""
    with writing(path, "export"):
        found = _current_rows(path, stage_key)
        if found is not None:
            return ExportResult(found, {"skipped": True, "path": str(path)})
        import datasets  # heavy; only when something is written

        datasets.disable_progress_bars()  # the build shows its own progress
        r = ctx.recipe
        tally = Tally()
        shards = zip(
            ctx.each_shard("prompts", ["prompt_id", "messages"]),
            ctx.each_shard("samples", ["sample_id", "text", "policy"]),
            ctx.each_shard("pairs"),
            strict=True,
        )
        with DatasetWriter(path, preference_features(datasets)) as out:
            for prompts, samples, pairs in shards:
                records, dropped = without_special_tokens(preference_records(ctx, prompts, samples, pairs))
                tally.prompts, tally.samples, tally.dropped = (
                    tally.prompts + len(prompts),
                    tally.samples + len(samples),
                    tally.dropped + dropped,
                )
                tally.margins += [rec["margin"] for rec in records]
                tally.count(samples, records)
                for split, recs in split_records(records, r.export.test_fraction, r.export.seed).items():
                    out.write(split, recs)
            complete = not ctx.incomplete
            notes: dict[str, Any] = {
                "run_id": ctx.run_id,
                "stage_key": stage_key,
                "dropped_special_tokens": tally.dropped,
                **{f"{s}_rows": n for s, n in out.rows.items()},
            }
            readme = card(ctx, out.rows, tally, notes)
            rows = sum(out.rows.values())
            out.finish(readme, {"stage_key": stage_key, "run_id": ctx.run_id, "complete": complete, "rows": rows})
    notes["complete"] = complete
    notes["path"] = str(path)
    return ExportResult(rows, notes)


def sft_records(ctx: Context, prompts: list[dict[str, Any]], references: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One TRL prompt/completion row per prompt (of one shard) that has the chosen reference (the
    distillation baseline)."""
    r = ctx.recipe
    name = r.export.sft_reference
    refs = {x["prompt_id"]: x for x in references if x["reference_name"] == name and x["status"] == "ok"}
    records = []
    for p in prompts:
        ref = refs.get(p["prompt_id"])
        if ref is None:
            continue
        records.append(
            {
                "prompt": json.loads(p["messages"]),
                "completion": [{"role": "assistant", "content": ref["text"]}],
                "prompt_id": p["prompt_id"],
                "reference_name": name,
                "source_kind": ref["source_kind"],
                "reference_model": ref.get("model"),
                "recipe": r.name,
                "recipe_hash": r.content_hash,
            }
        )
    return records


def export_sft(path: Path, ctx: Context, stage_key: str) -> ExportResult:
    """Write the SFT dataset of one reference source (prompt/completion, TRL's conversational format)."""
    with writing(path, "export"):
        return _export_sft(path, ctx, stage_key)


def _export_sft(path: Path, ctx: Context, stage_key: str) -> ExportResult:
    found = _current_rows(path, stage_key)
    if found is not None:
        return ExportResult(found, {"skipped": True, "path": str(path)})
    import datasets

    datasets.disable_progress_bars()
    r = ctx.recipe
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    text = datasets.Value("string")
    features = datasets.Features(
        {
            "prompt": datasets.List(message),
            "completion": datasets.List(message),
            **{k: text for k in ("prompt_id", "reference_name", "source_kind", "reference_model", "recipe")},
            "recipe_hash": text,
        }
    )
    dropped = 0
    shards = zip(ctx.each_shard("prompts", ["prompt_id", "messages"]), ctx.each_shard("references"), strict=True)
    with DatasetWriter(path, features) as out:
        for prompts, references in shards:
            records, n = without_special_tokens(sft_records(ctx, prompts, references), columns=("prompt", "completion"))
            dropped += n
            for split, recs in split_records(records, r.export.test_fraction, r.export.seed).items():
                out.write(split, recs)
        readme = "\n".join(
            [
                f"# {r.name} (SFT on references)",
                "",
                f"Supervised fine-tuning data: each prompt with the `{r.export.sft_reference}` reference as the",
                "completion (the paper's distillation baseline), in TRL's conversational prompt/completion format.",
                "",
                *[f"- {s}: {n} rows" for s, n in out.rows.items()],
                "",
                "## Recipe",
                "",
                "```yaml",
                ctx.loaded.text.rstrip(),
                "```",
                "",
            ]
        )
        rows = sum(out.rows.values())
        info = {"stage_key": stage_key, "run_id": ctx.run_id, "complete": not ctx.incomplete, "rows": rows}
        notes = {"path": str(path), "dropped_special_tokens": dropped, **{f"{s}_rows": n for s, n in out.rows.items()}}
        out.finish(readme, info)
    return ExportResult(rows, notes)
