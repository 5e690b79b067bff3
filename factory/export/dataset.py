"""Export: pairs → a Hugging Face preference dataset in TRL's conversational format, plus a dataset card.

Written to one folder (`factory.export.writer`): Parquet files for `load_dataset("parquet", ...)` and the
Hub, the same rows in `datasets.save_to_disk` layout for `load_from_disk`, and the card (`factory.export.card`).
Records are made and written one shard of the build at a time, so the export holds one shard, never the
dataset; a shard the folder already holds unchanged is not made again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.core.keys import stable_hash
from factory.core.owned import read_marker, writing
from factory.export.card import Tally, card, shard_tally, source_names
from factory.export.writer import EXPORT_FOLDER, DatasetWriter, Layout
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


def sft_features(datasets: Any) -> Any:
    """The SFT export's column types (TRL's conversational prompt/completion, with provenance)."""
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    text = datasets.Value("string")
    return datasets.Features(
        {
            "prompt": datasets.List(message),
            "completion": datasets.List(message),
            **{k: text for k in ("prompt_id", "reference_name", "source_kind", "reference_model", "recipe")},
            "recipe_hash": text,
        }
    )


PREFERENCE = Layout("preference", 1, preference_features)
SFT = Layout("sft", 1, sft_features)
"""The two exports' columns; a version is bumped when its columns change (`Layout`)."""


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


def _shards(ctx: Context, out: DatasetWriter, records_of: Callable[[int], tuple[list[dict[str, Any]], Any]]) -> Tally:
    """Write every shard of the build into `out`, taking the ones the folder holds unchanged as they are;
    `records_of(i)` reads shard `i` and gives its records and card counts. Returns the summed counts."""
    r = ctx.recipe
    tally = Tally()
    for i in range(ctx.shard_count):
        key = ctx.shard_key(i)
        key = key and stable_hash({"export": EXPORT_SHARD_VERSION, "recipe": r.content_hash, "shard": key})
        counts = out.reuse(key)
        if counts is None:
            records, counts = records_of(i)
            out.write(key, split_records(records, r.export.test_fraction, r.export.seed), counts)
        tally.add(counts)
    return tally


EXPORT_SHARD_VERSION = 1
"""Bumped when the records an export makes of a shard change for the same rows."""


def export_dataset(path: Path, ctx: Context, stage_key: str) -> ExportResult:
    """Write the preference dataset folder at `path` from the build's shards (skipped when it already holds
    this export stage key; shards it holds unchanged are taken as they are)."""
    with writing(path, "export"):
        found = _current_rows(path, stage_key)
        if found is not None:
            return ExportResult(found, {"skipped": True, "path": str(path)})

        def records_of(i: int) -> tuple[list[dict[str, Any]], Any]:
            prompts = ctx.shard_table("prompts", i, ["prompt_id", "messages"]).to_pylist()
            samples = ctx.shard_table("samples", i, ["sample_id", "text", "policy"]).to_pylist()
            pairs = ctx.shard_table("pairs", i).to_pylist()
            records, dropped = without_special_tokens(preference_records(ctx, prompts, samples, pairs))
            return records, shard_tally(ctx, i, len(prompts), samples, records, dropped)

        with DatasetWriter(path, PREFERENCE) as out:
            tally = _shards(ctx, out, records_of)
            complete = not ctx.incomplete
            notes: dict[str, Any] = {
                "run_id": ctx.run_id,
                "stage_key": stage_key,
                "dropped_special_tokens": tally.dropped,
                "shards_reused": out.reused,
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
    r = ctx.recipe

    def records_of(i: int) -> tuple[list[dict[str, Any]], Any]:
        prompts = ctx.shard_table("prompts", i, ["prompt_id", "messages"]).to_pylist()
        references = ctx.shard_table("references", i).to_pylist()
        records, dropped = without_special_tokens(sft_records(ctx, prompts, references), ("prompt", "completion"))
        return records, {
            "prompts": len(prompts),
            "samples": 0,
            "dropped": dropped,
            "margins": [0, 0.0, 0.0, 0.0],
            "sources": {},
            "labeler": {},
        }

    with DatasetWriter(path, SFT) as out:
        dropped = _shards(ctx, out, records_of).dropped
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
