"""`factory train`: SFT or DPO on an export with TRL, as a run in the warehouse (docs/DESIGN.md §5).

Settings come in three layers, each overriding the one before: a preset (`paper`: the paper's settings;
`cpu`: a few real steps of the embedded model), a YAML `train:` section (in a recipe or a file of its own),
and `--set KEY=VALUE` on the command line. Every value handed to TRL is set explicitly, so TRL's own
defaults (gradient clipping 1.0, weight decay 0, max length 1024) never slip in unnoticed.

A training is a stage of its own: its key hashes the dataset's content, the base model's identity and the
resolved settings, so a rerun with the same inputs reuses the finished model instead of training again.
Every candidate (one per β of a sweep) is a row of the `trainings` table and its logged steps are rows of
`training_metrics`; the candidate with the lowest validation loss is kept in the output folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from factory.backends import folder_fingerprint
from factory.errors import UserInputError
from factory.keys import canonical_json, stable_hash
from factory.recipe import TrainSettings, clip_value, one_line

Method = Literal["dpo", "sft"]


# Presets written out in full: the paper's (arXiv 2602.16802) and one that runs in minutes on 2 CPU cores.
_PAPER = {
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.1,
    "batch_size": 8,
    "gradient_accumulation": 8,  # 8 × 8 = 64 examples per optimizer step on one device
    "weight_decay": 0.01,
    "max_grad_norm": 0.0,  # no clipping
    "max_length": 2048,
}
_CPU = {
    "learning_rate": 5e-5,
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "epochs": 1.0,
    "max_steps": 4,
    "batch_size": 2,
    "gradient_accumulation": 1,
    "weight_decay": 0.01,
    "max_grad_norm": 0.0,
    "max_length": 256,
    "threads": 1,
}
_DPO = {"loss_type": "sigmoid", "precompute_ref_log_probs": True}

PRESETS: dict[str, dict[Method, dict[str, Any]]] = {
    "paper": {
        "dpo": {**_PAPER, **_DPO, "learning_rate": 5e-7, "epochs": 1.0, "beta": [0.005, 0.01, 0.02, 0.05, 0.2]},
        "sft": {**_PAPER, "learning_rate": 5e-6, "epochs": 2.0},
    },
    "cpu": {"dpo": {**_CPU, **_DPO, "beta": 0.1}, "sft": dict(_CPU)},
}
"""What each preset sets; anything a preset leaves unset falls back to `DEFAULTS`, never to TRL's own."""

DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-7,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.1,
    "epochs": 1.0,
    "max_steps": None,
    "batch_size": 8,
    "gradient_accumulation": 8,
    "weight_decay": 0.01,
    "max_grad_norm": 0.0,
    "max_length": 2048,
    "beta": 0.1,
    "loss_type": "sigmoid",
    "precompute_ref_log_probs": True,
    "threads": None,
}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings from the command line, each value read as YAML (numbers, lists, booleans)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"--set {clip_value(pair)}: expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserInputError(f"--set {clip_value(pair)}: the value is not valid YAML") from None
    return out


def settings_from(layers: list[tuple[str, dict[str, Any]]]) -> TrainSettings:
    """Merge setting layers (later wins) and validate; an error names the layer and the field."""
    merged: dict[str, Any] = {}
    for _, layer in layers:
        merged.update(layer)
    try:
        return TrainSettings.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        origin = next((name for name, layer in reversed(layers) if err["loc"] and err["loc"][0] in layer), "settings")
        message = "unknown setting" if err["type"] == "extra_forbidden" else one_line(str(err["msg"]))
        got = f"; got {clip_value(err['input'])}" if err["type"] not in ("extra_forbidden", "missing") else ""
        raise UserInputError(f"{origin}: field '{field}': {message.removeprefix('Value error, ')}{got}") from None


def resolved(settings: TrainSettings, method: Method) -> dict[str, Any]:
    """Every training value after preset and defaults: exactly what the trainer is given."""
    preset = PRESETS[settings.preset][method] if settings.preset else {}
    given = settings.model_dump(exclude_unset=True)
    out = {**DEFAULTS, **preset, **{k: v for k, v in given.items() if k in DEFAULTS and v is not None}}
    if method == "sft":
        for key in ("beta", "loss_type", "precompute_ref_log_probs"):
            out.pop(key)
    return out


