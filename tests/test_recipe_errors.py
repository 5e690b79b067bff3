"""Bad input through the real CLI: exit code 2, one `error:` line naming file, field and line, no traceback.

No case reaches a model: every one fails while the recipe or its prompt data is read.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from factory.cli.main import main

BASE = """\
name: errors
models:
  smol:
    backend: embedded
prompts:
  inline:
    - instruction: Say hi
      reference: Hi
  reference_fields: [reference]
references:
  - name: human
    kind: column
samples:
  policy: smol
  n: 2
judgments:
  judge: smol
  protocol: refeval
  reference: human
"""


def line_of(text: str, needle: str) -> int:
    """1-based number of the only line of `text` that contains `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, f"{needle!r} is on lines {hits}"
    return hits[0]


@dataclass(frozen=True)
class Case:
    """A broken recipe: text edits to BASE, the field the error must name, and the line it points at."""

    id: str
    edits: tuple[tuple[str, str], ...]
    field: str | None
    line_needle: str | None
    """A text on the line the message must point at (in the edited recipe); None: no line expected."""
    message: str


RECIPE_CASES = [
    Case(
        "unknown-key", (("  n: 2\n", "  n: 2\n  temprature: 0.7\n"),), "samples.temprature", "temprature", "unknown key"
    ),
    Case("wrong-type", (("  n: 2", "  n: two"),), "samples.n", "n: two", "valid integer"),
    Case(
        "unknown-policy", (("  policy: smol", "  policy: big"),), "samples.policy", "policy: big", "unknown model 'big'"
    ),
    Case("unknown-judge", (("  judge: smol", "  judge: huge"),), "judgments.judge", "judge: huge", "unknown model"),
    Case(
        "unknown-reference-model",
        (("    kind: column", "    kind: model\n    model: gpt9"), ("  reference_fields: [reference]\n", "")),
        "references.0.model",
        "model: gpt9",
        "unknown model 'gpt9'",
    ),
    Case(
        "unknown-reference",
        (("  reference: human", "  reference: experts"),),
        "judgments.reference",
        "reference: experts",
        "unknown reference 'experts'",
    ),
    Case(
        "unknown-protocol",
        (("  protocol: refeval", "  protocol: refwhatever"),),
        "judgments.protocol",
        "protocol: refwhatever",
        "refwhatever",
    ),
    Case(
        "protocol-needs-reference",
        (("  reference: human\n", ""),),
        "judgments.reference",
        "judgments:",  # the field is absent: the line of the judgments key
        "needs 'reference'",
    ),
    Case(
        "reference-on-reference-free-protocol",
        (("  protocol: refeval", "  protocol: reffree"),),
        "judgments.reference",
        "reference: human",
        "shows no reference",
    ),
    Case(
        "reference-field-not-listed",
        (("    kind: column", "    kind: column\n    field: answer"),),
        "references.0.field",
        "field: answer",
        "not in prompts.reference_fields",
    ),
    Case("n-too-small", (("  n: 2", "  n: 1"),), "samples.n", "n: 1", "greater than or equal to 2"),
    Case("misspelled-section", (("judgments:", "judgmints:"),), "judgmints", "judgmints:", "unknown key"),
    Case("invalid-yaml", (("  n: 2", "  n: 2: 3"),), None, "n: 2: 3", "not valid YAML"),
    Case("not-a-mapping", ((BASE, "- a list\n- of things\n"),), None, None, "mapping"),
    Case(
        "duplicate-key",
        (("  n: 2\n", "  n: 2\n  n: 3\n"),),
        "samples.n",
        "n: 3",
        "duplicate key 'n' (first on line 15)",
    ),
    Case(
        "non-finite-number",
        (("  n: 2\n", "  n: 2\n  params:\n    temperature: .inf\n"),),
        "samples.params.temperature",
        "temperature: .inf",
        "expected a finite number",
    ),
    Case(
        "huge-value",
        (("  policy: smol", "  policy: " + "x" * 300_000),),
        "samples.policy",
        "policy: x",
        "(300000 characters)",
    ),
]

DATA_CASES = [
    Case(
        "missing-data-file",
        (("  inline:\n    - instruction: Say hi\n      reference: Hi\n", "  path: data/nowhere.jsonl\n"),),
        "prompts.path",
        "path: data/nowhere.jsonl",
        "nowhere.jsonl",
    ),
    Case(
        "empty-prompt-set",
        (("    - instruction: Say hi", '    - instruction: ""'),),
        "prompts.inline",
        "inline:",
        "no usable prompts",
    ),
    Case(
        "missing-instruction-column",
        (("    - instruction: Say hi", "    - question: Say hi"),),
        "prompts.inline",
        "inline:",
        "missing column 'instruction'",
    ),
]


def write_recipe(tmp_path: Path, case: Case) -> tuple[Path, str]:
    text = BASE
    for old, new in case.edits:
        assert old in text, f"edit {old!r} does not apply"
        text = text.replace(old, new, 1)
    path = tmp_path / f"recipe-{case.id}.yaml"
    path.write_text(text, encoding="utf-8")
    return path, text


def assert_one_error_line(result: Result | subprocess.CompletedProcess[str], stderr: str, stdout: str) -> str:
    """The shared contract of every input error; returns the error line."""
    assert "Traceback" not in stderr + stdout
    assert stderr.endswith("\n") and stderr.count("\n") == 1, f"expected one line on stderr, got {stderr!r}"
    line = stderr.rstrip("\n")
    assert line.startswith("error: "), line
    return line


def assert_names_field(error: str, path: Path, text: str, case: Case) -> None:
    assert path.name in error
    if case.line_needle is not None:
        expected = line_of(text, case.line_needle)
        assert re.search(rf"{re.escape(path.name)}:{expected}:", error), f"expected :{expected}: in {error!r}"
    if case.field is not None:
        assert f"field '{case.field}'" in error
    assert case.message in error


def run_cli(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    # Only SystemExit(2) from the CLI's own error handling; any other exception is a crash.
    assert isinstance(result.exception, SystemExit), result.exception
    return result


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", RECIPE_CASES, ids=lambda c: c.id)
def test_validate_rejects_bad_recipe(tmp_path: Path, case: Case) -> None:
    path, text = write_recipe(tmp_path, case)
    result = run_cli("validate", str(path))
    error = assert_one_error_line(result, result.stderr, result.stdout)
    assert_names_field(error, path, text, case)


@pytest.mark.parametrize("case", RECIPE_CASES, ids=lambda c: c.id)
def test_build_with_bad_recipe_leaves_warehouse_untouched(tmp_path: Path, case: Case) -> None:
    path, text = write_recipe(tmp_path, case)
    warehouse = tmp_path / "warehouse"
    (warehouse / "tables").mkdir(parents=True)
    (warehouse / "README.md").write_text("keep me\n")
    (warehouse / "tables" / "note.bin").write_bytes(b"\x00\x01")
    before = snapshot(warehouse)
    result = run_cli("build", str(path), "--warehouse", str(warehouse), "--quiet")
    error = assert_one_error_line(result, result.stderr, result.stdout)
    assert_names_field(error, path, text, case)
    assert snapshot(warehouse) == before


@pytest.mark.parametrize("case", DATA_CASES, ids=lambda c: c.id)
def test_build_rejects_bad_prompt_data(tmp_path: Path, case: Case) -> None:
    path, text = write_recipe(tmp_path, case)
    result = run_cli("build", str(path), "--warehouse", str(tmp_path / "warehouse"))
    error = assert_one_error_line(result, result.stderr, result.stdout)
    assert_names_field(error, path, text, case)


def test_valid_base_recipe_passes(tmp_path: Path) -> None:
    """The cases above fail because of their edits, not because the base recipe is broken."""
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE, encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: recipe 'errors'")


@pytest.mark.parametrize("command", ["validate", "build"])
def test_missing_recipe_file(tmp_path: Path, command: str) -> None:
    path = tmp_path / "no-such-recipe.yaml"
    args = [command, str(path)] + (["--warehouse", str(tmp_path / "wh")] if command == "build" else [])
    result = run_cli(*args)
    error = assert_one_error_line(result, result.stderr, result.stdout)
    assert "no-such-recipe.yaml" in error and "not found" in error
    assert not (tmp_path / "wh").exists()


def test_real_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    """The console script itself (not only the in-process runner): exit status, stderr, no traceback."""
    case = RECIPE_CASES[0]
    path, text = write_recipe(tmp_path, case)
    proc = subprocess.run(
        [sys.executable, "-m", "factory.cli.main", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    error = assert_one_error_line(proc, proc.stderr, proc.stdout)
    assert_names_field(error, path, text, case)
