"""The bad-input corpus (tests/bad_inputs/): every case is refused with exit code 2 and one `error:` line,
before any model is loaded, and nothing is written anywhere.

Each case is a folder `tests/bad_inputs/<group>/<case>/` with a manifest `case.yaml` (see the README there).
The folder is copied to a temporary directory first, so the repository is never written. Commands run in this
process through click's CliRunner; importing a model backend (or torch, transformers, vLLM, ...) during a case
raises `ModelLoadAttempt`, so a case that slips past validation fails fast instead of loading a model.
"""

from __future__ import annotations

import importlib
import importlib.abc
import os
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

CORPUS = Path(__file__).parent / "bad_inputs"
GOOD = CORPUS / "_good"
MANIFEST = "case.yaml"
MANIFEST_KEYS = {"about", "args", "exit", "names", "mentions", "unset_env", "pad", "render"}

# Third-party packages that only a model load imports, and factory's backend modules (which import them).
HEAVY_PACKAGES = ("torch", "transformers", "vllm", "gguf", "llama_cpp", "openai", "accelerate", "safetensors")
BACKEND_MODULES = ("factory.models.hf", "factory.models.vllm_backend", "factory.models.openai_backend")

# Settings for a quiet, offline, deterministic run (placeholders are filled in per case).
CI_ENV = {
    "NO_COLOR": "1",
    "TERM": "dumb",
    "COLUMNS": "200",
    "CI": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FACTORY_CACHE": "{tmp}/factory-cache",
    "HF_HOME": "{tmp}/hf-home",
}


# ------------------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class BadInput:
    """One corpus case, read from its manifest."""

    id: str
    folder: Path
    args: list[str]
    exit: int
    names: list[str]
    mentions: list[str]
    unset_env: list[str]
    pad: dict[str, Any] | None
    render: list[str]

    @property
    def group(self) -> str:
        return self.id.split("/")[0]


def load_cases() -> list[BadInput]:
    cases = []
    for manifest in sorted(CORPUS.glob(f"*/*/{MANIFEST}")):
        folder = manifest.parent
        if folder.parent.name.startswith("_"):
            continue
        data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
        case_id = f"{folder.parent.name}/{folder.name}"
        unknown = set(data) - MANIFEST_KEYS
        assert not unknown, f"{manifest}: unknown manifest keys {sorted(unknown)}"
        assert isinstance(data.get("args"), list) and data["args"], f"{manifest}: 'args' must be a non-empty list"
        cases.append(
            BadInput(
                id=case_id,
                folder=folder,
                args=[str(a) for a in data["args"]],
                exit=int(data.get("exit", 2)),
                names=list(data.get("names") or []),
                mentions=list(data.get("mentions") or []),
                unset_env=list(data.get("unset_env") or []),
                pad=data.get("pad"),
                render=list(data.get("render") or []),
            )
        )
    return cases


CASES = load_cases()


def test_corpus_size() -> None:
    """The corpus covers every kind of input at least as widely as promised in its README."""
    groups: dict[str, int] = {}
    for c in CASES:
        groups[c.group] = groups.get(c.group, 0) + 1
    assert len(CASES) >= 45, groups
    assert groups.get("recipes", 0) >= 20 and groups.get("data", 0) >= 8, groups
    assert groups.get("sql", 0) >= 10 and groups.get("judge_eval", 0) >= 6, groups
    for c in CASES:
        assert c.names or c.mentions, f"{c.id}: give 'names' or 'mentions'"
        assert c.group == "sql" or c.names, f"{c.id}: a non-sql case must name the offending file ('names')"


# ------------------------------------------------------------------------------------- model-load guard


class ModelLoadAttempt(RuntimeError):
    """A bad input got as far as loading a model."""


