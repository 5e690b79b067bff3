"""`factory publish`: an export folder as a Hugging Face Hub dataset, Parquet shards and a dataset card in one commit.

What goes up is exactly what `--dry-run` writes to a folder:

- `data/<split>-NNNNN-of-MMMMM.parquet`, the Hub's usual layout, for every split with rows, in shards of at most
  `MAX_SHARD_BYTES` of Arrow data. An empty split is left out: `load_dataset` refuses a split without rows.
- `README.md`: the export's own card (recipe, lineage, counts, score statistics, position consistency) under a
  metadata header the Hub reads: `configs` naming every shard of every split (named files, not globs, so shards
  of an earlier, larger publication that linger in the repo are never loaded), `license`, `task_categories`,
  `tags` and `size_categories`.

The license is `--license`, else the export card's, else `unknown` (a license the Hub lists): factory cannot
know the terms of the prompts' source or of the models whose outputs fill the dataset, and `other` would promise
a license text in the repo that nobody wrote. The card says so, and how to set one.

Every publication, dry runs included, is a row of the `publications` table written through a `Run`. Each row is
a table version in a unit of its own (`<owner>--<name>--<run id>`), so the view shows every publication, not
only the latest. `export_hash` is `factory.train.command.dataset_hash` of the published splits: a hash of the rows,
whatever the files' bytes, and the `dataset_hash` `factory train` records, so `publications` joins `trainings`.

The token comes from huggingface_hub's own lookup (HF_TOKEN, then the `hf auth login` cache) and goes only to
`HfApi`, which sends it in `Authorization` headers. It is never printed, logged, stored in the warehouse or
written to a file, and error text is scrubbed of it before it is shown or recorded. `HF_ENDPOINT` and
`HF_HUB_OFFLINE` are read when the command runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.core.errors import FactoryError, UserInputError
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
from factory.core.text import one_line
from factory.warehouse.store import Warehouse

# datasets' own `push_to_hub` default: shards the Hub's viewer and loaders handle comfortably.
MAX_SHARD_BYTES = 500 * 2**20
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
README = "README.md"
DRY_RUN_MARKER = ".factory-publish.json"
DRY_RUN_FOLDER = FolderKind("dry-run folder", DRY_RUN_MARKER, "--dry-run")
# A repo id part: letters, digits, `-`, `_` and `.`, not starting or ending with `-` or `.` (the Hub's rule).
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
_BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")
_TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub reads as a true environment flag
REDACTED = "[redacted]"


@dataclass
class Staged:
    """The files of one publication, written under `folder`, and what its row says about them."""

    folder: Path
    shards: dict[str, list[str]]  # split -> repo paths of its shards
    rows: dict[str, int]  # split -> rows published
    left_out: list[str]  # empty splits, not published
    export_hash: str
    recipe: str
    recipe_hash: str
    export_key: str

    @property
    def files(self) -> list[str]:
        """Every repo path of the commit: the shards, then the card."""
        return [path for paths in self.shards.values() for path in paths] + [README]


@dataclass
class Publication:
    """What `publish` did: its publications row, its files, and the dry run's folder."""

    row: dict[str, Any]
    staged: Staged
    folder: Path | None = None  # the dry run's folder


# ------------------------------------------------------------------------------------------------ inputs
def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it has the Hub's OWNER/NAME form, else a UserInputError saying what that form is."""
    owner, _, name = repo_id.partition("/")
    ok = (
        repo_id.count("/") == 1
        and all(_REPO_PART.fullmatch(part) for part in (owner, name))
        and len(name) <= 96
        and "--" not in repo_id
        and ".." not in repo_id
    )
    if not ok:
        raise UserInputError(
            f"--repo-id {repo_id!r}: expected OWNER/NAME, each of letters, digits, '-', '_' and '.' "
            "(no '--' or '..'), e.g. my-org/my-preferences"
        )
    return repo_id


def check_revision(revision: str) -> str:
    """`revision` if it can name a branch on the Hub."""
    ok = (
        _BRANCH.fullmatch(revision) is not None
        and len(revision) <= 200
        and ".." not in revision
        and not revision.endswith((".", ".lock"))
        and not revision.startswith("refs/")
    )
    if not ok:
        raise UserInputError(f"--revision {revision!r}: not a branch name (letters, digits, '-', '_', '.' and '/')")
    return revision


def check_license(license_id: str | None) -> str | None:
    """A license identifier as the Hub spells them (apache-2.0, cc-by-4.0, ...); the Hub checks the list."""
    if license_id is not None and not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", license_id):
        raise UserInputError(
            f"--license {license_id!r}: expected a Hub license identifier such as apache-2.0, cc-by-4.0 or other"
        )
    return license_id


