"""`factory judge-eval`: run judges × protocols over human-labelled pairwise sets, in both orders.

The same machinery as a build: request keys as in the `judgments` stage, the `judge_calls` cache (a rerun
makes no model call), batches flushed as they finish, and one stage-style table, `eval_judgments`, with a
row per (case, order) judgment. A unit of work is one (data set, judge, protocol, reference); each unit is a
versioned table file, so runs over other protocols or judges add to the table instead of replacing it. The
decoding switches (prefill, markers, top-k) and the second order (`swap`) are in every row and in the unit's
stage key: a run with other switches makes its own version of the unit current.

Like the build's stages, the pure halves (`unit_calls`, `unit_rows`) touch no file and no model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from factory.config.errors import error_field, error_text
from factory.config.models import ModelSpec
from factory.config.yaml_loader import read_yaml
from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.core.reading import read_input_text
from factory.core.text import clip_value
from factory.inputs.labelled_sets import EvalCase, EvalSet
from factory.judge.protocols import PROTOCOLS, Protocol, custom_protocol
from factory.judge_eval.variants import BLOCKS
from factory.models.registry import BACKENDS, Backend, backends_for, load_backend, model_identity
from factory.models.requests import Call, judge_call
from factory.pipeline.calls import ModelPool, Reporter
from factory.pipeline.run import Run
from factory.pipeline.stage import StageOutput, StageStats
from factory.stages.rows import verdict_fields
from factory.warehouse.store import Warehouse

TABLE = "eval_judgments"
PURPOSE = "meta-eval"
RECIPE = "judge-eval"
EVAL_VERSION = 2
"""Bump when this module changes what it writes: it is part of every unit's stage key."""
DEFAULT_PROTOCOLS = tuple(PROTOCOLS)
"""Every registered protocol, in the registry's order (the paper's Table 1)."""


class EvalSettings(BaseModel):
    """How judges are asked and how the report is computed."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_tokens: int | None = Field(None, ge=1)
    """Tokens a judge may generate in protocols that answer directly; unset: each protocol's own default (8
    after the prefilled `Output (`, 16 with `prefill: none`)."""
    cot_max_tokens: int | None = Field(None, ge=1)
    """Tokens for protocols that reason before answering (cot; custom templates with an empty prefill);
    unset: each protocol's own default."""
    top_logprobs: int = Field(20, ge=2)
    """Top log-probabilities kept per generated token (the soft score reads the marker tokens among them);
    the paper's code keeps 5."""
    prefill: Literal["output", "none"] = "output"
    """`output`: answers start with `Output (`; `none`: the paper's decoding (`Protocol.unprefilled`: no
    prefill, 16 tokens, the verdict by regex, the soft score at its marker token)."""
    markers: Literal["variants", "exact"] = "variants"
    """Which tokens `p_a` counts: marker variants (`a`, ` a`, `A`, ...) or only `a` and `b` (the paper's rule).
    Only the reading changes: the stored answers are re-read, no model call is made."""
    swap: Literal["outputs", "blocks", "both"] = "outputs"
    """The second order: swap the outputs under fixed letters (`swapped`), move each output's block with its
    letter (`swapped_blocks`), or both (position and letter bias apart)."""
    unparsed: Literal["random", "wrong", "half"] = "random"
    """How an unparsed or tied verdict counts in accuracy (a report rule: no model call, not in the stage key)."""
    limit: int | None = Field(None, ge=1)
    """Judge only the first N cases of each data set."""
    bootstrap: int = Field(1000, ge=0)
    """Bootstrap resamples for confidence intervals (0: none)."""
    seed: int = 0
    """Seed of the bootstrap and of the random winner of unparsed verdicts."""
    verdict_rule: Literal["factory", "reife"] = "factory"
    """How the verdict is read from an answer: factory's parser (docs/DESIGN.md §4), or ReIFE's (`reife_verdict`)."""
    preset: Literal["reife"] | None = None
    """The named preset (`PRESETS`) these settings came from; the report says so."""

    @property
    def orders(self) -> tuple[str, ...]:
        """The orders each case is judged in: forward, then the second order(s)."""
        second = {"outputs": ("swapped",), "blocks": (BLOCKS,), "both": ("swapped", BLOCKS)}[self.swap]
        return ("forward", *second)

    def recorded(self) -> dict[str, Any]:
        """The settings as run records and keys hash them: the verdict rule and the preset only when set, so
        runs without them keep the keys they had before these settings existed."""
        data = self.model_dump()
        for name in ("verdict_rule", "preset"):
            if data[name] == EvalSettings.model_fields[name].default:
                del data[name]
        return data


