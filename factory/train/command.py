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

import hashlib
import itertools
import json
import math
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from factory.config.errors import error_field, error_text
from factory.config.training import TrainSettings
from factory.core import owned
from factory.core.errors import UserInputError
from factory.core.keys import canonical_json, stable_hash
from factory.core.owned import FolderKind, check_replaceable, new_folder_beside, replace_folder, seal
from factory.core.text import clip_value, message_line
from factory.models.registry import folder_fingerprint
from factory.models.remote_code import TRAIN_OPT_IN, remote_code_refused

Method = Literal["dpo", "sft"]

# Presets written out in full. `paper` follows the authors' released code, yale-nlp/RLRR at commit 04a5a96
# (file:line there after each value; docs/SELF_IMPROVEMENT.md has the same table): `mle.py` for SFT,
# `dpo.py` and `self_improve.sh` for DPO. `cpu` runs in minutes on 2 CPU cores.
_PAPER_BOTH = {
    "weight_decay": 0.01,  # dpo.py:153, mle.py:127: torch.optim.AdamW without weight_decay, i.e. its default
    "max_grad_norm": 0.0,  # dpo.py:25, mle.py:25 (grad_norm 0, never applied); deepspeed.conf:18 clipping 0.0
    "max_length": 2048,  # dpo.py:27, mle.py:31; prompt + response cut at the end (data_utils.py:38-39, :305)
}
_DPO = {
    "loss_type": "sigmoid",  # losses.py:45 (-logsigmoid(β·margin)), called at dpo.py:220
    "precompute_ref_log_probs": True,  # self_improve.sh:131-148 (get_logprobs.py), read at dpo.py:218-219
}
_PAPER_DPO = {
    **_PAPER_BOTH,
    **_DPO,
    "learning_rate": 5e-7,  # self_improve.sh:173 (--max_lr 0.0000005)
    "lr_scheduler": "cosine",  # self_improve.sh:170 (--lr_schedule cosine); dpo.py:161-162
    "warmup_ratio": 0.1,  # dpo.py:24; int(0.1 × total steps) at dpo.py:156
    "epochs": 1.0,  # self_improve.sh:163 (--epoch 1)
    "batch_size": 1,  # dpo.py:21 (one pair per device per pass)
    "examples_per_step": 64,  # 1 (dpo.py:21) × 8 accumulation (self_improve.sh:171) × 8 processes (:158)
    "eval_steps": 400,  # self_improve.sh:172 (--eval_interval 400); also at the epoch's end, dpo.py:265
    "beta": [0.005, 0.01, 0.02, 0.05, 0.2],  # self_improve.sh:151
    "select": "all",  # self_improve.sh:151-175: one run per β, each into its own folder ${FDIR}-${BETA} (:154)
}
_PAPER_SFT = {
    **_PAPER_BOTH,
    "learning_rate": 2e-5,  # mle.py:29
    "lr_scheduler": "linear",  # mle.py:133 (get_linear_schedule_with_warmup)
    "warmup_ratio": 0.03,  # mle.py:24; int(0.03 × total steps) at mle.py:130
    "epochs": 2.0,  # mle.py:237 (--epoch default 2)
    "batch_size": 2,  # mle.py:20
    "examples_per_step": 256,  # 2 (mle.py:20) × 16 accumulation (mle.py:22) × 8 GPUs (README.md:22)
    "eval_steps": 1000,  # mle.py:27; also at the epoch's end (mle.py:212); best loss kept, mle.py:216-218
}
# The SFT settings the paper's text gives where they differ from mle.py (the numbers factory's preset had
# before it followed the code): lr 5e-6, cosine, 10 % warm-up, 64 examples per step.
_PAPER_TEXT_SFT = {
    **_PAPER_SFT,
    "learning_rate": 5e-6,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.1,
    "examples_per_step": 64,
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
    "eval_steps": 2,
    "threads": 1,
}

PRESETS: dict[str, dict[Method, dict[str, Any]]] = {
    "paper": {"dpo": _PAPER_DPO, "sft": _PAPER_SFT},
    "paper-text": {"dpo": _PAPER_DPO, "sft": _PAPER_TEXT_SFT},
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
    "examples_per_step": None,
    "weight_decay": 0.01,
    "max_grad_norm": 0.0,
    "max_length": 2048,
    "eval_steps": None,
    "beta": 0.1,
    "select": None,
    "loss_type": "sigmoid",
    "precompute_ref_log_probs": True,
    "threads": None,
}
_DPO_ONLY = ("beta", "select", "loss_type", "precompute_ref_log_probs")

