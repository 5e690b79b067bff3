"""Held-out evaluation: a policy's win rate against a baseline, as a run in the warehouse
(docs/SELF_IMPROVEMENT.md).

For each contender (a policy: the recipe's, a trained checkpoint, each round's) three stage versions are
written, each keyed by what changes it, so a rerun reuses them and a retrained checkpoint (a new weights
hash) is evaluated anew:

- `eval_outputs`: the contender's answers to the held-out prompts (and, in a unit of its own, the baseline
  model's answers when the baseline is a model rather than a column);
- `eval`: every prompt judged twice, the policy shown as Output (a) and then as Output (b);
- `eval_results`: one row of figures (`factory.policy_eval.winrate`).

Each is a `Stage` run by `factory.pipeline.stage.execute`, in the key layout its table had before (`flat`,
and `chained` for `eval_results`), so the versions a warehouse holds are reused. A contender's answers are
run on their own, so its policy leaves memory before the judge is loaded.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.config.models import ModelSpec
from factory.config.recipe import LoadedRecipe
from factory.core.files import atomic_write_bytes
from factory.core.keys import stable_hash
from factory.core.owned import check_output_file
from factory.judge.protocols import get_protocol
from factory.models.registry import model_identity
from factory.models.requests import Call, generation_call, judge_call
from factory.pipeline.calls import ModelPool, Reporter
from factory.pipeline.run import Run
from factory.pipeline.stage import Context, Stage, StageOutput, StageStats, execute
from factory.policy_eval.winrate import p_policy, summary
from factory.stages.judgments import judgment_row
from factory.stages.prompts import read_prompts
from factory.stages.samples import generation_row
from factory.warehouse.store import Warehouse

VERSION = 1
"""Bump when this module changes what it writes: it is part of the `eval_outputs` and `eval` stage keys."""


@dataclass(frozen=True)
class Contender:
    """A policy to evaluate: a label for its rows, the model, and the round that trained it (if any)."""

    label: str
    spec: ModelSpec
    round: int | None = None


def recipe_policy(loaded: LoadedRecipe) -> Contender:
    """The recipe's own policy (`samples.policy`) as a contender."""
    r = loaded.recipe
    assert r.policy is not None  # a recipe with eval has one policy (the recipe checks)
    return Contender(r.policy, r.models[r.policy])


def _unit(name: str, label: str) -> str:
    """A table folder name for one contender's eval versions (labels may hold characters a folder may not)."""
    return f"{name}.{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}"


def _outputs_stage(
    name: str, prompts: list[dict[str, Any]], label: str, spec: ModelSpec, role: str, loaded: LoadedRecipe
) -> Stage:
    """One model's answers to the held-out prompts, in the contender's unit (or the baseline's)."""
    e = loaded.recipe.eval
    identity = model_identity(spec)
    calls = [
        generation_call(identity, json.loads(p["messages"]), e.params, e.seed, 0, prompt_id=p["prompt_id"])
        for p in prompts
    ]
    head = {"role": role, "contender": label, "model_hash": stable_hash(identity, 16)}

    def compute(ctx: Context, st: StageStats) -> StageOutput:
        results = ctx.call(label, "eval_outputs", calls, st)
        rows = [{"prompt_id": c.meta["prompt_id"], **head, **generation_row(c, results.get(c.key))} for c in calls]
        failed = sum(r["error"] is not None for r in rows)
        return StageOutput(rows, {"failed": failed}, complete=not failed)

    stage_name = "eval_baseline" if role == "baseline" else f"eval_outputs[{label}]"
    unit = _unit(name, "baseline" if role == "baseline" else label)
    spec_of = {"calls": [c.key for c in calls], "role": role}
    return Stage(stage_name, (), lambda ctx: spec_of, compute, VERSION, table="eval_outputs", unit=unit, layout="flat")


