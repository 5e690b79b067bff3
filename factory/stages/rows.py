"""The stages' row transforms: small pure functions of rows. No file, SQL or model is touched here.

Model-calling stages are split in two pure halves: one turns parent rows into keyed calls, the other
turns (calls, call results) into the stage's rows. The run makes the calls in between. Which transforms
form which stage, and in what order, is declared in `factory.build.command` and `factory.labelers.registry`.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.judge.protocols import Protocol
from factory.judge.verdicts import soft_score
from factory.models.requests import Call, generation_call, judge_call, reward_call
from factory.pipeline.stage import StageOutput

if TYPE_CHECKING:
    from factory.config.labeling import JudgmentsSpec, PairsSpec, SamplesSpec
    from factory.config.sources import PromptSource, ReferenceSpec


# ------------------------------------------------------------------------------------------------ prompts


def _columns(names: Any) -> str:
    """Available column names for an error message, cut short when there are many or they are long."""
    shown = [str(n)[:40] for n in sorted(names, key=str)[:12]]
    return repr(shown)[:-1] + (", …]" if len(names) > 12 else "]")


def _text(row: dict[str, Any], column: str, where: str, required: bool) -> str | None:
    if column not in row or row[column] is None:
        if required and column in row:
            raise UserInputError(f"{where}: column '{column[:80]}' is null; expected text")
        if required:
            raise UserInputError(f"{where}: missing column '{column[:80]}' (available: {_columns(row)})")
        return None
    value = row[column]
    if not isinstance(value, str):
        raise UserInputError(f"{where}: column '{column}' must be text, got {type(value).__name__}")
    return value


def prompt_rows(
    source_name: str, raw: list[dict[str, Any]], spec: PromptSource, where: str | None = None
) -> StageOutput:
    """Instructions as chat messages with a content-hash id; duplicates dropped, then shuffle and limit.

    `where` starts error messages (the build passes the recipe file, line and field of the source).
    """
    where = where or f"prompts ({source_name})"
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    duplicates = empty = 0
    for i, row in enumerate(raw):
        row_where = f"{where} (row {i})"
        instruction = _text(row, spec.instruction_field, row_where, required=True)
        assert instruction is not None
        if not instruction.strip():
            empty += 1
            continue
        messages = []
        system = _text(row, spec.system_field, row_where, required=False) if spec.system_field else None
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": instruction})
        prompt_id = stable_hash(messages, 16)
        if prompt_id in seen and spec.dedupe:
            duplicates += 1
            continue
        seen.add(prompt_id)
        refs = {c: _text(row, c, row_where, required=False) for c in spec.reference_fields}
        rows.append(
            {
                "prompt_id": prompt_id,
                "messages": json.dumps(messages, ensure_ascii=False),
                "instruction": instruction,
                "source": source_name,
                "source_row": i,
                "source_id": None if spec.id_field is None else str(row.get(spec.id_field)),
                "reference_fields": json.dumps(refs, ensure_ascii=False),
            }
        )
    named = [(c, "prompts.reference_fields") for c in spec.reference_fields]
    named += [(c, f"prompts.{f}") for f, c in (("id_field", spec.id_field), ("system_field", spec.system_field)) if c]
    absent = [(c, field) for c, field in named if raw and all(c not in r for r in raw)]
    if absent:
        column, field = absent[0]
        raise UserInputError(f"{where}: column '{column[:80]}' ({field}) is in no row (available: {_columns(raw[0])})")
    if spec.shuffle:
        random.Random(spec.seed).shuffle(rows)
    if spec.limit is not None:
        rows = rows[: spec.limit]
    if not rows:
        raise UserInputError(
            f"{where}: the source {source_name} gave no usable prompts ({len(raw)} rows read, {empty} empty)"
        )
    return StageOutput(rows, {"read": len(raw), "duplicates": duplicates, "empty": empty, "kept": len(rows)})


# --------------------------------------------------------------------------------------------- references


def column_reference_rows(prompts: list[dict[str, Any]], ref: ReferenceSpec, column: str) -> StageOutput:
    """Human references read from the prompt source; prompts without one get a `missing` row."""
    rows = []
    for p in prompts:
        text = json.loads(p["reference_fields"]).get(column)
        ok = bool(text and text.strip())
        rows.append(
            {
                "prompt_id": p["prompt_id"],
                "reference_name": ref.name,
                "text": text if ok else None,
                "source_kind": "human",
                "status": "ok" if ok else "missing",
            }
        )
    return StageOutput(rows, {"missing": sum(r["status"] == "missing" for r in rows)})


def generation_calls(
    prompts: list[dict[str, Any]], identity: dict[str, Any], params: Any, seed: int, n: int
) -> list[Call]:
    """One call per (prompt, sample index); the backend groups a prompt's indices into one n-sample call."""
    calls = []
    for p in prompts:
        messages = json.loads(p["messages"])
        calls += [
            generation_call(identity, messages, params, seed, i, prompt_id=p["prompt_id"], sample_index=i)
            for i in range(n)
        ]
    return calls


