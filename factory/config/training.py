"""Recipe model of one training (`TrainSettings`): the `train` section, `factory train` and each round's steps."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from factory.config.base import Strict


class TrainSettings(Strict):
    """One training: what to train, from which model, and how. Unset fields take the preset's value."""

    method: Literal["dpo", "sft"] | None = None
    """`dpo` (preference data) or `sft` (prompt/completion data); default: read from the dataset's columns."""
    base_model: str = "embedded:smollm2-135m-instruct"
    """The model to start from: `embedded:smollm2-135m-instruct`, a local folder, or a Hub id."""
    revision: str | None = None
    """Hub revision of `base_model`."""
    trust_remote_code: bool = False
    """Let a base model that ships Python code (`auto_map`) load: this RUNS that code, so only for code you trust."""
    preset: Literal["paper", "paper-text", "cpu"] | None = None
    """`paper`: the authors' released training code (yale-nlp/RLRR `mle.py`, `dpo.py`, `self_improve.sh`; each
    value and its source in docs/SELF_IMPROVEMENT.md); `paper-text`: the same, with the SFT settings the paper's
    text states where they differ from the code; `cpu`: a few real steps of the embedded model on a laptop."""
    learning_rate: float | None = Field(None, gt=0)
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] | None = None
    """Learning-rate schedule after warm-up (`constant`: flat after warm-up, the same as `constant_with_warmup`)."""
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    """Share of the optimizer steps spent warming up linearly from 0; factory counts the optimizer steps and
    hands the trainer a whole number of warm-up steps (the share rounded down, as the authors' code does)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training split."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides `epochs`)."""
    batch_size: int | None = Field(None, ge=1)
    """Examples per device per forward pass."""
    gradient_accumulation: int | None = Field(None, ge=1)
    """Forward passes per optimizer step; pairs per step = batch_size × gradient_accumulation × devices.
    Setting it drops a preset's `examples_per_step`."""
    examples_per_step: int | None = Field(None, ge=1)
    """Examples (pairs) per optimizer step over all devices; when set, `gradient_accumulation` is derived from it,
    `batch_size` and the number of devices (it must divide evenly)."""
    weight_decay: float | None = Field(None, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float | None = Field(None, ge=0)
    """Gradient clipping norm; 0 turns clipping off."""
    max_length: int | None = Field(None, ge=8)
    """Tokens of prompt + response; longer examples are cut by TRL (counted and reported first)."""
    beta: float | list[float] | None = None
    """DPO β, or a list to sweep: one run per value, each keeping its own best checkpoint (`eval_steps`);
    `select` says which run's model is kept (validation losses at different β are never compared)."""
    eval_steps: int | None = Field(None, ge=1)
    """Evaluate on the validation split (the export's test split) every this many optimizer steps and at the
    end, and keep the checkpoint with the lowest validation loss within the run; unset: evaluate once, at the
    end, and keep the final weights."""
    select: Literal["val_accuracy", "eval", "all"] | None = None
    """How a β sweep picks its model: `val_accuracy` (the share of validation pairs whose implicit reward ranks
    chosen above rejected, at each run's kept checkpoint), `eval` (the recipe's held-out win rate of each run's
    checkpoint; only when the training comes from a recipe with an `eval:` section), or `all` (keep every β's
    checkpoint, in `<output>-beta<β>`). Default: `eval` where the recipe has an `eval:` section, else
    `val_accuracy`."""
    loss_type: str | None = None
    """DPO loss (`sigmoid` is the paper's)."""
    precompute_ref_log_probs: bool | None = None
    """Compute the reference model's log-probabilities once before training (DPO)."""
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1)
    """Seed of the trainer (data order, dropout)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for torch."""
    output: str | None = None
    """Output folder; default `<warehouse>/models/<name>`."""
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
    """Name of the training (its folder and its rows); default: the dataset folder's name and the method."""

    @model_validator(mode="after")
    def _betas(self) -> TrainSettings:
        betas = self.beta if isinstance(self.beta, list) else [self.beta] if self.beta is not None else []
        if any(not (b > 0 and math.isfinite(b)) for b in betas) or (isinstance(self.beta, list) and not betas):
            raise ValueError("beta must be a positive number or a non-empty list of them")
        return self
