"""`factory train`: SFT or DPO on an export, a Hub dataset or a recipe's export, with TRL.

`factory.cli` registers `COMMANDS`; only click is imported at load time.
"""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli_options import WAREHOUSE_OPTION, friendly
from factory.errors import UserInputError


@click.command(name="train")
@click.argument("data")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A YAML file of train settings (the fields of a recipe's `train:` section).",
)
@click.option("--preset", type=click.Choice(["paper", "cpu"]), default=None, help="Start from a preset.")
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
    from factory.progress import RichReporter
    from factory.recipe import read_yaml
    from factory.train import parse_overrides, settings_from
    from factory.train import train as run_training
    from factory.warehouse import Warehouse

    wh = Warehouse(warehouse)
    layers: list[tuple[str, dict]] = []
    source, recipe_hash = data, None
    if data.endswith((".yaml", ".yml")):
        from factory.export import export_path
        from factory.recipe import load_recipe
        from factory.runs import Run

        loaded = load_recipe(data)
        r = loaded.recipe
        source = str(export_path(loaded, wh.root))
        if r.samples is None:
            source += "-sft"
        if not Path(source).is_dir():
            raise UserInputError(f"{data}: its export {source} does not exist yet; run `factory build {data}` first")
        recipe_hash = Run.hash_of(r.model_dump(mode="json"))
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
        row = run_training(source, settings, wh, reporter, recipe_hash)
    click.echo(
        f"trained {row['method']} '{row['training_name']}': {row['steps']} steps, final train loss "
        f"{row['final_train_loss']:.4f}, validation loss "
        f"{'n/a' if row['val_loss'] is None else format(row['val_loss'], '.4f')}, β {row['beta']}"
    )
    click.echo(f'model: {row["output"]}  (factory sql "SELECT * FROM training_metrics")')


COMMANDS = [train]