def model_reference_rows(calls: list[Call], results: dict[str, dict[str, Any]], ref: ReferenceSpec) -> StageOutput:
    """References written by a model: one row per prompt, failures kept as rows."""
    rows = []
    for c in calls:
        r = results.get(c.key, {})
        ok = r.get("status") == "ok"
        rows.append(
            {
                "prompt_id": c.meta["prompt_id"],
                "reference_name": ref.name,
                "text": r.get("text") if ok else None,
                "source_kind": "model",
                "model": ref.model,
                "request_key": c.key,
                "status": "ok" if ok else "error",
                "error": r.get("error") or (None if ok else "no result"),
                "tokens_in": r.get("tokens_in"),
                "tokens_out": r.get("tokens_out"),
                "latency_s": r.get("latency_s"),
            }
        )
    return StageOutput(rows, {"failed": sum(r["status"] != "ok" for r in rows)})


# ------------------------------------------------------------------------------------------------ samples


def sample_rows(calls: list[Call], results: dict[str, dict[str, Any]], spec: SamplesSpec) -> StageOutput:
    """The policy's outputs; a failed call is a row with finish_reason `error`."""
    rows = []
    for c in calls:
        r = results.get(c.key, {})
        ok = r.get("status") == "ok"
        rows.append(
            {
                "sample_id": c.key[:16],
                "prompt_id": c.meta["prompt_id"],
                "policy": spec.policy,
                "sample_index": c.meta["sample_index"],
                "text": r.get("text") if ok else None,
                "finish_reason": r.get("finish_reason") if ok else "error",
                "n_tokens": r.get("tokens_out"),
                "n_prompt_tokens": r.get("tokens_in"),
                "request_key": c.key,
                "error": None if ok else (r.get("error") or "no result"),
                "tokens_in": r.get("tokens_in"),
                "tokens_out": r.get("tokens_out"),
                "latency_s": r.get("latency_s"),
            }
        )
    return StageOutput(rows, {"failed": sum(r["error"] is not None for r in rows)})


# ---------------------------------------------------------------------------------------------- judgments