class _ModelGuard(importlib.abc.MetaPathFinder):
    """Refuses heavy imports and backend requests, and remembers each attempt (the CLI may swallow the error)."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, what: str) -> ModelLoadAttempt:
        self.attempts.append(what)
        return ModelLoadAttempt(f"bad input reached a model load ({what})")

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in HEAVY_PACKAGES or name in BACKEND_MODULES:
            raise self.refuse(f"import {name}")
        return None

    def refuse_backend(self, *args: Any, **kwargs: Any) -> Any:
        raise self.refuse(f"backend requested: {', '.join(repr(a)[:80] for a in args)}")


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> _ModelGuard:
    """Make any model load fail at once (restored after the test); the guard lists the attempts."""
    # Light libraries the commands import lazily; loaded before the block (datasets probes for torch on import).
    import datasets  # noqa: F401
    import duckdb  # noqa: F401
    import pyarrow.csv
    import pyarrow.parquet  # noqa: F401

    import factory.cli.main  # noqa: F401

    guard = _ModelGuard()
    for name in BACKEND_MODULES:  # force a fresh import, which the guard refuses
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [guard, *sys.meta_path])
    # Second line of defence, for when torch is already imported (an earlier test loaded a model) and a backend
    # lives in a module not listed above: the model pool and the loaders refuse too. Where the code has moved
    # on and these names are gone, the import guard above still stands.
    # Every module is imported before any is patched: one imported later would bind the patched loader as its
    # own name (`from factory.models.registry import load_backend`), and undoing the patch would leave it there.
    loaded: list[tuple[Any, str | None, str]] = []
    for module, owner, attr in (
        ("factory.pipeline.calls", "ModelPool", "get"),
        ("factory.models.registry", None, "load_backend"),
        ("factory.judge_eval.command", None, "load_backend"),
    ):
        try:
            loaded.append((importlib.import_module(module), owner, attr))
        except Exception:  # a broken or heavy module fails the cases themselves, not this fixture
            continue
    for target, owner, attr in loaded:
        if owner is not None:
            target = getattr(target, owner, None)
        if target is not None and callable(getattr(target, attr, None)):
            monkeypatch.setattr(target, attr, guard.refuse_backend)
    return guard


# ---------------------------------------------------------------------------------------- sql warehouse

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _provenance(stage_key: str) -> dict[str, str]:
    return {"recipe": "badinput", "run_id": "run-bad-inputs", "stage_key": stage_key}


@pytest.fixture(scope="session")
def warehouse_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real warehouse (prompts, samples, a run, factory.duckdb) written without any model."""
    from factory.warehouse.store import Warehouse

    root = tmp_path_factory.mktemp("bad-inputs-warehouse") / "wh"
    wh = Warehouse(root)
    prompts = [
        {
            **_provenance("kp"),
            "prompt_id": f"p{i}",
            "messages": f'[{{"role": "user", "content": "{text}"}}]',
            "instruction": text,
            "source": "inline",
            "source_row": i,
            "source_id": None,
            "reference_fields": "{}",
        }
        for i, text in enumerate(["Say hi", "Name a color."])
    ]
    samples = [
        {
            **_provenance("ks"),
            "sample_id": f"p{i}-s{j}",
            "prompt_id": f"p{i}",
            "policy": "smol",
            "sample_index": j,
            "text": f"answer {i}.{j}",
            "finish_reason": "stop",
            "n_tokens": 3,
            "n_prompt_tokens": 5,
            "request_key": f"r{i}{j}",
            "error": None,
            "tokens_in": 5,
            "tokens_out": 3,
            "latency_s": 0.01,
        }
        for i in range(2)
        for j in range(2)
    ]
    wh.write_stage("prompts", "badinput", "kp", "run-bad-inputs", prompts, complete=True)
    wh.write_stage("samples", "badinput", "ks", "run-bad-inputs", samples, complete=True)
    wh.write_run(
        {
            "run_id": "run-bad-inputs",
            "recipe": "badinput",
            "status": "ok",
            "started_at": T0,
            "finished_at": T0,
            "seconds": 0.0,
            "model_calls": 0,
            "stages": [],
        }
    )
    wh.refresh_database()
    return root


# ------------------------------------------------------------------------------------------- snapshots


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under `root` (and root itself): kind, bytes, and modification time in ns."""
    out: dict[str, Any] = {}
    if not os.path.lexists(root):
        return {".": None}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [".", *sorted(dirnames), *sorted(filenames)]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif p.is_dir():
                out[rel] = ("dir", None, st.st_mtime_ns)
            else:
                out[rel] = ("file", p.read_bytes(), st.st_mtime_ns)
    return out


def diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What changed between two snapshots, briefly."""
    changes = [f"+{k}" for k in sorted(set(after) - set(before))]
    changes += [f"-{k}" for k in sorted(set(before) - set(after))]
    changes += [f"~{k}" for k in sorted(set(before) & set(after)) if before[k] != after[k]]
    return changes


# ---------------------------------------------------------------------------------------------- runner


@dataclass
class Prepared:
    case_dir: Path
    wh: Path
    tmp: Path
    args: list[str]
    env: dict[str, str | None]


def fill(text: str, places: dict[str, str]) -> str:
    """Replace {case}, {wh} and {tmp} (nothing else: SQL and templates keep their other braces)."""
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


def prepare(case: BadInput, tmp_path: Path, warehouse: Path, monkeypatch: pytest.MonkeyPatch) -> Prepared:
    case_dir, wh, tmp = tmp_path / "case", tmp_path / "wh", tmp_path / "scratch"
    shutil.copytree(case.folder, case_dir, symlinks=True)
    shutil.copytree(warehouse, wh)
    tmp.mkdir()
    places = {"case": str(case_dir), "wh": str(wh), "tmp": str(tmp)}
    if case.pad and "file" in case.pad:
        target = case_dir / case.pad["file"]
        text = target.read_text(encoding="utf-8")
        assert case.pad["marker"] in text, f"{case.id}: pad marker not in {case.pad['file']}"
        target.write_text(text.replace(case.pad["marker"], case.pad["text"] * int(case.pad["times"])), encoding="utf-8")
    for rel in case.render:
        target = case_dir / rel
        target.write_text(fill(target.read_text(encoding="utf-8"), places), encoding="utf-8")
    env: dict[str, str | None] = {k: fill(v, places) for k, v in CI_ENV.items()}
    for var in case.unset_env:
        monkeypatch.delenv(var, raising=False)
        env[var] = None
    monkeypatch.chdir(tmp)  # a relative path written by mistake lands in the scratch dir, which is watched
    args = [fill(a, places) for a in case.args]
    if case.pad and "arg" in case.pad:  # grow an argument instead of a file (e.g. a 1 MB SQL query)
        i = int(case.pad["arg"])
        assert case.pad["marker"] in args[i], f"{case.id}: pad marker not in argument {i}"
        args[i] = args[i].replace(case.pad["marker"], case.pad["text"] * int(case.pad["times"]))
    return Prepared(case_dir, wh, tmp, args, env)


