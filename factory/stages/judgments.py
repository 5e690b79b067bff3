"""The `judgments` stage: a pairwise judge asked about every ordered pair of a prompt's distinct samples
(or, under the adaptive schedule, the pairs each round's answers call for).

Also the one builder of a judgment row (`judgment_row`: verdict fields, soft score, parse status, raw
output), which policy eval and judge-eval use too, and how a judgment reads as a win probability.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from factory.config.vocabulary import CUSTOM
from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.core.reading import read_input_text
from factory.judge.adaptive import Adaptive
from factory.judge.protocols import Protocol, custom_protocol, get_protocol, with_template
from factory.judge.verdicts import soft_scores
from factory.models.registry import model_identity
from factory.models.requests import Call, judge_caller
from factory.pipeline.stage import Context, PlannedStage, Stage, StageOutput, StageStats, merge_notes
from factory.stages.samples import distinct_samples, samples_per_prompt, text_representatives

if TYPE_CHECKING:
    from factory.config.labeling import JudgmentsSpec
    from factory.config.recipe import LoadedRecipe


def judge_protocol(loaded: LoadedRecipe, entry: int = 0) -> Protocol:
    """The protocol of the recipe's judge (of panel entry `entry`), checked up front: a built-in one, a
    `custom` one read from its template file, or a built-in one worded by its template file
    (`factory.judge.protocols.with_template`)."""
    j = loaded.recipe.judges[entry]
    loc: tuple[str | int, ...] = ("judgments", entry) if isinstance(loaded.recipe.judgments, list) else ("judgments",)
    if j.template is None:
        protocol = get_protocol(j.protocol)
        return protocol.unprefilled() if j.prefill == "none" else protocol
    path = loaded.resolve(j.template)
    where = loaded.where(*loc, "template")
    try:
        text = read_input_text(path, "judge template file")
    except UserInputError as exc:
        raise UserInputError(f"{where}: {exc}") from None
    named = f"{where} ({path.name})"
    if j.protocol != CUSTOM:
        protocol = with_template(get_protocol(j.protocol), text, named)
        return protocol.unprefilled() if j.prefill == "none" else protocol
    protocol = custom_protocol(text, prefill="" if j.prefill == "none" else "Output (", where=named)
    if protocol.uses_reference != bool(j.reference_names):
        need = "uses {reference}, so set" if protocol.uses_reference else "has no {reference}, so remove"
        raise UserInputError(f"{loaded.where(*loc, 'reference')}: the template {need} 'judgments.reference'")
    return protocol


def judge_calls(
    prompts: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    references: list[dict[str, Any]],
    spec: JudgmentsSpec,
    protocol: Protocol,
    identity: dict[str, Any],
) -> tuple[list[Call], dict[str, Any]]:
    """Every ordered pair of a prompt's distinct good samples (or only a-before-b with `orders: forward`);
    a sample whose text repeats an earlier one's is merged into it (`text_representatives`) and counted."""
    representative = text_representatives(samples)
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        if s["error"] is None and representative[s["sample_id"]] == s["sample_id"]:
            by_prompt[s["prompt_id"]].append(s)
    names: list[str | None] = list(spec.reference_names) if protocol.uses_reference else [None]
    refs = {(r["reference_name"], r["prompt_id"]): r["text"] for r in references if r["status"] == "ok"}
    calls: list[Call] = []
    make = judge_caller(identity, protocol.prefill, spec.generation_tokens, spec.top_logprobs)
    no_reference = 0
    for p, name in ((p, name) for p in prompts for name in names):
        group = sorted(by_prompt.get(p["prompt_id"], []), key=lambda s: s["sample_index"])
        reference = refs.get((name, p["prompt_id"]))
        if name is not None and reference is None:
            no_reference += 1
            continue
        fill = protocol.pair_turns(p["instruction"], reference) if len(group) > 1 else None
        for a in group:
            for b in group:
                if fill is None or a is b or (spec.orders == "forward" and a["sample_index"] > b["sample_index"]):
                    continue
                call = make.from_turns(
                    fill(a["text"], b["text"]),
                    prompt_id=p["prompt_id"],
                    sample_a=a["sample_id"],
                    sample_b=b["sample_id"],
                    order="forward" if a["sample_index"] < b["sample_index"] else "swapped",
                    reference_name=name,
                )
                calls.append(call)
    merged = sum(rep != sid for sid, rep in representative.items())
    return calls, {"prompts_without_reference": no_reference, "merged_samples": merged}


