"""The TRL config of one training candidate, with every value that changes training set explicitly.

Values whose default moved between TRL or transformers versions (prompt truncation, warm-up, optimizer) are
handed over too, so no installed version's default slips in unnoticed (docs/DESIGN.md §5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factory.train.presets import Method
from factory.train.settings import accumulation

# transformers' "constant" schedule ignores warm-up; factory's `constant` means flat after the warm-up.
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


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
    trainer gets the exact number once it knows the dataset's size, see `build_trainer`).
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
