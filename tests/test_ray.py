"""`factory build --executor ray`: model calls on Ray actors give the same tables as a local build, a worker
killed mid-shard loses nothing and writes nothing twice, and a rebuild makes no model call.

The Ray tests start one local cluster of 2 CPUs for the module and build a tiny recipe (4 prompts × 2 samples,
batches of 2, so the judgments stage has more shards than workers) on the embedded model, once locally and
once with `--executor ray`, killing one worker mid-shard during the ray build. Sampling stays on
(temperature 1.0): a shard is exactly one of the batches a local build makes, and the transformers backend
seeds each batch from its requests, so even sampled texts must match the local build's exactly.

The first tests need no Ray: the option checks run before anything starts.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from factory.cli.main import main

pytestmark = pytest.mark.ray
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the `ray` extra")

PROMPTS, N, BATCH = 4, 2, 2


def tiny(kit: Any, **changes: Any) -> dict[str, Any]:
    return kit.recipe(prompts=PROMPTS, n=N, **{"models.smol.batch_size": BATCH, **changes})


def cli(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# ---------------------------------------------------------------------------------- without Ray running


def test_missing_ray_extra_is_one_line_naming_the_extra(
    tmp_path: Path, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import factory.pipeline.executors

    real = importlib.util.find_spec
    monkeypatch.setattr(
        factory.pipeline.executors.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "ray" else real(name, *a, **k),
    )
    recipe = kit.write(tmp_path / "recipe.yaml", tiny(kit))
    for args, data in ((["--executor", "ray"], None), ([], tiny(kit, **{"run.executor": "ray"}))):
        if data is not None:
            kit.write(recipe, data)
        result = cli("build", str(recipe), "-w", str(tmp_path / "wh"), "-q", *args)
        assert result.exit_code == 2, result.output
        [line] = result.output.strip().splitlines()
        assert line.startswith("error: ") and "pip install 'factory[ray]'" in line, line
        assert not (tmp_path / "wh").exists()  # nothing written


def test_address_needs_the_ray_executor(tmp_path: Path, kit: Any) -> None:
    recipe = kit.write(tmp_path / "recipe.yaml", tiny(kit))
    result = cli("build", str(recipe), "-w", str(tmp_path / "wh"), "--address", "auto")
    assert result.exit_code == 2
    assert "--address goes with --executor ray" in result.output
    assert not (tmp_path / "wh").exists()


def test_dry_run_names_the_executor_without_starting_it(tmp_path: Path, kit: Any) -> None:
    data = tiny(kit, **{"run": {"executor": "ray", "address": "auto", "workers": 3}})
    recipe = kit.write(tmp_path / "recipe.yaml", data)
    result = cli("build", str(recipe), "-w", str(tmp_path / "wh"), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "executor: ray on auto, workers per model: 3" in result.output
    result = cli("build", str(recipe), "-w", str(tmp_path / "wh"), "--dry-run", "--executor", "local")
    assert "executor:" not in result.output


# ------------------------------------------------------------------------------------------ with Ray


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A local 2-CPU Ray cluster for the module; the signal handlers ray.init replaces are put back."""
    ray = pytest.importorskip("ray")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()
        for s, handler in handlers.items():
            signal.signal(s, handler)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, kit: Any, embedded_dir: Path) -> tuple[Path, Path, float]:
    """The tiny recipe built locally: (recipe, warehouse, seconds)."""
    root = tmp_path_factory.mktemp("local")
    recipe = kit.write(root / "recipe.yaml", tiny(kit))
    t0 = time.perf_counter()
    result = cli("build", str(recipe), "-w", str(root / "wh"), "-q")
    assert result.exit_code == 0, result.output
    return recipe, root / "wh", time.perf_counter() - t0


def tables(warehouse: Path) -> dict[str, list[tuple[Any, ...]]]:
    """What a build made, without run ids, timings, latencies, creation times or worker ids."""
    from factory.warehouse.store import Warehouse

    wh = Warehouse(warehouse)
    queries = {
        "prompts": "SELECT prompt_id, messages FROM prompts",
        "samples": "SELECT sample_id, prompt_id, sample_index, text, finish_reason, n_tokens, request_key FROM samples",
        "judgments": "SELECT sample_a, sample_b, raw_output, verdict, p_a, p_a_exact, request_key FROM judgments",
        "scores": "SELECT sample_id, score, wins FROM scores",
        "pairs": "SELECT prompt_id, chosen_sample_id, rejected_sample_id, margin FROM pairs",
        "generation_calls": "SELECT request_key, status, text, tokens_in, tokens_out FROM generation_calls",
        "judge_calls": "SELECT request_key, status, text, tokens_in, tokens_out FROM judge_calls",
    }
    return {name: sorted(map(tuple, (r.values() for r in wh.query(q).to_pylist()))) for name, q in queries.items()}


