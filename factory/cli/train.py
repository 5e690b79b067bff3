"""`factory train`: SFT or DPO on an export, a Hub dataset or a recipe's export, with TRL.

`factory.cli.main` registers `COMMANDS`; only click is imported at load time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from factory.cli.options import WAREHOUSE_OPTION, friendly
from factory.core.errors import UserInputError
from factory.core.text import clean


@click.command(name="train")
@click.argument("data")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A YAML file of train settings (the fields of a recipe's `train:` section).",
)
@click.option("--preset", type=click.Choice(["paper", "paper-text", "cpu"]), default=None, help="Start from a preset.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one setting (repeatable).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None, help="Model folder.")
@WAREHOUSE_OPTION
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@friendly
def train(
    data: str,
    config_file: Path | None,
    preset: str | None,
    overrides: tuple[str, ...],
    output: Path | None,
    warehouse: Path,
    quiet: bool,
) -> None:
    """Train on DATA: an export folder, a Hub dataset name, or a recipe (its export and its `train:` section).

    Settings layer as preset < recipe `train:` < --config file < --set; every value reaches TRL explicitly.
    The result is a Hugging Face model folder with a model card; the run, every candidate and every logged
    step are in the warehouse (tables `trainings` and `training_metrics`). A rerun with the same data, base
    model and settings reuses the trained model.
    """
    from factory.cli.progress import RichReporter
    from factory.config.yaml_loader import read_yaml
    from factory.train.command import held_out_for, parse_overrides, settings_from
    from factory.train.command import train as run_training
    from factory.warehouse.store import Warehouse

    wh = Warehouse(warehouse)
    layers: list[tuple[str, dict]] = []
    source, recipe_hash, held_out = data, None, None
    if data.endswith((".yaml", ".yml")):
        from factory.config.loading import load_recipe
        from factory.export.dataset import export_path

        loaded = load_recipe(data)
        r = loaded.recipe
        source = str(export_path(loaded, wh.root))
        if r.samples is None:
            source += "-sft"
        if not Path(source).is_dir():
            raise UserInputError(f"{data}: its export {source} does not exist yet; run `factory build {data}` first")
        recipe_hash = r.content_hash
        held_out = held_out_for(loaded)  # `select: eval` (a β sweep's default) with the recipe's `eval:` section
        if r.train is not None:
            layers.append((f"{data} (train)", r.train.model_dump(exclude_unset=True)))
    if config_file is not None:
        content = read_yaml(config_file, "train settings file")
        if not isinstance(content, dict):
            raise UserInputError(f"{config_file}: expected a mapping of train settings")
        layers.append((str(config_file), content.get("train", content)))
    extra = parse_overrides(list(overrides))
    if preset is not None:
        extra["preset"] = preset
    if output is not None:
        extra["output"] = str(output)
    layers.append(("--set", extra))
    settings = settings_from(layers)
    with RichReporter(quiet=quiet) as reporter:
        rows = run_training(source, settings, wh, reporter, recipe_hash, held_out=held_out)
    for line in summary_lines(rows):
        click.echo(clean(line))


def _number(value: Any, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What `factory train` prints: one line per candidate, the rule that kept the model, where it is."""
    first = rows[0]
    rule = first.get("selected_by") or "only"
    how = "" if rule == "only" else f", selected by {rule}"
    lines = [f"trained {first['method']} '{first['training_name']}'{how}"]
    for row in rows:
        beta = "" if row["beta"] is None else f"β {row['beta']:g}: "
        figures = [
            f"{row['steps']} steps, final train loss {_number(row['final_train_loss'])}",
            f"kept step {row.get('best_step')} (validation loss {_number(row.get('best_val_loss'))}"
            + (f", accuracy {_number(row['val_accuracy'], '.3f')}" if row.get("val_accuracy") is not None else "")
            + (f", win rate {_number(row['eval_win_rate'], '.1f')}" if row.get("eval_win_rate") is not None else "")
            + ")",
        ]
        where = f"  → {row['output']}" if row["selected"] else ""
        lines.append(f"  {beta}" + "; ".join(figures) + where)
    lines.append('every step and evaluation: factory sql "SELECT * FROM training_metrics"')
    return lines


def _policy_contender(policy: str, like: Any, recipe: Path, models: list[str]) -> Any:
    """`--policy` as a contender: a trained model folder, or a Hub model id (run like the recipe's policy)."""
    import re

    from factory.policy_eval.command import Contender
    from factory.rounds.loop import checkpoint_spec

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


COMMANDS = [train, eval_]