PRESETS: dict[str, dict[str, Any]] = {
    # ReIFE (yale-nlp/ReIFE), the meta-evaluation the paper's Table 1 follows: configs/default/*.yaml,
    # ReIFE/methods/base_pairwise.py, ReIFE/evaluator.py, meta_eval.py. docs/JUDGE_EVAL.md lists the sources.
    "reife": {
        "prefill": "none",  # the prompt files end with the user turn; the answer is generated whole
        "max_tokens": 64,  # configs/default/pairwise_base.yaml:3 (and pairwise_reference.yaml:3)
        "cot_max_tokens": 1024,  # configs/default/pairwise_cot.yaml:3
        "top_logprobs": 4,  # configs/default/pairwise_base.yaml:2 (logprobs: 4)
        "markers": "exact",  # its logprob parser looks up the tokens `a` and `b` exactly (base_pairwise.py:215-217)
        "swap": "blocks",  # pairwise_base_swap.yaml:15 -> prompts/pairwise_vanilla_swap.txt:19-23
        "unparsed": "random",  # base_pairwise.py:47,53 (random winner), evaluator.py:162 (seeded)
        "verdict_rule": "reife",  # base_pairwise.py:38-48; pairwise_base.yaml:14, pairwise_cot.yaml:12,14
    },
}
"""judge-eval's `--preset` values: the settings each one fixes (the CLI refuses them given beside it)."""


def preset_settings(name: str, **rest: Any) -> EvalSettings:
    """Settings of a named preset, with `rest` (limit, bootstrap, seed: what a preset leaves open)."""
    if name not in PRESETS:
        raise UserInputError(f"unknown judge-eval preset {clip_value(name)}; known: {list(PRESETS)}")
    clash = sorted(set(rest) & set(PRESETS[name]))
    if clash:
        raise UserInputError(f"preset {name} sets {clash} itself")
    return EvalSettings(**PRESETS[name], **rest, preset=name)


REIFE_VERDICT_RE = re.compile(r"Output \((\S+)\)")
"""ReIFE's verdict pattern (configs/default/pairwise_base.yaml:14)."""
REIFE_BETTER_RE = re.compile(r"Output \((\S+)\) is better")
"""ReIFE's pattern for answers that reason first (configs/default/pairwise_cot.yaml:14)."""


def reife_verdict(answer: str, reasoning: bool) -> tuple[str | None, str]:
    """(verdict, parse_status) as ReIFE reads an answer (base_pairwise.py:36-57): the first match of its
    pattern, anywhere in the answer (a reasoning answer: the first "Output (x) is better", not its closing
    statement), whose marker must be exactly `a` or `b`; anything else is unparsed."""
    match = (REIFE_BETTER_RE if reasoning else REIFE_VERDICT_RE).search(answer)
    if match is None:
        return None, "no_match"
    marker = match.group(1)
    return (marker, "ok") if marker in ("a", "b") else (None, "invalid_marker")


class CustomTemplate(BaseModel):
    """A custom judge protocol read from a YAML/JSON file (a plain text file is just the template)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Shown as `custom:<name>` in the table and the report."""
    template: str
    """The prompt, with the placeholders {instruction}, {output_a}, {output_b} and optionally {reference}."""
    prefill: str = "Output ("
    """Text the judge's answer starts with; empty when the template asks for reasoning first."""
    last_match: bool = False
    """Read the last `Output (x)` in the answer instead of the first (for reasoning templates)."""
    max_tokens: int | None = Field(None, ge=1)
    """Tokens the judge may generate; default from the settings (by whether the prefill is empty)."""


@dataclass(frozen=True)
class EvalProtocol:
    """A protocol as judge-eval runs it: the template and how many tokens the judge may write."""

    protocol: Protocol
    max_tokens: int

    @property
    def name(self) -> str:
        """The protocol's name in rows and reports."""
        return self.protocol.name


def builtin_protocol(name: str, settings: EvalSettings) -> EvalProtocol:
    """A registered protocol, decoded as `settings.prefill` says, with the token budget its answer style needs."""
    if name not in PROTOCOLS:
        raise UserInputError(
            f"unknown judge protocol {clip_value(name)}; known: {list(PROTOCOLS)} (or --custom-template)"
        )
    p = PROTOCOLS[name]
    budget = settings.max_tokens if p.prefill else settings.cot_max_tokens  # by the registered answer style
    if settings.prefill == "none":
        p = p.unprefilled()
    return EvalProtocol(p, budget or p.default_max_tokens)