# transformers' "constant" schedule ignores warm-up; factory's `constant` means flat after the warm-up.
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


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
        origin = next((name for name, layer in reversed(layers) if err["loc"] and err["loc"][0] in layer), "settings")
        message = error_text(
            err, unknown="unknown setting", missing=None, echo_value_errors=True, name_non_finite=False
        )
        raise UserInputError(f"{origin}: field '{error_field(err)}': {message}") from None


def resolved(settings: TrainSettings, method: Method) -> dict[str, Any]:
    """Every training value after preset and defaults: exactly what the trainer is given (the accumulation
    and warm-up steps are derived from these when training starts)."""
    preset = PRESETS[settings.preset][method] if settings.preset else {}
    given = {k: v for k, v in settings.model_dump(exclude_unset=True).items() if k in DEFAULTS and v is not None}
    out = {**DEFAULTS, **preset, **given}
    if "gradient_accumulation" in given and "examples_per_step" not in given:
        out["examples_per_step"] = None  # an accumulation set by hand replaces a preset's examples per step
    if method == "sft":
        for key in _DPO_ONLY:
            out.pop(key)
    return out


def betas(values: dict[str, Any]) -> list[float | None]:
    """The β values to train (a sweep is a list); [None] for SFT."""
    beta = values.get("beta")
    if beta is None:
        return [None]
    return list(beta) if isinstance(beta, list) else [beta]


def accumulation(values: dict[str, Any], world_size: int) -> int:
    """Forward passes per optimizer step: `gradient_accumulation`, or derived from `examples_per_step`."""
    per_step = values.get("examples_per_step")
    if not per_step:
        return int(values["gradient_accumulation"])
    per_pass = values["batch_size"] * world_size
    if per_step % per_pass:
        raise UserInputError(
            f"examples_per_step {per_step} is not a multiple of batch_size {values['batch_size']} × {world_size} "
            "device(s); change batch_size or examples_per_step"
        )
    return per_step // per_pass


def optimizer_steps(
    rows: int, batch_size: int, accumulate: int, world_size: int, epochs: float, max_steps: int | None
) -> int:
    """The optimizer steps a training takes: `max_steps`, or the epochs over `rows` examples in batches of
    `batch_size` per device on `world_size` devices, a last short accumulation counting as a step."""
    if max_steps:
        return int(max_steps)
    batches = math.ceil(rows / (batch_size * world_size))
    return math.ceil(epochs * max(math.ceil(batches / accumulate), 1))


def warmup_steps(ratio: float, total: int) -> int:
    """Warm-up steps for a share of `total` optimizer steps, rounded down as the authors' code does
    (`int(warmup_ratio * total_steps)`, dpo.py:156, mle.py:130)."""
    return int(ratio * total)


def selection_rule(values: dict[str, Any], candidates: int, has_validation: bool, held_out: Any, where: str) -> str:
    """The rule that picks the kept model: `only` for one candidate, else `select` or its default; a rule that
    cannot run here is refused, with one line, before anything is trained."""
    if candidates == 1:
        return "only"
    rule = values.get("select") or ("eval" if held_out is not None else "val_accuracy")
    if rule == "eval" and held_out is None:
        raise UserInputError(
            f"{where}: select: eval compares the β runs by the recipe's held-out win rate, so it needs a recipe "
            "with an `eval:` section (`factory train RECIPE.yaml`, or its rounds); use select: val_accuracy or all"
        )
    if rule == "val_accuracy" and not has_validation:
        raise UserInputError(
            f"{where}: select: val_accuracy compares the β runs on the validation split: it needs a test split "
            "(export.test_fraction > 0); or use select: all"
        )
    return rule


def validation_split(dd: Any) -> Any:
    """The split evaluated during training (the export's `test` split), or None when there is none or it is empty."""
    return dd["test"] if "test" in dd and len(dd["test"]) else None


def beta_output(output: Path, beta: float | None) -> Path:
    """The folder of one β's model under `select: all` (`<output>-beta<β>`, as self_improve.sh:154 names them)."""
    return output.with_name(f"{output.name}-beta{beta:g}")


