"""`factory publish`: an export folder to a Hugging Face Hub dataset repo (factory/publish/command.py does the work).

`factory.cli.main` registers `COMMANDS`; only click is imported at load time.
"""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli.options import WAREHOUSE_OPTION, friendly
from factory.core.text import clean


@click.command(name="publish")
@click.argument("export", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, metavar="OWNER/NAME", help="The Hub dataset repo (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default="main", show_default=True, metavar="BRANCH", help="The branch to commit to.")
@click.option(
    "--license",
    "license_id",
    default=None,
    metavar="ID",
    help="The card's license (a Hub identifier such as cc-by-4.0); default: the export card's, else unknown.",
)
@click.option(
    "--dry-run",
    "dry_run",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[FOLDER]",
    help="Write the files instead of uploading them, to FOLDER (default: <EXPORT>-publish); needs no token. "
    "Put it last, or write --dry-run=FOLDER.",
)
@WAREHOUSE_OPTION
@friendly
def publish(
    export: Path,
    repo_id: str,
    private: bool,
    revision: str,
    license_id: str | None,
    dry_run: str | None,
    warehouse: Path,
) -> None:
    """Publish EXPORT, an export folder of `factory build`, as a Hub dataset: one commit of Parquet shards
    (data/<split>-00000-of-00001.parquet) and the export's dataset card under Hub metadata.

    The token comes from HF_TOKEN or the `hf auth login` cache and is never printed or stored; HF_ENDPOINT
    and HF_HUB_OFFLINE are respected. Every publication, dry runs included, is a row of the `publications`
    table: repo, branch, commit, the data's hash and when.
    """
    from factory.publish.command import publish as run_publish
    from factory.warehouse.store import Warehouse

    done = run_publish(
        export,
        repo_id,
        Warehouse(warehouse),
        revision=revision,
        private=private,
        dry_run=dry_run,
        license_id=license_id,
    )
    staged, row = done.staged, done.row
    total = sum(staged.rows.values())
    if done.folder is not None:
        click.echo(clean(f"dry run: {len(staged.files)} file(s) for {repo_id} ({revision}) written to {done.folder}"))
    else:
        click.echo(clean(f"published {total} rows to {repo_id} ({revision}): commit {row['commit_id']}"))
        click.echo(clean(f"commit: {row['commit_url']}"))
    for split, paths in staged.shards.items():
        click.echo(clean("\n".join(f"  {path}  (split {split})" for path in paths)))
    click.echo("  README.md  (dataset card)")
    click.echo(clean(f"rows: {', '.join(f'{split} {n}' for split, n in staged.rows.items())}, {total} in all"))
    for split in staged.left_out:
        click.echo(clean(f"split '{split}' has no rows: left out (the Hub cannot load an empty split)"))
    click.echo(f'dataset hash {row["export_hash"]}  (factory sql "SELECT * FROM publications")')


COMMANDS = [publish]