def betas(values: dict[str, Any]) -> list[float | None]:
    """The β values to train (a sweep is a list); [None] for SFT."""
    beta = values.get("beta")
    if beta is None:
        return [None]
    return list(beta) if isinstance(beta, list) else [beta]


def trl_config(method: Method, values: dict[str, Any], output_dir: Path, beta: float | None, seed: int) -> Any:
    """The TRL config object for one candidate, with every value set explicitly."""
    import dataclasses

    import torch
    from trl import DPOConfig, SFTConfig

    cls = DPOConfig if method == "dpo" else SFTConfig
    names = {f.name for f in dataclasses.fields(cls)}
    on_cpu = not torch.cuda.is_available()
    common: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": values["learning_rate"],
        "lr_scheduler_type": values["lr_scheduler"],
        # transformers 5 reads a float below 1 as a share of the steps (warmup_ratio is gone there).
        "warmup_steps": values["warmup_ratio"],
        "num_train_epochs": values["epochs"],
        "max_steps": values["max_steps"] or -1,
        "per_device_train_batch_size": values["batch_size"],
        "per_device_eval_batch_size": values["batch_size"],
        "gradient_accumulation_steps": values["gradient_accumulation"],
        "weight_decay": values["weight_decay"],
        "max_grad_norm": values["max_grad_norm"],
        "max_length": values["max_length"],
        "seed": seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "use_cpu": on_cpu,
        # CPUs without native bf16 run bf16 autocast several times slower than float32.
        "bf16": not on_cpu and torch.cuda.is_bf16_supported(),
        "gradient_checkpointing": False,
    }
    if method == "dpo":
        common.update(
            beta=beta,
            loss_type=[values["loss_type"]] if "loss_type" in names else values["loss_type"],
            precompute_ref_log_probs=values["precompute_ref_log_probs"],
        )
    return cls(**{k: v for k, v in common.items() if k in names})


# ------------------------------------------------------------------------------------------------- data


def dataset_method(columns: list[str], where: str) -> Method:
    """DPO for preference columns, SFT for prompt/completion; anything else is an input error."""
    if {"prompt", "chosen", "rejected"} <= set(columns):
        return "dpo"
    if {"prompt", "completion"} <= set(columns):
        return "sft"
    raise UserInputError(
        f"{where}: neither a preference dataset (prompt, chosen, rejected) nor an SFT one (prompt, completion); "
        f"columns: {clip_value(columns)}"
    )


def load_splits(source: str | Path) -> tuple[Any, str]:
    """The train and test splits of an export folder, a folder of Parquet files, or a Hub dataset."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    try:
        if (path / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(str(path))
        elif (path / "data").is_dir():
            dd = datasets.load_dataset("parquet", data_dir=str(path / "data"))
        elif path.exists():
            raise UserInputError(f"{path}: not an export folder (no dataset_dict.json and no data/)")
        else:
            dd = datasets.load_dataset(str(source))
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"{source}: could not load the dataset: {one_line(str(exc))}") from None
    if "train" not in dd or len(dd["train"]) == 0:
        raise UserInputError(f"{source}: the train split is empty or missing; nothing to train on")
    name = path.name if path.exists() else str(source).replace("/", "--")
    return dd, name


def dataset_hash(dd: Any) -> str:
    """A hash of the rows the training sees (every split), independent of where and how they are stored."""
    digest = hashlib.sha256()
    for split in sorted(dd):
        digest.update(split.encode())
        for row in dd[split]:
            digest.update(canonical_json(row).encode())
    return digest.hexdigest()[:16]


def length_report(tokenizer: Any, split: Any, method: Method, max_length: int) -> dict[str, int]:
    """Counts of examples the trainer would cut at `max_length`, and a check that no BOS or EOS is doubled
    after the chat template (a dataset whose text carries them would teach a broken turn)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    cut = doubled = 0
    answers = ("chosen", "rejected") if method == "dpo" else ("completion",)
    for row in split:
        for answer in answers:
            ids = tokenizer.apply_chat_template(row["prompt"] + row[answer], tokenize=True, return_dict=True)
            ids = list(ids["input_ids"])
            cut += len(ids) > max_length
            doubled += any(a == b and a in (bos, eos) for a, b in itertools.pairwise(ids))
    return {"examples_cut_at_max_length": cut, "examples_with_doubled_bos_or_eos": doubled}


