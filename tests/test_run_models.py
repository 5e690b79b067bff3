"""`Run` without a model pool: a command that calls no model opens its run without one, and a stage that asks
for a model call in such a run is a programming error named in one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from factory.config.models import ModelSpec, SamplingParams
from factory.models.registry import model_identity
from factory.models.requests import generation_call
from factory.pipeline.run import Run
from factory.pipeline.stage import Context, Stage, StageOutput, StageStats, execute
from factory.warehouse.store import Warehouse


def test_run_without_models_runs_stages_that_call_none(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    run = Run(wh, "plain", "h")
    stage = Stage("numbers", (), lambda ctx: 1, lambda ctx, st: StageOutput([{"n": 1}]), sink=True)
    with run:
        execute([stage], Context(None, run.call, run_id=run.run_id), run)
    assert run.status == "ok" and run.models is None


def test_run_without_models_refuses_a_model_call(tmp_path: Path) -> None:
    wh = Warehouse(tmp_path / "wh")
    identity = model_identity(ModelSpec(backend="scripted"))
    calls = [generation_call(identity, [{"role": "user", "content": "hi"}], SamplingParams(), 0, 0, prompt_id="p")]

    def compute(ctx: Context, st: StageStats) -> StageOutput:
        ctx.call("m", "asks", calls, st)
        return StageOutput([])

    run = Run(wh, "plain", "h")
    with pytest.raises(RuntimeError, match="opened without a model pool"), run:
        execute([Stage("asks", (), lambda ctx: 1, compute)], Context(None, run.call, run_id=run.run_id), run)
    assert run.status == "failed"
