"""Export: pairs → a Hugging Face preference dataset in TRL's conversational format, plus a dataset card.

Written to one folder: `datasets.save_to_disk` layout (train/, test/, dataset_dict.json) for
`load_from_disk`, the same rows as `data/<split>.parquet` for `load_dataset("parquet", ...)` and the Hub,
and README.md. The folder is built beside its target and renamed into place.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.core.files import check_folder
from factory.core.keys import stable_hash
from factory.core.owned import (
    FolderKind,
    building_beside,
    check_replaceable,
    read_marker,
    replace_folder,
    seal,
    writing,
)
from factory.labelers.registry import labeler_of
from factory.pipeline.stage import Context

if TYPE_CHECKING:
    from factory.config.recipe import LoadedRecipe

MARKER = ".factory-export.json"
EXPORT_FOLDER = FolderKind("export folder", MARKER, "export.path")
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
    kept = [
        rec
        for rec in records
        if not any(tok in m["content"] for col in columns for m in rec[col] for tok in SPECIAL_TOKENS)
    ]
    return kept, len(records) - len(kept)


def preference_records(ctx: Context, pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One TRL conversational preference row per pair, with provenance columns."""
    recipe = ctx.recipe
    found = labeler_of(recipe)
    assert recipe.samples is not None and found is not None
    labeler = found.provenance(recipe)
    prompts = {p["prompt_id"]: p for p in ctx.rows["prompts"]}
    samples = {s["sample_id"]: s for s in ctx.rows["samples"]}
    recipe_hash = recipe.content_hash
    records = []
    for pair in pairs:
        records.append(
            {
                "prompt": json.loads(prompts[pair["prompt_id"]]["messages"]),
                "chosen": [{"role": "assistant", "content": samples[pair["chosen_sample_id"]]["text"]}],
                "rejected": [{"role": "assistant", "content": samples[pair["rejected_sample_id"]]["text"]}],
                "prompt_id": pair["prompt_id"],
                "chosen_sample_id": pair["chosen_sample_id"],
                "rejected_sample_id": pair["rejected_sample_id"],
                "chosen_score": pair["chosen_score"],
                "rejected_score": pair["rejected_score"],
                "margin": pair["margin"],
                "policy": recipe.samples.policy,
                **labeler,
                "recipe": recipe.name,
                "recipe_hash": recipe_hash,
            }
        )
    return records


