"""Judgments per second: factory's batched, prefix-shared logprob judging vs a naive one-pair-at-a-time loop.

Same inputs, same backend, same protocol (RefEval). Inputs: the first P prompts of an LLMBar-format JSONL
(instruction, output_1, output_2, reference), each with S fixed "samples" (output_1, output_2, the reference,
output_2 cut to half), every ordered pair judged: P·S·(S−1) judgments.

- factory: `backend.judge` on the requests in the order a build makes them (prompt by prompt), in batches of
  `--batch-size` (what CallRunner submits); the answer is prefilled with `Output (` and only the marker
  token's top-k log-probabilities are needed, but it generates up to `--judge-tokens` (default 8, the
  recipe default `judgments.max_tokens`; greedy decoding stops early at the end of the turn).
- naive: one request at a time, greedy generation without prefill of `--naive-tokens` tokens (enough for
  `Output (a)`), the way a hand-written loop would ask for a verdict. vLLM's prefix cache stays on for both.

Engine/model load time is reported apart and excluded; each mode is warmed up once before timing.

    python bench/judge_throughput.py --prompts 8 --samples 4 --backends vllm transformers
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


def load_inputs(data: Path, prompts: int, samples: int) -> list[dict[str, Any]]:
    """Rows with an instruction, a reference and `samples` candidate outputs."""
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for row in rows[:prompts]:
        candidates = [row["output_1"], row["output_2"], row["reference"], row["output_2"][: len(row["output_2"]) // 2]]
        out.append({"instruction": row["instruction"], "reference": row["reference"], "samples": candidates[:samples]})
    return out


def judge_requests(inputs: list[dict[str, Any]], max_tokens: int, top_logprobs: int) -> list[Any]:
    """Every ordered pair of every prompt's samples, prompt by prompt (as `stages.judge_calls` orders them)."""
    from factory.backends import JudgeRequest
    from factory.protocols import get_protocol

    protocol = get_protocol("refeval")
    requests = []
    for row in inputs:
        for i, a in enumerate(row["samples"]):
            for j, b in enumerate(row["samples"]):
                if i != j:
                    messages = protocol.render(row["instruction"], a, b, row["reference"])
                    requests.append(JudgeRequest(messages, protocol.prefill, max_tokens, top_logprobs))
    return requests


def run_factory(backend: Any, requests: list[Any], batch_size: int) -> tuple[float, list[str | None]]:
    """Seconds for batched prefilled judging, and the verdict of each judgment."""
    from factory.protocols import parse_verdict

    t0 = time.perf_counter()
    outputs: list[Any] = []
    for i in range(0, len(requests), batch_size):
        outputs += backend.judge(requests[i : i + batch_size])
    seconds = time.perf_counter() - t0
    verdicts = [
        None if isinstance(o, Exception) else parse_verdict(r.prefill, o.text, o.tokens, o.top_logprobs).verdict
        for r, o in zip(requests, outputs, strict=True)
    ]
    return seconds, verdicts


def run_naive(backend: Any, requests: list[Any], max_tokens: int) -> tuple[float, list[str | None]]:
    """Seconds for one greedy un-prefilled generation per judgment, and the verdict each one states."""
    from factory.backends import GenerationRequest
    from factory.protocols import VERDICT_RE, marker_of
    from factory.recipe import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    texts = []
    for r in requests:
        (gens,) = backend.generate([GenerationRequest(r.messages, params, 0, (0,))])
        texts.append(gens[0].text)
    seconds = time.perf_counter() - t0
    verdicts = []
    for text in texts:
        match = VERDICT_RE.search(text)
        verdicts.append(marker_of(match.group(1)) if match else None)
    return seconds, verdicts


def bench_backend(name: str, requests: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    from factory.backends import load_backend
    from factory.recipe import ModelSpec

    spec = ModelSpec(**{**MODELS[name], "batch_size": args.batch_size[name], "threads": args.threads})
    t0 = time.perf_counter()
    backend = load_backend(spec)
    load_s = time.perf_counter() - t0
    try:
        run_factory(backend, requests[:2], 2)  # warm-up: first-call allocations stay out of the figures
        run_naive(backend, requests[:1], args.naive_tokens)
        factory_s, factory_verdicts = run_factory(backend, requests, args.batch_size[name])
        naive_s, naive_verdicts = run_naive(backend, requests, args.naive_tokens)
    finally:
        backend.close()
    n = len(requests)
    return {
        "backend": name,
        "judgments": n,
        "load_s": round(load_s, 1),
        "factory_s": round(factory_s, 2),
        "naive_s": round(naive_s, 2),
        "factory_judgments_per_s": round(n / factory_s, 2),
        "naive_judgments_per_s": round(n / naive_s, 2),
        "speedup": round(naive_s / factory_s, 2),
        "factory_parsed": sum(v is not None for v in factory_verdicts),
        "naive_parsed": sum(v is not None for v in naive_verdicts),
        "same_verdict": sum(a == b and a is not None for a, b in zip(factory_verdicts, naive_verdicts, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4, choices=[2, 3, 4])
    parser.add_argument("--backends", nargs="+", default=["vllm", "transformers"], choices=sorted(MODELS))
    parser.add_argument("--judge-tokens", type=int, default=8, help="tokens factory's judge may generate")
    parser.add_argument("--naive-tokens", type=int, default=8, help="tokens the naive loop generates")
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--vllm-batch", type=int, default=256, help="vLLM submission size")
    parser.add_argument("--hf-batch", type=int, default=8, help="transformers forward batch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (transformers)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.batch_size = {"vllm": args.vllm_batch, "transformers": args.hf_batch}
    inputs = load_inputs(args.data, args.prompts, args.samples)
    requests = judge_requests(inputs, args.judge_tokens, args.top_logprobs)
    rows = [bench_backend(name, requests, args) for name in args.backends]  # one engine at a time
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":  # vLLM starts its workers with spawn: the entry point must be guarded
    main()
