"""The dataset card a publication carries: the export's own card under the metadata header the Hub reads
(`configs` naming every shard, license, task categories, tags, size category), checked as the Hub reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factory.core.errors import FactoryError, UserInputError
from factory.publish.staged import README, Staged

DEFAULT_LICENSE = "unknown"
TASK_CATEGORIES = ["text-generation"]
TAGS = {"preference": ["dpo", "preference", "factory", "synthetic"], "sft": ["sft", "factory", "synthetic"]}
# The Hub's size_categories, smallest first; the one after the last is "n>1T".
SIZE_CATEGORIES = (
    "n<1K",
    "1K<n<10K",
    "10K<n<100K",
    "100K<n<1M",
    "1M<n<10M",
    "10M<n<100M",
    "100M<n<1B",
    "1B<n<10B",
    "10B<n<100B",
    "100B<n<1T",
)


def size_category(rows: int) -> str:
    """The Hub's size category for a dataset of `rows` rows."""
    for exponent, label in enumerate(SIZE_CATEGORIES, start=3):
        if rows < 10**exponent:
            return label
    return "n>1T"


def hub_card(original: str, staged: Staged, repo_id: str, revision: str, kind: str, license_id: str | None) -> str:
    """The export's card under the Hub's metadata, with a section on loading the published dataset."""
    from huggingface_hub import DatasetCard

    try:
        card = DatasetCard(original)
    except Exception as exc:
        raise UserInputError(f"the export's {README} has an unreadable metadata header ({exc})") from None
    data = card.data
    data.pretty_name = data.pretty_name or staged.recipe
    data.license = license_id or data.license or DEFAULT_LICENSE
    data.task_categories = _merged(data.task_categories, TASK_CATEGORIES)
    data.tags = _merged(data.tags, TAGS[kind])
    data.size_categories = [size_category(sum(staged.rows.values()))]
    files = [{"split": split, "path": paths} for split, paths in staged.shards.items()]
    data.configs = [{"config_name": "default", "data_files": files}]
    text = card.text.strip("\n") + "\n\n" + "\n".join(_use_section(staged, repo_id, revision, data.license)) + "\n"
    return f"---\n{data.to_yaml()}\n---\n\n{text}"


def _merged(existing: Any, wanted: list[str]) -> list[str]:
    """`existing` (a string, a list or None) followed by what `wanted` adds, without repeats."""
    items = [existing] if isinstance(existing, str) else list(existing or [])
    return items + [item for item in wanted if item not in items]


def _use_section(staged: Staged, repo_id: str, revision: str, license_id: Any) -> list[str]:
    """Card lines: how to load the dataset, which files hold which split, and the license's origin."""
    where = json.dumps(repo_id) if revision == "main" else f"{json.dumps(repo_id)}, revision={json.dumps(revision)}"
    lines = [
        "## Load it",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f"ds = load_dataset({where})",
        "```",
        "",
        *[
            f"- `{split}`: {staged.rows[split]} row(s) in {len(paths)} Parquet file(s) under `data/`"
            for split, paths in staged.shards.items()
        ],
    ]
    if staged.left_out:
        lines.append(f"- left out for having no rows: {', '.join(f'`{s}`' for s in staged.left_out)}")
    lines.append(f"- dataset hash (factory's hash of the rows): `{staged.export_hash}`")
    if license_id == DEFAULT_LICENSE:
        lines += [
            "",
            "License: `unknown`. factory does not know the terms of the prompts' source or of the models whose "
            "outputs these rows hold; check them before using the data, and publish with `--license` to set one.",
        ]
    return lines


def check_card(card: str, folder: Path) -> None:
    """Check the card as the Hub reads it: DatasetCardData metadata whose configs name files under `folder`."""
    from huggingface_hub import DatasetCard, DatasetCardData

    parsed = DatasetCard(card)
    data = DatasetCardData(**parsed.data.to_dict())
    problems = []
    if not data.license:
        problems.append("no license")
    if not data.task_categories:
        problems.append("no task_categories")
    sizes = data.size_categories or []
    if len(sizes) != 1 or sizes[0] not in (*SIZE_CATEGORIES, "n>1T"):
        problems.append(f"size_categories {sizes!r}")
    configs = getattr(data, "configs", None) or []
    for config in configs:
        for entry in config.get("data_files", []):
            paths = [entry["path"]] if isinstance(entry["path"], str) else entry["path"]
            problems += [f"{p} (split {entry['split']}) is missing" for p in paths if not (folder / p).is_file()]
    if not configs:
        problems.append("no configs")
    if problems:
        # factory wrote this card itself: a problem here is a bug, not the user's to fix.
        raise FactoryError(f"the dataset card is not valid Hub metadata: {'; '.join(problems)}")
