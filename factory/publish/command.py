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
only the latest. `export_hash` is `dataset_hash` (factory/export/content_hash.py) of the published splits: a hash
of the rows, whatever the files' bytes, and the `dataset_hash` `factory train` records, so `publications` joins
`trainings`.

The token comes from huggingface_hub's own lookup (HF_TOKEN, then the `hf auth login` cache) and goes only to
`HfApi`, which sends it in `Authorization` headers. It is never printed, logged, stored in the warehouse or
written to a file, and error text is scrubbed of it before it is shown or recorded. `HF_ENDPOINT` and
`HF_HUB_OFFLINE` are read when the command runs.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.core.errors import FactoryError, UserInputError
from factory.core.files import check_folder
from factory.core.owned import FolderKind, building_beside, check_replaceable, replace_folder, seal, writing
from factory.pipeline.calls import now
from factory.pipeline.run import Run
from factory.pipeline.stage import Context, Stage, StageOutput, StageStats, execute
from factory.publish.hub import check_online, endpoint, hub_failure, hub_token, scrub, upload
from factory.publish.staged import README, Staged
from factory.publish.staging import MAX_SHARD_BYTES, check_export, stage
from factory.warehouse.store import Warehouse

DRY_RUN_MARKER = ".factory-publish.json"
DRY_RUN_FOLDER = FolderKind("dry-run folder", DRY_RUN_MARKER, "--dry-run")
# A repo id part: letters, digits, `-`, `_` and `.`, not starting or ending with `-` or `.` (the Hub's rule).
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
_BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")


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
    run = Run(wh, staged.recipe, staged.recipe_hash, recipe_path=str(export.resolve()))
    unit = publication_unit(row["repo_id"], run.run_id, row["dry_run"])

    def compute(ctx: Context, st: StageStats) -> StageOutput:
        commit_id, commit_url = act()
        done = {**row, "commit_id": commit_id, "commit_url": commit_url, "published_at": now()}
        st.notes = {"unit": unit, **notes}
        return StageOutput([done])

    # Each publication is its own unit (repo and run), and an act that happens every time: never reused.
    stage = Stage(
        "publish",
        (),
        lambda ctx: {"unit": unit, "export_hash": staged.export_hash, **row},
        compute,
        table="publications",
        unit=unit,
        reuse=lambda ctx: False,
    )
    ctx = Context(None, run_id=run.run_id)
    with run:
        execute([stage], ctx, run)
    return ctx.rows["publish"][0]


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