def check_export(path: Path) -> dict[str, Any]:
    """The export marker of `path`, refusing anything but a complete export folder written by factory."""
    from factory.export.dataset import EXPORT_FOLDER, MARKER

    if not path.is_dir():
        raise UserInputError(f"{path}: no such folder (EXPORT is an export folder written by `factory build`)")
    marker = read_marker(path, EXPORT_FOLDER)
    if marker is None or not isinstance(marker.get("stage_key"), str):
        raise UserInputError(f"{path}: not an export folder written by factory (no {MARKER} in it)")
    if marker.get("complete", True) is not True:
        raise UserInputError(
            f"{path}: exported by a build that did not finish every call; run `factory build` again until it "
            "completes, then publish"
        )
    missing = [name for name in ("dataset_dict.json", README) if not (path / name).is_file()]
    if missing:
        raise UserInputError(f"{path}: the export is missing {', '.join(missing)}; rebuild it with `factory build`")
    return marker


def load_export(path: Path) -> Any:
    """The export's splits (the save_to_disk copy, memory-mapped)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        dd = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserInputError(f"{path}: the export's dataset cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(dd, datasets.DatasetDict):
        raise UserInputError(f"{path}: the export holds one dataset, not its splits; rebuild it with `factory build`")
    return dd


def size_category(rows: int) -> str:
    """The Hub's size category for a dataset of `rows` rows."""
    for exponent, label in enumerate(SIZE_CATEGORIES, start=3):
        if rows < 10**exponent:
            return label
    return "n>1T"


def export_kind(columns: list[str]) -> str:
    """preference (TRL's chosen/rejected) or sft (prompt/completion)."""
    return "preference" if {"chosen", "rejected"} <= set(columns) else "sft"


# ------------------------------------------------------------------------------------------------ staging
def shard_paths(split: str, count: int) -> list[str]:
    """The Hub's shard names for one split: data/<split>-00000-of-00002.parquet, ..."""
    return [f"data/{split}-{i:05d}-of-{count:05d}.parquet" for i in range(count)]


def write_split(ds: Any, split: str, folder: Path, max_shard_bytes: int) -> list[str]:
    """Write one split as contiguous Parquet shards under `folder`; returns their repo paths."""
    count = min(len(ds), max(1, math.ceil(ds.data.nbytes / max_shard_bytes)))
    paths = shard_paths(split, count)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for index, rel in enumerate(paths):
        # datasets' to_parquet keeps the features in the file's metadata, so a load reads them back exactly.
        ds.shard(count, index, contiguous=True).to_parquet(str(folder / rel))
    return paths