def _answers(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Prompt id → text of the generation rows whose call succeeded."""
    return {x["prompt_id"]: x["text"] for x in rows if x["error"] is None}


def _contender_stages(
    name: str, prompts: list[dict[str, Any]], c: Contender, outputs: str, loaded: LoadedRecipe
) -> list[Stage]:
    """A contender's `eval` (every prompt judged twice, the policy shown as Output (a) and then as Output
    (b)) and `eval_results` (one row of figures), after its `outputs` stage and the baseline's."""
    r = loaded.recipe
    e = r.eval
    protocol = get_protocol(e.protocol)
    judge_identity = model_identity(r.models[e.judge])
    baseline_name = e.baseline or f"model:{e.baseline_model}"
    references = {p["prompt_id"]: json.loads(p["reference_fields"]) for p in prompts}
    unit = _unit(name, c.label)
    judged_by = f"eval[{c.label}]"
    parents = (outputs, "eval_baseline") if e.baseline_model is not None else (outputs,)

    def baseline(ctx: Context) -> dict[str, str | None]:
        if e.baseline_model is not None:
            return dict(_answers(ctx.rows["eval_baseline"]))
        return {pid: refs.get(e.baseline) for pid, refs in references.items()}

    def judge_calls(ctx: Context) -> list[Call]:
        policy, base = _answers(ctx.rows[outputs]), baseline(ctx)
        calls = []
        for p in prompts:
            a, b = policy.get(p["prompt_id"]), base.get(p["prompt_id"])
            ref = references[p["prompt_id"]].get(e.reference_column) if e.reference_column else None
            if a is None or b is None or (e.reference_column and not ref):
                continue
            for order, first, second in (("policy_first", a, b), ("baseline_first", b, a)):
                messages = protocol.render(p["instruction"], first, second, ref)
                calls.append(
                    judge_call(
                        judge_identity,
                        messages,
                        protocol.prefill,
                        e.generation_tokens,
                        e.top_logprobs,
                        prompt_id=p["prompt_id"],
                        order=order,
                        len_policy=len(a),
                        len_baseline=len(b),
                    )
                )
        return calls

    def judge_spec(ctx: Context) -> dict[str, Any]:
        # A column baseline has no stage: its texts stand in its place.
        base_key = (
            ctx.keys["eval_baseline"] if e.baseline_model is not None else stable_hash([e.baseline, baseline(ctx)])
        )
        return {"outputs": ctx.keys[outputs], "baseline": base_key, "calls": [x.key for x in judge_calls(ctx)]}

    def judge(ctx: Context, st: StageStats) -> StageOutput:
        calls = judge_calls(ctx)
        answers = ctx.call(e.judge, "eval", calls, st)
        fields = {
            "contender": c.label,
            "baseline": baseline_name,
            "judge": e.judge,
            "protocol": e.protocol,
            "reference_name": e.reference_column,
        }
        rows = []
        for call in calls:
            row = judgment_row(call, answers.get(call.key), protocol, fields)
            del row["prompt_hash"]  # the eval table keys its rows by prompt, contender and order
            row["p_policy"] = p_policy(row, e.scoring)
            rows.append(row)
        skipped = len(prompts) - len(calls) // 2
        failed = sum(row["parse_status"] == "error" for row in rows)
        return StageOutput(rows, {"prompts_skipped": skipped, "failed": failed}, complete=not failed)

    def figures(ctx: Context, st: StageStats) -> StageOutput:
        row = {
            "contender": c.label,
            "model_hash": stable_hash(model_identity(c.spec), 16),
            "baseline": baseline_name,
            "judge": e.judge,
            "protocol": e.protocol,
            "scoring": e.scoring,
            **summary(ctx.rows[judged_by], e.scoring, e.resamples, e.seed),
        }
        return StageOutput([row])

    return [
        Stage(judged_by, parents, judge_spec, judge, VERSION, table="eval", unit=unit, layout="flat"),
        Stage(
            f"eval_results[{c.label}]",
            (judged_by,),
            lambda ctx: [e.scoring, e.resamples, e.seed],
            figures,
            table="eval_results",
            unit=unit,
            layout="chained",
        ),
    ]