def trl_config(
    method: Method,
    values: dict[str, Any],
    output_dir: Path,
    beta: float | None,
    seed: int,
    *,
    evaluate: bool = False,
    warmup: int = 0,
) -> Any:
    """The TRL config object for one candidate, with every value that changes training set explicitly.

    `evaluate`: a validation split exists (evaluated every `eval_steps`); `warmup`: whole warm-up steps (the
    trainer gets the exact number once it knows the dataset's size, see `_build_trainer`).
    """
    import dataclasses

    import torch
    from trl import DPOConfig, SFTConfig

    cls = DPOConfig if method == "dpo" else SFTConfig
    names = {f.name for f in dataclasses.fields(cls)}
    on_cpu = not torch.cuda.is_available()
    every = values.get("eval_steps") if evaluate else None
    common: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": values["learning_rate"],
        "lr_scheduler_type": _SCHEDULERS.get(values["lr_scheduler"], values["lr_scheduler"]),
        "lr_scheduler_kwargs": {},
        # A whole number of steps means the same on every transformers version (a float below 1 is a share
        # of the steps on 5.x and nothing on 4.x, where `warmup_ratio` held the share instead).
        "warmup_steps": int(warmup),
        "warmup_ratio": 0.0,  # transformers 4.x only: the steps above are the whole warm-up
        "num_train_epochs": values["epochs"],
        "max_steps": values["max_steps"] or -1,
        "per_device_train_batch_size": values["batch_size"],
        "per_device_eval_batch_size": values["batch_size"],
        "gradient_accumulation_steps": values["gradient_accumulation"],
        # The authors' optimizer: torch.optim.AdamW with its default betas and epsilon (dpo.py:153, mle.py:127).
        "optim": "adamw_torch",
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "weight_decay": values["weight_decay"],
        "max_grad_norm": values["max_grad_norm"],
        "max_length": values["max_length"],
        # Prompts are never cut on their own: TRL 0.20-0.29 keeps only the last `max_prompt_length` (512)
        # prompt tokens by default. Prompt + response is cut at `max_length` from the end, as the authors'
        # tokenizer calls do (data_utils.py:38-39); TRL 0.x cut from the start by default.
        "max_prompt_length": None,
        "max_completion_length": None,
        "truncation_mode": "keep_start",
        "padding_free": False,
        "dataloader_drop_last": False,
        "average_tokens_across_devices": True,
        "seed": seed,
        "logging_steps": 1,
        "save_strategy": "no",  # the best checkpoint is kept by `BestCheckpoint`, without optimizer state
        "eval_strategy": "steps" if every else "no",
        "eval_steps": every,
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
            disable_dropout=True,
        )
    else:
        # The loss counts the response tokens only, as mle.py's mask does (data_utils.py:307); no packing.
        common.update(completion_only_loss=True, assistant_only_loss=False, packing=False)
    config = cls(**{k: v for k, v in common.items() if k in names})
    config.gradient_accumulation_steps = accumulation(values, config.world_size)
    return config


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
            # In memory: the trainers' `map` calls would otherwise write cache files into the export folder,
            # which is factory's own sealed folder (the next export would refuse to replace it).
            dd = datasets.load_from_disk(str(path), keep_in_memory=True)
        elif (path / "data").is_dir():
            dd = datasets.load_dataset("parquet", data_dir=str(path / "data"))
        elif path.exists():
            raise UserInputError(f"{path}: not an export folder (no dataset_dict.json and no data/)")
        else:
            dd = datasets.load_dataset(str(source))
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"{source}: could not load the dataset: {message_line(str(exc))}") from None
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
MODEL_FOLDER = FolderKind("model folder", MARKER, "the training output")


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
        f"- Steps: {info['steps']} (warm-up {info['warmup_steps']}, {info['examples_per_step']} examples per step); "
        f"final training loss {info['final_train_loss']}; final validation loss {info['val_loss']}",
        f"- Kept checkpoint: step {info['best_step']}, validation loss {info['best_val_loss']}"
        + (f", validation preference accuracy {info['val_accuracy']}" if info.get("val_accuracy") is not None else ""),
        f"- β: {info['beta']}, chosen by `{info['selected_by']}`"
        + (f" (held-out win rate {info['eval_win_rate']})" if info.get("eval_win_rate") is not None else "")
        if info["beta"] is not None
        else "- β: n/a (SFT)",
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


# -------------------------------------------------------------------------------------------------- run


def base_model_path(settings: TrainSettings) -> str:
    """Where transformers loads the base model from (the embedded model's converted folder, a folder, an id)."""
    if settings.base_model.startswith("embedded:"):
        from factory.models.hf import embedded_model_dir

        return str(embedded_model_dir(settings.base_model.removeprefix("embedded:")))
    return settings.base_model


def base_identity(settings: TrainSettings) -> dict[str, Any]:
    """The base model's identity as request keys see it (a local folder is identified by its content)."""
    from factory.config.models import ModelSpec
    from factory.models.registry import model_identity

    return model_identity(ModelSpec(backend="transformers", model=settings.base_model, revision=settings.revision))


