"""`factory eval`: the win rate of a policy against a baseline on a recipe's held-out prompts.

`factory.cli.main` registers `COMMANDS`; only click is imported at load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from factory.cli.options import WAREHOUSE_OPTION, friendly
from factory.core.errors import UserInputError
from factory.core.text import clean


def _policy_contender(policy: str, like: Any, recipe: Path, models: list[str]) -> Any:
    """`--policy` as a contender: a trained model folder, or a Hub model id (run like the recipe's policy)."""
    import re

    from factory.policy_eval.command import Contender
    from factory.train.selection import checkpoint_spec

    folder = Path(policy)
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise UserInputError(f"--policy {policy}: not a model folder (no config.json there)")
        return Contender(folder.resolve().name, checkpoint_spec(like, folder.resolve()))
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", policy) and not folder.parent.exists():
        return Contender(policy.replace("/", "--"), checkpoint_spec(like, policy))
    raise UserInputError(f"--policy {policy}: neither a model of {recipe} ({models}), a model folder, nor a Hub id")


@click.command(name="eval")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--policy",
    default=None,
    help="The policy: a model name from the recipe, a trained model folder, or a Hub id (default: samples.policy).",
)
@click.option("--judge", default=None, help="The judge: a model name from the recipe (default: eval.judge).")
@click.option("--protocol", default=None, help="A built-in judge protocol (default: eval.protocol, refeval).")
@click.option(
    "--alpaca-eval-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the policy's outputs as the JSON list `alpaca_eval --model_outputs` reads.",
)
@WAREHOUSE_OPTION
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@friendly
def eval_(
    recipe: Path,
    policy: str | None,
    judge: str | None,
    protocol: str | None,
    alpaca_eval_out: Path | None,
    warehouse: Path,
    quiet: bool,
) -> None:
    """Win rate of a policy against a baseline on RECIPE's held-out `eval` prompts.

    Every prompt is judged in both orders (the policy as Output (a), then as Output (b)); the table shows the
    win rate and AlpacaEval 2's length-controlled win rate with 95 % bootstrap intervals. Outputs, judgments
    and figures land in the tables `eval_outputs`, `eval` and `eval_results`.
    """
    from factory.cli.progress import RichReporter, print_eval
    from factory.config.loading import load_recipe, with_eval_overrides
    from factory.policy_eval.command import Contender, evaluate, recipe_policy
    from factory.warehouse.store import Warehouse

    loaded = with_eval_overrides(load_recipe(recipe), judge=judge, protocol=protocol)
    r = loaded.recipe
    contender = recipe_policy(loaded)
    if policy is not None and policy in r.models:
        contender = Contender(policy, r.models[policy])
    elif policy is not None:
        contender = _policy_contender(policy, contender.spec, recipe, sorted(r.models))
    wh = Warehouse(warehouse)
    with RichReporter(quiet=quiet) as reporter:
        row, results = evaluate(loaded, wh, [contender], reporter, alpaca_eval_out=alpaca_eval_out)
    print_eval(results)
    click.echo(clean(f"judgments: factory sql \"SELECT * FROM eval WHERE contender = '{contender.label}'\""))
    if alpaca_eval_out is not None:
        click.echo(clean(f"alpaca_eval outputs: {alpaca_eval_out}"))
    if row["status"] != "ok":
        click.echo(f"error: the evaluation ended {row['status']}; run the same command again to retry", err=True)
        raise SystemExit(1)


COMMANDS = [eval_]