def neutral(line: str, prepared: Prepared, root: Path) -> str:
    """The error line with the test's own folders written as {case}, {wh}, {tmp}, {root}: a file name or a
    word must come from the message, not from the temporary path it happens to contain."""
    places = {"case": prepared.case_dir, "wh": prepared.wh, "tmp": prepared.tmp, "root": root}
    for key, path in places.items():
        for form in sorted({str(path.resolve()), str(path)}, key=len, reverse=True):
            line = line.replace(form, "{" + key + "}")
    return line


def invoke(prepared: Prepared) -> Result:
    from factory.cli.main import main

    runner = CliRunner(env=prepared.env, catch_exceptions=True)
    return runner.invoke(main, prepared.args, catch_exceptions=True, color=False)


def describe(result: Result) -> str:
    """Exit code, first output line and any uncaught exception, for assertion messages."""
    lines = [line for line in (result.stdout + result.stderr).splitlines() if any(c.isalnum() for c in line)]
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    first = lines[0].strip() if lines else "<no output>"
    return f"exit {result.exit_code}; first line: {first[:300]!r}" + (f"; exception: {exc!r}"[:300] if exc else "")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused(
    case: BadInput,
    tmp_path: Path,
    warehouse_template: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_model_loads: _ModelGuard,
) -> None:
    prepared = prepare(case, tmp_path, warehouse_template, monkeypatch)
    for var in case.unset_env:
        assert var not in os.environ
    watched = {"case folder": prepared.case_dir, "warehouse": prepared.wh, "scratch dir": prepared.tmp}
    before = {k: snapshot(p) for k, p in watched.items()}

    result = invoke(prepared)

    after = {k: snapshot(p) for k, p in watched.items()}
    changed = {what: diff(before[what], after[what])[:5] for what in watched if after[what] != before[what]}
    summary = describe(result) + (f"; changed: {changed}" if changed else "")
    output = result.stdout + result.stderr
    assert not no_model_loads.attempts, f"a model would be loaded ({no_model_loads.attempts[0]}): {summary}"
    assert result.exit_code == case.exit, summary
    assert isinstance(result.exception, SystemExit), f"uncaught exception: {summary}"
    assert "Traceback" not in output, summary
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), f"expected one 'error:' line, got {lines!r}"
    # A value the line quotes is shown, not obeyed: no escape sequence or other control character gets out.
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", lines[0]), f"a control character in {lines[0]!r}"
    line = neutral(lines[0], prepared, tmp_path)
    for name in case.names:
        assert name in line, f"the error line does not name {name!r}: {line!r}"
    if case.mentions:
        low = line.lower()
        assert any(m.lower() in low for m in case.mentions), (
            f"the error line mentions none of {case.mentions}: {line!r}"
        )
    assert not changed, f"something was written: {summary}"


# ----------------------------------------------------------------------------------------------- controls
# The same inputs, unbroken, are accepted: each case fails because of its defect, not because of the harness.


def test_control_good_recipe_validates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_loads: _ModelGuard
) -> None:
    from factory.cli.main import main

    shutil.copytree(GOOD, tmp_path / "good")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "good" / "recipe.yaml")])
    assert result.exit_code == 0, describe(result)
    assert result.stdout.startswith("ok: recipe 'badinput': 2 prompts")


def test_control_sql_reads_the_prepared_warehouse(
    tmp_path: Path, warehouse_template: Path, monkeypatch: pytest.MonkeyPatch, no_model_loads: _ModelGuard
) -> None:
    from factory.cli.main import main

    wh = tmp_path / "wh"
    shutil.copytree(warehouse_template, wh)
    before = snapshot(wh)
    monkeypatch.chdir(tmp_path)
    query = "SELECT count(*) AS n FROM prompts JOIN samples USING (prompt_id)"
    result = CliRunner().invoke(main, ["sql", query, "--warehouse", str(wh), "--format", "csv"])
    assert result.exit_code == 0, describe(result)
    assert result.stdout.split() == ["n", "4"] or result.stdout.split() == ['"n"', "4"], result.stdout
    assert snapshot(wh) == before


def test_control_good_eval_set_reads() -> None:
    from factory.inputs.labelled_sets import read_eval_set

    ds = read_eval_set(str(GOOD / "cases.jsonl"))
    assert [c.label for c in ds.cases] == [1, 2, 1]