def _log_rows(history: list[dict[str, Any]], name: str, beta: float | None) -> list[dict[str, Any]]:
    """TRL's log history as `training_metrics` rows: each optimizer step (`loss`, train rewards) and each
    evaluation on the validation split (`val_loss`, `val_rewards_*`)."""
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
                "val_rewards_chosen": entry.get("eval_rewards/chosen"),
                "val_rewards_rejected": entry.get("eval_rewards/rejected"),
                "val_rewards_accuracies": entry.get("eval_rewards/accuracies"),
                "val_rewards_margins": entry.get("eval_rewards/margins"),
            }
        )
    return rows


def _best_checkpoint(trainer: Any, folder: Path) -> Any:
    """A callback that saves the model into `folder` whenever an evaluation's loss is the lowest of the run so
    far (ties keep the earlier one, as dpo.py:271 and mle.py:216 do).

    It saves through `trainer.save_model` (weights, config, tokenizer; no optimizer state), which gathers the
    weights under every distributed setup the Trainer supports. Kept on disk rather than copied in memory: a
    copy of an 8B model's float32 weights would double the host memory, and on CPU the disk copy of the
    135M model is about a second."""
    from transformers import TrainerCallback

    class BestCheckpoint(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.best: dict[str, Any] | None = None
            self.last_step: int | None = None
            self.last_loss: float | None = None

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            # Every epoch's end is evaluated too (dpo.py:265 and mle.py:212 test at the last batch of each).
            if args.eval_strategy != "no" and self.last_step != state.global_step:
                control.should_evaluate = True
            return control

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kw: Any):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            self.last_step, self.last_loss = state.global_step, loss
            if self.best is None or loss < self.best["loss"]:
                trainer.save_model(str(folder))
                self.best = {
                    "step": state.global_step,
                    "loss": loss,
                    "accuracy": (metrics or {}).get("eval_rewards/accuracies"),
                }

    return BestCheckpoint()


def _build_trainer(
    method: Method,
    values: dict[str, Any],
    beta: float | None,
    seed: int,
    path: str,
    dd: Any,
    out: Path,
    *,
    trust_remote_code: bool = False,
) -> Any:
    """The TRL trainer of one candidate, its warm-up set as a whole number of steps counted from the data the
    trainer kept (`trainer.factory_plan` says how many steps, warm-up steps and examples per step)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOTrainer, SFTTrainer

    os.environ.setdefault("TQDM_DISABLE", "1")  # the run shows its own progress; tqdm bars only clutter logs
    torch.manual_seed(seed)
    trust = {"trust_remote_code": trust_remote_code}
    with remote_code_refused(path, trust_remote_code, TRAIN_OPT_IN):
        tokenizer = AutoTokenizer.from_pretrained(path, **trust)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **trust)
        # DPO: an explicit reference copy; TRL would otherwise reload it from the model's folder by name.
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **trust) if method == "dpo" else None
    evaluation = validation_split(dd)
    args = trl_config(method, values, out / "trainer", beta, seed, evaluate=evaluation is not None)
    if method == "dpo":
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
    a = trainer.args
    total = optimizer_steps(
        len(trainer.train_dataset),
        a.per_device_train_batch_size,
        a.gradient_accumulation_steps,
        a.world_size,
        values["epochs"],
        values["max_steps"],
    )
    # Set before `train()` builds the scheduler; a whole number means the same on every transformers version.
    a.warmup_steps = warmup_steps(values["warmup_ratio"], total)
    trainer.factory_plan = {
        "planned_steps": total,
        "warmup_steps": a.warmup_steps,
        "gradient_accumulation": a.gradient_accumulation_steps,
        "examples_per_step": a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size,
        "rows_dropped": len(dd["train"]) - len(trainer.train_dataset),
    }
    return trainer


def _train_one(trainer: Any, out: Path) -> dict[str, Any]:
    """Train one candidate (a `_build_trainer` trainer writing under `out`) and leave its kept checkpoint in
    `out`: the lowest-validation-loss evaluation of the run (every `eval_steps` optimizer steps and at the end),
    or the final weights without a validation split. Returns the trainer's plan and log history, the steps, the
    losses and the kept checkpoint's step and figures."""
    kept = out / "trainer" / "best"
    keeper = _best_checkpoint(trainer, kept)
    trainer.add_callback(keeper)
    result = trainer.train()
    step = trainer.state.global_step
    if trainer.eval_dataset is not None and keeper.last_step != step:
        trainer.evaluate()  # the end of the run is always evaluated (transformers < 5 does not by itself)
    if keeper.best is None:
        trainer.save_model(str(kept))  # no validation split: the final weights
    for file in kept.iterdir():
        if file.name != "training_args.bin":  # the trainer's pickled arguments are not part of the model
            os.replace(file, out / file.name)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    best = keeper.best or {}
    return {
        **trainer.factory_plan,
        "history": trainer.state.log_history,
        "steps": step,
        "trainer_steps": trainer.state.max_steps,
        "final_train_loss": result.training_loss,
        "val_loss": keeper.last_loss,
        "best_step": best.get("step", step),
        "best_val_loss": best.get("loss"),
        "val_accuracy": best.get("accuracy"),
    }