def stage(
    export: Path,
    marker: dict[str, Any],
    repo_id: str,
    revision: str,
    folder: Path,
    license_id: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Staged:
    """Write the publication's files (shards, then the card) under `folder`; `marker` is the export's."""
    from factory.train.command import dataset_hash

    dd = load_export(export)
    published = {split: ds for split, ds in dd.items() if len(ds)}
    if not published:
        raise UserInputError(f"{export}: every split is empty; there is nothing to publish")
    shards = {split: write_split(ds, split, folder, max_shard_bytes) for split, ds in published.items()}
    rows = {split: len(ds) for split, ds in published.items()}
    first = next(iter(published.values()))
    columns = first.column_names
    staged = Staged(
        folder=folder,
        shards=shards,
        rows=rows,
        left_out=[split for split in dd if split not in published],
        export_hash=dataset_hash(published),
        recipe=str(first[0]["recipe"]) if "recipe" in columns else export.name,
        recipe_hash=str(first[0]["recipe_hash"]) if "recipe_hash" in columns else marker["stage_key"][:16],
        export_key=marker["stage_key"],
    )
    original = (export / README).read_text(encoding="utf-8")
    card = hub_card(original, staged, repo_id, revision, export_kind(columns), license_id)
    check_card(card, folder)
    (folder / README).write_text(card, encoding="utf-8")
    return staged


# --------------------------------------------------------------------------------------------------- card
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


# ---------------------------------------------------------------------------------------------------- hub
def endpoint() -> str:
    """The Hub endpoint: HF_ENDPOINT as it is now (huggingface_hub reads it once, at import), else its default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_online() -> None:
    """Refuse to publish in offline mode, before anything is written."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in _TRUE:
            raise UserInputError(f"{name} is set: publishing needs the network; unset it, or use --dry-run")
    if constants.is_offline_mode():
        raise UserInputError("huggingface_hub is in offline mode: publishing needs the network; use --dry-run instead")


def hub_token() -> str:
    """The token from huggingface_hub's own lookup (HF_TOKEN, then the login cache); never shown anywhere."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserInputError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` with a token that can write to the repo "
            "(or write the files with --dry-run)"
        )
    return token


def upload(staged: Staged, repo_id: str, revision: str, private: bool, token: str, hub: str) -> tuple[str, str]:
    """Create the repo (and branch) if needed and commit every staged file at once; returns (commit id, url)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    import factory

    api = HfApi(endpoint=hub, token=token, library_name="factory", library_version=factory.__version__)
    # Without --private the owner's default visibility applies; an existing repo keeps its own.
    api.create_repo(repo_id, repo_type="dataset", private=True if private else None, exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(staged.folder / p)) for p in staged.files]
    rows = ", ".join(f"{split} {n}" for split, n in staged.rows.items())
    info = api.create_commit(
        repo_id,
        operations,
        repo_type="dataset",
        revision=revision,
        commit_message=f"Publish {staged.recipe} with factory (rows: {rows})",
        commit_description=(
            f"Export stage key {staged.export_key}, recipe hash {staged.recipe_hash}, "
            f"dataset hash {staged.export_hash}."
        ),
    )
    return str(info.oid), str(info.commit_url)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and its causes (huggingface_hub wraps an LFS upload's failure in a RuntimeError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport failures of whichever HTTP client this huggingface_hub uses (only a loaded one can raise)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


def hub_failure(exc: BaseException, repo_id: str, hub: str) -> FactoryError | None:
    """A one-line FactoryError for a refusal or a network failure; None for anything else (a bug)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    owner = repo_id.split("/")[0]
    for cause in _chain(exc):
        if isinstance(cause, OfflineModeIsEnabled):
            return UserInputError("huggingface_hub is in offline mode (HF_HUB_OFFLINE): use --dry-run instead")
        response = getattr(cause, "response", None)
        if isinstance(cause, HfHubHTTPError) and response is not None:
            status = response.status_code
            said = " ".join(str(getattr(cause, "server_message", None) or "").split())[:300]
            said = f": {said}" if said else ""
            if status in (401, 403):
                return FactoryError(
                    f"{repo_id}: the Hub at {hub} refused (HTTP {status}{said}); check that your token can write "
                    f"to '{owner}'"
                )
            return FactoryError(f"{repo_id}: the Hub at {hub} answered HTTP {status}{said}")
        if isinstance(cause, _network_errors()):
            return FactoryError(
                f"{repo_id}: cannot reach the Hub at {hub} ({type(cause).__name__}: {cause}); check the network "
                "and HF_ENDPOINT"
            )
        if isinstance(cause, ValueError) and "Invalid metadata in README.md" in str(cause):
            said = one_line(cause)
            return FactoryError(f"{repo_id}: the Hub refused the dataset card's metadata ({said})")
    return None


def scrub(text: str, token: str | None) -> str:
    """`text` without the token (it may come from the login cache, which `redact` does not know) or other secrets."""
    from factory.core.redact import redact

    if token:
        text = text.replace(token, REDACTED)
    return redact(text) or ""


# -------------------------------------------------------------------------------------------------- record
def publication_unit(repo_id: str, run_id: str, dry_run: bool) -> str:
    """The table unit of one publication: repo and time, as a safe folder name, so every one stays in the view."""
    unit = f"{repo_id.replace('/', '--')}--{run_id}{'--dry-run' if dry_run else ''}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", unit)


def record(
    wh: Warehouse,
    staged: Staged,
    row: dict[str, Any],
    act: Callable[[], tuple[str | None, str | None]],
    export: Path,
    notes: dict[str, Any],
) -> dict[str, Any]:
    """Run `act` (upload, or move the dry run's folder into place) inside a Run, and write its publications row."""
    from factory.pipeline.calls import ModelPool, now
    from factory.pipeline.run import Run
    from factory.pipeline.stage import StageOutput, StageStats

    run = Run(wh, staged.recipe, staged.recipe_hash, ModelPool({}), recipe_path=str(export.resolve()))
    unit = publication_unit(row["repo_id"], run.run_id, row["dry_run"])
    key = stable_hash({"publication": 1, "unit": unit, "export_hash": staged.export_hash, **row})

    def compute(st: StageStats) -> StageOutput:
        commit_id, commit_url = act()
        done = {**row, "commit_id": commit_id, "commit_url": commit_url, "published_at": now()}
        st.notes = {"unit": unit, **notes}
        return StageOutput([done])

    with run:
        rows = run.materialize("publications", key, compute, unit=unit, label="publish", reuse=False)
    return rows[0]


# ------------------------------------------------------------------------------------------------ dry run
def dry_run_folder(export: Path, given: str, wh_root: Path | None = None) -> Path:
    """Where a dry run writes: FOLDER, or `<export>-publish` beside the export; refused unless it is new, empty,
    or an earlier dry run's (its marker is there)."""
    target = Path(given) if given else export.with_name(f"{export.name}-publish")
    check_folder(target)
    inside = export.resolve()
    if target.resolve() == inside or inside in target.resolve().parents:
        raise UserInputError(f"--dry-run {target}: inside the export itself; choose a folder outside it")
    check_replaceable(target, DRY_RUN_FOLDER, wh_root)
    return target


# --------------------------------------------------------------------------------------------------- main
def publish(
    export: Path,
    repo_id: str,
    wh: Warehouse,
    *,
    revision: str = "main",
    private: bool = False,
    dry_run: str | None = None,
    license_id: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Publication:
    """Publish `export` to `repo_id`, or with `dry_run` ("" for the default folder, or a folder) write the files
    that would be uploaded; either way record a publications row. Everything the user can get wrong (the
    export, the repo id, the branch, offline mode, a missing token) is refused before anything is written."""
    check_repo_id(repo_id)
    check_revision(revision)
    check_license(license_id)
    marker = check_export(export)
    base = {"repo_id": repo_id, "revision": revision, "private": private, "export_path": str(export.resolve())}
    options: dict[str, Any] = {"license_id": license_id, "max_shard_bytes": max_shard_bytes}
    if dry_run is not None:
        return _dry_run(export, marker, wh, dry_run, base, options)
    check_online()
    token = hub_token()
    hub = endpoint()
    with tempfile.TemporaryDirectory(prefix="factory-publish-") as tmp:
        staged = stage(export, marker, repo_id, revision, Path(tmp), **options)
        if token in (staged.folder / README).read_text(encoding="utf-8"):
            # The card carries the recipe's text, where a token could have been pasted by mistake.
            raise UserInputError(f"{export}: its {README} contains your Hugging Face token; not publishing it")
        row = {**base, **_row_facts(staged), "endpoint": hub, "dry_run": False}

        def act() -> tuple[str | None, str | None]:
            try:
                return upload(staged, repo_id, revision, private, token, hub)
            except Exception as exc:
                raise _one_line_failure(exc, repo_id, hub, token) from None

        row = record(wh, staged, row, act, export, {"files": len(staged.files)})
    return Publication(row, staged)


def _one_line_failure(exc: Exception, repo_id: str, hub: str, token: str) -> FactoryError:
    """The error to raise for a failed upload, its text scrubbed of the token (the original may carry it, so it is
    not chained: a refusal or network failure is the user's to fix, and anything else is named by its type)."""
    failure = hub_failure(exc, repo_id, hub)
    if failure is None:
        failure = FactoryError(f"{repo_id}: publishing failed ({type(exc).__name__}: {exc})")
    failure.args = (scrub(str(failure), token),)
    return failure


def _dry_run(
    export: Path,
    marker: dict[str, Any],
    wh: Warehouse,
    given: str,
    base: dict[str, Any],
    options: dict[str, Any],
) -> Publication:
    """Write the publication's files to a folder and record the dry run; needs no token and sends nothing."""
    target = dry_run_folder(export, given, wh.root)
    # Built beside its target and renamed into place: a reader never sees half a publication.
    with writing(target, "dry-run folder"), building_beside(target) as built:
        staged = stage(export, marker, base["repo_id"], base["revision"], built, **options)
        seal(built, DRY_RUN_FOLDER, {"repo_id": base["repo_id"], "export": marker["stage_key"]})
        row = {**base, **_row_facts(staged), "endpoint": None, "dry_run": True}

        def act() -> tuple[str | None, str | None]:
            replace_folder(built, target, DRY_RUN_FOLDER, wh.root)
            return None, None

        row = record(wh, staged, row, act, export, {"folder": str(target.resolve())})
    staged.folder = target
    return Publication(row, staged, folder=target)


def _row_facts(staged: Staged) -> dict[str, Any]:
    """The columns a staged publication fills: its data hash, its files and its rows per split."""
    return {"export_hash": staged.export_hash, "files": json.dumps(staged.files), "rows": json.dumps(staged.rows)}