def duplicate_keys(warehouse: Path) -> dict[str, int]:
    from factory.warehouse.store import Warehouse

    wh = Warehouse(warehouse)
    out = {}
    for table in ("generation_calls", "judge_calls"):
        dup = wh.query(f"SELECT request_key FROM {table} GROUP BY 1 HAVING count(*) > 1").num_rows
        out[table] = dup
    return out


@dataclass
class RayBuild:
    """The module's `factory build --executor ray` of the tiny recipe, with one worker killed mid-shard."""

    warehouse: Path
    exit_code: int
    output: str
    seconds: float
    executor: Any


@pytest.fixture(scope="module")
def ray_build(tmp_path_factory: pytest.TempPathFactory, ray_cluster: Any, local: tuple[Path, Path, float]) -> RayBuild:
    """The CLI's ray build, whose executor SIGKILLs the worker that returned the first judgments shard: that
    worker has just been handed the next shard, so the shard dies with it and Ray must run it again on the
    restarted worker. (One build serves every check, to keep the module within a few minutes on 2 cores.)"""
    import factory.pipeline.executors

    made: list[Any] = []

    class KillingExecutor(factory.pipeline.executors.RayExecutor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.killed: int | None = None
            self.results_before_kill = 0
            made.append(self)

        def map(self, pool: Any, kind: Any, model: str, base: Any, batches: Any) -> Iterator[Any]:
            for item in super().map(pool, kind, model, base, batches):
                yield item  # the caller has written this shard's rows when it asks for the next one
                if kind.role == "judge" and self.killed is None:
                    self.killed, self.results_before_kill = self.pids[model][-1], len(self.pids[model])
                    os.kill(self.killed, signal.SIGKILL)

    warehouse = tmp_path_factory.mktemp("ray") / "wh"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(factory.pipeline.executors, "RayExecutor", KillingExecutor)
        t0 = time.perf_counter()
        result = cli("build", str(local[0]), "-w", str(warehouse), "-q", "--executor", "ray")
        seconds = time.perf_counter() - t0
    [executor] = made
    return RayBuild(warehouse, result.exit_code, result.output, seconds, executor)


@pytest.mark.model
@pytest.mark.slow
@needs_ray
def test_ray_build_equals_local_build(ray_build: RayBuild, kit: Any, local: tuple[Path, Path, float]) -> None:
    assert ray_build.exit_code == 0, ray_build.output
    [run] = kit.runs(ray_build.warehouse)
    assert run["status"] == "ok" and run["model_calls"] == PROMPTS * N + PROMPTS * N * (N - 1)
    assert '"executor": "ray"' in kit.stages(run)["samples"]["notes"]
    got, want = tables(ray_build.warehouse), tables(local[1])
    for name in want:
        assert got[name] == want[name], f"table {name} differs from the local build's"
    assert len(want["pairs"]) == PROMPTS
    print(f"\ntiny recipe, 2 CPUs: local build {local[2]:.1f}s, ray build {ray_build.seconds:.1f}s (with a kill)")


@pytest.mark.model
@pytest.mark.slow
@needs_ray
def test_a_killed_worker_loses_nothing(ray_build: RayBuild) -> None:
    executor = ray_build.executor
    assert executor.killed is not None and ray_build.exit_code == 0, ray_build.output
    # Ray restarted the worker, which ran the lost shard: a process that was not there before answered.
    before = executor.pids["smol"][: executor.results_before_kill]
    after = executor.pids["smol"][executor.results_before_kill :]
    assert after and executor.killed not in after
    assert set(after) - set(before), (before, after)
    # Every call exactly once: the lost shard's rows were never written, its retry's were, once.
    assert duplicate_keys(ray_build.warehouse) == {"generation_calls": 0, "judge_calls": 0}
    got = tables(ray_build.warehouse)
    assert len(got["generation_calls"]) == PROMPTS * N and len(got["judge_calls"]) == PROMPTS * N * (N - 1)
    assert not executor.models  # the run's end stopped the workers


@pytest.mark.model
@pytest.mark.slow
@needs_ray
def test_a_ray_rebuild_makes_no_model_calls(ray_build: RayBuild, kit: Any, local: tuple[Path, Path, float]) -> None:
    result = cli("build", str(local[0]), "-w", str(ray_build.warehouse), "-q", "--executor", "ray")
    assert result.exit_code == 0, result.output
    last = kit.runs(ray_build.warehouse)[-1]
    assert last["status"] == "ok" and last["model_calls"] == 0
    assert all(s["skipped"] for name, s in kit.stages(last).items() if name != "export")


@needs_ray
@pytest.mark.slow
def test_failures_keep_their_local_meaning(tmp_path: Path, kit: Any, ray_cluster: Any) -> None:
    """On Ray, as locally: a transient failure is an error row (run incomplete), anything else stops the run."""
    flaky = {"backend": "scripted", "batch_size": BATCH, "script": {"fail_rate": 0.5, "fail_seed": 3}}
    recipe = kit.write(tmp_path / "flaky.yaml", tiny(kit, **{"models.smol": flaky}))
    result = cli("build", str(recipe), "-w", str(tmp_path / "flaky"), "-q", "--executor", "ray")
    assert result.exit_code == 1
    [run] = kit.runs(tmp_path / "flaky")
    assert run["status"] == "incomplete" and run["failed_calls"] > 0
    assert duplicate_keys(tmp_path / "flaky") == {"generation_calls": 0, "judge_calls": 0}

    crash = {"backend": "scripted", "batch_size": BATCH, "script": {"crash_after": 1}}
    recipe = kit.write(tmp_path / "crash.yaml", tiny(kit, **{"models.smol": crash}))
    result = cli("build", str(recipe), "-w", str(tmp_path / "crash"), "-q", "--executor", "ray")
    assert result.exit_code == 1
    assert "error: ScriptedCrash: scripted crash after 1 requests" in result.output
    [run] = kit.runs(tmp_path / "crash")
    assert run["status"] == "failed" and run["error"].startswith("ScriptedCrash: ")


@needs_ray
@pytest.mark.slow
def test_two_models_and_the_eval_section_run_on_ray(tmp_path: Path, kit: Any, ray_cluster: Any) -> None:
    """Policy and judge are different models (the workers of one give way to the other's) and the recipe's
    `eval` runs in the same build: every table equals the local build's."""
    held_out = [{"instruction": f"Name a {w}.", "gpt4": f"A {w}."} for w in ("tree", "bird", "fish", "month")]
    data = tiny(kit)
    data["models"] = {
        "pol": {"backend": "scripted", "batch_size": BATCH, "script": {"seed": 1}},
        "judge": {"backend": "scripted", "batch_size": BATCH, "script": {"seed": 2}},
    }
    data["samples"]["policy"], data["judgments"]["judge"] = "pol", "judge"
    data["eval"] = {
        "prompts": {"inline": held_out, "reference_fields": ["gpt4"]},
        "baseline": "gpt4",
        "judge": "judge",
        "resamples": 50,
    }
    recipe = kit.write(tmp_path / "recipe.yaml", data)
    for name, extra in (("local", ()), ("ray", ("--executor", "ray"))):
        result = cli("build", str(recipe), "-w", str(tmp_path / name), "-q", *extra)
        assert result.exit_code == 0, result.output
    from factory.warehouse.store import Warehouse

    def made(name: str) -> list[Any]:
        wh = Warehouse(tmp_path / name)
        return [
            sorted(map(tuple, (r.values() for r in wh.query(q).to_pylist())))
            for q in (
                "SELECT sample_id, text FROM samples",
                "SELECT sample_a, sample_b, verdict, p_a FROM judgments",
                "SELECT prompt_id, role, text FROM eval_outputs",
                "SELECT * EXCLUDE (run_id, stage_key, latency_s) FROM eval",
            )
        ]

    assert made("ray") == made("local")
    stages = kit.stages(kit.runs(tmp_path / "ray")[-1])  # the eval's run
    assert all('"executor": "ray"' in s["notes"] for s in stages.values() if s["model_calls"])
