"""The training presets, written out in full, and the defaults anything a preset leaves unset falls back to.

`paper` follows the authors' released training code (each value's file:line there beside it); `cpu` runs a few
real steps of the embedded model (docs/SELF_IMPROVEMENT.md has the same table).
"""

from __future__ import annotations

from typing import Any, Literal

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
DPO_ONLY = ("beta", "select", "loss_type", "precompute_ref_log_probs")