def split_records(records: list[dict[str, Any]], fraction: float, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Train/test by a hash of (seed, prompt_id): stable when prompts are added or removed."""
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for rec in records:
        u = int(stable_hash([seed, rec["prompt_id"]], 8), 16) / 16**8
        splits["test" if u < fraction else "train"].append(rec)
    return splits


def card(ctx: Context, splits: dict[str, list[dict[str, Any]]], notes: dict[str, Any]) -> str:
    """The dataset card: what was built, from what, with which labeler, and how it came out."""
    r = ctx.recipe
    labeler = labeler_of(r)
    assert labeler is not None
    margins = [rec["margin"] for recs in splits.values() for rec in recs]
    counts, score_lines = labeler.card_facts(ctx)
    lines = [
        "---",
        "tags: [dpo, preference, factory]",
        "configs:",
        "- config_name: default",
        "  data_files:",
        *[f"  - split: {s}\n    path: data/{s}.parquet" for s in splits],
        "---",
        "",
        f"# {r.name}",
        "",
        r.description or "A preference dataset built by factory (reference-guided pairwise judging).",
        "",
        "## How it was built",
        "",
        f"- Prompts: {len(ctx.rows['prompts'])} from `{r.prompts.path or r.prompts.dataset or 'inline'}`",
        f"- Policy: `{r.samples.policy}` ({r.models[r.samples.policy].backend}: "
        f"{r.models[r.samples.policy].model}), {r.samples.n} samples per prompt, "
        f"temperature {r.samples.params.temperature}, top_p {r.samples.params.top_p}",
        labeler.card_line(r),
        f"- Pairs: {r.pairs.method}, min margin {r.pairs.min_margin}, max tokens {r.pairs.max_tokens}",
        f"- Run `{notes['run_id']}`, export stage key `{notes['stage_key']}`, recipe hash "
        f"`{splits['train'][0]['recipe_hash'] if splits['train'] else ''}`",
        "",
        "## Counts",
        "",
        "| what | n |",
        "| --- | --- |",
        f"| samples | {len(ctx.rows['samples'])} |",
        *[f"| {what} | {n} |" for what, n in counts],
        *[f"| pairs in {s} | {len(recs)} |" for s, recs in splits.items()],
        f"| pairs dropped for a chat control token in their text | {notes['dropped_special_tokens']} |",
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


def _is_current(path: Path, stage_key: str) -> bool:
    """Whether `path` holds this export, written from complete inputs (an export of an incomplete run has the
    same key, so it is rewritten once the run completes)."""
    marker = read_marker(path, EXPORT_FOLDER)
    return marker is not None and marker.get("stage_key") == stage_key and marker.get("complete", True) is True


def export_path(loaded: LoadedRecipe, wh_root: Path) -> Path:
    """Where a recipe's preference dataset goes: `export.path`, else `<warehouse>/exports/<name>` (its SFT
    data goes beside it, with `-sft` appended)."""
    r = loaded.recipe
    return loaded.resolve(r.export.path) if r.export.path else wh_root / "exports" / r.name


def check_export_target(path: Path, wh_root: Path | None = None) -> None:
    """Refuse to export over anything factory did not write: an export replaces only its own folders."""
    check_folder(path)
    check_replaceable(path, EXPORT_FOLDER, wh_root)


def write_dataset_folder(
    path: Path,
    splits: dict[str, list[dict[str, Any]]],
    features: Any,
    readme: str,
    stage_key: str,
    run_id: str,
    complete: bool = True,
) -> None:
    """save_to_disk layout + data/<split>.parquet + README.md, built beside `path` and renamed into place."""
    import datasets

    check_export_target(path)
    with building_beside(path) as tmp:
        dd = datasets.DatasetDict(
            {
                # from_list drops the columns of an empty list; from_dict keeps them.
                split: datasets.Dataset.from_dict({k: [r[k] for r in recs] for k in features}, features=features)
                for split, recs in splits.items()
            }
        )
        # An empty split saved with datasets' default shard count gets zero shards, and load_from_disk then
        # fails on it (IndexError in concat_tables); one explicit (empty) shard loads as a 0-row split.
        dd.save_to_disk(str(tmp), num_shards={split: 1 for split, ds in dd.items() if len(ds) == 0})
        (tmp / "data").mkdir()
        for split, ds in dd.items():
            ds.to_parquet(str(tmp / "data" / f"{split}.parquet"))
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        seal(tmp, EXPORT_FOLDER, {"stage_key": stage_key, "run_id": run_id, "complete": complete})
        replace_folder(tmp, path, EXPORT_FOLDER)


def export_dataset(path: Path, ctx: Context, pairs: list[dict[str, Any]], stage_key: str) -> ExportResult:
    """Write the preference dataset folder at `path` (skipped when it already holds this export stage key)."""
    with writing(path, "export"):
        if _is_current(path, stage_key):
            return ExportResult(len(pairs), {"skipped": True, "path": str(path)})
        import datasets  # heavy; only when something is written

        datasets.disable_progress_bars()  # the build shows its own progress
        records, dropped = without_special_tokens(preference_records(ctx, pairs))
        r = ctx.recipe
        splits = split_records(records, r.export.test_fraction, r.export.seed)
        notes: dict[str, Any] = {
            "run_id": ctx.run_id,
            "stage_key": stage_key,
            "dropped_special_tokens": dropped,
            **{f"{s}_rows": len(v) for s, v in splits.items()},
        }
        readme = card(ctx, splits, notes)
        complete = not ctx.incomplete
        notes["complete"] = complete
        write_dataset_folder(path, splits, preference_features(datasets), readme, stage_key, ctx.run_id, complete)
    notes["path"] = str(path)
    return ExportResult(len(records), notes)


def sft_records(ctx: Context) -> list[dict[str, Any]]:
    """One TRL prompt/completion row per prompt that has the chosen reference (the distillation baseline)."""
    r = ctx.recipe
    name = r.export.sft_reference
    refs = {x["prompt_id"]: x for x in ctx.rows["references"] if x["reference_name"] == name and x["status"] == "ok"}
    records = []
    for p in ctx.rows["prompts"]:
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
    if _is_current(path, stage_key):
        return ExportResult(0, {"skipped": True, "path": str(path)})
    import datasets

    datasets.disable_progress_bars()
    r = ctx.recipe
    records, dropped = without_special_tokens(sft_records(ctx), columns=("prompt", "completion"))
    splits = split_records(records, r.export.test_fraction, r.export.seed)
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
    readme = "\n".join(
        [
            f"# {r.name} (SFT on references)",
            "",
            f"Supervised fine-tuning data: each prompt with the `{r.export.sft_reference}` reference as the",
            "completion (the paper's distillation baseline), in TRL's conversational prompt/completion format.",
            "",
            *[f"- {s}: {len(v)} rows" for s, v in splits.items()],
            "",
            "## Recipe",
            "",
            "```yaml",
            ctx.loaded.text.rstrip(),
            "```",
            "",
        ]
    )
    write_dataset_folder(path, splits, features, readme, stage_key, ctx.run_id, not ctx.incomplete)
    notes = {"path": str(path), "dropped_special_tokens": dropped, **{f"{s}_rows": len(v) for s, v in splits.items()}}
    return ExportResult(len(records), notes)