def text_representatives(samples: list[dict[str, Any]]) -> dict[str, str]:
    """For every good sample, the sample that stands for its text: the lowest sample index of the prompt's
    samples with exactly that text. Identical samples are one candidate (as the paper keys candidates by
    text): the text is judged and scored once, and a sample is never paired with its own copy."""
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for s in sorted((s for s in samples if s["error"] is None), key=lambda s: (s["prompt_id"], s["sample_index"])):
        first.setdefault((s["prompt_id"], s["text"]), s)
    return {s["sample_id"]: first[(s["prompt_id"], s["text"])]["sample_id"] for s in samples if s["error"] is None}


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
    no_reference = 0
    for p, name in ((p, name) for p in prompts for name in names):
        group = sorted(by_prompt.get(p["prompt_id"], []), key=lambda s: s["sample_index"])
        reference = refs.get((name, p["prompt_id"]))
        if name is not None and reference is None:
            no_reference += 1
            continue
        for a in group:
            for b in group:
                if a is b or (spec.orders == "forward" and a["sample_index"] > b["sample_index"]):
                    continue
                messages = protocol.render(p["instruction"], a["text"], b["text"], reference)
                call = judge_call(
                    identity,
                    messages,
                    protocol.prefill,
                    spec.generation_tokens,
                    spec.top_logprobs,
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
    tops = [[(t["token"], t["logprob"]) for t in step] for step in result["top_logprobs"]]
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


def paper_first_token(tops: list[list[tuple[str, float]]], markers: str) -> dict[str, Any]:
    """The soft score data_processing.py gives an answer whose verdict token it cannot read: its first
    token's top log-probabilities (data_processing.py:70-72), ½ for both sides when neither marker is among
    them (:94-99). No first token at all also counts ½."""
    if not tops:
        return {"p_a": 0.5, "p_a_exact": 0.5, "p_source": "none", "marker_tokens": json.dumps({"a": [], "b": []})}
    p_a, seen = soft_score(tops[0])
    p_exact, _ = soft_score(tops[0], exact=True)
    return {
        "p_a": p_exact if markers == "exact" else p_a,
        "p_a_exact": p_exact,
        "p_source": "first_token",
        "marker_tokens": json.dumps(seen, ensure_ascii=False),
    }


def judgment_rows(
    calls: list[Call], results: dict[str, dict[str, Any]], spec: JudgmentsSpec, protocol: Protocol
) -> StageOutput:
    """Each judge answer parsed into verdict, soft score and parse status; failed calls stay as rows."""
    rows = []
    for c in calls:
        r = results.get(c.key, {})
        row: dict[str, Any] = {
            **c.meta,
            "protocol": protocol.name,
            "judge": spec.judge,
            "request_key": c.key,
            "prefill": protocol.prefill,
            "markers": spec.markers,
            "top_logprobs": spec.top_logprobs,
            "tokens_in": r.get("tokens_in"),
            "tokens_out": r.get("tokens_out"),
            "latency_s": r.get("latency_s"),
        }
        row.update(verdict_fields(r, protocol, spec.markers, paper=spec.pooling == "paper"))
        rows.append(row)
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


# --------------------------------------------------------------------------------------- scores and pairs


def pair_probability(votes: list[dict[str, Any]], scoring: str) -> tuple[float | None, str | None]:
    """One ordered pair's P(a wins) and winner over its per-reference judgments.

    With one reference this is that judgment's own reading. With several they vote: the mean soft score,
    or the majority of parsed verdicts (a tie is no verdict: nothing is guessed).
    """
    probs = [p for p in (win_probability(j, scoring) for j in votes) if p is not None]
    a_votes = sum(j["verdict"] == "a" for j in votes)
    b_votes = sum(j["verdict"] == "b" for j in votes)
    winner = "a" if a_votes > b_votes else "b" if b_votes > a_votes else None
    if scoring == "verdict":
        return ({"a": 1.0, "b": 0.0}.get(winner or ""), winner)
    return (sum(probs) / len(probs) if probs else None, winner)


def score_rows(samples: list[dict[str, Any]], judgments: list[dict[str, Any]], scoring: str) -> StageOutput:
    """A sample's score: the mean of its win probabilities over every comparison it appears in."""
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for j in judgments:
        by_pair[(j["sample_a"], j["sample_b"])].append(j)
    probs: dict[str, list[float]] = defaultdict(list)
    wins: dict[str, int] = defaultdict(int)
    for (sample_a, sample_b), votes in by_pair.items():
        p, winner = pair_probability(votes, scoring)
        if p is None:
            continue
        probs[sample_a].append(p)
        probs[sample_b].append(1.0 - p)
        if winner is not None:
            wins[sample_a if winner == "a" else sample_b] += 1
    representative = text_representatives(samples)
    rows = []
    for s in samples:
        rep = representative.get(s["sample_id"], s["sample_id"])  # a copy carries its text's score
        ps = probs.get(rep)
        if not ps:
            continue
        rows.append(
            {
                "sample_id": s["sample_id"],
                "prompt_id": s["prompt_id"],
                "labeler": "judgments",
                "score": sum(ps) / len(ps),
                "n_comparisons": len(ps),
                "wins": wins[rep],
            }
        )
    return StageOutput(rows, {"unscored_samples": len(samples) - len(rows)})


def paper_score_rows(samples: list[dict[str, Any]], judgments: list[dict[str, Any]], scoring: str) -> StageOutput:
    """Scores as the paper's data_processing.py computes them (`pooling: paper`), from the merged judgments.

    The paper judges every ordered pair of sample indices (scoring.py:141-144) and appends both sides' soft
    scores to a list per text (data_processing.py:108-119), so a text's score is a mean over its copies'
    comparisons. The same numbers, without the calls whose answers are known:

    - a copy shows the judge the same messages as the sample that stands for its text, so a judged ordered
      pair (a, b) counts m(a)·m(b) times, m being the number of samples with that text;
    - a copy against a copy of its own text puts both of the judgment's scores on that text, and they sum to
      1 whatever the judge says (data_processing.py:76-99), so the m(m−1) ordered copy pairs add 2·m(m−1)
      entries that sum to m(m−1): asked of no model;
    - an unparsed judgment counts (the soft score `verdict_fields` gave it under this pooling; ½ under
      `scoring: verdict`). Failed calls count nothing: the run is incomplete, and the next one retries them.

    A text with no judged comparison stays unscored. `n_comparisons` is the number of entries averaged;
    `wins` counts the weighted comparisons whose verdict named the text (copy pairs name none).
    """
    representative = text_representatives(samples)
    copies: dict[str, int] = defaultdict(int)
    for rep in representative.values():
        copies[rep] += 1
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for j in judgments:
        by_pair[(j["sample_a"], j["sample_b"])].append(j)
    total: dict[str, float] = defaultdict(float)
    entries: dict[str, int] = defaultdict(int)
    wins: dict[str, int] = defaultdict(int)
    for (sample_a, sample_b), votes in by_pair.items():
        p, winner = pair_probability(votes, scoring)
        if p is None and any(v["parse_status"] != "error" for v in votes):
            p = 0.5  # answered, but without a verdict to read: the paper's ½ for both sides
        if p is None:
            continue
        weight = copies[sample_a] * copies[sample_b]
        total[sample_a] += weight * p
        total[sample_b] += weight * (1.0 - p)
        entries[sample_a] += weight
        entries[sample_b] += weight
        if winner is not None:
            wins[sample_a if winner == "a" else sample_b] += weight
    for rep in list(entries):
        pairs_of_copies = copies[rep] * (copies[rep] - 1)
        total[rep] += pairs_of_copies
        entries[rep] += 2 * pairs_of_copies
    rows = []
    for s in samples:
        rep = representative.get(s["sample_id"])
        if rep is None or not entries.get(rep):
            continue
        rows.append(
            {
                "sample_id": s["sample_id"],
                "prompt_id": s["prompt_id"],
                "labeler": "judgments",
                "score": total[rep] / entries[rep],
                "n_comparisons": entries[rep],
                "wins": wins[rep],
            }
        )
    return StageOutput(rows, {"unscored_samples": len(samples) - len(rows), "pooling": "paper"})


def reward_calls(prompts: list[dict[str, Any]], samples: list[dict[str, Any]], identity: dict[str, Any]) -> list[Call]:
    """One reward-model call per good sample: the prompt's messages plus the sample as the assistant turn."""
    messages = {p["prompt_id"]: json.loads(p["messages"]) for p in prompts}
    calls = []
    for s in samples:
        if s["error"] is not None:
            continue
        conversation = [*messages[s["prompt_id"]], {"role": "assistant", "content": s["text"]}]
        calls.append(reward_call(identity, conversation, sample_id=s["sample_id"], prompt_id=s["prompt_id"]))
    return calls


def reward_score_rows(calls: list[Call], results: dict[str, dict[str, Any]]) -> StageOutput:
    """A sample's score is its reward; samples whose call failed get no score (and are counted)."""
    rows = []
    for c in calls:
        r = results.get(c.key)
        if r is None or r.get("status") != "ok":
            continue
        rows.append({**c.meta, "labeler": "rewards", "score": r["reward"], "n_comparisons": None, "wins": None})
    return StageOutput(rows, {"unscored_samples": len(calls) - len(rows)})


def similarity_score_rows(
    samples: list[dict[str, Any]], references: list[dict[str, Any]], reference_name: str
) -> StageOutput:
    """A sample's score is its ROUGE-L F1 against the prompt's reference (the paper's lexical baseline)."""
    from rouge_score import rouge_scorer  # light, but only this labeler needs it

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    refs = {
        r["prompt_id"]: r["text"] for r in references if r["reference_name"] == reference_name and r["status"] == "ok"
    }
    rows = []
    for s in samples:
        ref = refs.get(s["prompt_id"])
        if s["error"] is not None or ref is None:
            continue
        score = scorer.score(ref, s["text"])["rougeL"].fmeasure
        row = {"sample_id": s["sample_id"], "prompt_id": s["prompt_id"], "labeler": "similarity", "score": score}
        rows.append({**row, "n_comparisons": None, "wins": None})
    return StageOutput(rows, {"unscored_samples": len(samples) - len(rows)})


def pair_rows(samples: list[dict[str, Any]], scores: list[dict[str, Any]], spec: PairsSpec) -> StageOutput:
    """Best-vs-worst per prompt, after dropping over-length samples; ties and thin prompts are counted."""
    sample_by_id = {s["sample_id"]: s for s in samples}
    representative = text_representatives(samples)
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    over_length = 0
    for sc in scores:
        s = sample_by_id[sc["sample_id"]]
        if representative.get(s["sample_id"], s["sample_id"]) != s["sample_id"]:
            continue  # a copy of another sample's text: that sample stands for it
        if spec.max_tokens is not None and (s["n_prompt_tokens"] or 0) + (s["n_tokens"] or 0) > spec.max_tokens:
            over_length += 1
            continue
        by_prompt[sc["prompt_id"]].append(sc)
    rows = []
    too_few = ties = 0
    for prompt_id, group in by_prompt.items():
        if len(group) < 2:
            too_few += 1
            continue
        # Sort by score, then by sample index, so equal scores pick the same pair on every run.
        group.sort(key=lambda sc: (-sc["score"], sample_by_id[sc["sample_id"]]["sample_index"]))
        best, worst = group[0], group[-1]
        margin = best["score"] - worst["score"]
        if margin <= spec.min_margin:
            ties += 1
            continue
        rows.append(
            {
                "prompt_id": prompt_id,
                "chosen_sample_id": best["sample_id"],
                "rejected_sample_id": worst["sample_id"],
                "chosen_score": best["score"],
                "rejected_score": worst["score"],
                "margin": margin,
            }
        )
    notes = {"over_length_samples": over_length, "too_few_samples": too_few, "ties_or_small_margin": ties}
    return StageOutput(rows, notes)


# ------------------------------------------------------------------------------------- adaptive schedule


def schedule_seed(prompt_id: str) -> int:
    """A prompt's schedule seed: its own id, so every build draws the same first round for it."""
    return int(stable_hash(prompt_id, 8), 16)


def distinct_samples(samples: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per prompt, the ids of its distinct good samples (`text_representatives`) in sample-index order."""
    representative = text_representatives(samples)
    out: dict[str, list[str]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: (s["prompt_id"], s["sample_index"])):
        if s["error"] is None and representative[s["sample_id"]] == s["sample_id"]:
            out[s["prompt_id"]].append(s["sample_id"])
    return out


def replay_schedules(samples: list[dict[str, Any]], judgments: list[dict[str, Any]], scoring: str) -> dict[str, Any]:
    """Each prompt's adaptive schedule, replayed from its stored judgments (the pairs a schedule asks depend
    only on its samples, its seed and the answers, so the replay asks exactly what the build asked)."""
    from factory.judge.adaptive import Adaptive

    votes: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for j in judgments:
        votes[(j["sample_a"], j["sample_b"])].append(j)
    out = {}
    for prompt_id, ids in distinct_samples(samples).items():
        schedule = Adaptive(ids, seed=schedule_seed(prompt_id))
        while pairs := schedule.next_round():
            for a, b in pairs:
                found = votes.get((a, b))
                schedule.record(a, b, pair_probability(found, scoring)[0] if found else None)
        out[prompt_id] = schedule
    return out


def adaptive_score_rows(samples: list[dict[str, Any]], judgments: list[dict[str, Any]], scoring: str) -> StageOutput:
    """Scores under the adaptive schedule: each sample's estimate of its all-pairs score (its judged
    comparisons plus predictions for those not asked; `factory.judge.adaptive`), so best-vs-worst picks the pair
    the schedule settled on. A copy of another sample's text takes that sample's score."""
    # One fit per prompt: `scores()` refits the schedule's model each time it is called.
    by_prompt = {pid: schedule.scores() for pid, schedule in replay_schedules(samples, judgments, scoring).items()}
    representative = text_representatives(samples)
    rows = []
    for s in samples:
        rep = representative.get(s["sample_id"])
        score = by_prompt.get(s["prompt_id"], {}).get(rep) if rep is not None else None
        if score is None or not score.n_comparisons:
            continue
        rows.append(
            {
                "sample_id": s["sample_id"],
                "prompt_id": s["prompt_id"],
                "labeler": "judgments",
                "score": score.score,
                "n_comparisons": score.n_comparisons,
                "wins": score.wins,
            }
        )
    return StageOutput(rows, {"unscored_samples": len(samples) - len(rows), "schedule": "adaptive"})
