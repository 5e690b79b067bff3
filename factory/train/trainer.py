"""The TRL trainer of one candidate: built with its warm-up counted by factory, trained while keeping its
lowest-validation-loss checkpoint (as the authors' `dpo.py` does), and its log history as `training_metrics` rows."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from factory.models.remote_code import TRAIN_OPT_IN, remote_code_refused
from factory.train.data import validation_split
from factory.train.presets import Method
from factory.train.settings import optimizer_steps, warmup_steps
from factory.train.trl_config import trl_config


def log_rows(history: list[dict[str, Any]], name: str, beta: float | None) -> list[dict[str, Any]]:
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


def build_trainer(
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


def train_one(trainer: Any, out: Path) -> dict[str, Any]:
    """Train one candidate (a `build_trainer` trainer writing under `out`) and leave its kept checkpoint in
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
