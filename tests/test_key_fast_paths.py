"""The fast paths to keys render the very text the plain path renders, so no request key or prompt hash moves."""

from __future__ import annotations

from typing import Any

import pytest

from factory.config.models import SamplingParams
from factory.core.keys import canonical_json, canonical_messages, canonical_object, stable_hash
from factory.judge.protocols import PROTOCOLS
from factory.models.chat_tokens import neutralise_messages
from factory.models.requests import (
    GenerationCaller,
    generation_call,
    judge_call,
    judge_caller,
    prompt_hash,
    request_group,
    request_key,
)

TEXTS = [
    "plain",
    'quotes " and \\ backslashes',
    "control \x00\x1f\t\n and unicode é 漢字 😀 \u2028",
    "markers <|im_start|>assistant\n[INST] </s>",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_judge_call_keys_equal_the_plain_rendering(text: str) -> None:
    identity: dict[str, Any] = {"backend": "scripted", "seed": 3, "path": None, "options": {"z": 1.5, "a": [True]}}
    messages = [{"role": "system", "content": "judge"}, {"role": "user", "content": f"A: {text}\nB: {text[::-1]}"}]
    call = judge_call(identity, messages, "Output (", 8, 20, prompt_id="p")
    sent, _ = neutralise_messages(messages)
    payload = {"messages": sent, "prefill": "Output (", "max_tokens": 8, "top_logprobs": 20}
    assert call.key == request_key("judge", identity, payload)
    assert call.meta["prompt_hash"] == prompt_hash(sent) == stable_hash(sent, 16)


def test_canonical_object_is_canonical_json_of_the_object() -> None:
    obj: dict[str, Any] = {"zeta": [1, {"b": 2, "a": None}], "é": "x", "A": 1.25, "a": "\x7f", "_": {}}
    assert canonical_object({k: canonical_json(v) for k, v in obj.items()}) == canonical_json(obj)


def test_the_shared_encoder_still_refuses_and_detects_cycles() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="Circular reference"):
        canonical_json(cycle)
    with pytest.raises(TypeError):
        canonical_json({"a": {1, 2}})
    assert canonical_json({"b": [1], "a": "é"}) == '{"a":"é","b":[1]}'  # a failure leaves no state behind


class Text(str):
    """A str subclass: rendered like a str by the encoder, but not the shape the fast path takes."""


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": t} for t in TEXTS] + [{"content": "x", "role": "user"}],
        [],
        [{"role": "user", "content": "x", "name": "extra key"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": Text("sub")}],
        [{"role": "user"}, {"content": "x", "role": "user"}],
        ({"role": "user", "content": "a tuple"},),
        [["not", "a", "dict"]],
    ],
)
def test_canonical_messages_is_canonical_json(messages: Any) -> None:
    assert canonical_messages(messages) == canonical_json(messages)


@pytest.mark.parametrize("protocol", ["refeval", "llmbar-base", "cot"])
def test_calls_from_turns_equal_calls_from_messages(protocol: str) -> None:
    p = PROTOCOLS[protocol]
    make = judge_caller({"backend": "scripted", "seed": 3}, p.prefill, 8, 20)
    # Pieces that split a marker between them, and a value that looks like a placeholder.
    values = [*TEXTS, "<|im_", "end|>", "{output_b}"]
    for a in values:
        for b in values:
            ref = f"ref {b}" if p.uses_reference else None
            plain = make(p.render(a, a, b, ref), prompt_id="p")
            fast = make.from_turns(p.turns(a, a, b, ref), prompt_id="p")
            assert (fast.key, fast.meta, fast.neutralised, fast.request) == (
                plain.key,
                plain.meta,
                plain.neutralised,
                plain.request,
            )


@pytest.mark.parametrize("text", TEXTS)
def test_generation_call_keys_equal_the_plain_rendering(text: str) -> None:
    identity: dict[str, Any] = {"backend": "scripted", "seed": 3, "options": {"z": 1.5, "a": [True]}}
    params = SamplingParams(max_tokens=64, temperature=0.7)
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": text}]
    calls = GenerationCaller(identity, params, 5).calls(messages, range(3), {"prompt_id": "p"}, "sample_index")
    sent, _ = neutralise_messages(messages)
    for i, call in enumerate(calls):
        payload = {"messages": sent, "params": params.model_dump(), "seed": 5, "sample_index": i}
        assert call.key == request_key("generate", identity, payload)
        assert call.meta == {"prompt_id": "p", "sample_index": i}
        # The group the runner merges a prompt's samples by is the one it would render from the request.
        assert call.group == request_group(call.request)
        assert call == generation_call(identity, messages, params, 5, i, prompt_id="p", sample_index=i)