def verdict_fields(
    result: dict[str, Any], protocol: Protocol, markers: str = "variants", paper: bool = False
) -> dict[str, Any]:
    """A judge call read into row fields: raw output, verdict, soft score (under the `markers` rule, and under
    the exact rule), parse status (or the error).

    `paper` (`pooling: paper`) gives an answer the parser left without a soft score the one the paper's
    data_processing.py gives it: the reading of its first generated token, ½ when neither marker is there.
    """
    if result.get("status") != "ok":
        # Every key a parsed row has, so downstream code reads an error row like any other (no verdict).
        return {
            "raw_output": None,
            "verdict": None,
            "p_a": None,
            "p_a_exact": None,
            "p_source": "none",
            "marker_tokens": None,
            "parse_status": "error",
            "error": result.get("error") or "no result",
        }
    tops = logprob_pairs(result["top_logprobs"])
    v = protocol.parse(result["text"], result["tokens"], tops, markers=markers)
    fields = {
        "raw_output": protocol.prefill + result["text"],
        "verdict": v.verdict,
        "p_a": v.p_a,
        "p_a_exact": v.p_a_exact,
        "p_source": v.p_source,
        "marker_tokens": v.marker_tokens,
        "parse_status": v.parse_status,
    }
    if paper and v.p_a is None:
        fields.update(paper_first_token(tops, markers))
    return fields


def logprob_pairs(steps: list[list[Any]]) -> list[list[tuple[str, float]]]:
    """A call row's top log-probabilities as (token, logprob) pairs: a row made in this run holds the
    backend's pairs, a row read from the cache holds {token, logprob} dicts (Parquet structs)."""
    for step in steps:  # the first position with alternatives tells which (a plain loop: once per judgment)
        if step:
            if isinstance(step[0], dict):
                return [[(t["token"], t["logprob"]) for t in step] for step in steps]
            break
    return steps


def paper_first_token(tops: list[list[tuple[str, float]]], markers: str) -> dict[str, Any]:
    """The soft score data_processing.py gives an answer whose verdict token it cannot read: its first
    token's top log-probabilities (data_processing.py:70-72), ½ for both sides when neither marker is among
    them (:94-99). No first token at all also counts ½."""
    if not tops:
        return {"p_a": 0.5, "p_a_exact": 0.5, "p_source": "none", "marker_tokens": json.dumps({"a": [], "b": []})}
    p_a, p_exact, seen_a, seen_b = soft_scores(tops[0])
    return {
        "p_a": p_exact if markers == "exact" else p_a,
        "p_a_exact": p_exact,
        "p_source": "first_token",
        "marker_tokens": json.dumps({"a": list(seen_a), "b": list(seen_b)}, ensure_ascii=False),
    }


def judgment_row(
    call: Call,
    result: dict[str, Any] | None,
    protocol: Protocol,
    fields: dict[str, Any],
    markers: str = "variants",
    paper: bool = False,
) -> dict[str, Any]:
    """One judge answer as a row: the call's fields, `fields` (what the caller's table adds: judge, protocol,
    decoding switches), the request key, token counts and latency, and the answer read by `verdict_fields`
    (under `markers`; `paper`: the paper's pooling); a failed call is a row with parse_status error."""
    r = result or {}
    return {
        **call.meta,
        **fields,
        "request_key": call.key,
        "tokens_in": r.get("tokens_in"),
        "tokens_out": r.get("tokens_out"),
        "latency_s": r.get("latency_s"),
        **verdict_fields(r, protocol, markers, paper=paper),
    }


def judgment_rows(
    calls: list[Call],
    results: dict[str, dict[str, Any]],
    spec: JudgmentsSpec,
    protocol: Protocol,
    schedule: dict[str, Any] | None = None,
) -> StageOutput:
    """Each judge answer parsed into verdict, soft score and parse status; failed calls stay as rows.
    `schedule`: fields every row gets besides (the schedule and its round, when all rows share them)."""
    fields = {
        "protocol": protocol.name,
        "judge": spec.judge,
        "prefill": protocol.prefill,
        "markers": spec.markers,
        "top_logprobs": spec.top_logprobs,
        **(schedule or {}),
    }
    paper = spec.pooling == "paper"
    rows = [judgment_row(c, results.get(c.key), protocol, fields, spec.markers, paper) for c in calls]
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["parse_status"]] += 1
    return StageOutput(rows, {"parse_status": dict(counts)})


