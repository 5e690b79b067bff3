"""A build killed mid-stage resumes: no row lost or duplicated, and finished calls are never made again.

`factory build` runs in its own process with batch_size 1, so sample batches reach the warehouse one prompt
at a time; the test stops it as soon as the first batch is on disk, then builds again to completion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from factory.warehouse.store import Warehouse

pytestmark = [pytest.mark.model, pytest.mark.slow]

N = 2
STARTUP_LIMIT_S = 300  # generous: loading torch and the model on a busy 2-core machine


def call_rows(warehouse: Path, table: str) -> list[dict[str, Any]]:
    """Every row of a calls table's finished parts and compacted files, less the files that a compacted file
    says it holds (temporary files are never globbed)."""
    folder = warehouse / "calls" / table
    compacted = sorted(folder.glob("compact-*.parquet"))
    covered = {name for c in compacted for name in json.loads(pq.read_metadata(c).metadata[b"factory.covers"])}
    files = [p for p in sorted(folder.glob("part-*.parquet")) + compacted if p.name not in covered]
    return [row for p in files for row in pq.read_table(p).to_pylist()]


def default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default. A CI job started in the background runs pytest
    with SIGINT ignored, and an ignored signal stays ignored across exec: the build would never see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_stop(factory_exe: str, recipe: Path, warehouse: Path, sig: signal.Signals) -> int:
    """Start a build, send `sig` once its first sample batch is written, return its exit code."""
    folder = warehouse / "calls" / "generation_calls"
    proc = subprocess.Popen(
        [factory_exe, "build", str(recipe), "-w", str(warehouse), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while not any(folder.glob("part-*.parquet")):
            if proc.poll() is not None:
                pytest.fail(f"the build ended (exit {proc.returncode}) before writing a batch: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no sample batch written within {STARTUP_LIMIT_S} s")
            time.sleep(0.05)
        os.kill(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def check_resumed(warehouse: Path, prompts: int, written_before: int, kit: Any) -> None:
    """The finished warehouse holds each row once, and the resuming run made only the missing calls."""
    wh = Warehouse(warehouse)
    samples = wh.query("SELECT * FROM samples").to_pylist()
    assert len(samples) == prompts * N
    assert len({s["sample_id"] for s in samples}) == prompts * N
    assert Counter((s["prompt_id"], s["sample_index"]) for s in samples).most_common(1)[0][1] == 1
    assert all(s["error"] is None and s["text"] is not None for s in samples)

    judgments = wh.query("SELECT * FROM judgments").to_pylist()
    assert len(judgments) == prompts * N * (N - 1)
    assert len({(j["sample_a"], j["sample_b"]) for j in judgments}) == len(judgments)
    # Two identical sample texts render the same judge prompt, hence the same request key; otherwise unique.
    assert len({j["request_key"] for j in judgments}) == len({j["prompt_hash"] for j in judgments})

    generated = [r for r in call_rows(warehouse, "generation_calls") if r["status"] == "ok"]
    assert len(generated) == prompts * N, "a sample call was made twice, or one is missing"
    assert len({r["request_key"] for r in generated}) == prompts * N
    judged = [r for r in call_rows(warehouse, "judge_calls") if r["status"] == "ok"]
    assert len(judged) == len(judgments)

    resumed = kit.runs(warehouse)[-1]
    assert resumed["status"] == "ok"
    samples_stage = kit.stages(resumed)["samples"]
    assert samples_stage["cached_calls"] == written_before
    assert samples_stage["model_calls"] == prompts * N - written_before


def test_kill_9_mid_sampling_then_resume(tmp_path: Path, kit: Any, factory_exe: str, cli_build: Any) -> None:
    prompts = 6
    models = {"smol": {"backend": "embedded", "threads": 1, "batch_size": 1}}
    recipe = kit.write(tmp_path / "recipe.yaml", kit.recipe(prompts, N, models=models))
    warehouse = tmp_path / "wh"

    code = start_and_stop(factory_exe, recipe, warehouse, signal.SIGKILL)
    assert code == -signal.SIGKILL
    written = len(call_rows(warehouse, "generation_calls"))
    assert 0 < written < prompts * N, f"the kill came too late to test resuming ({written} calls written)"
    assert written % N == 0, "batch_size 1 flushes one prompt's n samples at a time"
    [killed] = kit.runs(warehouse)
    assert killed["status"] == "running"  # a kill -9 leaves no chance to record anything else

    result = cli_build(recipe, warehouse)
    assert result.exit_code == 0, result.output
    check_resumed(warehouse, prompts, written, kit)


def test_ctrl_c_exits_130_and_resumes(tmp_path: Path, kit: Any, factory_exe: str, cli_build: Any) -> None:
    prompts = 4
    models = {"smol": {"backend": "embedded", "threads": 1, "batch_size": 1}}
    recipe = kit.write(tmp_path / "recipe.yaml", kit.recipe(prompts, N, models=models))
    warehouse = tmp_path / "wh"

    code = start_and_stop(factory_exe, recipe, warehouse, signal.SIGINT)
    assert code == 130
    written = len(call_rows(warehouse, "generation_calls"))
    assert 0 < written < prompts * N, f"the interrupt came too late to test resuming ({written} calls written)"
    [interrupted] = kit.runs(warehouse)
    assert interrupted["status"] == "interrupted"
    assert interrupted["finished_at"] is not None

    result = cli_build(recipe, warehouse)
    assert result.exit_code == 0, result.output
    check_resumed(warehouse, prompts, written, kit)
