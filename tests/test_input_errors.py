"""Bad input files through the real CLI: duplicate YAML keys, non-finite numbers, bytes that are not UTF-8,
empty or wrongly shaped files, folders and unreadable files, huge values. Each is exit code 2 and one short
`error:` line naming the file (and the line and field where there is one); no traceback, nothing written.

No case reaches a model: every one fails while the recipe, its prompt data or an eval set is read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from test_recipe_errors import BASE, assert_one_error_line, line_of, run_cli

from factory.core.errors import UserInputError
from factory.inputs.data_sources import NamedPath
from factory.inputs.labelled_sets import read_eval_set

MAX_LINE = 400
"""No error line may be longer than this, whatever the size of the input."""

INLINE = "  inline:\n    - instruction: Say hi\n      reference: Hi\n"


def recipe_error(tmp_path: Path, content: str | bytes, name: str = "recipe.yaml") -> str:
    """The one error line of `validate` and of `build` on a recipe file; build must write nothing."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return cli_error(tmp_path, path)


def cli_error(tmp_path: Path, recipe: Path) -> str:
    """Run `validate` and `build` on `recipe`: both fail with the same one line, and the build writes nothing."""
    errors = []
    warehouse = tmp_path / "warehouse"
    for args in (["validate", str(recipe)], ["build", str(recipe), "--warehouse", str(warehouse), "--quiet"]):
        result = run_cli(*args)
        errors.append(assert_one_error_line(result, result.stderr, result.stdout))
    assert errors[0] == errors[1]
    assert not warehouse.exists(), "a bad input must be refused before anything is written"
    assert len(errors[0]) < MAX_LINE, errors[0]
    return errors[0]


def edit(*changes: tuple[str, str]) -> str:
    """BASE with text replacements (each must apply)."""
    text = BASE
    for old, new in changes:
        assert old in text, f"edit {old!r} does not apply"
        text = text.replace(old, new, 1)
    return text


# ------------------------------------------------------------------------------------------ duplicate keys

NESTED = edit(("  n: 2\n", "  n: 2\n  n: 3\n"))
IN_LIST = edit(("    kind: column\n", "    kind: column\n    name: other\n"))
DUPLICATES = [
    # (id, recipe text, field, line of the repeat, line of the first)
    ("top-level", BASE + "name: again\n", "name", BASE.count("\n") + 1, 1),
    (
        "model",
        edit(("    backend: embedded\n", "    backend: embedded\n  smol:\n    backend: vllm\n")),
        "models.smol",
        5,
        3,
    ),
    ("nested", NESTED, "samples.n", line_of(NESTED, "n: 3"), line_of(NESTED, "n: 2")),
    ("in-a-list", IN_LIST, "references.0.name", line_of(IN_LIST, "name: other"), line_of(IN_LIST, "- name: human")),
]


@pytest.mark.parametrize(("case", "text", "field", "second", "first"), DUPLICATES, ids=[d[0] for d in DUPLICATES])
def test_duplicate_key(tmp_path: Path, case: str, text: str, field: str, second: int, first: int) -> None:
    error = recipe_error(tmp_path, text)
    key = field.rsplit(".", 1)[-1]
    assert error.endswith(f"recipe.yaml:{second}: field '{field}': duplicate key '{key}' (first on line {first})"), (
        error
    )


