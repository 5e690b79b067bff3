"""Shared fixtures for the tests that run the real embedded model (markers `model` and `slow`).

Fixtures here build nothing until a test asks for them, so the fast unit tests never load torch.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
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


def recipe_dict(prompts: int = 2, n: int = 2, **changes: Any) -> dict[str, Any]:
    """The tiny recipe with its first `prompts` prompts and `n` samples each; `changes` are dotted-path edits
    such as `{"judgments.protocol": "refmatch"}` (pass them as `**{...}`)."""
    data = copy.deepcopy(TINY_RECIPE)
    if prompts > len(data["prompts"]["inline"]):
        raise ValueError(f"the tiny recipe has only {len(data['prompts']['inline'])} prompts")
    data["prompts"]["inline"] = data["prompts"]["inline"][:prompts]
    data["samples"]["n"] = n
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    """Write a recipe mapping as YAML; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


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
    write = staticmethod(write_recipe)
    runs = staticmethod(runs)
    stages = staticmethod(stage_stats)


@pytest.fixture(scope="session")
def kit() -> type[ModelKit]:
    """Recipe and runs-table helpers: `kit.recipe(...)`, `kit.write(...)`, `kit.runs(wh)`, `kit.stages(run)`."""
    return ModelKit
