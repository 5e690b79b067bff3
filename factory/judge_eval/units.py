"""judge-eval's units of work: one (data set, judge, protocol, reference) each, every case judged in both
orders, and each one a stage of the `eval_judgments` table in a folder of its own. The pure halves
(`unit_calls`, `unit_rows`) touch no file and no model."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from factory.config.models import ModelSpec
from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.inputs.labelled_sets import EvalCase, EvalSet
from factory.judge_eval.settings import EvalSettings, reife_verdict
from factory.judge_eval.templates import EvalProtocol
from factory.judge_eval.variants import BLOCKS
from factory.models.requests import Call, judge_call
from factory.pipeline.stage import Context, Stage, StageOutput, StageStats, stage_key
from factory.stages.judgments import judgment_row

TABLE = "eval_judgments"
PURPOSE = "meta-eval"
EVAL_VERSION = 2
"""Bump when this module changes what it writes: it is part of every unit's stage key."""


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
    fields = {
        "purpose": PURPOSE,
        "dataset": unit.dataset.name,
        "judge": unit.judge,
        "protocol": protocol.name,
        "reference_name": unit.reference,
        "prefill": protocol.prefill,
        "markers": settings.markers,
        "top_logprobs": settings.top_logprobs,
    }
    rows = []
    for c in calls:
        row = judgment_row(c, results.get(c.key), protocol, fields, settings.markers)
        if settings.verdict_rule == "reife" and row["parse_status"] != "error":
            # Only the verdict is ReIFE's: the soft scores stay factory's reading (ReIFE's configs keep none).
            row["verdict"], row["parse_status"] = reife_verdict(row["raw_output"], protocol.last_match)
        rows.append(row)
    return rows


def unit_stage(unit: Unit, calls: list[Call], settings: EvalSettings, missing: int = 0) -> Stage:
    """The unit as a stage of the `eval_judgments` table, in the unit's own folder.

    Its key (`factory.pipeline.stage.stage_key`, laid out flat) holds the code version, the names and
    switches in its rows, and every call's key and fields. Prefill and top-k reach the request keys too; the
    marker rule only changes how the stored answers are read, so it is here and not in the request keys.
    """
    spec = {
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

    def compute(ctx: Context, st: StageStats) -> StageOutput:
        # Similar lengths in one batch waste less padding; results are keyed, so order is free.
        ordered = sorted(calls, key=lambda c: len(json.dumps(c.request.messages)))
        rows = unit_rows(unit, calls, ctx.call(unit.judge, unit.title, ordered, st), settings)
        errors = sum(r["parse_status"] == "error" for r in rows)
        return StageOutput(rows, {"errors": errors, "cases_without_reference": missing}, complete=not errors)

    return Stage(unit.title, (), lambda ctx: spec, compute, EVAL_VERSION, table=TABLE, unit=unit.folder, layout="flat")


def unit_key(unit: Unit, calls: list[Call], settings: EvalSettings) -> str:
    """The unit's stage key (`unit_stage`)."""
    return stage_key(unit_stage(unit, calls, settings), Context(None, lambda *a: {}))
