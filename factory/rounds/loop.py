"""Self-improvement rounds: the paper's loop as one `factory build` (docs/SELF_IMPROVEMENT.md).

    [round 0]  SFT the policy on a reference (optional)
    round k    build the recipe with round k−1's checkpoint as the policy → DPO on its pairs → checkpoint k
    eval       every policy of the chain against the baseline (with an `eval` section)

Each round is an ordinary build of the recipe with the policy replaced by the previous round's checkpoint
wherever the recipe names it (so a judge that is the policy's own model judges with the checkpoint too: the
paper's self-judge). Its rows carry the recipe name `<name>.r<k>` and the round number, its export goes to
`exports/<name>.r<k>`, its training to `models/<name>.r<k>-dpo`, and each build, training and evaluation is a
row of the runs table with its round.

A checkpoint is identified in request keys by a hash of its weights and configuration, so an unchanged rerun
reuses every finished round (0 model calls, no training) and a retrained one makes its successors anew.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factory.build.command import Build
from factory.config.models import ModelSpec
from factory.config.recipe import LoadedRecipe, Recipe
from factory.config.training import TrainSettings
from factory.pipeline.calls import Reporter
from factory.policy_eval.command import Contender, evaluate, recipe_policy
from factory.train.command import train
from factory.train.selection import checkpoint_spec, held_out_for
from factory.train.settings import betas, resolved, settings_from
from factory.warehouse.store import Warehouse


def train_base(spec: ModelSpec) -> dict[str, Any]:
    """`factory train`'s base model fields for a policy model."""
    if spec.backend == "embedded":
        return {"base_model": f"embedded:{spec.model}"}
    # A base model that needed its own code to run needs it to train too: the entry's opt-in carries over.
    return {"base_model": spec.model, "revision": spec.revision, "trust_remote_code": spec.trust_remote_code}


def round_recipe(loaded: LoadedRecipe, k: int, policy: ModelSpec | None, *, sft_only: bool = False) -> LoadedRecipe:
    """The recipe of round `k`: renamed `<name>.r<k>`, its policy model replaced by `policy` (when given);
    round 0 builds only the SFT data of `rounds.sft_reference`."""
    r = loaded.recipe
    assert r.rounds is not None and r.samples is not None
    data = r.model_dump(exclude={"rounds", "eval", "train"})
    data["name"] = f"{r.name}.r{k}"
    if r.export.path is not None:
        data["export"]["path"] = f"{r.export.path}.r{k}"
    if policy is not None:
        data["models"][r.policy] = policy.model_dump()
    if sft_only:
        data.update(samples=None, judgments=None, rewards=None, similarity=None)
        data["export"]["sft_reference"] = r.rounds.sft_reference
    return LoadedRecipe(
        recipe=Recipe.model_validate(data), path=loaded.path, text=loaded.text, overrides=loaded.overrides
    )


@dataclass
class Step:
    """One step of the loop as the summary shows it."""

    round: int
    kind: str
    """build | sft | dpo | eval"""
    row: dict[str, Any]
    """The step's runs row (a training's: its `trainings` row)."""
    detail: str = ""


