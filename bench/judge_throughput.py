"""Preference pairs per judge-second: the paper's way of judging vs factory's all-pairs and adaptive judging.

Same inputs, same backend, same protocol (RefEval) in ONE run. Inputs: the first P prompts of an LLMBar-format
JSONL (instruction, output_1, output_2, reference), each with S fixed candidate "samples" (output_1, output_2,
the reference, output_2 cut to half, output_1 cut to half); identical texts are merged as a build merges them
(`factory.stages.judgments.judge_calls`), so a prompt has at most S(S−1) ordered pairs. Three modes:

- paper (the baseline): every ordered pair of every prompt in ONE batched engine call, no prefill, 16 greedy
  new tokens, top-5 log-probabilities, the verdict found by regex and the soft score read at its marker token
  with the exact `a`/`b` rule (`Protocol.unprefilled()` + `parse(..., markers="exact")`). vLLM: one
  `LLM.generate` of all requests with `enable_prefix_caching=True`. transformers: one batched `generate()` of
  all requests, left-padded, no prefix sharing (the closest equivalent).
- all-pairs: as factory judges today: `backend.judge` on the requests in build order, in batches of
  `--vllm-batch` / `--hf-batch` (what CallRunner submits), the answer prefilled with `Output (`, top-20,
  up to 8 tokens (the recipe defaults), soft score over marker variants.
- adaptive: the same judge calls, but only those `factory.judge.adaptive.Adaptive` asks for, round by round with
  all prompts in lockstep, each round's calls in batches as above (`factory.stages.judgments._adaptive_judgments`).

Pairs are made as a build makes them: `factory.stages.scores.score_rows` (paper, all-pairs) or
`factory.stages.scores.adaptive_score_rows` (adaptive), then `factory.stages.pairs.pair_rows` (best vs worst;
exact ties give no pair). The headline is preference pairs per judge-second: prompts that yield a
chosen/rejected pair ÷ the mode's judge seconds (the wall time of its backend calls, parsing and scheduling).
"same pair" is the share of prompts where a mode picks the same chosen AND rejected sample as the paper's mode
(a prompt where neither yields a pair counts as the same). The per-judgment figures the earlier version of
this script reported (judgments/s, parsed verdicts, verdict agreement per ordered pair) are kept; its
one-request-at-a-time loop is gone (the baseline is now the paper's one batched call).

Engine/model load time is reported apart and excluded; each mode is warmed up once (on 2 requests of the first
prompt) before timing, and vLLM's prefix cache is emptied before each timed mode, so no mode reuses the
prompts another mode computed.

    python bench/judge_throughput.py --prompts 8 --samples 5 --backends vllm transformers --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "llmbar" / "natural.jsonl"

MODELS: dict[str, dict[str, Any]] = {
    "vllm": {"backend": "vllm", "model": "embedded:smollm2-135m-instruct", "engine": {"enforce_eager": True}},
    "transformers": {"backend": "transformers", "model": "embedded:smollm2-135m-instruct"},
}
MODES = ("paper", "all-pairs", "adaptive")
REFERENCE = "human"


# ------------------------------------------------------------------------------------------------ inputs


def load_inputs(data: Path, prompts: int, samples: int) -> list[dict[str, Any]]:
    """Rows with an instruction, a reference and `samples` candidate outputs."""
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for row in rows[:prompts]:
        o1, o2 = row["output_1"], row["output_2"]
        candidates = [o1, o2, row["reference"], o2[: len(o2) // 2], o1[: len(o1) // 2]]
        out.append({"instruction": row["instruction"], "reference": row["reference"], "samples": candidates[:samples]})
    return out


def factory_rows(inputs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The inputs as a build's `prompts`, `samples` and `references` rows."""
    from factory.core.keys import stable_hash

    prompts, samples, references = [], [], []
    for row in inputs:
        messages = [{"role": "user", "content": row["instruction"]}]
        pid = stable_hash(messages, 16)
        prompts.append({"prompt_id": pid, "instruction": row["instruction"], "messages": json.dumps(messages)})
        references.append({"prompt_id": pid, "reference_name": REFERENCE, "text": row["reference"], "status": "ok"})
        for i, text in enumerate(row["samples"]):
            samples.append(
                {
                    "sample_id": f"{pid}-{i}",
                    "prompt_id": pid,
                    "sample_index": i,
                    "text": text,
                    "error": None,
                    "n_tokens": None,
                    "n_prompt_tokens": None,
                }
            )
    return {"prompts": prompts, "samples": samples, "references": references}


