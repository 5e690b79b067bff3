"""`factory train`: SFT or DPO on an export with TRL, as a run in the warehouse (docs/DESIGN.md §5).

Settings come in three layers, each overriding the one before: a preset (`paper`: the authors' released
training code; `cpu`: a few real steps of the embedded model), a YAML `train:` section (in a recipe or a file
of its own), and `--set KEY=VALUE` on the command line. Every value that changes training is handed to TRL
explicitly, including those whose default moved between TRL or transformers versions (prompt truncation,
warm-up, optimizer), so no installed version's default slips in unnoticed.

A training is a stage of its own: its key hashes the dataset's content, the base model's identity and the
resolved settings, so a rerun with the same inputs reuses the finished model instead of training again.
Every candidate (one per β of a sweep) is a row of the `trainings` table and its logged steps and
evaluations are rows of `training_metrics`. Each candidate evaluates on the validation split every
`eval_steps` optimizer steps and at the end and keeps its lowest-validation-loss checkpoint, as the authors'
`dpo.py` does; across β, where losses are not comparable, `select` picks the kept model (or keeps them all).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from factory.config.models import ModelSpec
from factory.config.training import TrainSettings
from factory.core import owned
from factory.core.errors import UserInputError
from factory.core.owned import check_replaceable, new_folder_beside, replace_folder, seal
from factory.export.content_hash import dataset_hash
from factory.models.registry import folder_fingerprint, model_identity
from factory.models.remote_code import TRAIN_OPT_IN, remote_code_refused
from factory.pipeline.run import Run
from factory.pipeline.stage import Context, Stage, StageOutput, execute, stage_key
from factory.train.card import MODEL_FOLDER, model_card
from factory.train.data import dataset_method, length_report, load_splits, validation_split
from factory.train.selection import HeldOut, beta_output, pick, selection_rule, win_rates
from factory.train.settings import betas, resolved
from factory.train.trainer import build_trainer, log_rows, train_one


def base_model_path(settings: TrainSettings) -> str:
    """Where transformers loads the base model from (the embedded model's converted folder, a folder, an id)."""
    if settings.base_model.startswith("embedded:"):
        from factory.models.hf import embedded_model_dir

        return str(embedded_model_dir(settings.base_model.removeprefix("embedded:")))
    return settings.base_model


def base_identity(settings: TrainSettings) -> dict[str, Any]:
    """The base model's identity as request keys see it (a local folder is identified by its content)."""
    return model_identity(ModelSpec(backend="transformers", model=settings.base_model, revision=settings.revision))


def train(
    source: str,
    settings: TrainSettings,
    wh: Any,
    reporter: Any = None,
    recipe_hash: str | None = None,
    loop_round: int | None = None,
    held_out: HeldOut | None = None,
) -> list[dict[str, Any]]:
    """Train on `source` (an export folder or a Hub dataset) in a run; returns every candidate's `trainings`
    row (`selected` and `output` mark the kept ones).

    `held_out` (a recipe with an `eval:` section) makes `select: eval` possible and its default for a sweep.
    A finished training with the same key (dataset content, base model identity, resolved settings, selection)
    whose output folders are still there is reused without training.
    """
    dd, data_name = load_splits(source)
    method = settings.method or dataset_method(dd["train"].column_names, source)
    want = dataset_method(dd["train"].column_names, source)
    if want != method:
        raise UserInputError(f"{source}: method '{method}' needs {'preference' if method == 'dpo' else 'SFT'} data")
    values = resolved(settings, method)
    candidates = betas(values)
    rule = selection_rule(values, len(candidates), validation_split(dd) is not None, held_out, source)
    name = settings.name or f"{data_name}-{method}"
    output = Path(settings.output).resolve() if settings.output else wh.root / "models" / name
    targets = [beta_output(output, beta) for beta in candidates] if rule == "all" else [output]
    destinations = targets if rule == "all" else [output] * len(candidates)  # each candidate's folder if kept
    for target in targets:
        check_replaceable(target, MODEL_FOLDER, wh.root)  # before anything is trained: a user's folder is refused
    identity = base_identity(settings)
    data_hash = dataset_hash(dd)
    if recipe_hash is None and "recipe_hash" in dd["train"].column_names:
        recipe_hash = dd["train"][0]["recipe_hash"]  # a factory export says which recipe made it
    spec = {
        "method": method,
        "base": identity,
        "dataset": data_hash,
        "values": values,
        "seed": settings.seed,
        "selected_by": rule,
        "held_out": held_out.signature() if rule == "eval" and held_out is not None else None,
    }
    # A training stands while the model folders it made still carry its key; its metrics are written by the
    # same computation, under the same key (layout `parent`).
    finished = False
    training = Stage(
        "train",
        (),
        lambda ctx: spec,
        lambda ctx, st: compute(st),
        version=2,
        table="trainings",
        layout="flat",
        reuse=lambda ctx: finished,
    )
    metrics_stage = Stage(
        "metrics",
        ("train",),
        lambda ctx: None,
        lambda ctx, st: StageOutput(metrics),
        table="training_metrics",
        layout="parent",
        reuse=lambda ctx: finished,
    )
    ctx = Context(None)
    key = stage_key(training, ctx)
    finished = all((owned.read_marker(target, MODEL_FOLDER) or {}).get("key") == key for target in targets)
    # The runs row carries the recipe hash of the data (as the build's and the publication's rows do), so
    # trainings join exports and publications on it; data from elsewhere has none, and the key stands in.
    run = Run(wh, name, recipe_hash or key[:16], reporter=reporter, recipe_path=str(source), loop_round=loop_round)
    metrics: list[dict[str, Any]] = []

    def compute(st: Any) -> StageOutput:
        import torch

        if values.get("threads"):
            torch.set_num_threads(values["threads"])
        path = base_model_path(settings)
        from transformers import AutoTokenizer

        with remote_code_refused(path, settings.trust_remote_code, TRAIN_OPT_IN):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
        checks = length_report(tokenizer, dd["train"], method, values["max_length"])
        if checks["examples_with_doubled_bos_or_eos"]:
            raise UserInputError(
                f"{source}: {checks['examples_with_doubled_bos_or_eos']} example(s) have a doubled BOS or EOS after "
                "the chat template (their text carries special tokens); fix the data before training"
            )
        if checks["examples_cut_at_max_length"] and run.reporter:
            run.reporter.warn(
                f"{checks['examples_cut_at_max_length']} example(s) are longer than max_length "
                f"{values['max_length']} tokens; the trainer cuts them"
            )
        rows = []
        for i, beta in enumerate(candidates):
            t0 = time.perf_counter()
            out = new_folder_beside(destinations[i])  # a marked folder a sweep may remove
            folders.append(out)
            trainer = build_trainer(
                method, values, beta, settings.seed, path, dd, out, trust_remote_code=settings.trust_remote_code
            )
            got = train_one(trainer, out)
            metrics.extend(log_rows(got["history"], name, beta))
            if got["rows_dropped"] and run.reporter:
                run.reporter.warn(
                    f"the trainer left out {got['rows_dropped']} example(s) whose prompt alone fills max_length"
                )
            if got["trainer_steps"] != got["planned_steps"] and run.reporter:
                run.reporter.warn(
                    f"the trainer planned {got['trainer_steps']} optimizer steps where factory counted "
                    f"{got['planned_steps']}; the warm-up is {got['warmup_steps']} steps"
                )
            derived = {"gradient_accumulation": got["gradient_accumulation"], "warmup_steps": got["warmup_steps"]}
            rows.append(
                {
                    "training_name": name,
                    "method": method,
                    "base_model": settings.base_model,
                    "base_identity": json.dumps(identity, sort_keys=True),
                    "dataset": str(source),
                    "dataset_hash": data_hash,
                    "settings": json.dumps({**values, **derived}, sort_keys=True),
                    "beta": beta,
                    "selected": False,
                    "selected_by": rule,
                    "steps": got["steps"],
                    "warmup_steps": got["warmup_steps"],
                    "examples_per_step": got["examples_per_step"],
                    "final_train_loss": got["final_train_loss"],
                    "val_loss": got["val_loss"],
                    "best_step": got["best_step"],
                    "best_val_loss": got["best_val_loss"],
                    "val_accuracy": got["val_accuracy"],
                    "eval_win_rate": None,
                    "train_rows": len(dd["train"]),
                    "examples_cut": checks["examples_cut_at_max_length"],
                    "output": None,
                    "model_hash": folder_fingerprint(out),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
        if rule == "eval":
            assert held_out is not None
            rates = win_rates(held_out, wh, run, name, list(zip(candidates, folders, strict=True)), loop_round)
            for row, rate in zip(rows, rates, strict=True):
                row["eval_win_rate"] = rate
            kept = [pick(rates)]
        elif rule == "val_accuracy":
            kept = [pick([r["val_accuracy"] for r in rows])]
        else:
            kept = list(range(len(rows)))  # `only`: the one candidate; `all`: every β into its own folder
        for i in kept:
            target = destinations[i]
            rows[i].update(selected=True, output=str(target))
            info = {**rows[i], "settings": json.loads(rows[i]["settings"]), "run_id": run.run_id}
            (folders[i] / "README.md").write_text(model_card(name, {**info, "recipe_hash": recipe_hash}), "utf-8")
            marker = {"key": key, "run_id": run.run_id, "model_hash": rows[i]["model_hash"], "beta": rows[i]["beta"]}
            seal(folders[i], MODEL_FOLDER, marker)
            replace_folder(folders[i], target, MODEL_FOLDER, wh.root)
        st.notes = {"candidates": len(rows), "selected_by": rule, **checks}
        return StageOutput(rows)

    folders: list[Path] = []
    with ExitStack() as stack:
        for target in targets:
            stack.enter_context(owned.writing(target, "model folder"))  # its lock, then what a killed run left
        stack.enter_context(run)
        try:
            execute([training, metrics_stage], ctx, run)
        finally:
            for folder in folders:
                owned.discard(folder)  # the candidates not kept (the kept ones are in place, no longer leftovers)
    return ctx.rows["train"]
