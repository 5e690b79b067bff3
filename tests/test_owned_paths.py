"""A user's files are never deleted, truncated or overwritten: every command that writes outside the warehouse's
tables replaces only what factory wrote (docs/RELIABILITY.md, "What factory writes and deletes").

Each test puts a user's file where a command would write, runs the command for real (scripted backend, no
torch), and checks the refusal (one `error:` line, exit 2) and that the file is byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from factory.cli.main import main
from factory.core.owned import LEFTOVER, FolderKind, new_folder_beside, replace_folder, seal, sweep_leftovers


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def refused(result: Result, *words: str) -> str:
    """The one `error:` line of a refused command (exit 2), which must contain every one of `words`."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def user_tree(root: Path) -> dict[str, bytes]:
    """A folder of a user's files: a note and a subfolder."""
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("my notes")
    (root / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return snapshot(root)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shared_build(tmp_path_factory: pytest.TempPathFactory, kit: Any) -> Iterator[tuple[Path, Path]]:
    """A finished scripted build: (recipe, warehouse), its export in the default place. Built once for the
    module, for tests whose commands only read it, which the check after the last one holds them to."""
    folder = tmp_path_factory.mktemp("built")
    path = kit.scripted(folder)
    wh = folder / "wh"
    ok(cli("build", path, "-w", wh, "-q"))
    # A command that takes the warehouse's lock rewrites its lock note and its views database (factory.duckdb)
    # with the same views; everything else (tables, calls, runs, export) must stay as built.
    bookkeeping = {str(Path("wh") / ".lock"), str(Path("wh") / "factory.duckdb")}
    before = {k: v for k, v in snapshot(folder).items() if k not in bookkeeping}
    yield path, wh
    assert {k: v for k, v in snapshot(folder).items() if k not in bookkeeping} == before, "a test changed the build"


@pytest.fixture
def built(shared_build: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The shared build copied into this test's folder (recipe and warehouse side by side, as a build there
    would leave them), for tests whose commands write to the warehouse: a publish records a run."""
    path, wh = shared_build
    shutil.copy2(path, tmp_path / path.name)
    shutil.copytree(wh, tmp_path / wh.name, symlinks=True)
    return tmp_path / path.name, tmp_path / wh.name


# ------------------------------------------------------------------------------------------------ export
def test_export_sweep_leaves_a_users_look_alike_folders(tmp_path: Path, kit: Any) -> None:
    project = tmp_path / "proj"
    mine = {name: user_tree(project / name) for name in (".ds-backup", ".ds.old-mine", ".ds.factory-tmp-mine")}
    stale = project / ".ds.factory-old-abc123"  # what a killed export of factory's own leaves: marked
    stale.mkdir()
    (stale / LEFTOVER).write_bytes(b"")
    path = kit.scripted(tmp_path, **{"export.path": str(project / "ds")})
    ok(cli("build", path, "-w", tmp_path / "wh", "-q"))
    for name, files in mine.items():
        assert snapshot(project / name) == files, name
    assert not stale.exists()
    assert (project / "ds" / "dataset_dict.json").is_file()
    assert sorted(p.name for p in project.iterdir()) == sorted(
        [".ds-backup", ".ds.old-mine", ".ds.factory-tmp-mine", ".ds.lock", "ds"]
    )


def test_export_refuses_a_users_folder_and_a_file_added_to_its_own(tmp_path: Path, kit: Any) -> None:
    target = tmp_path / "ds"
    files = user_tree(target)
    path = kit.scripted(tmp_path, **{"export.path": str(target)})
    refused(cli("build", path, "-w", tmp_path / "wh", "-q"), "did not write")
    assert snapshot(target) == files

    path = kit.scripted(tmp_path, "r2.yaml", **{"export.path": str(tmp_path / "ds2")})
    ok(cli("build", path, "-w", tmp_path / "wh", "-q"))
    (tmp_path / "ds2" / "my-analysis.ipynb").write_text("{}")
    changed = kit.scripted(tmp_path, "r2.yaml", **{"export.path": str(tmp_path / "ds2"), "export.seed": 1})
    refused(cli("build", changed, "-w", tmp_path / "wh", "-q"), "my-analysis.ipynb")
    assert (tmp_path / "ds2" / "my-analysis.ipynb").read_text() == "{}"


def test_export_refuses_the_working_folder_and_the_warehouse(tmp_path: Path, monkeypatch: Any, kit: Any) -> None:
    monkeypatch.chdir(tmp_path)
    path = kit.scripted(tmp_path, **{"export.path": str(tmp_path)})
    refused(cli("build", path, "-w", tmp_path / "wh", "-q"), "working folder")
    path = kit.scripted(tmp_path, **{"export.path": str(tmp_path / "wh" / "tables")})
    refused(cli("build", path, "-w", tmp_path / "wh", "-q"), "warehouse")


# ------------------------------------------------------------------------------------------------- locks
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tmp_path: Path, kit: Any) -> None:
    victim = tmp_path / "victim_conf.txt"
    victim.write_text("keep me")
    wh = tmp_path / "wh"
    wh.mkdir()
    (wh / ".lock").symlink_to(victim)
    path = kit.scripted(tmp_path)
    refused(cli("build", path, "-w", wh, "-q"), ".lock", "symbolic link")
    assert victim.read_text() == "keep me"

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / ".ds.lock").symlink_to(victim)
    path = kit.scripted(tmp_path, **{"export.path": str(tmp_path / "exp" / "ds")})
    refused(cli("build", path, "-w", tmp_path / "wh2", "-q"), ".ds.lock", "symbolic link")
    assert victim.read_text() == "keep me"


def test_a_lock_file_hard_linked_to_a_users_file_is_never_written(tmp_path: Path, kit: Any) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    wh = tmp_path / "wh"
    wh.mkdir()
    os.link(victim, wh / ".lock")
    ok(cli("build", kit.scripted(tmp_path), "-w", wh, "-q"))
    assert victim.read_text() == "keep me"


def test_a_lock_file_is_never_truncated(tmp_path: Path, kit: Any) -> None:
    wh = tmp_path / "wh"
    wh.mkdir()
    (wh / ".lock").write_text("a user's text, in the lock's place")
    ok(cli("build", kit.scripted(tmp_path), "-w", wh, "-q"))
    assert (wh / ".lock").read_text() == "a user's text, in the lock's place"


# ------------------------------------------------------------------------------------------------- train
def test_train_refuses_a_users_output_folder_before_training(shared_build: tuple[Path, Path], tmp_path: Path) -> None:
    _, wh = shared_build
    export = wh / "exports" / "scripted"
    victim = tmp_path / "victim_models"
    files = user_tree(victim)
    refused(cli("train", export, "--output", victim, "-w", wh, "-q", "--preset", "cpu"), "did not write")
    assert snapshot(victim) == files


def test_train_refuses_the_working_folder(shared_build: tuple[Path, Path], tmp_path: Path, monkeypatch: Any) -> None:
    _, wh = shared_build
    files = user_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    refused(cli("train", wh / "exports" / "scripted", "--output", ".", "-w", wh, "-q"), "working folder")
    assert snapshot(tmp_path) == files


# ----------------------------------------------------------------------------------------------- publish
def test_publish_dry_run_replaces_only_its_own_folder(built: tuple[Path, Path], tmp_path: Path) -> None:
    _, wh = built
    export = wh / "exports" / "scripted"
    folder = tmp_path / "preview"
    folder.mkdir()
    (folder / "README.md").write_text("my own readme")
    refused(cli("publish", export, "--repo-id", "me/ds", "-w", wh, f"--dry-run={folder}"), "did not write")
    assert (folder / "README.md").read_text() == "my own readme"

    fresh = tmp_path / "fresh"
    ok(cli("publish", export, "--repo-id", "me/ds", "-w", wh, f"--dry-run={fresh}"))
    ok(cli("publish", export, "--repo-id", "me/ds", "-w", wh, f"--dry-run={fresh}"))  # its own: replaced
    (fresh / "todo.txt").write_text("mine")
    refused(cli("publish", export, "--repo-id", "me/ds", "-w", wh, f"--dry-run={fresh}"), "todo.txt")
    assert (fresh / "todo.txt").read_text() == "mine"


def test_an_old_copy_a_dry_run_could_not_remove_is_swept_by_the_next(
    built: tuple[Path, Path], tmp_path: Path, monkeypatch: Any
) -> None:
    _, wh = built
    export, folder = wh / "exports" / "scripted", tmp_path / "preview"
    ok(cli("publish", export, "--repo-id", "me/ds", "-w", wh, f"--dry-run={folder}"))
    with monkeypatch.context() as patched:  # the replaced copy cannot be removed (a busy mount, say)
        patched.setattr("factory.core.owned._remove_leftover", lambda folder: None)
        ok(cli("publish", export, "--repo-id", "me/ds", "-w", wh, f"--dry-run={folder}"))
    old = [p for p in tmp_path.iterdir() if p.name.startswith(".preview.factory-old-")]
    assert len(old) == 1 and (old[0] / LEFTOVER).is_file()
    ok(cli("publish", export, "--repo-id", "me/ds", "-w", wh, f"--dry-run={folder}"))
    assert not [p.name for p in tmp_path.iterdir() if ".factory-" in p.name]
    assert (folder / "README.md").is_file()


# ------------------------------------------------------------------------------------------------ report
def test_report_writes_over_its_own_page_only(shared_build: tuple[Path, Path], tmp_path: Path) -> None:
    _, wh = shared_build
    page = tmp_path / "page.html"
    ok(cli("report", "--out", page, "-w", wh))
    ok(cli("report", "--out", page, "-w", wh))  # an earlier report: replaced
    mine = tmp_path / "mine.html"
    mine.write_text("<html>my page</html>")
    refused(cli("report", "--out", mine, "-w", wh), "did not write")
    assert mine.read_text() == "<html>my page</html>"
    current = next((wh / "tables" / "prompts").rglob("CURRENT.json"))
    before = current.read_bytes()
    refused(cli("report", "--out", current, "-w", wh), "warehouse")
    assert current.read_bytes() == before
    link = tmp_path / "link.html"
    link.symlink_to(mine)
    refused(cli("report", "--out", link, "-w", wh), "symbolic link")


# -------------------------------------------------------------------------------------------------- eval
def test_eval_alpaca_eval_out_refuses_a_users_file_and_the_warehouse(tmp_path: Path, kit: Any) -> None:
    from test_eval_scripted import RECIPE as EVAL_RECIPE

    path = kit.write_edited(EVAL_RECIPE, tmp_path / "r.yaml")
    wh = tmp_path / "wh"
    mine = tmp_path / "outputs.json"
    mine.write_text('[{"instruction": "x", "output": "y", "generator": "me", "dataset": "d", "note": "mine"}]')
    before = mine.read_bytes()
    refused(cli("eval", path, "-w", wh, "-q", "--alpaca-eval-out", mine), "did not write")
    assert mine.read_bytes() == before
    assert not (wh / "runs").exists() or not any((wh / "runs").iterdir())  # refused before any run or call

    ours = tmp_path / "ours.json"
    ok(cli("eval", path, "-w", wh, "-q", "--alpaca-eval-out", ours))
    ok(cli("eval", path, "-w", wh, "-q", "--alpaca-eval-out", ours))  # its own file: replaced
    run = next((wh / "runs").iterdir())
    before = run.read_bytes()
    refused(cli("eval", path, "-w", wh, "-q", "--alpaca-eval-out", run), "warehouse")
    assert run.read_bytes() == before


# ------------------------------------------------------------------------------------------- judge-eval
def test_judge_eval_report_folder_replaces_only_its_own(tmp_path: Path) -> None:
    data = tmp_path / "toy.jsonl"
    rows = [{"input": f"Say {w}.", "output_1": w, "output_2": "no", "label": 1} for w in ("yes", "hi", "ok")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    wh = tmp_path / "wh"
    args = ["judge-eval", "--data", f"toy={data}", "--judge", "scripted", "--protocol", "reffree", "-w", wh, "-q"]
    mine = tmp_path / "results"
    files = user_tree(mine)
    refused(cli(*args, "--out", mine), "did not write")
    assert snapshot(mine) == files
    assert not (wh / "runs").exists() or not any((wh / "runs").iterdir())  # refused before any judging

    ok(cli(*args, "--out", tmp_path / "report"))
    ok(cli(*args, "--out", tmp_path / "report"))
    assert (tmp_path / "report" / "table1.csv").is_file()
    # The default folder of a release that wrote no marker holds only judge-eval's files: it is adopted.
    legacy = wh / "judge-eval"
    legacy.mkdir()
    (legacy / "table1.csv").write_text("old")
    ok(cli(*args))
    assert (legacy / "table1.csv").read_text() != "old"


# ------------------------------------------------------------------------------------- the folder helper
KIND = FolderKind("test folder", ".factory-test.json", "--out")


def test_replace_folder_replaces_its_own_and_sweeps_only_marked_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "t"
    first = new_folder_beside(target)
    (first / "a.txt").write_text("1")
    seal(first, KIND, {})
    replace_folder(first, target, KIND)
    assert (target / "a.txt").read_text() == "1" and not (target / LEFTOVER).exists()
    second = new_folder_beside(target)
    (second / "a.txt").write_text("2")
    seal(second, KIND, {})
    replace_folder(second, target, KIND)
    assert (target / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # nothing left beside it
    # A build folder that never got swapped in (a killed command) is swept; a user's look-alike is not.
    third = new_folder_beside(target)
    look_alike = tmp_path / ".t.factory-tmp-users"
    look_alike.mkdir()
    assert sweep_leftovers(target) == [third]
    assert look_alike.is_dir()


@pytest.mark.model
def test_model_conversion_sweeps_only_its_own_leftovers(tmp_path: Path, monkeypatch: Any) -> None:
    from factory.models.hf import embedded_model_dir

    monkeypatch.setenv("FACTORY_CACHE", str(tmp_path / "cache"))
    models = tmp_path / "cache" / "models"
    name = embedded_model_dir.__defaults__[0]
    from factory.config.vocabulary import EMBEDDED_MODELS
    from factory.models.registry import package_version

    version = package_version(EMBEDDED_MODELS[name][0].replace("_", "-"))
    target = models / f"{name}-{version}"
    killed = new_folder_beside(target)  # what a conversion killed mid-way leaves
    mine = user_tree(models / f".{target.name}.factory-tmp-mine")  # a look-alike without the marker
    assert embedded_model_dir(name) == target
    assert (target / "config.json").is_file() and not (target / LEFTOVER).exists()
    assert not killed.exists()
    assert snapshot(models / f".{target.name}.factory-tmp-mine") == mine