def win_probability(row: dict[str, Any], scoring: str) -> float | None:
    """P(sample_a wins) as the scoring rule reads one judgment; None when it carries no information."""
    if row["parse_status"] == "error":
        return None
    if scoring == "verdict":
        return {"a": 1.0, "b": 0.0}.get(row["verdict"] or "")
    return row["p_a"]


def pair_probability(votes: list[dict[str, Any]], scoring: str) -> tuple[float | None, str | None]:
    """One ordered pair's P(a wins) and winner over its per-reference judgments.

    With one reference this is that judgment's own reading. With several they vote: the mean soft score,
    or the majority of parsed verdicts (a tie is no verdict: nothing is guessed).
    """
    if len(votes) == 1:  # one reference (the usual case, once per ordered pair): the same reading, made directly
        verdict = votes[0]["verdict"]
        winner = verdict if verdict == "a" or verdict == "b" else None
        if scoring == "verdict":
            return ({"a": 1.0, "b": 0.0}.get(winner or ""), winner)
        return (win_probability(votes[0], scoring), winner)
    probs = [p for p in (win_probability(j, scoring) for j in votes) if p is not None]
    a_votes = sum(j["verdict"] == "a" for j in votes)
    b_votes = sum(j["verdict"] == "b" for j in votes)
    winner = "a" if a_votes > b_votes else "b" if b_votes > a_votes else None
    if scoring == "verdict":
        return ({"a": 1.0, "b": 0.0}.get(winner or ""), winner)
    return (sum(probs) / len(probs) if probs else None, winner)


def schedule_seed(prompt_id: str) -> int:
    """A prompt's schedule seed: its own id, so every build draws the same first round for it."""
    return int(stable_hash(prompt_id, 8), 16)


def _judgments_spec(ctx: Context) -> Any:
    # The prompt text is in the key, so editing a protocol's wording (or a custom file) re-judges.
    specs = []
    for i, j in enumerate(ctx.recipe.judges):
        protocol = judge_protocol(ctx.loaded, i)
        specs.append([j.model_dump(), protocol.template, protocol.system, model_identity(ctx.recipe.models[j.judge])])
    # One judge, in either form, keeps the key it had before panels existed.
    return specs if len(specs) > 1 else specs[0]


def _judgments(ctx: Context, st: StageStats) -> StageOutput:
    j = ctx.recipe.judging
    if j.schedule == "adaptive":  # one judge: a panel judges every pair (the recipe checks)
        protocol = judge_protocol(ctx.loaded)
        identity = model_identity(ctx.recipe.models[j.judge])
        calls, notes = judge_calls(
            ctx.rows["prompts"], ctx.rows["samples"], ctx.rows["references"], j, protocol, identity
        )
        out = _adaptive_judgments(ctx, st, calls, protocol)
        out.notes.update(notes)
        out.complete = not out.notes["parse_status"].get("error", 0)
        return out
    out = StageOutput([], {"parse_status": {}})
    for i, entry in enumerate(ctx.recipe.judges):
        protocol = judge_protocol(ctx.loaded, i)
        identity = model_identity(ctx.recipe.models[entry.judge])
        calls, notes = judge_calls(
            ctx.rows["prompts"], ctx.rows["samples"], ctx.rows["references"], entry, protocol, identity
        )
        schedule = {"schedule": "all-pairs", "schedule_round": 1}
        judged = judgment_rows(calls, ctx.call(entry.judge, "judgments", calls, st), entry, protocol, schedule)
        out.rows += judged.rows
        merged = notes.pop("merged_samples")  # the same samples for every judge: counted once, not summed
        out.notes = {**merge_notes(out.notes, {**judged.notes, **notes}), "merged_samples": merged}
    out.complete = not out.notes["parse_status"].get("error", 0)
    return out


