"""The recipe: a declarative description of one preference dataset, as strict pydantic models.

Every field carries a docstring; `schemas/recipe.schema.json` is generated from these models
(`python -m factory.warehouse.schemas`), and a test fails when the file is stale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from factory.config.base import SAFE_NAME, FieldError, Strict
from factory.config.labeling import JudgmentsSpec, PairsSpec, RewardsSpec, SamplesSpec, SimilaritySpec
from factory.config.models import ModelSpec
from factory.config.outcomes import EvalSpec, ExportSpec, RoundsSpec, RunOptions
from factory.config.overrides import override_of
from factory.config.sample_sources import ImportedSamples, PolicySamples, SampleSource, one_or_list
from factory.config.sources import PromptSource, ReferenceSpec
from factory.config.training import TrainSettings
from factory.config.vocabulary import BACKEND_ROLES, LABELER_MODELS, TRAINABLE_BACKENDS
from factory.config.yaml_loader import yaml_line
from factory.core.keys import stable_hash
from factory.core.text import dotted


class Recipe(Strict):
    """A whole recipe: prompts → references → samples → judgments → scores → pairs → export."""

    name: str = Field(pattern=SAFE_NAME)
    """Recipe name; tags every row and names its table folders and export folder (letters, digits, `_.-`)."""
    description: str = Field("", max_length=20_000)
    """Free text shown in the dataset card."""
    models: dict[str, ModelSpec]
    """Named models, referred to by name below."""
    prompts: PromptSource
    """The instructions."""
    references: list[ReferenceSpec] = Field([])
    """Zero or more named reference sources."""
    samples: (
        Annotated[
            Annotated[SamplesSpec, Tag("form-one")]
            | Annotated[list[SampleSource], Field(min_length=1), Tag("form-list")],
            Discriminator(one_or_list),
        ]
        | None
    ) = None
    """The policy's samples (a mapping), or a list of sources whose samples of a prompt are judged as one set:
    policies (`policy`, `n`, `params`, `seed` each) and imported completions (`imported`); leave out for a
    references-only recipe (SFT export)."""
    judgments: (
        Annotated[
            Annotated[JudgmentsSpec, Tag("form-one")]
            | Annotated[list[JudgmentsSpec], Field(min_length=1), Tag("form-list")],
            Discriminator(one_or_list),
        ]
        | None
    ) = None
    """The pairwise judge labeler (the method), or a panel: a list of (judge, protocol, reference) entries,
    each judging every ordered pair, whose judgments vote as several references do. Give exactly one labeler
    when there are samples."""
    rewards: RewardsSpec | None = None
    """The reward-model labeler (a baseline)."""
    similarity: SimilaritySpec | None = None
    """The reference-similarity labeler (a baseline)."""
    pairs: PairsSpec = PairsSpec()
    """Pair construction."""
    export: ExportSpec = ExportSpec()
    """Dataset export."""
    train: TrainSettings | None = None
    """Settings for `factory train RECIPE` (SFT or DPO on this recipe's export); CLI overrides win."""
    run: RunOptions = RunOptions()
    """How the build runs (`executor: ray`); operational, so changing it reuses every finished stage."""
    rounds: RoundsSpec | None = None
    """Self-improvement rounds run by `factory build`: `rounds: 2`, or a mapping with SFT and DPO settings."""
    eval: EvalSpec | None = None
    """Held-out win rate of the policy (of every round's policy, with `rounds`), run by `factory build` after
    the data, and by `factory eval`."""

    @property
    def content_hash(self) -> str:
        """The short hash of the whole recipe that runs rows and exports keep (16 hex digits of its JSON)."""
        return stable_hash(self.model_dump(mode="json"), 16)

    @property
    def sample_sources(self) -> list[SamplesSpec | PolicySamples | ImportedSamples]:
        """Where a prompt's samples come from, in order (the mapping form is one policy)."""
        if self.samples is None:
            return []
        return list(self.samples) if isinstance(self.samples, list) else [self.samples]

    @property
    def policies(self) -> list[SamplesSpec | PolicySamples]:
        """The sample sources that call a model."""
        return [s for s in self.sample_sources if not isinstance(s, ImportedSamples)]

    @property
    def imports(self) -> list[ImportedSamples]:
        """The sample sources read from data."""
        return [s for s in self.sample_sources if isinstance(s, ImportedSamples)]

    @property
    def policy(self) -> str | None:
        """The model name of the recipe's one policy (what rounds train and eval measures); None when it has
        none or several."""
        names = [p.policy for p in self.policies]
        return names[0] if len(names) == 1 else None

    @property
    def judges(self) -> list[JudgmentsSpec]:
        """The judge entries: one, or a panel."""
        if self.judgments is None:
            return []
        return list(self.judgments) if isinstance(self.judgments, list) else [self.judgments]

    @property
    def judging(self) -> JudgmentsSpec:
        """The first judge entry, whose orders, scoring, schedule and pooling the panel shares."""
        return self.judges[0]

    @property
    def labeler(self) -> str | None:
        """Which labeler scores the samples: judgments, rewards, similarity (or None)."""
        given = [n for n in LABELER_MODELS if getattr(self, n) is not None]
        return given[0] if given else None

    @model_validator(mode="after")
    def _stages_fit(self) -> Recipe:
        given = [n for n in LABELER_MODELS if getattr(self, n) is not None]
        if len(given) > 1:
            raise FieldError((given[1],), f"give one labeler ({', '.join(LABELER_MODELS)}), got {given}")
        if self.samples is not None and not given:
            raise FieldError(("samples",), f"samples need a labeler: add one of {', '.join(LABELER_MODELS)}")
        if self.samples is None and given:
            raise FieldError((given[0],), f"{given[0]} labels samples: add a 'samples' section")
        if self.samples is None and self.export.sft_reference is None:
            raise FieldError(("samples",), "nothing to build: add samples (and a labeler), or export.sft_reference")
        if self.rounds is not None:
            if self.samples is None:
                raise FieldError(("rounds",), "rounds train on the policy's own pairs: add 'samples' and a labeler")
            if self.policy is None:
                raise FieldError(("rounds",), "rounds train one policy: give 'samples' exactly one policy entry")
            backend = self.models[self.policy].backend if self.policy in self.models else None
            if backend is not None and backend not in TRAINABLE_BACKENDS:
                raise FieldError(
                    ("rounds",),
                    f"rounds train the policy '{self.policy}', but backend '{backend}' has no weights to "
                    f"train; use one of {list(TRAINABLE_BACKENDS)}",
                )
        if self.eval is not None and self.samples is None:
            raise FieldError(("eval",), "eval measures the policy: add a 'samples' section naming it")
        if self.eval is not None and self.policy is None:
            raise FieldError(("eval",), "eval measures one policy: give 'samples' exactly one policy entry")
        self._sources_fit()
        self._panel_fits()
        return self

    def _sources_fit(self) -> None:
        """The list form of `samples`: distinct entries, at least two samples a prompt when nothing is
        imported, and an import joined by id only to prompts that have ids."""
        if not isinstance(self.samples, list):
            return
        seen: dict[str, int] = {}
        for i, s in enumerate(self.samples):
            if isinstance(s, ImportedSamples):
                ident = f"imported {s.imported}"
                if s.join == "id" and s.separate and self.prompts.id_field is None:
                    raise FieldError(("samples", i, "join"), "joining by id needs prompts.id_field")
            else:
                # Two entries of one model with the same settings would ask the same requests twice.
                ident = f"policy {s.policy} {s.params.model_dump_json()} {s.seed}"
            if ident in seen:
                raise FieldError(("samples", i), f"repeats entry {seen[ident]} of 'samples'")
            seen[ident] = i
        if not self.imports and sum(p.n for p in self.policies) < 2:
            raise FieldError(("samples",), "a pair needs at least 2 samples per prompt: raise 'n'")

    def _panel_fits(self) -> None:
        """A panel of judges votes on each ordered pair, so its entries share how pairs are asked and read."""
        if not isinstance(self.judgments, list):
            return
        first = self.judgments[0]
        seen: dict[str, int] = {}
        for i, j in enumerate(self.judgments):
            for name in ("orders", "scoring", "schedule", "pooling"):
                if getattr(j, name) != getattr(first, name):
                    raise FieldError(
                        ("judgments", i, name), f"a panel's entries share '{name}': set it as entry 0 does"
                    )
            ident = json.dumps([j.judge, j.protocol, j.reference_names, j.template])
            if ident in seen:
                raise FieldError(("judgments", i), f"repeats entry {seen[ident]} of the panel")
            seen[ident] = i
        if len(self.judgments) > 1 and first.schedule == "adaptive":
            raise FieldError(("judgments", 0, "schedule"), "a panel judges every pair: use 'all-pairs'")

    @model_validator(mode="after")
    def _names_resolve(self) -> Recipe:
        known_models = sorted(self.models)
        for loc, name, _ in self.model_uses():
            if name not in self.models:
                raise FieldError(loc, f"unknown model '{name}'; known models: {known_models}")
        self._roles_fit()
        names = [r.name for r in self.references]
        if len(set(names)) != len(names):
            raise FieldError(("references",), f"names must be unique, got {names}")
        wanted = [
            *[(self._judge_loc(i, "reference"), name) for i, j in enumerate(self.judges) for name in j.reference_names],
            (("similarity", "reference"), self.similarity.reference if self.similarity else None),
            (("export", "sft_reference"), self.export.sft_reference),
        ]
        if self.rounds is not None:
            wanted.append((("rounds", "sft_reference"), self.rounds.sft_reference))
        for loc, name in wanted:
            if name and name not in names:
                raise FieldError(loc, f"unknown reference '{name}'; known: {names}")
        for i, ref in enumerate(self.references):
            if ref.kind != "column":
                continue
            fields = self.prompts.reference_fields
            if ref.field is None and len(fields) != 1:
                raise FieldError(("references", i, "field"), f"name one of prompts.reference_fields {fields}")
            if ref.field is not None and ref.field not in fields:
                raise FieldError(
                    ("references", i, "field"), f"'{ref.field}' is not in prompts.reference_fields {fields}"
                )
        return self

    def model_uses(self) -> list[tuple[tuple[str | int, ...], str, str]]:
        """Every place the recipe names a model: (field location, model name, role it must play)."""
        uses: list[tuple[tuple[str | int, ...], str, str]] = []
        if isinstance(self.samples, SamplesSpec):
            uses.append((("samples", "policy"), self.samples.policy, "generate"))
        elif self.samples is not None:
            uses += [
                (("samples", i, "policy"), s.policy, "generate")
                for i, s in enumerate(self.samples)
                if isinstance(s, PolicySamples)
            ]
        uses += [(("references", i, "model"), r.model, "generate") for i, r in enumerate(self.references) if r.model]
        for section, labeler in LABELER_MODELS.items():
            spec = getattr(self, section)
            if isinstance(spec, list) and labeler is not None:
                field, role = labeler.field, labeler.role
                uses += [((section, i, field), getattr(s, field), role) for i, s in enumerate(spec)]
            elif spec is not None and labeler is not None:
                uses.append(((section, labeler.field), getattr(spec, labeler.field), labeler.role))
        if self.eval is not None:
            uses.append((("eval", "judge"), self.eval.judge, "judge"))
            if self.eval.baseline_model is not None:
                uses.append((("eval", "baseline_model"), self.eval.baseline_model, "generate"))
        return uses

    def _roles_fit(self) -> None:
        """Each model is named only for roles its backend can play (a recipe error, not a runtime raise)."""
        for loc, name, role in self.model_uses():
            backend = self.models[name].backend
            if role not in BACKEND_ROLES[backend]:
                able = [b for b, roles in BACKEND_ROLES.items() if role in roles]
                raise FieldError(loc, f"model '{name}' (backend '{backend}') cannot {role}; backends that can: {able}")

    def _judge_loc(self, i: int, name: str) -> tuple[str | int, ...]:
        """Where judge entry `i`'s field is written: `judgments.NAME`, or `judgments.I.NAME` in a panel."""
        return ("judgments", i, name) if isinstance(self.judgments, list) else ("judgments", name)

    def column_field(self, ref: ReferenceSpec) -> str:
        """The prompt-source column a `column` reference reads."""
        return ref.field or self.prompts.reference_fields[0]


class LoadedRecipe(BaseModel):
    """A validated recipe with where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    recipe: Recipe
    path: Path
    text: str
    overrides: dict[str, Any] = {}
    """`--set KEY=VALUE` values applied over the file (dotted keys), so errors about them name the option."""

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the recipe are resolved against."""
        return self.path.parent

    def where(self, *loc: str | int) -> str:
        """`FILE:LINE: field 'a.b'`: how an error about a recipe field names it (line of its nearest parent), or
        `--set a.b` when the command line set it."""
        key = override_of(loc, self.overrides)
        if key is not None:
            return f"--set {dotted(tuple(key.split('.')))}"
        line = yaml_line(yaml.compose(self.text), loc)
        return f"{self.path}:{line or '?'}: field '{'.'.join(str(p) for p in loc)}'"

    def resolve(self, relative: str) -> Path:
        """A recipe-relative path made absolute (normalised, but links are not followed: messages name the
        path as the recipe wrote it)."""
        p = Path(relative).expanduser()
        return Path(os.path.abspath(p if p.is_absolute() else self.base_dir / p))
