"""Which candidate a training keeps: the rule across β (`only`, `all`, `val_accuracy`, `eval`), each β's folder
under `select: all`, the held-out win rates `select: eval` compares, and a trained checkpoint's model spec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.config.models import ModelSpec
from factory.core.errors import UserInputError
from factory.policy_eval.command import Contender, evaluate


def checkpoint_spec(policy: ModelSpec, folder: str | Path) -> ModelSpec:
    """The model spec of a trained folder, run the way the policy was (threads, batch size, device, dtype)."""
    return ModelSpec(
        backend="vllm" if policy.backend == "vllm" else "transformers",
        model=str(folder),
        threads=policy.threads,
        batch_size=policy.batch_size,
        dtype=policy.dtype,
        device=policy.device,
        engine=policy.engine,
        trust_remote_code=policy.trust_remote_code,  # a checkpoint keeps its base model's code (save_pretrained)
    )


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


def beta_output(output: Path, beta: float | None) -> Path:
    """The folder of one β's model under `select: all` (`<output>-beta<β>`, as self_improve.sh:154 names them)."""
    return output.with_name(f"{output.name}-beta{beta:g}")


@dataclass(frozen=True)
class HeldOut:
    """What `select: eval` needs: the recipe (with its `eval:` section) and the policy model whose settings
    (backend, threads, device) run each candidate checkpoint."""

    loaded: Any
    """The LoadedRecipe."""
    policy: Any
    """The ModelSpec the candidates run like (`checkpoint_spec`)."""

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
    return HeldOut(loaded, policy if policy is not None else r.models[r.policy or ""])


def win_rates(
    held_out: HeldOut, wh: Any, run: Any, name: str, candidates: list[tuple[float | None, Path]], loop_round: Any
) -> list[float | None]:
    """Each candidate checkpoint's held-out win rate (factory.policy_eval.command, in this training's run)."""
    contenders = [
        Contender(f"{name}.beta{beta:g}", checkpoint_spec(held_out.policy, folder), loop_round)
        for beta, folder in candidates
    ]
    _, results = evaluate(held_out.loaded, wh, contenders, run.reporter, loop_round=loop_round, run=run)
    rates = {r["contender"]: r.get("win_rate") for r in results}
    return [rates.get(c.label) for c in contenders]


def pick(scores: list[float | None]) -> int:
    """The index of the highest score (None counts lowest; a tie keeps the β listed first)."""
    return max(range(len(scores)), key=lambda i: (scores[i] is not None, scores[i] or 0.0, -i))
