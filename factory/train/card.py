"""A trained model's folder as factory marks it: its marker kind and its README (the model card)."""

from __future__ import annotations

import json
from typing import Any

from factory.core.owned import FolderKind

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