def load_custom_template(path: str | Path, settings: EvalSettings) -> EvalProtocol:
    """A custom protocol from a text file (the template) or a YAML/JSON file (a `CustomTemplate`)."""
    path = Path(path)
    text = read_input_text(path, "custom template file")
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        data = read_yaml(path, "custom template file")
        try:
            spec = CustomTemplate.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            message = error_text(err, unknown=None, missing=None, keep_prefix=True, echo=False)
            raise UserInputError(f"{path}: field '{error_field(err)}': {message}") from None
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem) or "template"
        spec = CustomTemplate(name=name, template=text)
    protocol = custom_protocol(spec.template, prefill=spec.prefill, last_match=spec.last_match, where=str(path))
    protocol = dataclasses.replace(protocol, name=f"custom:{spec.name}")
    default = settings.max_tokens if spec.prefill else settings.cot_max_tokens
    if settings.prefill == "none":
        protocol = protocol.unprefilled()
    return EvalProtocol(protocol, spec.max_tokens or default or protocol.default_max_tokens)


def parse_judges(values: list[str], **overrides: Any) -> dict[str, ModelSpec]:
    """Judges from `BACKEND[:MODEL]` strings or YAML/JSON model files, by name.

    A file holds one model spec (named after the file) or a mapping of names to specs, as a recipe's
    `models`. `overrides` (batch_size, threads, ...; None = unset) apply to judges given as strings.
    """
    judges: dict[str, ModelSpec] = {}
    origin: dict[str, str] = {}
    extra = {k: v for k, v in overrides.items() if v is not None}
    for value in values:
        path = Path(value).expanduser()
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            data = read_yaml(path, "judge spec file")
            if not isinstance(data, dict) or not data:
                raise UserInputError(f"{path}: expected a model spec or a mapping of names to model specs")
            # A mapping of names holds mappings; anything else is one spec (so a typo in a key is named).
            single = not all(isinstance(v, dict) for v in data.values())
            entries = {path.stem: data} if single else data
            for name, spec in entries.items():
                origin[str(name)] = str(path)
                try:
                    judges[str(name)] = ModelSpec.model_validate(spec)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    message = error_text(err, unknown=None, missing=None, keep_prefix=True, echo=False)
                    raise UserInputError(
                        f"{path}: judge {clip_value(name)}: field '{error_field(err)}': {message}"
                    ) from None
            continue
        backend, _, model = value.partition(":")
        if backend not in BACKENDS:
            raise UserInputError(
                f"--judge {clip_value(value)}: expected BACKEND[:MODEL] with a backend in {list(BACKENDS)}, "
                "or a YAML/JSON model spec file"
            )
        fields: dict[str, Any] = {"backend": backend, **extra}
        if model:
            fields["model"] = model
        try:
            judges[value] = ModelSpec.model_validate(fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = f"field '{error_field(err)}': " if err["loc"] else ""
            raise UserInputError(
                f"--judge {clip_value(value)}: {where}{error_text(err, unknown=None, missing=None, echo=False)} "
                "(give such a judge as a YAML/JSON model spec file)"
            ) from None
    if not judges:
        raise UserInputError("give at least one --judge")
    for name, spec in judges.items():
        where = f"{origin[name]}: judge {clip_value(name)}" if name in origin else f"--judge {clip_value(name)}"
        if "judge" not in BACKENDS[spec.backend].roles:
            raise UserInputError(
                f"{where}: backend '{spec.backend}' cannot judge; backends that can: {backends_for('judge')}"
            )
        if spec.api_key_env and not os.environ.get(spec.api_key_env):
            raise UserInputError(f"{where}: the environment variable {spec.api_key_env} (api_key_env) is not set")
    return judges


# ------------------------------------------------------------------------------------------------ units


@dataclass(frozen=True)
class Unit:
    """One (data set, judge, protocol, reference) combination: every case judged in both orders."""

    dataset: EvalSet
    judge: str
    protocol: EvalProtocol
    reference: str | None

    @property
    def title(self) -> str:
        """Short name for progress output."""
        ref = f"@{self.reference}" if self.reference else ""
        return f"{self.dataset.name}/{self.protocol.name}{ref}"

    @property
    def folder(self) -> str:
        """The unit's folder under tables/eval_judgments/: readable, and unique by a hash suffix."""
        parts = [self.dataset.name, self.judge, self.protocol.name, self.reference or "-"]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", "__".join(parts))[:80]
        return f"{slug}-{stable_hash(parts, 8)}"


def plan_units(
    datasets: list[EvalSet], judges: dict[str, ModelSpec], protocols: list[EvalProtocol], explicit: bool
) -> tuple[list[Unit], list[str]]:
    """Every unit to run, judge-major (one model loaded at a time); notes say what was skipped and why.

    A protocol that shows a reference runs once per reference name. When the protocols were not chosen
    explicitly, reference protocols are skipped (with a note) for a set that has no references.
    """
    units: list[Unit] = []
    notes: list[str] = []
    for judge in judges:
        for ds in datasets:
            for p in protocols:
                if not p.protocol.uses_reference:
                    units.append(Unit(ds, judge, p, None))
                    continue
                if not ds.reference_names:
                    msg = (
                        f"{ds.source}: protocol {p.name} needs references; give --references FILE "
                        "or --reference-column COLUMN"
                    )
                    if explicit:
                        raise UserInputError(msg)
                    if judge == next(iter(judges)):
                        notes.append(msg + " (skipped)")
                    continue
                units.extend(Unit(ds, judge, p, ref) for ref in ds.reference_names)
    return units, notes


def _ordered(case: EvalCase, order: str) -> tuple[str, str]:
    """(Output (a), Output (b)) in an order: only `swapped` gives output_2 the letter (a)."""
    return (case.output_2, case.output_1) if order == "swapped" else (case.output_1, case.output_2)


def check_swappable(protocols: list[EvalProtocol], settings: EvalSettings) -> None:
    """With blocks-swapping, every protocol's template must have the two standard output blocks (one line
    naming the protocol otherwise), found before any judging."""
    if BLOCKS not in settings.orders:
        return
    for p in protocols:
        p.protocol.render("i", "a", "b", "r" if p.protocol.uses_reference else None, swap_blocks=True)


def unit_calls(unit: Unit, identity: dict[str, Any], settings: EvalSettings) -> tuple[list[Call], int]:
    """One call per case and order (forward: output_1 shown as (a); then `settings.orders`' second order(s)),
    keyed exactly as build judgments are.

    `swapped` gives output_2 the letter (a); `swapped_blocks` keeps the letters (output_1 is (a)) and shows
    (b)'s block first, so a verdict `a` still names output_1. Cases without the unit's reference are left out;
    their count is returned.
    """
    p = unit.protocol
    calls: list[Call] = []
    missing = 0
    for case in unit.dataset.cases:
        reference = case.references.get(unit.reference) if unit.reference else None
        if unit.reference and reference is None:
            missing += 1
            continue
        for order in settings.orders:
            a, b = _ordered(case, order)
            messages = p.protocol.render(case.instruction, a, b, reference, swap_blocks=order == BLOCKS)
            meta = {"case_id": case.case_id, "case_index": case.index, "label": case.label, "order": order}
            calls.append(
                judge_call(
                    identity,
                    messages,
                    p.protocol.prefill,
                    p.max_tokens,
                    settings.top_logprobs,
                    **meta,
                    len_a=len(a),
                    len_b=len(b),
                )
            )
    return calls, missing


def unit_rows(
    unit: Unit, calls: list[Call], results: dict[str, dict[str, Any]], settings: EvalSettings
) -> list[dict[str, Any]]:
    """One row per call: the parsed verdict and soft scores (under `settings.markers`, and exact) and the
    decoding switches; a failed call is a row with parse_status error."""
    protocol = unit.protocol.protocol
    rows = []
    for c in calls:
        r = results.get(c.key, {})
        row: dict[str, Any] = {
            **c.meta,
            "purpose": PURPOSE,
            "dataset": unit.dataset.name,
            "judge": unit.judge,
            "protocol": protocol.name,
            "reference_name": unit.reference,
            "request_key": c.key,
            "prefill": protocol.prefill,
            "markers": settings.markers,
            "top_logprobs": settings.top_logprobs,
            "tokens_in": r.get("tokens_in"),
            "tokens_out": r.get("tokens_out"),
            "latency_s": r.get("latency_s"),
        }
        row.update(verdict_fields(r, protocol, settings.markers))
        if settings.verdict_rule == "reife" and row["parse_status"] != "error":
            # Only the verdict is ReIFE's: the soft scores stay factory's reading (ReIFE's configs keep none).
            row["verdict"], row["parse_status"] = reife_verdict(row["raw_output"], protocol.last_match)
        rows.append(row)
    return rows


def unit_key(unit: Unit, calls: list[Call], settings: EvalSettings) -> str:
    """The unit's stage key: the code version, the names and switches in its rows, and every call's key and
    fields. Prefill and top-k reach the request keys too; the marker rule only changes how the stored answers
    are read, so it is here and not in the request keys."""
    return stable_hash(
        {
            "stage": TABLE,
            "version": EVAL_VERSION,
            "dataset": unit.dataset.name,
            "judge": unit.judge,
            "protocol": unit.protocol.name,
            "reference": unit.reference,
            "prefill": unit.protocol.protocol.prefill,
            "markers": settings.markers,
            "top_logprobs": settings.top_logprobs,
            "swap": settings.swap,
            "calls": [(c.key, c.meta) for c in calls],
            # Only when set: the key of a unit read with factory's verdict rule is what it was before the rule.
            **({"verdict_rule": settings.verdict_rule} if settings.verdict_rule != "factory" else {}),
        }
    )


# ------------------------------------------------------------------------------------------------- runs


@dataclass
class EvalRun:
    """What one judge-eval run did: its rows (exactly as stored), per-unit stats, and notes."""

    run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    stats: list[StageStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = "running"

    @property
    def model_calls(self) -> int:
        """Model calls this run made (cached results not counted)."""
        return sum(s.model_calls for s in self.stats)

    @property
    def cached_calls(self) -> int:
        """Calls answered from the cache."""
        return sum(s.cached_calls for s in self.stats)


class JudgeEval:
    """One judge-eval run into one warehouse, in the same run lifecycle as a build (`factory.pipeline.run.Run`)."""

    def __init__(
        self,
        wh: Warehouse,
        settings: EvalSettings,
        judges: dict[str, ModelSpec],
        reporter: Reporter | None = None,
        loader: Callable[[ModelSpec], Backend] | None = None,
    ) -> None:
        self.wh = wh
        self.settings = settings
        self.judges = judges
        self.reporter = reporter or Reporter()
        # Looked up at call time (not bound as a default) so tests can substitute the loader.
        self.pool = ModelPool(judges, loader=loader or load_backend)
        self.notes: list[str] = []

    def _one(self, run: Run, unit: Unit) -> list[dict[str, Any]]:
        identity = model_identity(self.judges[unit.judge])
        calls, missing = unit_calls(unit, identity, self.settings)
        if missing:
            self.notes.append(f"{unit.title}: {missing} case(s) without reference '{unit.reference}' left out")

        def compute(st: StageStats) -> StageOutput:
            # Similar lengths in one batch waste less padding; results are keyed, so order is free.
            ordered = sorted(calls, key=lambda c: len(json.dumps(c.request.messages)))
            rows = unit_rows(unit, calls, run.call(unit.judge, unit.title, ordered, st), self.settings)
            errors = sum(r["parse_status"] == "error" for r in rows)
            return StageOutput(rows, {"errors": errors, "cases_without_reference": missing}, complete=not errors)

        key = unit_key(unit, calls, self.settings)
        run.materialize(TABLE, key, compute, unit=unit.folder, label=unit.title)
        return self.wh.read_stage(TABLE, unit.folder, key)  # the report reads exactly what is stored

    def execute(self, units: list[Unit]) -> EvalRun:
        """Run every unit; the run is recorded in the runs table and the DuckDB views are refreshed."""
        recipe_hash = Run.hash_of({"settings": self.settings.recorded(), "units": [u.folder for u in units]})
        run = Run(self.wh, RECIPE, recipe_hash, self.pool, self.reporter)
        result = EvalRun(run.run_id, stats=run.stats, notes=self.notes)
        try:
            with run:
                previous: str | None = None
                for unit in units:
                    if previous is not None and unit.judge != previous:
                        self.pool.release(previous)  # one judge in memory at a time
                    previous = unit.judge
                    result.rows.extend(self._one(run, unit))
        finally:
            result.status = run.status
        return result


def run_judge_eval(
    datasets: list[EvalSet],
    judges: dict[str, ModelSpec],
    protocols: list[EvalProtocol],
    settings: EvalSettings,
    wh: Warehouse,
    *,
    explicit_protocols: bool = True,
    reporter: Reporter | None = None,
    loader: Callable[[ModelSpec], Backend] | None = None,
) -> EvalRun:
    """Judge every case of every set with every judge × protocol (× reference), forward and in the second
    order(s) of `settings.swap`."""
    names = [p.name for p in protocols]
    if len(set(names)) != len(names):
        raise UserInputError(f"protocols must be unique, got {names}")
    data_names = [d.name for d in datasets]
    if len(set(data_names)) != len(data_names):
        raise UserInputError(f"data set names must be unique, got {data_names}; name them with NAME=PATH")
    check_swappable(protocols, settings)
    units, notes = plan_units(datasets, judges, protocols, explicit_protocols)
    if not units:
        raise UserInputError("nothing to judge: " + "; ".join(notes) if notes else "nothing to judge")
    runner = JudgeEval(wh, settings, judges, reporter, loader)
    runner.notes.extend(note for ds in datasets for note in ds.notes)
    runner.notes.extend(notes)
    return runner.execute(units)