def test_merge_keys_may_override_without_being_duplicates(tmp_path: Path) -> None:
    """`<<: *anchor` then an explicit key is YAML's way to override: not a duplicate."""
    text = edit(
        ("  smol:\n    backend: embedded\n", "  smol: &base\n    backend: embedded\n    batch_size: 4\n"),
        ("prompts:", "  other:\n    <<: *base\n    batch_size: 2\nprompts:"),
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    from factory.config.loading import load_recipe

    models = load_recipe(path).recipe.models
    assert (models["smol"].batch_size, models["other"].batch_size) == (4, 2)


# --------------------------------------------------------------------------------------- non-finite numbers

NON_FINITE = [
    ("temperature-inf", ("  n: 2\n", "  n: 2\n  params:\n    temperature: .inf\n"), "samples.params.temperature"),
    ("top-p-minus-inf", ("  n: 2\n", "  n: 2\n  params:\n    top_p: -.inf\n"), "samples.params.top_p"),
    (
        "engine-nan",
        ("    backend: embedded\n", "    backend: embedded\n    engine: {x: .NaN}\n"),
        "models.smol.engine.x",
    ),
    (
        "inline-row-nan",
        ("      reference: Hi\n", "      reference: Hi\n      weight: .nan\n"),
        "prompts.inline.0.weight",
    ),
    # Strings that pydantic turns into non-finite floats: caught after validation, or in place of a bound error.
    ("temperature-string-inf", ("  n: 2\n", "  n: 2\n  params:\n    temperature: inf\n"), "samples.params.temperature"),
    ("top-p-string-nan", ("  n: 2\n", "  n: 2\n  params:\n    top_p: nan\n"), "samples.params.top_p"),
]


@pytest.mark.parametrize(("case", "change", "field"), NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_number(tmp_path: Path, case: str, change: tuple[str, str], field: str) -> None:
    text = edit(change)
    error = recipe_error(tmp_path, text)
    line = line_of(text, field.rsplit(".", 1)[-1] + ":")
    assert re.search(rf"recipe\.yaml:{line}: field '{re.escape(field)}': expected a finite number", error), error


def test_pairs_min_margin_nan(tmp_path: Path) -> None:
    text = BASE + "pairs:\n  min_margin: .nan\n"
    error = recipe_error(tmp_path, text)
    assert f"recipe.yaml:{line_of(text, 'min_margin')}: field 'pairs.min_margin': expected a finite number" in error


# ------------------------------------------------------------------------------------ recipe file problems


def test_recipe_not_utf8(tmp_path: Path) -> None:
    data = BASE.replace("name: errors\n", "name: errors\ndescription: caf\xe9\n").encode("latin-1")
    offset = data.index(b"\xe9")
    error = recipe_error(tmp_path, data)
    assert error.endswith(f"recipe.yaml:2: not valid UTF-8 text (byte 0xe9 at offset {offset}); save the file as UTF-8")


def test_recipe_with_byte_order_mark_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    from factory.config.loading import load_recipe

    assert load_recipe(path).recipe.name == "errors"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "recipe.yaml: the recipe is empty"),
        ("# nothing but a comment\n", "recipe.yaml: the recipe is empty"),
        ("- a list\n- of things\n", "recipe.yaml:1: expected a mapping of recipe fields at the top level, got a list"),
        ("just words\n", "recipe.yaml:1: expected a mapping of recipe fields at the top level, got a string"),
        ("\n42\n", "recipe.yaml:2: expected a mapping of recipe fields at the top level, got a number"),
        ("~\n", "got null"),
    ],
    ids=["empty", "comment-only", "list", "string", "number", "null"],
)
def test_recipe_of_the_wrong_shape(tmp_path: Path, content: str, expected: str) -> None:
    assert expected in recipe_error(tmp_path, content)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("  n: 2", '  n: "x\x00y"'), r"recipe\.yaml:\d+: not valid YAML: character '\\x00' is not allowed"),
        (("  n: 2", "  n: " + "9" * 5000), r"recipe\.yaml:\d+: not valid YAML: an integer of 5000 characters"),
        (("description: ", "description: 2024-13-01\n"), r"recipe\.yaml:\d+: not valid YAML: not a valid date"),
        (("  n: 2", "  n: " + "[" * 3000 + "]" * 3000), r"recipe\.yaml: not valid YAML: nested too deeply"),
    ],
    ids=["nul-character", "huge-integer", "impossible-date", "deep-nesting"],
)
def test_yaml_the_safe_loader_would_crash_on(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    text = BASE.replace("name: errors\n", "name: errors\ndescription: \n")
    old, new = change
    assert old in text
    assert re.search(expected, recipe_error(tmp_path, text.replace(old, new, 1)))


def test_yaml_alias_that_contains_itself(tmp_path: Path) -> None:
    text = edit(("    backend: embedded\n", "    backend: embedded\n    engine: &e {x: *e}\n"))
    error = recipe_error(tmp_path, text)
    assert "field 'models.smol.engine.x': a YAML alias that contains itself" in error


def test_yaml_alias_bomb(tmp_path: Path) -> None:
    """Aliases that expand to a billion values are refused at once, not walked or validated."""
    levels = ["    a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = edit(("    backend: embedded\n", "    backend: embedded\n    engine:\n" + "\n".join(levels) + "\n"))
    assert "YAML aliases expand this to more than" in recipe_error(tmp_path, text)


def test_recipe_path_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").mkdir()
    assert cli_error(tmp_path, tmp_path / "recipe.yaml").endswith("recipe.yaml: is a folder; expected a recipe file")


def deny_reading(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Make `path` unreadable: by its mode, and (as root ignores modes) by failing reads of it."""
    path.chmod(0)
    if os.geteuid() == 0:
        real = Path.read_bytes

        def read_bytes(self: Path) -> bytes:
            if self.resolve() == path.resolve():
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)


def test_recipe_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE, encoding="utf-8")
    deny_reading(monkeypatch, path)
    assert cli_error(tmp_path, path).endswith("recipe.yaml: cannot read the recipe file: permission denied")


# ------------------------------------------------------------------------------------------- huge values

HUGE = "a" * 300_000


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("  policy: smol", f"  policy: {HUGE}"), "samples.policy"),
        (("  n: 2", f"  n: {HUGE}"), "samples.n"),
        (("  protocol: refeval", f"  protocol: {HUGE}"), "judgments.protocol"),
        (("  reference: human", f"  reference: [human, {HUGE}]"), "judgments.reference"),
    ],
    ids=["unknown-model", "wrong-type", "unknown-choice", "unknown-reference-in-list"],
)
def test_huge_value_is_not_echoed_whole(tmp_path: Path, change: tuple[str, str], field: str) -> None:
    error = recipe_error(tmp_path, edit(change))
    assert f"field '{field}'" in error
    assert "aaaa…' (300000 characters)" in error


def test_value_with_newline_stays_on_one_line(tmp_path: Path) -> None:
    error = recipe_error(tmp_path, edit(("  policy: smol", '  policy: "big\\nsmall"')))
    assert "unknown model 'big\\nsmall'" in error


def test_huge_duplicate_key_is_clipped(tmp_path: Path) -> None:
    key = "k" * 1000  # YAML allows implicit keys of up to 1024 characters
    error = recipe_error(tmp_path, edit(("  n: 2\n", f'  n: 2\n  "{key}": 1\n  "{key}": 2\n')))
    assert "duplicate key 'kkk" in error and "(1000 characters)" in error


# ------------------------------------------------------------------------------------- prompt data files


def data_recipe(tmp_path: Path, name: str, write: Callable[[Path], None]) -> Path:
    """A recipe whose prompts are read from `name` (next to it), created by `write`."""
    write(tmp_path / name)
    path = tmp_path / "recipe.yaml"
    path.write_text(edit((INLINE, f"  path: {name}\n")), encoding="utf-8")
    return path


def text_file(content: str | bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    return write


ROW = json.dumps({"instruction": "Say hi", "reference": "Hi"})
DATA_CASES = [
    (
        "jsonl-not-utf8",
        "data.jsonl",
        text_file(f"{ROW}\n".encode() + b'{"instruction": "caf\xe9"}\n'),
        rf"data\.jsonl:2: not valid UTF-8 text \(byte 0xe9 at offset {len(ROW) + 21}\)",
    ),
    (
        "json-not-utf8",
        "data.json",
        text_file(b'[{"instruction": "\xff"}]'),
        r"data\.json:1: not valid UTF-8 text \(byte 0xff at offset 18\)",
    ),
    (
        "csv-not-utf8",
        "data.csv",
        text_file(b"instruction,reference\ncaf\xe9,x\n"),
        r"data\.csv:2: not valid UTF-8 text \(byte 0xe9",
    ),
    ("jsonl-not-json", "data.jsonl", text_file(f"{ROW}\n{{oops\n"), r"data\.jsonl:2: not valid JSON \("),
    (
        "jsonl-not-object",
        "data.jsonl",
        text_file(f'{ROW}\n\n["a list"]\n'),
        r"data\.jsonl:3: expected a JSON object per line, got a list",
    ),
    (
        "jsonl-deep",
        "data.jsonl",
        text_file("[" * 100_000 + "]" * 100_000 + "\n"),
        r"data\.jsonl:1: JSON nested too deeply",
    ),
    (
        "json-not-list",
        "data.json",
        text_file('{"a": 1, "b": 2}'),
        r"data\.json: expected a JSON list of objects, got an object",
    ),
    (
        "json-item-not-object",
        "data.json",
        text_file(f'[{ROW}, "x"]'),
        r"data\.json: expected a JSON list of objects; item 1 is a string",
    ),
    ("json-empty", "data.json", text_file(" \n"), r"data\.json: the file is empty; expected a JSON list of objects"),
    ("json-broken", "data.json", text_file(f"[\n{ROW},\n"), r"data\.json:3: not valid JSON \("),
    (
        "parquet-garbage",
        "data.parquet",
        text_file(b"not parquet at all" * 10),
        r"data\.parquet: not a readable Parquet file: ",
    ),
    (
        "csv-ragged",
        "data.csv",
        text_file("instruction,reference\nhi,there,extra\n"),
        r"data\.csv: not a readable CSV file: ",
    ),
    (
        "csv-huge-ragged-row",
        "data.csv",
        text_file(f"instruction\nhi,{HUGE}\n"),
        r"data\.csv: not a readable CSV file: CSV parse error",
    ),
    ("folder-named-like-a-file", "data.jsonl", Path.mkdir, r"data\.jsonl: is a folder; expected a \.jsonl file"),
    ("folder-not-a-dataset", "data", Path.mkdir, r"data: a folder, but not a dataset saved by datasets\.save_to_disk"),
]


@pytest.mark.parametrize(("case", "name", "write", "expected"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_prompt_data_file(
    tmp_path: Path, case: str, name: str, write: Callable[[Path], None], expected: str
) -> None:
    error = cli_error(tmp_path, data_recipe(tmp_path, name, write))
    assert re.search(expected, error), error
    assert str(tmp_path / name) in error  # the data file, by the path the recipe resolves it to


def test_prompt_data_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = data_recipe(tmp_path, "data.jsonl", text_file(ROW + "\n"))
    deny_reading(monkeypatch, tmp_path / "data.jsonl")
    assert cli_error(tmp_path, recipe).endswith("data.jsonl: cannot read the JSONL file: permission denied")


# ----------------------------------------------------------------------------------------------- eval sets

CASE = {"input": "Say hi", "output_1": "Hi", "output_2": "Bye", "label": 1}


def eval_error(source: Path, **kwargs: object) -> str:
    """The message of the UserInputError that reading the set raises: one short line."""
    with pytest.raises(UserInputError) as info:
        read_eval_set(str(source), **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and len(message) < MAX_LINE, message
    return message


def test_eval_set_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    path.write_bytes(b'{"input": "\xff"}\n')
    assert eval_error(path) == f"{path}:1: not valid UTF-8 text (byte 0xff at offset 11); save the file as UTF-8"


def test_eval_references_not_utf8(tmp_path: Path) -> None:
    data, refs = tmp_path / "set.jsonl", tmp_path / "refs.json"
    data.write_text(json.dumps(CASE) + "\n")
    refs.write_bytes(b'["\xc3("]')
    message = eval_error(data, reference_files=[NamedPath("gpt", str(refs))])
    assert message.startswith(f"{refs}:1: not valid UTF-8 text (byte 0xc3 at offset 2)")


def test_eval_references_is_a_folder(tmp_path: Path) -> None:
    data, refs = tmp_path / "set.jsonl", tmp_path / "refs.jsonl"
    data.write_text(json.dumps(CASE) + "\n")
    refs.mkdir()
    message = eval_error(data, reference_files=[NamedPath("gpt", str(refs))])
    assert message == f"{refs}: is a folder; expected a reference file (.jsonl or .json)"


@pytest.mark.parametrize(
    ("name", "write", "expected"),
    [
        ("set.jsonl", Path.mkdir, "is a folder; expected a .jsonl file"),
        ("set.parquet", text_file(b"garbage" * 5), "not a readable Parquet file"),
        ("set.json", text_file('{"input": 1, "label": 2}'), "expected a JSON list, got an object"),
        ("set.jsonl", text_file("{}\n{bad\n"), ":2: not valid JSON"),
    ],
    ids=["folder", "parquet-garbage", "json-not-list", "jsonl-bad-line"],
)
def test_eval_set_bad_file(tmp_path: Path, name: str, write: Callable[[Path], None], expected: str) -> None:
    write(tmp_path / name)
    message = eval_error(tmp_path / name)
    assert message.startswith(str(tmp_path / name)) and expected in message, message


def test_eval_set_huge_values_are_clipped(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({**CASE, "label": HUGE}) + "\n")
    assert eval_error(path).endswith("got 'aaaaaaa" + "a" * 71 + "…' (300000 characters)")
    path.write_text("\n".join(json.dumps({**CASE, "id": HUGE}) for _ in range(2)) + "\n")
    assert "appears twice" in eval_error(path)


def test_judge_eval_cli_writes_nothing_on_bad_data(tmp_path: Path) -> None:
    path = tmp_path / "set.jsonl"
    path.write_bytes(b"\xff\xfe{}\n")
    warehouse = tmp_path / "warehouse"
    result = run_cli("judge-eval", "--data", str(path), "--warehouse", str(warehouse), "--quiet")
    error = assert_one_error_line(result, result.stderr, result.stdout)
    assert "set.jsonl:1: not valid UTF-8 text (byte 0xff at offset 0)" in error
    assert not warehouse.exists()
