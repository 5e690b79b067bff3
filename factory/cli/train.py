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
    from factory.train.command import train as run_training
    from factory.train.selection import held_out_for
    from factory.train.settings import parse_overrides, settings_from
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


COMMANDS = [train]