MARKER = ".factory-model.json"


def model_card(name: str, info: dict[str, Any]) -> str:
    """The trained folder's README: what it was trained on and with which settings."""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [factory, trl, " + info["method"] + "]",
        "---",
        "",
        f"# {name}",
        "",
        f"{info['method'].upper()} of `{info['base_model']}` with TRL, by `factory train`.",
        "",
        f"- Dataset: `{info['dataset']}` (content hash `{info['dataset_hash']}`), {info['train_rows']} training rows",
        f"- Recipe hash of the dataset: `{info.get('recipe_hash') or 'n/a'}`",
        f"- Steps: {info['steps']}; final training loss {info['final_train_loss']}; validation loss {info['val_loss']}",
        f"- β: {info['beta']}" if info["beta"] is not None else "- β: n/a (SFT)",
        f"- Wall time: {info['seconds']:.1f} s; run `{info['run_id']}`",
        "",
        "## Settings",
        "",
        "```json",
        json.dumps(info["settings"], indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def copy_model(source: Path, target: Path) -> None:
    """Replace `target` with `source`, built beside it and renamed into place."""
    tmp = target.with_name(f".{target.name}.new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- run


def base_model_path(settings: TrainSettings) -> str:
    """Where transformers loads the base model from (the embedded model's converted folder, a folder, an id)."""
    if settings.base_model.startswith("embedded:"):
        from factory.backends.hf import embedded_model_dir

        return str(embedded_model_dir(settings.base_model.removeprefix("embedded:")))
    return settings.base_model


def base_identity(settings: TrainSettings) -> dict[str, Any]:
    """The base model's identity as request keys see it (a local folder is identified by its content)."""
    from factory.backends import model_identity
    from factory.recipe import ModelSpec

    return model_identity(ModelSpec(backend="transformers", model=settings.base_model, revision=settings.revision))


def _log_rows(history: list[dict[str, Any]], name: str, beta: float | None) -> list[dict[str, Any]]:
    """TRL's log history as `training_metrics` rows (train steps; the final evaluation as `val_loss`)."""
    rows = []
    for entry in history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue
        rows.append(
            {
                "training_name": name,
                "beta": beta,
                "step": int(entry.get("step", 0)),
                "epoch": entry.get("epoch"),
                "loss": entry.get("loss"),
                "val_loss": entry.get("eval_loss"),
                "learning_rate": entry.get("learning_rate"),
                "grad_norm": entry.get("grad_norm"),
                "rewards_chosen": entry.get("rewards/chosen"),
                "rewards_rejected": entry.get("rewards/rejected"),
                "rewards_accuracies": entry.get("rewards/accuracies"),
                "rewards_margins": entry.get("rewards/margins"),
            }
        )
    return rows


def _train_one(
    method: Method, values: dict[str, Any], beta: float | None, seed: int, path: str, dd: Any, out: Path
) -> Any:
    """Train one candidate into `out`; returns (trainer state history, steps, final train loss, val loss)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOTrainer, SFTTrainer

    os.environ.setdefault("TQDM_DISABLE", "1")  # the run shows its own progress; tqdm bars only clutter logs
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = trl_config(method, values, out / "trainer", beta, seed)
    evaluation = dd["test"] if "test" in dd and len(dd["test"]) else None
    if method == "dpo":
        # An explicit reference copy: TRL would otherwise reload it from the model's folder by name.
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=dd["train"],
            eval_dataset=evaluation,
            processing_class=tokenizer,
        )
    else:
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dd["train"], eval_dataset=evaluation, processing_class=tokenizer
        )
    trainer.remove_callback(PrinterCallback)  # every step lands in training_metrics instead
    result = trainer.train()
    val = trainer.evaluate()["eval_loss"] if evaluation is not None else None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    return trainer.state.log_history, trainer.state.global_step, result.training_loss, val


def train(
    source: str,
    settings: TrainSettings,
    wh: Any,
    reporter: Any = None,
    recipe_hash: str | None = None,
    loop_round: int | None = None,
) -> dict[str, Any]:
    """Train on `source` (an export folder or a Hub dataset) in a run; returns the selected candidate's row.

    A finished training with the same key (dataset content, base model identity, resolved settings) whose
    output folder is still there is reused without training.
    """
    from factory.calls import ModelPool
    from factory.pipeline import StageOutput
    from factory.runs import Run

    dd, data_name = load_splits(source)
    method = settings.method or dataset_method(dd["train"].column_names, source)
    want = dataset_method(dd["train"].column_names, source)
    if want != method:
        raise UserInputError(f"{source}: method '{method}' needs {'preference' if method == 'dpo' else 'SFT'} data")
    values = resolved(settings, method)
    candidates = betas(values)
    if len(candidates) > 1 and not ("test" in dd and len(dd["test"])):
        raise UserInputError(
            f"{source}: a β sweep keeps the model with the lowest validation loss: it needs a test split"
        )
    name = settings.name or f"{data_name}-{method}"
    output = Path(settings.output).resolve() if settings.output else wh.root / "models" / name
    identity = base_identity(settings)
    data_hash = dataset_hash(dd)
    if recipe_hash is None and "recipe_hash" in dd["train"].column_names:
        recipe_hash = dd["train"][0]["recipe_hash"]  # a factory export says which recipe made it
    key = stable_hash(
        {
            "stage": "trainings",
            "version": 1,
            "method": method,
            "base": identity,
            "dataset": data_hash,
            "values": values,
            "seed": settings.seed,
        }
    )
    marker = output / MARKER
    finished = marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("key") == key
    run = Run(wh, name, key[:16], ModelPool({}), reporter, recipe_path=str(source), loop_round=loop_round)
    metrics: list[dict[str, Any]] = []

    def compute(st: Any) -> StageOutput:
        import torch

        if values.get("threads"):
            torch.set_num_threads(values["threads"])
        path = base_model_path(settings)
        from transformers import AutoTokenizer

        checks = length_report(AutoTokenizer.from_pretrained(path), dd["train"], method, values["max_length"])
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
        scratch = output.with_name(f".{output.name}.candidates")
        shutil.rmtree(scratch, ignore_errors=True)
        for i, beta in enumerate(candidates):
            t0 = time.perf_counter()
            out = scratch / f"candidate-{i}"
            history, steps, train_loss, val = _train_one(method, values, beta, settings.seed, path, dd, out)
            metrics.extend(_log_rows(history, name, beta))
            rows.append(
                {
                    "training_name": name,
                    "method": method,
                    "base_model": settings.base_model,
                    "base_identity": json.dumps(identity, sort_keys=True),
                    "dataset": str(source),
                    "dataset_hash": data_hash,
                    "settings": json.dumps(values, sort_keys=True),
                    "beta": beta,
                    "selected": False,
                    "steps": steps,
                    "final_train_loss": train_loss,
                    "val_loss": val,
                    "train_rows": len(dd["train"]),
                    "examples_cut": checks["examples_cut_at_max_length"],
                    "output": None,
                    "model_hash": folder_fingerprint(out),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
        best = min(range(len(rows)), key=lambda i: (rows[i]["val_loss"] is None, rows[i]["val_loss"] or 0.0, i))
        rows[best].update(selected=True, output=str(output))
        chosen = scratch / f"candidate-{best}"
        info = {**rows[best], "settings": values, "run_id": run.run_id, "recipe_hash": recipe_hash}
        (chosen / "README.md").write_text(model_card(name, info), encoding="utf-8")
        (chosen / MARKER).write_text(
            json.dumps({"key": key, "run_id": run.run_id, "model_hash": rows[best]["model_hash"]})
        )
        copy_model(chosen, output)
        shutil.rmtree(scratch, ignore_errors=True)
        best_val = min((r["val_loss"] for r in rows if r["val_loss"] is not None), default=None)
        for r in rows:
            r["best_val_loss"] = best_val
        st.notes = {"candidates": len(rows), **checks}
        return StageOutput(rows)

    with run:
        rows = run.materialize("trainings", key, compute, reuse=finished, label="train")
        run.materialize("training_metrics", key, lambda st: StageOutput(metrics), reuse=finished, label="metrics")
    return next(r for r in rows if r["selected"])
