"""Shared fixtures: the scripted recipe most scripted tests start from, and the tests that run the real
embedded model (markers `model` and `slow`).

Fixtures here build nothing until a test asks for them, so the fast unit tests never load torch. Test modules
reach the helpers through the `kit` fixture (they do not import conftest).
"""

from __future__ import annotations

import copy
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# A tiny recipe: every test that builds starts from it and changes what it checks. One torch thread, because
# the CI machine has two cores and other work on the second one makes two threads crawl (docs/DESIGN.md §6).
TINY_RECIPE: dict[str, Any] = {
    "name": "modeltest",
    "models": {"smol": {"backend": "embedded", "threads": 1, "batch_size": 8}},
    "prompts": {
        "inline": [
            {"instruction": "Name a color.", "ref": "Blue."},
            {"instruction": "Say hello in one word.", "ref": "Hello."},
            {"instruction": "Name a fruit.", "ref": "Apple."},
            {"instruction": "What is 2+2?", "ref": "4"},
            {"instruction": "Name an animal.", "ref": "Cat."},
            {"instruction": "Name a country.", "ref": "France."},
        ],
        "reference_fields": ["ref"],
    },
    "references": [{"name": "human", "kind": "column"}],
    "samples": {"policy": "smol", "n": 2, "params": {"temperature": 1.0, "max_tokens": 10}},
    "judgments": {"judge": "smol", "protocol": "refeval", "reference": "human", "max_tokens": 4},
    "export": {"test_fraction": 0.5},
}


# The scripted recipe: one model `m` on the `scripted` backend (no torch, milliseconds) is policy and judge.
SCRIPTED_RECIPE: dict[str, Any] = {
    "name": "scripted",
    "models": {"m": {"backend": "scripted", "batch_size": 4}},
    "prompts": {
        "inline": [
            {"instruction": "Name a color.", "ref": "Blue."},
            {"instruction": "Say hi.", "ref": "Hi."},
            {"instruction": "Name a fruit.", "ref": "Apple."},
            {"instruction": "What is 2+2?", "ref": "4"},
        ],
        "reference_fields": ["ref"],
    },
    "references": [{"name": "human", "kind": "column"}],
    "samples": {"policy": "m", "n": 3, "params": {"max_tokens": 12}},
    "judgments": {"judge": "m", "protocol": "refeval", "reference": "human"},
    "export": {"test_fraction": 0.25},
}


def edited(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of `base` with dotted-path edits such as `{"judgments.protocol": "refmatch"}` (pass them as
    `**{...}`); None deletes the key."""
    data = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def write_edited(base: dict[str, Any], path: Path, **changes: Any) -> Path:
    """`base` with dotted-path edits (`edited`), written to `path` as YAML; returns `path`."""
    return write_recipe(path, edited(base, **changes))


def scripted_recipe(folder: Path, filename: str = "r.yaml", **changes: Any) -> Path:
    """The scripted recipe with dotted-path edits, written to `folder/filename`; returns its path."""
    return write_edited(SCRIPTED_RECIPE, folder / filename, **changes)


def recipe_dict(prompts: int = 2, n: int = 2, **changes: Any) -> dict[str, Any]:
    """The tiny recipe with its first `prompts` prompts and `n` samples each; `changes` are dotted-path edits
    such as `{"judgments.protocol": "refmatch"}` (pass them as `**{...}`; None deletes the key)."""
    if prompts > len(TINY_RECIPE["prompts"]["inline"]):
        raise ValueError(f"the tiny recipe has only {len(TINY_RECIPE['prompts']['inline'])} prompts")
    data = edited(TINY_RECIPE, **{"samples.n": n})
    data["prompts"]["inline"] = data["prompts"]["inline"][:prompts]
    return edited(data, **changes)


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    """Write a recipe mapping as YAML; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# pytest-xdist spreads the suite over workers a test file at a time (pyproject.toml, addopts), so a module's
# fixtures (a loop build, a shared warehouse) are built once. A module with a test that starts a vLLM engine
# (~5 GiB) or a local Ray cluster holds a lock shared by the workers while it runs: no two of them at once.
ONE_AT_A_TIME = ("vllm", "ray")


@pytest.fixture(scope="module", autouse=True)
def one_heavy_module_at_a_time(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    chosen = [item for item in request.session.items if item.module is request.module]
    heavy = any(item.get_closest_marker(name) for item in chosen for name in ONE_AT_A_TIME)
    if not heavy or "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    # The workers' base folders share a parent: the lock lives there, and goes with the session's files.
    with (tmp_path_factory.getbasetemp().parent / "one-at-a-time.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session", autouse=True)
def no_fsync() -> Iterator[None]:
    """Skip fsync in this process. It makes a write survive a power loss, which no test can observe, and on a
    shared disk it costs about a tenth of a second per build; atomicity (write aside, rename into place) is
    unchanged. Builds that tests kill (docs/RELIABILITY.md) run in their own processes and fsync as always."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 converted once to a plain HF folder (under $FACTORY_CACHE or ~/.cache/factory)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from factory.models.hf import embedded_model_dir

    path = embedded_model_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="session")
def factory_exe() -> str:
    """The installed `factory` console script (for tests that must run a build in its own process)."""
    exe = shutil.which("factory")
    if exe is None:
        pytest.skip("the `factory` console script is not on PATH (pip install -e . in the active environment)")
    return exe


@pytest.fixture(scope="session")
def cli_build(embedded_dir: Path) -> Callable[[Path, Path], Any]:
    """Run `factory build RECIPE -w WAREHOUSE -q` in this process; returns click's Result (exit code, output)."""
    from click.testing import CliRunner

    from factory.cli.main import main

    def run(recipe: Path, warehouse: Path) -> Any:
        result = CliRunner().invoke(main, ["build", str(recipe), "-w", str(warehouse), "-q"])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    return run


def runs(warehouse: Path) -> list[dict[str, Any]]:
    """Every row of the runs table, oldest first; `stages` is a list of per-stage dicts."""
    from factory.warehouse.store import Warehouse

    table = Warehouse(warehouse).query("SELECT * FROM runs ORDER BY started_at")
    return table.to_pylist()


def stage_stats(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A runs-table row's per-stage stats keyed by stage name."""
    return {s["stage"]: s for s in run["stages"]}


class ModelKit:
    """Helpers for the model tests, handed out by the `kit` fixture (test modules do not import conftest)."""

    recipe = staticmethod(recipe_dict)
    scripted_data = SCRIPTED_RECIPE
    """The scripted recipe's mapping (copy it with `edited` before changing it)."""
    scripted = staticmethod(scripted_recipe)
    edited = staticmethod(edited)
    write_edited = staticmethod(write_edited)
    write = staticmethod(write_recipe)
    runs = staticmethod(runs)
    stages = staticmethod(stage_stats)


@pytest.fixture(scope="session")
def kit() -> type[ModelKit]:
    """Recipe and runs-table helpers: `kit.recipe(...)` (the tiny embedded-model recipe), `kit.scripted(folder,
    ...)` (the scripted recipe, written), `kit.edited(...)`, `kit.write(...)`, `kit.runs(wh)`, `kit.stages(run)`."""
    return ModelKit
