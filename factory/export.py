"""Export: pairs → a Hugging Face preference dataset in TRL's conversational format, plus a dataset card.

Written to one folder: `datasets.save_to_disk` layout (train/, test/, dataset_dict.json) for
`load_from_disk`, the same rows as `data/<split>.parquet` for `load_dataset("parquet", ...)` and the Hub,
and README.md. The folder is built beside its target and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.keys import stable_hash
from factory.recipe import LoadedRecipe

MARKER = ".factory-export.json"
# Special tokens that must never survive into exported text: a chat template adds its own, and a doubled
# BOS/EOS silently changes what DPO learns.
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>", "<s>", "</s>")


@dataclass
class ExportResult:
    """How many pairs went where, and the card's numbers."""

    rows: int
    notes: dict[str, Any] = field(default_factory=dict)


def position_consistency(judgments: list[dict[str, Any]]) -> tuple[float | None, int]:
    """Share of sample pairs judged in both orders whose two parsed verdicts name the same winner."""
    winners: dict[tuple[str, str], list[str]] = defaultdict(list)
    for j in judgments:
        if j["verdict"] not in ("a", "b"):
            continue
        pair = tuple(sorted((j["sample_a"], j["sample_b"])))
        winners[pair].append(j["sample_a"] if j["verdict"] == "a" else j["sample_b"])  # type: ignore[index]
    both = [w for w in winners.values() if len(w) == 2]
    if not both:
        return None, 0
    return sum(w[0] == w[1] for w in both) / len(both), len(both)


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


def check_special_tokens(records: list[dict[str, Any]]) -> None:
    """Fail if any exported message carries a chat special token (it would be doubled after templating)."""
    for rec in records:
        for column in ("prompt", "chosen", "rejected"):
            for message in rec[column]:
                for tok in SPECIAL_TOKENS:
                    if tok in message["content"]:
                        raise ValueError(f"pair {rec['prompt_id']}: {column} contains the special token {tok}")


def preference_records(
    loaded: LoadedRecipe, pairs: list[dict[str, Any]], ctx: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """One TRL conversational preference row per pair, with provenance columns."""
    recipe = loaded.recipe
    prompts = {p["prompt_id"]: p for p in ctx["prompts"]}
    samples = {s["sample_id"]: s for s in ctx["samples"]}
    recipe_hash = stable_hash(recipe.model_dump(mode="json"), 16)
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
                "judge": recipe.judgments.judge,
                "protocol": recipe.judgments.protocol,
                "reference_name": recipe.judgments.reference,
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


def card(
    loaded: LoadedRecipe, splits: dict[str, list[dict[str, Any]]], ctx: dict[str, Any], notes: dict[str, Any]
) -> str:
    """The dataset card: what was built, from what, with which judge, and how it came out."""
    r = loaded.recipe
    margins = [rec["margin"] for recs in splits.values() for rec in recs]
    judgments = ctx["judgments"]
    status: dict[str, int] = defaultdict(int)
    for j in judgments:
        status[j["parse_status"]] += 1
    consistency = notes["position_consistency"]
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
        f"- Prompts: {len(ctx['prompts'])} from `{r.prompts.path or r.prompts.dataset or 'inline'}`",
        f"- Policy: `{r.samples.policy}` ({r.models[r.samples.policy].backend}: "
        f"{r.models[r.samples.policy].model}), {r.samples.n} samples per prompt, "
        f"temperature {r.samples.params.temperature}, top_p {r.samples.params.top_p}",
        f"- Judge: `{r.judgments.judge}` ({r.models[r.judgments.judge].model}), protocol `{r.judgments.protocol}`, "
        f"reference `{r.judgments.reference}`, orders `{r.judgments.orders}`, scoring `{r.judgments.scoring}`",
        f"- Pairs: {r.pairs.method}, min margin {r.pairs.min_margin}, max tokens {r.pairs.max_tokens}",
        f"- Run `{notes['run_id']}`, export stage key `{notes['stage_key']}`, recipe hash "
        f"`{splits['train'][0]['recipe_hash'] if splits['train'] else ''}`",
        "",
        "## Counts",
        "",
        "| what | n |",
        "| --- | --- |",
        f"| samples | {len(ctx['samples'])} |",
        f"| judgments | {len(judgments)} |",
        *[f"| judgments with parse status `{k}` | {v} |" for k, v in sorted(status.items())],
        *[f"| pairs in {s} | {len(recs)} |" for s, recs in splits.items()],
        "",
        "## Scores",
        "",
        f"- Position consistency (same winner in both orders): "
        f"{'n/a' if consistency is None else f'{consistency:.3f}'} over {notes['pairs_judged_both_orders']} pairs",
    ]
    if margins:
        lines.append(
            f"- Margin (chosen − rejected score): mean {statistics.fmean(margins):.3f}, "
            f"min {min(margins):.3f}, max {max(margins):.3f}"
        )
    lines += ["", "## Recipe", "", "```yaml", loaded.text.rstrip(), "```", ""]
    return "\n".join(lines)


def export_dataset(
    path: Path,
    loaded: LoadedRecipe,
    pairs: list[dict[str, Any]],
    ctx: dict[str, list[dict[str, Any]]],
    run_id: str,
    stage_key: str,
) -> ExportResult:
    """Write the dataset folder at `path` (skipped when it already holds this export stage key)."""
    marker = path / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("stage_key") == stage_key:
        return ExportResult(len(pairs), {"skipped": True, "path": str(path)})
    import datasets  # heavy; only when something is written

    datasets.disable_progress_bars()  # the build shows its own progress

    records = preference_records(loaded, pairs, ctx)
    check_special_tokens(records)
    r = loaded.recipe
    splits = split_records(records, r.export.test_fraction, r.export.seed)
    consistency, n_both = position_consistency(ctx["judgments"])
    notes: dict[str, Any] = {
        "run_id": run_id,
        "stage_key": stage_key,
        "position_consistency": consistency,
        "pairs_judged_both_orders": n_both,
        **{f"{s}_rows": len(v) for s, v in splits.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        features = preference_features(datasets)
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
        (tmp / "README.md").write_text(card(loaded, splits, ctx, notes), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps({"stage_key": stage_key, "run_id": run_id}))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{run_id}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes["path"] = str(path)
    return ExportResult(len(records), notes)