def evaluate(
    loaded: LoadedRecipe,
    wh: Warehouse,
    contenders: list[Contender],
    reporter: Reporter | None = None,
    *,
    loop_round: int | None = None,
    alpaca_eval_out: Path | None = None,
    run: Run | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate each contender in one run; returns the runs row and one `eval_results` row per contender.

    `run`: a run already open (a training choosing among its β runs by win rate) whose stages these become."""
    r = loaded.recipe
    e = r.eval
    assert e is not None
    reporter = reporter or Reporter()
    if alpaca_eval_out is not None:
        check_alpaca_eval_out(alpaca_eval_out, wh.root)  # before any model call, not after them
    prompts = read_prompts(loaded, ("eval", "prompts")).rows
    held_out_check(loaded, prompts, reporter)
    specs = {**r.models, **{c.label: c.spec for c in contenders}}
    name = f"{r.name}.eval"
    run_hash = Run.hash_of([e.model_dump(mode="json"), [model_identity(c.spec) for c in contenders]])
    own = run is None
    if run is None:
        run = Run(wh, name, run_hash, reporter, str(loaded.path), loop_round, models=ModelPool(specs))
    pool = run.add_models(specs)
    ctx = Context(loaded, run.call, run_id=run.run_id)
    results: list[dict[str, Any]] = []
    with run if own else contextlib.nullcontext():
        if e.baseline_model is not None:
            baseline = _outputs_stage(name, prompts, e.baseline_model, r.models[e.baseline_model], "baseline", loaded)
            execute([baseline], ctx, run)
        for c in contenders:
            outputs = _outputs_stage(name, prompts, c.label, c.spec, "policy", loaded)
            execute([outputs], ctx, run)
            if c.label != e.judge:
                pool.release(c.label)  # the policy leaves memory before the judge is loaded
            judged, figures = _contender_stages(name, prompts, c, outputs.name, loaded)
            execute([judged, figures], ctx, run)
            results += ctx.rows[figures.name]
            if alpaca_eval_out is not None:
                policy = _answers(ctx.rows[outputs.name])
                write_alpaca_eval(alpaca_eval_out, prompts, policy, c.label, r.name, wh.root)
    return run.row, results


def held_out_check(loaded: LoadedRecipe, prompts: list[dict[str, Any]], reporter: Reporter) -> None:
    """Warn when held-out prompts are also training prompts (a win rate on them measures memory)."""
    r = loaded.recipe
    if r.prompts.dataset is not None:
        return  # a Hub dataset is not downloaded just to check
    train_ids = {p["prompt_id"] for p in read_prompts(loaded).rows}
    shared = sum(p["prompt_id"] in train_ids for p in prompts)
    if shared:
        reporter.warn(
            f"{shared} of {len(prompts)} eval prompts are also training prompts; the win rate is not held-out"
        )


ALPACA_EVAL_KEYS = frozenset({"instruction", "output", "generator", "dataset"})


def is_alpaca_eval_file(path: Path) -> bool:
    """Whether `path` holds exactly what `write_alpaca_eval` writes: a JSON list of records with its four keys
    and nothing else (so an earlier --alpaca-eval-out is replaced, and any other file is left alone)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(records, list) and all(isinstance(x, dict) and set(x) == ALPACA_EVAL_KEYS for x in records)


def check_alpaca_eval_out(path: Path, wh_root: Path) -> None:
    """Refuse an --alpaca-eval-out that would replace a file factory did not write, or a warehouse file."""
    check_output_file(path, "--alpaca-eval-out", is_alpaca_eval_file, wh_root)


def write_alpaca_eval(
    path: Path, prompts: list[dict[str, Any]], outputs: dict[str, str], label: str, dataset: str, wh_root: Path
) -> None:
    """The policy's answers in the format `alpaca_eval --model_outputs` reads: a JSON list of
    {instruction, output, generator, dataset}. Prompts without an answer are left out."""
    records = [
        {"instruction": p["instruction"], "output": outputs[p["prompt_id"]], "generator": label, "dataset": dataset}
        for p in prompts
        if p["prompt_id"] in outputs
    ]
    check_alpaca_eval_out(path, wh_root)  # again, just before writing: the file may have appeared meanwhile
    atomic_write_bytes(path, json.dumps(records, ensure_ascii=False, indent=2).encode())
