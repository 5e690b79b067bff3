"""`factory show`: one prompt's decision audited in the terminal.

`factory.cli.main` registers `COMMANDS`; only click is imported at load time (rich loads when run).
"""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli.options import WAREHOUSE_OPTION, friendly
from factory.core.errors import UserInputError


@click.command(name="show")
@click.argument("prompt_id")
@WAREHOUSE_OPTION
@click.option("--recipe", default=None, help="Only this recipe's rows (default: every recipe with the prompt).")
@click.option(
    "--messages",
    is_flag=True,
    help="Also print every judgment's messages as the judge received them (system and user turns, the prefill), "
    "rebuilt from the stored rows and the recipe's protocol, and checked against the stored prompt hash.",
)
@click.option(
    "--recipe-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --messages: the recipe to read the protocol and template from (default: the file the build recorded).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="With --messages: a `--set` the build was given (e.g. judgments.template=PATH), applied over that recipe.",
)
@friendly
def show(
    prompt_id: str,
    warehouse: Path,
    recipe: str | None,
    messages: bool,
    recipe_file: Path | None,
    overrides: tuple[str, ...],
) -> None:
    """Audit one decision: PROMPT_ID's instruction, references, scored samples, every judgment and its pair.

    PROMPT_ID may be any unambiguous prefix of the id (`factory sql "SELECT prompt_id, instruction FROM
    prompts"` lists them). `--messages` adds the exact prompt of every judgment, so a template (yours or the
    paper authors') can be checked on a small build before a large one.
    """
    from factory.report.messages import MessageOptions
    from factory.report.show import show_prompt
    from factory.train.settings import parse_overrides
    from factory.warehouse.store import Warehouse

    if (recipe_file is not None or overrides) and not messages:
        raise UserInputError("--recipe-file and --set go with --messages")
    options = MessageOptions(recipe_file, parse_overrides(list(overrides))) if messages else None
    wh = Warehouse(warehouse)
    show_prompt(wh, prompt_id, recipe, messages=options)
    warning = wh.skipped_warning()
    if warning:
        click.echo(warning, err=True)


COMMANDS = [show]