@dataclass
class Loop:
    """The rounds of one recipe in one warehouse."""

    loaded: LoadedRecipe
    wh: Warehouse
    reporter: Reporter = field(default_factory=Reporter)
    steps: list[Step] = field(default_factory=list)
    chain: list[Contender] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"

    def run(self) -> str:
        """Run every round (stopping at the first that is not complete) and the evaluation; returns
        `ok`, or the status of the step that stopped the loop."""
        from factory.build.command import preflight
        from factory.stages.prompts import read_prompts

        read_prompts(self.loaded)
        preflight(self.loaded)  # every round's recipe is this one's: its problems show before round 0
        r = self.loaded.recipe
        spec = r.rounds
        assert spec is not None and r.samples is not None
        policy = r.models[r.policy]
        self._check_selection(spec.dpo, policy)  # before round 0, not after a round's data is built
        self.chain = [Contender(r.policy, policy)]
        replaced: ModelSpec | None = None
        if spec.sft_reference is not None:
            build = self._build(round_recipe(self.loaded, 0, None, sft_only=True), 0)
            if build is None:
                return self.status
            trained = self._train(build.sft_path, spec.sft, "sft", policy, f"{r.name}.r0-sft", 0)
            replaced = checkpoint_spec(policy, trained["output"])
            self.chain.append(Contender(f"{r.name}.sft", replaced, 0))
        for k in range(1, spec.count + 1):
            build = self._build(round_recipe(self.loaded, k, replaced), k)
            if build is None:
                return self.status
            trained = self._train(build.export_path, spec.dpo, "dpo", replaced or policy, f"{r.name}.r{k}-dpo", k)
            replaced = checkpoint_spec(policy, trained["output"])
            self.chain.append(Contender(f"{r.name}.r{k}", replaced, k))
        if r.eval is not None:
            contenders = self.chain if spec.evaluate == "each" else self.chain[-1:]
            row, self.results = evaluate(self.loaded, self.wh, contenders, self.reporter, loop_round=spec.count)
            self.steps.append(Step(spec.count, "eval", row, f"{len(contenders)} policies"))
            if row["status"] != "ok":
                self.status = row["status"]
        return self.status

    def _build(self, loaded: LoadedRecipe, k: int) -> Build | None:
        """Build one round's data; None (and the loop stops) unless every call succeeded: a round never
        trains on pairs that are missing some of their judgments."""
        build = Build(loaded, self.wh, self.reporter, loop_round=k)
        row = build.run()
        self.steps.append(Step(k, "build", row, str(build.export_path or build.sft_path or "")))
        if row["status"] != "ok":
            self.status = row["status"]
            return None
        return build

    @staticmethod
    def _settings(settings: TrainSettings, method: str, base: ModelSpec, name: str) -> TrainSettings:
        layers = [
            ("rounds (default preset)", {"preset": "cpu"}),
            (f"rounds.{method}", settings.model_dump(exclude_unset=True)),
            ("rounds", {**train_base(base), "method": method, "name": name}),
        ]
        return settings_from(layers)

    def _check_selection(self, settings: TrainSettings, policy: ModelSpec) -> None:
        """A β sweep in the rounds must keep one model: the next round samples with a single checkpoint."""
        from factory.core.errors import UserInputError

        values = resolved(self._settings(settings, "dpo", policy, "check"), "dpo")
        if len(betas(values)) > 1 and values.get("select") == "all":
            raise UserInputError(
                "rounds.dpo: select: all keeps every β's model, but each round samples with one checkpoint; "
                "use select: eval (the held-out win rate) or val_accuracy"
            )

    def _train(
        self, data: Path | None, settings: TrainSettings, method: str, base: ModelSpec, name: str, k: int
    ) -> dict[str, Any]:
        assert data is not None
        merged = self._settings(settings, method, base, name)
        # A β sweep picks its checkpoint by the held-out win rate when the recipe has an `eval:` section; each
        # candidate runs as the recipe's policy entry runs, judged by the eval's judge (never a round's checkpoint).
        held_out = held_out_for(self.loaded)
        rows = train(str(data), merged, self.wh, self.reporter, loop_round=k, held_out=held_out)
        row = next(x for x in rows if x["selected"])
        self.steps.append(Step(k, method, row, str(row["output"])))
        return row


@dataclass
class Outcome:
    """What `factory build` ran, for its summary: the rounds loop, or one build (and its eval)."""

    status: str
    """`ok`, or the status of the step that did not finish (the eval's when it ran)."""
    results: list[dict[str, Any]]
    """The eval's win rates (empty without one)."""
    loop: Loop | None = None
    build: Build | None = None
    build_row: dict[str, Any] = field(default_factory=dict)
    """The build's runs row (without rounds)."""


def run_recipe(loaded: LoadedRecipe, wh: Warehouse, reporter: Reporter) -> Outcome:
    """`factory build`'s work: with a `rounds` section the loop, else one build and, when it finished, the
    eval of the recipe's policy (with an `eval` section)."""
    if loaded.recipe.rounds is not None:
        loop = Loop(loaded, wh, reporter)
        status = loop.run()
        return Outcome(status, loop.results, loop=loop)
    build = Build(loaded, wh, reporter)
    row = build.run()
    outcome = Outcome(row["status"], [], build=build, build_row=row)
    if loaded.recipe.eval is not None and row["status"] == "ok":
        eval_row, outcome.results = evaluate(loaded, wh, [recipe_policy(loaded)], reporter)
        outcome.status = eval_row["status"]
    return outcome