def _adaptive_judgments(ctx: Context, st: StageStats, calls: list[Any], protocol: Any) -> StageOutput:
    """Judge round by round, every prompt's schedule in lockstep: each round's calls go to the judge as one
    batch, and its answers decide the next round's pairs (`factory.judge.adaptive.Adaptive`)."""
    j = ctx.recipe.judging
    by_pair: dict[tuple[str, str], list[Any]] = {}
    for c in calls:  # all-pairs calls in both orders; the schedule picks among them (one per reference)
        by_pair.setdefault((c.meta["sample_a"], c.meta["sample_b"]), []).append(c)
    schedules = {
        pid: Adaptive(ids, seed=schedule_seed(pid)) for pid, ids in distinct_samples(ctx.rows["samples"]).items()
    }
    rows: list[dict[str, Any]] = []
    while True:
        asked = [(s, a, b) for s in schedules.values() for a, b in s.next_round()]
        if not asked:
            break
        batch = [c for _, a, b in asked for c in by_pair.get((a, b), [])]
        answered = judgment_rows(batch, ctx.call(j.judge, "judgments", batch, st), j, protocol).rows
        votes: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in answered:
            votes.setdefault((row["sample_a"], row["sample_b"]), []).append(row)
        for schedule, a, b in asked:
            for row in votes.get((a, b), []):
                row.update(schedule="adaptive", schedule_round=schedule.round)
            found = votes.get((a, b))
            schedule.record(a, b, pair_probability(found, j.scoring)[0] if found else None)
        rows += answered
    asked_calls = len(rows)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["parse_status"]] = counts.get(row["parse_status"], 0) + 1
    notes = {"parse_status": counts, "schedule": "adaptive", "all_pairs_calls": len(calls), "asked": asked_calls}
    return StageOutput(rows, notes)


def _plan_judgments(ctx: Context, n_prompts: int | None) -> list[PlannedStage]:
    return [_plan_judge(ctx, n_prompts, i) for i in range(len(ctx.recipe.judges))]


def _plan_judge(ctx: Context, n_prompts: int | None, entry: int) -> PlannedStage:
    r = ctx.recipe
    j = r.judges[entry]
    counts = samples_per_prompt(ctx)  # one count for every prompt, or one per prompt with imports
    protocol = judge_protocol(ctx.loaded, entry)
    div = 1 if j.orders == "both" else 2
    ordered = None if counts is None else [n * (n - 1) // div for n in counts]
    pairs = 0 if not ordered else round(sum(ordered) / len(ordered))
    votes = max(1, len(j.reference_names))  # each reference that votes is one more judgment per pair
    chars = ctx.outputs.get("instruction_chars")
    ref = next((x for x in r.references if x.name in j.reference_names), None)
    ref_tokens = 0.0
    if ref is not None and ref.kind == "model":
        ref_tokens = ref.params.max_tokens
    elif ref is not None and chars is not None:
        field = r.column_field(ref)
        columns = [json.loads(p["reference_fields"]) for p in ctx.rows.get("prompts", [])]
        ref_tokens = sum(len(c.get(field) or "") for c in columns) / max(len(columns), 1) / 4
    longest = max([p.params.max_tokens for p in r.policies] or [0])
    each = len(protocol.template) / 4 + 2 * longest + (ref_tokens if protocol.uses_reference else 0)
    per = None if n_prompts is None or ordered is None else n_prompts * pairs * votes
    if r.imports and ordered is not None:
        per = sum(ordered) * votes  # each prompt's own count: imports hold different numbers
    # Without the instructions at hand (a Hub dataset) the estimate counts everything but them.
    approx = None if per is None else int(per * (each + (chars or 0) / 4))
    note = f"{pairs} ordered pairs per prompt, protocol {j.protocol}"
    if j.schedule == "adaptive":
        note = f"at most {pairs} ordered pairs per prompt (adaptive asks fewer), protocol {j.protocol}"
    if j.template is not None:
        note += f", worded by {Path(j.template).name}"
    if r.imports:
        note = note.replace(f"{pairs} ordered pairs per prompt", f"{pairs} ordered pairs per prompt on average")
    note += "" if chars is not None else "; input tokens exclude the instructions"
    return PlannedStage("judgments", j.judge, per, None if per is None else per * j.generation_tokens, approx, note)


# version 2: identical samples merged, system turns, decoding switches recorded in rows.
JUDGMENTS = Stage(
    "judgments", ("prompts", "samples", "references"), _judgments_spec, _judgments, version=2, plan=_plan_judgments
)
