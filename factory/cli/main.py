"""The `factory` command line. Heavy libraries load only inside the commands that need them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

import factory.cli.judge_eval
import factory.cli.policy_eval
import factory.cli.publish
import factory.cli.report
import factory.cli.show
import factory.cli.train
from factory.cli.options import MEMORY_SIZE, WAREHOUSE_OPTION, friendly
from factory.core.text import clean, one_line


class FactoryGroup(click.Group):
    """click's group, except that a usage error (a bad option value, a missing argument) is one `error:`
    line with exit code 2, like every other input error, instead of click's three-line usage block. The line
    quotes the bad value with its control characters made visible (`factory.core.text`)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone = kwargs.pop("standalone_mode", True)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
            if not standalone:
                return rv
            sys.exit(rv if isinstance(rv, int) else 0)  # as click's standalone mode ends: by exiting
        except click.UsageError as exc:
            if not standalone:
                raise
            command = f"factory {exc.ctx.info_name}" if exc.ctx and exc.ctx.parent else "factory"
            click.echo(f"error: {one_line(exc.format_message())} (see `{command} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if not standalone:
                raise
            click.echo(f"error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            if not standalone:
                raise
            click.echo("aborted", err=True)
            sys.exit(1)


SET_OPTION = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one recipe field (repeatable): a dotted key, the value read as YAML and validated like the file, "
    "e.g. --set judgments.template=/abs/path/refeval.txt. A relative path is read from the recipe's folder, as in "
    "the file.",
)


def _load(recipe: Path, overrides: tuple[str, ...]) -> Any:
    """The recipe with its `--set` overrides applied (parsed as `factory train --set` parses its own)."""
    from factory.config.loading import load_recipe
    from factory.train.settings import parse_overrides

    return load_recipe(recipe, parse_overrides(list(overrides)))


def _warn_skipped(wh: Any) -> None:
    """Name, on stderr, the unreadable call files a command had to skip."""
    warning = wh.skipped_warning()
    if warning:
        click.echo(warning, err=True)


@click.group(cls=FactoryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="factory")
def main() -> None:
    """factory: build preference datasets with reference-guided LLM judges.

    Write a recipe, `factory build recipe.yaml`, inspect every judgment with `factory sql`, and train on
    the exported dataset.
    """


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@WAREHOUSE_OPTION
@SET_OPTION
@friendly
def validate(recipe: Path, warehouse: Path, overrides: tuple[str, ...]) -> None:
    """Check a recipe, its prompt data when it is local, its template files, API key variables and export
    folder, without building anything."""
    from factory.build.command import preflight
    from factory.stages.imported import read_imports
    from factory.stages.prompts import read_prompt_source

    loaded = _load(recipe, overrides)
    r = loaded.recipe
    prompts = "prompts from a Hub dataset (not read)"
    read = None
    if r.prompts.dataset is None or r.imports:
        read = read_prompt_source(loaded)
        if r.prompts.dataset is None:
            prompts = f"{read[0].notes['kept']} prompts"
    preflight(loaded, warehouse.resolve())
    if r.imports and read is not None:  # imported completions are read and checked as a build reads them
        read_imports(loaded, read[0].rows, read[1])
    per = f"{sum(p.n for p in r.policies)} samples per prompt"
    if len(r.policies) > 1 or r.imports:
        per += f" from {len(r.policies)} policies and {len(r.imports)} imported sources"
    samples = f"{per}, labeler {r.labeler}" if r.samples else "no samples (SFT export)"
    click.echo(
        clean(
            f"ok: recipe '{r.name}': {prompts}, {len(r.models)} model(s), {len(r.references)} reference source(s), "
            f"{samples}"
        )
    )


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@WAREHOUSE_OPTION
@click.option("--quiet", "-q", is_flag=True, help="No progress display; print only the summary.")
@click.option("--dry-run", is_flag=True, help="Print the model calls each stage plans, then stop (loads no model).")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where model calls run: local (this process) or ray (Ray actors; the `ray` extra). "
    "Default: the recipe's run.executor, else local.",
)
@click.option(
    "--address",
    default=None,
    help="With ray: the cluster to join (`auto`, `ray://HOST:10001`). Default: the recipe's run.address, else a "
    "local cluster is started.",
)
@SET_OPTION
@friendly
def build(
    recipe: Path,
    warehouse: Path,
    quiet: bool,
    dry_run: bool,
    executor: str | None,
    address: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Build RECIPE: prompts → references → samples → judgments → scores → pairs → export.

    With a `rounds` section, the self-improvement loop: [SFT →] (build → DPO) × rounds; with an `eval`
    section, then the win rate of the policy (of every round's policy) on held-out prompts.
    Finished work is reused: an unchanged rebuild makes no model calls, and an interrupted build resumes
    with only the calls that were not yet written. `--executor ray` runs the model calls on a Ray cluster
    (docs/SCALING.md); the results, cache and resume are the same. `--set KEY=VALUE` changes one field for
    this build only (`--set judgments.template=PATH`: the judge's wording from a prompt file).
    """
    from factory.warehouse.store import Warehouse

    loaded = _load(recipe, overrides)
    kind = executor or loaded.recipe.run.executor
    if address is not None and kind != "ray":
        from factory.core.errors import UserInputError

        raise UserInputError("--address goes with --executor ray")
    if dry_run:
        from factory.build.command import plan, preflight
        from factory.cli.progress import print_plan

        preflight(loaded, warehouse.resolve(), keys=False)
        print_plan(loaded.recipe.name, *plan(loaded))
        r = loaded.recipe
        if r.rounds is not None:
            sft = f"SFT on '{r.rounds.sft_reference}', then " if r.rounds.sft_reference else ""
            click.echo(
                clean(
                    f"rounds: {sft}{r.rounds.count} round(s), each making these calls with the previous round's "
                    "checkpoint and one DPO training"
                )
            )
        if r.eval is not None:
            click.echo(clean(f"eval: both orders of every held-out prompt, judge '{r.eval.judge}', {r.eval.protocol}"))
        if kind == "ray":
            where = address or r.run.address or "a local cluster"
            workers = r.run.workers or "one per CPU (per GPU for GPU models)"
            click.echo(clean(f"executor: ray on {where}, workers per model: {workers}"))
        return
    if kind == "ray":
        from factory.pipeline.calls import executor_scope
        from factory.pipeline.executors import executor_for

        # Without the `ray` extra: one line naming it (exit 2), before anything is written.
        ray_executor = executor_for(loaded.recipe.run, kind, address)
        try:
            with executor_scope(ray_executor):
                _build(loaded, Warehouse(warehouse), quiet)
        finally:
            ray_executor.shutdown()
        return
    _build(loaded, Warehouse(warehouse), quiet)


def _build(loaded: Any, wh: Any, quiet: bool) -> None:
    """The build command's work after its options are settled: the recipe's build or rounds, then its summary."""
    from factory.cli.progress import RichReporter, print_eval, print_loop, print_summary
    from factory.rounds.loop import run_recipe

    with RichReporter(quiet=quiet) as reporter:
        outcome = run_recipe(loaded, wh, reporter)
    if outcome.loop is not None:
        print_loop(outcome.loop.steps, wh)
    elif outcome.build is not None:
        print_summary(outcome.build_row, outcome.build.stats, outcome.build.export_path, wh)
    print_eval(outcome.results)
    _warn_skipped(wh)
    if outcome.status != "ok":
        if outcome.loop is not None:
            click.echo(f"stopped: a step ended {outcome.status}; run the same command again to resume", err=True)
        sys.exit(1)


@main.command()
@click.argument("query")
@WAREHOUSE_OPTION
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True, help="Rows shown in table format.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=60,
    show_default=True,
    help="Stop the query after this many seconds (0: no limit).",
)
@click.option(
    "--memory-limit",
    "memory",
    type=MEMORY_SIZE,
    default="2GB",
    show_default=True,
    help="Memory the query may use (e.g. 500MB, 8GB, 4GiB); the rows it returns may use as much again.",
)
@friendly
def sql(query: str, warehouse: Path, fmt: str, limit: int, timeout: float, memory: tuple[int, str]) -> None:
    """Run one read-only SQL QUERY over the warehouse's tables (DuckDB dialect).

    Ctrl-C stops the query at once. Values are printed as text, control characters made visible; csv keeps
    them exact unless stdout is a terminal.
    """
    from factory.cli.progress import print_csv, print_json, print_table
    from factory.warehouse.sql_run import SqlLimits
    from factory.warehouse.store import Warehouse

    wh = Warehouse(warehouse)
    wh.require()
    limits = SqlLimits(seconds=timeout or None, memory=memory[0], memory_text=memory[1])
    # In table format only the rows shown are kept (the rest are counted): a big result costs no memory.
    result = wh.run_sql(query, limits, keep=limit if fmt == "table" else None)
    _warn_skipped(wh)
    if fmt == "csv":
        print_csv(result.table)
    elif fmt == "json":
        print_json(result.table)
    else:
        print_table(result.table, limit, result.rows)


@main.command(name="ls")
@WAREHOUSE_OPTION
@friendly
def ls_(warehouse: Path) -> None:
    """List tables with row counts, and the latest runs."""
    from factory.cli.progress import print_table
    from factory.warehouse.store import Warehouse

    wh = Warehouse(warehouse)
    wh.require()
    counts, runs = wh.overview(10)
    print_table(counts, 100)
    print_table(runs, 10)
    _warn_skipped(wh)


COMMAND_MODULES = (
    factory.cli.judge_eval,
    factory.cli.train,
    factory.cli.policy_eval,
    factory.cli.publish,
    factory.cli.report,
    factory.cli.show,
)
"""The modules whose `COMMANDS` join the group besides the ones above, imported by name: one that is missing
is an ImportError, never a command silently absent from `factory --help`. Each stays light to import (click
only); its commands import heavy libraries when run."""


def _register() -> None:
    """Add every command of the command modules to the group."""
    for module in COMMAND_MODULES:
        for command in module.COMMANDS:
            main.add_command(command)


_register()

if __name__ == "__main__":
    main()