def mode_setup(args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """Each mode's judgments spec and protocol (the paper's: unprefilled, 16 tokens, top-5, exact markers)."""
    from factory.config.labeling import JudgmentsSpec
    from factory.judge.protocols import get_protocol

    refeval = get_protocol("refeval")
    ours = {"judge": "judge", "reference": REFERENCE, "max_tokens": args.judge_tokens}
    ours["top_logprobs"] = args.top_logprobs
    paper = JudgmentsSpec(
        judge="judge", reference=REFERENCE, prefill="none", max_tokens=16, top_logprobs=5, markers="exact"
    )
    return {
        "paper": (paper, refeval.unprefilled()),
        "all-pairs": (JudgmentsSpec(**ours), refeval),
        "adaptive": (JudgmentsSpec(**ours, schedule="adaptive"), refeval),
    }


# ------------------------------------------------------------------------------------------- judge calls


def result_of(output: Any) -> dict[str, Any]:
    """A backend's judge output as the call-row fields `factory.stages.judgments.judgment_rows` reads
    (`calls._judge_fields`)."""
    if isinstance(output, Exception):
        return {"status": "error", "error": f"{type(output).__name__}: {output}"}
    tops = [[{"token": t, "logprob": lp} for t, lp in step] for step in output.top_logprobs]
    return {
        "status": "ok",
        "text": output.text,
        "tokens": output.tokens,
        "top_logprobs": tops,
        "tokens_in": output.tokens_in,
        "tokens_out": output.tokens_out,
    }


def hf_generate_all(backend: Any, requests: list[Any]) -> tuple[list[Any], int]:
    """The paper's judging on transformers: ONE batched greedy `generate()` of all requests (left-padded, no
    prefix sharing), keeping the top-k log-probabilities of every generated position; and the prompt tokens
    the batch computes, padding included."""
    import torch

    from factory.models.requests import JudgeOutput

    tok = backend.tokenizer
    ids = [backend._judge_ids(r) for r in requests]
    width = max(len(x) for x in ids)
    pad = tok.pad_token_id
    device = backend.spec.device
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    max_tokens, top_k = max(r.max_tokens for r in requests), max(r.top_logprobs for r in requests)
    with torch.inference_mode():
        out = backend.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            do_sample=False,
            top_k=None,
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
        logprobs = [torch.log_softmax(step.float(), dim=-1).topk(top_k) for step in out.logits]
    outputs = []
    for j, (r, x) in enumerate(zip(requests, ids, strict=True)):
        kept, _ = backend._new_tokens(out.sequences[j, width:])
        kept = kept[: r.max_tokens]
        steps = min(len(kept) + 1, len(logprobs), r.max_tokens)  # +1: the stop position too, as `judge` keeps
        tops = []
        for s in range(steps):
            values, indices = logprobs[s].values[j][: r.top_logprobs], logprobs[s].indices[j][: r.top_logprobs]
            tops.append([(tok.decode([t]), float(v)) for t, v in zip(indices.tolist(), values.tolist(), strict=True)])
        text = tok.decode(kept, skip_special_tokens=True)
        outputs.append(JudgeOutput(text, [tok.decode([t]) for t in kept], tops, len(x), len(kept)))
    return outputs, len(ids) * width


class Judge:
    """One loaded backend and how each mode submits to it."""

    def __init__(self, name: str, backend: Any, batch_size: int) -> None:
        self.name, self.backend, self.batch_size = name, backend, batch_size
        self.submissions = 0
        self.padded_tokens: int | None = None

    def reset_cache(self) -> None:
        """Empty vLLM's prefix cache, so a timed mode never reuses prompts an earlier mode computed."""
        if self.name == "vllm" and not self.backend.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache")

    def all_at_once(self, calls: list[Any]) -> dict[str, dict[str, Any]]:
        """Every call in one engine submission (the paper's way)."""
        requests = [c.request for c in calls]
        self.submissions += 1
        if self.name == "transformers":
            outputs, self.padded_tokens = hf_generate_all(self.backend, requests)
        else:
            outputs = self.backend.judge(requests)
        return {c.key: result_of(o) for c, o in zip(calls, outputs, strict=True)}

    def batched(self, calls: list[Any]) -> dict[str, dict[str, Any]]:
        """The calls in order, `batch_size` per `backend.judge` submission (as CallRunner submits a stage's calls)."""
        results: dict[str, dict[str, Any]] = {}
        for i in range(0, len(calls), self.batch_size):
            chunk = calls[i : i + self.batch_size]
            self.submissions += 1
            for c, o in zip(chunk, self.backend.judge([c.request for c in chunk]), strict=True):
                results[c.key] = result_of(o)
        return results


def run_mode(
    mode: str, judge: Judge, rows: dict[str, list[dict[str, Any]]], spec: Any, protocol: Any, max_calls: int | None
) -> list[dict[str, Any]]:
    """One mode's judgment rows (`factory.stages.judgments.judgment_rows`), judged on `judge`."""
    from factory.config.models import ModelSpec
    from factory.models.registry import model_identity
    from factory.stages.judgments import judge_calls, judgment_rows

    identity = model_identity(ModelSpec(**MODELS[judge.name]))
    calls, _ = judge_calls(rows["prompts"], rows["samples"], rows["references"], spec, protocol, identity)
    if max_calls is not None and mode != "adaptive":
        calls = calls[:max_calls]
    if mode == "paper":
        return judgment_rows(calls, judge.all_at_once(calls), spec, protocol).rows
    if mode == "all-pairs":
        return judgment_rows(calls, judge.batched(calls), spec, protocol).rows
    return adaptive_rows(judge, rows, calls, spec, protocol, max_calls)


def adaptive_rows(
    judge: Judge,
    rows: dict[str, list[dict[str, Any]]],
    calls: list[Any],
    spec: Any,
    protocol: Any,
    max_calls: int | None,
) -> list[dict[str, Any]]:
    """`factory.stages.judgments._adaptive_judgments`: every prompt's schedule in lockstep, each round's calls
    judged together."""
    from factory.judge.adaptive import Adaptive
    from factory.stages.judgments import judgment_rows, pair_probability, schedule_seed
    from factory.stages.samples import distinct_samples

    by_pair: dict[tuple[str, str], list[Any]] = {}
    for c in calls:
        by_pair.setdefault((c.meta["sample_a"], c.meta["sample_b"]), []).append(c)
    schedules = {
        pid: Adaptive(ids, seed=schedule_seed(pid), max_calls=max_calls)
        for pid, ids in distinct_samples(rows["samples"]).items()
    }
    out: list[dict[str, Any]] = []
    while True:
        asked = [(s, a, b) for s in schedules.values() for a, b in s.next_round()]
        if not asked:
            break
        batch = [c for _, a, b in asked for c in by_pair.get((a, b), [])]
        answered = judgment_rows(batch, judge.batched(batch), spec, protocol).rows
        votes: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in answered:
            votes.setdefault((row["sample_a"], row["sample_b"]), []).append(row)
        for schedule, a, b in asked:
            found = votes.get((a, b))
            schedule.record(a, b, pair_probability(found, spec.scoring)[0] if found else None)
        out += answered
    return out


def pairs_of(mode: str, rows: dict[str, list[dict[str, Any]]], judgments: list[dict[str, Any]], scoring: str) -> Any:
    """prompt_id -> (chosen, rejected), as the scores and pairs stages make them."""
    from factory.config.labeling import PairsSpec
    from factory.stages.pairs import pair_rows
    from factory.stages.scores import adaptive_score_rows, score_rows

    score = adaptive_score_rows if mode == "adaptive" else score_rows
    scores = score(rows["samples"], judgments, scoring).rows
    made = pair_rows(rows["samples"], scores, PairsSpec()).rows
    return {p["prompt_id"]: (p["chosen_sample_id"], p["rejected_sample_id"]) for p in made}


# --------------------------------------------------------------------------------------------- the bench


def bench_backend(name: str, rows: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[dict[str, Any]]:
    from factory.config.models import ModelSpec
    from factory.models.registry import load_backend

    setup = mode_setup(args)
    spec = ModelSpec(**{**MODELS[name], "batch_size": args.batch_size[name], "threads": args.threads})
    t0 = time.perf_counter()
    backend = load_backend(spec)
    load_s = time.perf_counter() - t0
    judge = Judge(name, backend, args.batch_size[name])
    warm = {k: v[:1] for k, v in rows.items() if k != "samples"}
    warm["samples"] = [s for s in rows["samples"] if s["prompt_id"] == rows["prompts"][0]["prompt_id"]]
    timed: dict[str, tuple[float, list[dict[str, Any]], int, int | None]] = {}
    try:
        for mode in args.modes:  # warm-up: first-call allocations stay out of the figures
            run_mode(mode, judge, warm, *setup[mode], max_calls=2)
        for mode in args.modes:
            judge.reset_cache()
            judge.submissions, judge.padded_tokens = 0, None
            t0 = time.perf_counter()
            judgments = run_mode(mode, judge, rows, *setup[mode], max_calls=None)
            timed[mode] = (time.perf_counter() - t0, judgments, judge.submissions, judge.padded_tokens)
    finally:
        backend.close()
    prompts = [p["prompt_id"] for p in rows["prompts"]]
    pairs = {mode: pairs_of(mode, rows, timed[mode][1], setup[mode][0].scoring) for mode in timed}
    verdicts = {m: {(j["sample_a"], j["sample_b"]): j["verdict"] for j in timed[m][1]} for m in timed}
    base = "paper" if "paper" in timed else None
    out = []
    for mode, (seconds, judgments, submissions, padded) in timed.items():
        made = len(pairs[mode])
        row: dict[str, Any] = {
            "backend": name,
            "mode": mode,
            "load_s": round(load_s, 1),
            "prompts": len(prompts),
            "judge_calls": len(judgments),
            "submissions": submissions,
            "judge_s": round(seconds, 2),
            "judgments_per_s": round(len(judgments) / seconds, 2),
            "tokens_in": sum(j["tokens_in"] or 0 for j in judgments),
            "padded_tokens_in": padded,
            "parsed": sum(j["verdict"] is not None for j in judgments),
            "pairs": made,
            "pairs_per_judge_s": round(made / seconds, 4),
        }
        if base is not None:
            paper_s, paper_pairs = timed[base][0], len(pairs[base])
            row["speedup_vs_paper"] = round((made / seconds) / (paper_pairs / paper_s), 2) if paper_pairs else None
            row["same_pair_as_paper"] = sum(pairs[mode].get(p) == pairs[base].get(p) for p in prompts)
            both = [(v, verdicts[base].get(k)) for k, v in verdicts[mode].items() if k in verdicts[base]]
            row["same_verdict_as_paper"] = f"{sum(a == b and a is not None for a, b in both)}/{len(both)}"
        out.append(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """The figures as a Markdown table."""
    lines = [
        "| backend | mode | judge calls | submissions | judge s | judgments/s | prompt tokens (padded) | parsed "
        "| pairs | **pairs / judge-s** | × paper | same pair as paper | same verdict as paper |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        same = r.get("same_pair_as_paper")
        padded = "" if r["padded_tokens_in"] is None else f" ({r['padded_tokens_in']:,})"
        shown = "" if same is None else f"{same}/{r['prompts']} ({100 * same / r['prompts']:.0f} %)"
        lines.append(
            f"| {r['backend']} | {r['mode']} | {r['judge_calls']} | {r['submissions']} | {r['judge_s']} "
            f"| {r['judgments_per_s']} | {r['tokens_in']:,}{padded} | {r['parsed']}/{r['judge_calls']} | {r['pairs']} "
            f"| **{r['pairs_per_judge_s']}** | {r.get('speedup_vs_paper', '')} | {shown} "
            f"| {r.get('same_verdict_as_paper', '')} |"
        )
    loads = sorted({(r["backend"], r["load_s"]) for r in rows})
    lines.append("")
    lines.append("load (excluded): " + ", ".join(f"{b} {s} s" for b, s in loads))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=5, choices=[2, 3, 4, 5])
    parser.add_argument("--backends", nargs="+", default=["vllm", "transformers"], choices=sorted(MODELS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="run in this order")
    parser.add_argument("--judge-tokens", type=int, default=8, help="tokens factory's prefilled judge may generate")
    parser.add_argument("--top-logprobs", type=int, default=20, help="factory's top-k (the paper's is 5)")
    parser.add_argument("--vllm-batch", type=int, default=256, help="vLLM submission size (factory's modes)")
    parser.add_argument("--hf-batch", type=int, default=8, help="transformers forward batch (factory's modes)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (transformers)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.batch_size = {"vllm": args.vllm_batch, "transformers": args.hf_batch}
    rows = factory_rows(load_inputs(args.data, args.prompts, args.samples))
    results = []
    for name in args.backends:  # one engine at a time
        results += bench_backend(name, rows, args)
        print(table([r for r in results if r["backend"] == name]), flush=True)
    print(json.dumps(results, indent=2))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":  # vLLM starts its workers with spawn: the entry point must be guarded
    main()