@dataclass(frozen=True)
class HeldOut:
    """What `select: eval` needs: the recipe (with its `eval:` section) and the policy model whose settings
    (backend, threads, device) run each candidate checkpoint."""

    loaded: Any
    """The LoadedRecipe."""
    policy: Any
    """The ModelSpec the candidates run like (`factory.rounds.loop.checkpoint_spec`)."""

    def signature(self) -> dict[str, Any]:
        """What the selection depends on besides the trained weights (part of the training's key)."""
        r = self.loaded.recipe
        e = r.eval
        models = {n: r.models[n].model_dump(mode="json") for n in (e.judge, e.baseline_model) if n is not None}
        return {"eval": e.model_dump(mode="json"), "models": models, "policy": self.policy.model_dump(mode="json")}


def held_out_for(loaded: Any, policy: Any = None) -> HeldOut | None:
    """The recipe's held-out evaluation for `select: eval`, or None when it has no `eval:` section or no policy."""
    r = loaded.recipe
    if r.eval is None or r.samples is None:
        return None
    return HeldOut(loaded, policy if policy is not None else r.models[r.samples.policy])


def _win_rates(
    held_out: HeldOut, wh: Any, run: Any, name: str, candidates: list[tuple[float | None, Path]], loop_round: Any
) -> list[float | None]:
    """Each candidate checkpoint's held-out win rate (factory.policy_eval.command, in this training's run)."""
    from factory.policy_eval.command import Contender, evaluate
    from factory.rounds.loop import checkpoint_spec

    contenders = [
        Contender(f"{name}.beta{beta:g}", checkpoint_spec(held_out.policy, folder), loop_round)
        for beta, folder in candidates
    ]
    _, results = evaluate(held_out.loaded, wh, contenders, run.reporter, loop_round=loop_round, run=run)
    rates = {r["contender"]: r.get("win_rate") for r in results}
    return [rates.get(c.label) for c in contenders]


def _pick(scores: list[float | None]) -> int:
    """The index of the highest score (None counts lowest; a tie keeps the β listed first)."""
    return max(range(len(scores)), key=lambda i: (scores[i] is not None, scores[i] or 0.0, -i))


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
    from factory.pipeline.calls import ModelPool
    from factory.pipeline.run import Run
    from factory.pipeline.stage import StageOutput

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
    key = stable_hash(
        {
            "stage": "trainings",
            "version": 2,
            "method": method,
            "base": identity,
            "dataset": data_hash,
            "values": values,
            "seed": settings.seed,
            "selected_by": rule,
            "held_out": held_out.signature() if rule == "eval" and held_out is not None else None,
        }
    )

    finished = all((owned.read_marker(target, MODEL_FOLDER) or {}).get("key") == key for target in targets)
    run = Run(wh, name, key[:16], ModelPool({}), reporter, recipe_path=str(source), loop_round=loop_round)
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
            trainer = _build_trainer(
                method, values, beta, settings.seed, path, dd, out, trust_remote_code=settings.trust_remote_code
            )
            got = _train_one(trainer, out)
            metrics.extend(_log_rows(got["history"], name, beta))
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
            rates = _win_rates(held_out, wh, run, name, list(zip(candidates, folders, strict=True)), loop_round)
            for row, rate in zip(rows, rates, strict=True):
                row["eval_win_rate"] = rate
            kept = [_pick(rates)]
        elif rule == "val_accuracy":
            kept = [_pick([r["val_accuracy"] for r in rows])]
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
            rows = run.materialize("trainings", key, compute, reuse=finished, label="train")
        finally:
            for folder in folders:
                owned.discard(folder)  # the candidates not kept (the kept ones are in place, no longer leftovers)
        run.materialize("training_metrics", key, lambda st: StageOutput(metrics), reuse=finished, label="metrics")
    return rows
