"""`factory publish`: a real export (built in milliseconds with the `scripted` backend, no torch) written as the
Hub's Parquet layout and dataset card by `--dry-run`, and uploaded to a stand-in for the Hugging Face Hub
(tests/hub_standin.py: a local HTTP server on 127.0.0.1 answering the calls huggingface_hub makes; it is not
the Hub). Every test runs the real command through click's CliRunner with HF_ENDPOINT, HF_TOKEN and offline
mode set per test (monkeypatch restores them), and checks where the token went: only into `Authorization`
headers the stand-in received, never into the warehouse, the export or the output.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hub_standin import HubStandIn

from factory.build.command import Build
from factory.cli.main import main
from factory.config.loading import load_recipe
from factory.publish.command import DRY_RUN_MARKER
from factory.warehouse.store import Warehouse

# A recognisable fake token: if it shows up anywhere but an Authorization header, the test says where.
TOKEN = "hf_FactoryStandInToken0123456789abcdef"
REPO = "factory-tests/scripted-prefs"
SHARDS = ["data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, kit: Any) -> Path:
    """One real export (3 train rows, 1 test row), built once for the module; tests publish copies of it."""
    root = tmp_path_factory.mktemp("built")
    path = kit.scripted(root)
    run = Build(load_recipe(path), Warehouse(root / "wh")).run()
    assert run["status"] == "ok"
    return root / "wh" / "exports" / "scripted"


@pytest.fixture
def export(built: Path, tmp_path: Path) -> Path:
    """This test's own copy of the export."""
    return Path(shutil.copytree(built, tmp_path / "scripted"))


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token, no endpoint, online, no xet, and no login cache, whatever the machine has; restored after."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads these once, at import: another test may have imported it offline.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # xet uploads go to a storage service the stand-in does not imitate; LFS is the Hub's other upload path.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")


def publish(*args: Any) -> Result:
    return CliRunner().invoke(main, ["publish", *map(str, args)])


def one_error(result: Result) -> str:
    """The single `error:` line of a refused command (no traceback, non-zero exit)."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def files(root: Path) -> dict[str, bytes]:
    """The files under `root`, without the marker by which a dry run's folder is known as factory's."""
    found = (p for p in sorted(root.rglob("*")) if p.is_file() and p.name != DRY_RUN_MARKER)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in found}


def publications(wh: Path) -> list[dict[str, Any]]:
    return Warehouse(wh).query("SELECT * FROM publications ORDER BY published_at").to_pylist()


def export_rows(export: Path) -> dict[str, list[dict[str, Any]]]:
    import datasets

    return {split: ds.to_list() for split, ds in datasets.load_from_disk(str(export)).items()}


def card_of(folder: Path) -> Any:
    """The folder's README.md as the Hub reads it, its metadata round-tripped through DatasetCardData."""
    from huggingface_hub import DatasetCard, DatasetCardData

    card = DatasetCard.load(folder / "README.md", repo_type="dataset")
    return card, DatasetCardData(**card.data.to_dict())


# -------------------------------------------------------------------------------------------------- dry run


def test_dry_run_writes_loadable_shards_and_a_valid_card(export: Path, tmp_path: Path, monkeypatch: Any) -> None:
    import datasets

    from factory.export.content_hash import dataset_hash

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a dry run needs no network and no token
    wh = tmp_path / "wh"
    out = ok(publish(export, "--repo-id", REPO, "--dry-run", "-w", wh)).output
    folder = tmp_path / "scripted-publish"
    assert str(folder.name) in out and all(path in out for path in SHARDS)
    assert sorted(files(folder)) == sorted(["README.md", *SHARDS])

    # The folder loads as the Hub would load the repo (through the card's configs), with the export's rows.
    loaded = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert {split: ds.to_list() for split, ds in loaded.items()} == export_rows(export)
    assert loaded["train"].features == datasets.load_from_disk(str(export))["train"].features

    card, data = card_of(folder)
    assert data.license == "unknown" and data.task_categories == ["text-generation"]
    assert {"dpo", "preference", "factory"} <= set(data.tags) and data.size_categories == ["n<1K"]
    (config,) = data.configs
    paths = {entry["split"]: entry["path"] for entry in config["data_files"]}
    assert paths == {"train": [SHARDS[0]], "test": [SHARDS[1]]}
    assert all((folder / p).is_file() for ps in paths.values() for p in ps)
    # The body keeps the export's own card: recipe, lineage, counts, score statistics, position consistency.
    original = (export / "README.md").read_text(encoding="utf-8").split("---", 2)[2].strip()
    assert original in card.text
    for kept in ("export stage key", "## Counts", "Position consistency", "## Recipe", "Margin"):
        assert kept in card.text
    assert f'load_dataset("{REPO}")' in card.text

    (row,) = publications(wh)
    assert row["dry_run"] is True and row["commit_id"] is None and row["repo_id"] == REPO
    assert row["revision"] == "main" and json.loads(row["files"]) == [*SHARDS, "README.md"]
    assert json.loads(row["rows"]) == {"train": 3, "test": 1}
    assert row["export_hash"] == dataset_hash(datasets.load_from_disk(str(export)))

    # Another dry run (to a named folder, with a license) is another row: every publication stays in the view.
    ok(publish(export, "--repo-id", REPO, "--license", "cc-by-4.0", "-w", wh, f"--dry-run={tmp_path / 'named'}"))
    assert card_of(tmp_path / "named")[1].license == "cc-by-4.0"
    assert len(publications(wh)) == 2
    # A rerun replaces its own earlier folder, never a folder with anything else in it.
    ok(publish(export, "--repo-id", REPO, "--dry-run", "-w", wh))
    (folder / "notes.txt").write_text("mine")
    assert "notes.txt" in one_error(publish(export, "--repo-id", REPO, "--dry-run", "-w", wh))
    assert (folder / "notes.txt").read_text() == "mine"


def test_shards_and_empty_splits(export: Path, tmp_path: Path) -> None:
    import datasets

    from factory.export.dataset import PREFERENCE
    from factory.export.writer import write_dataset_folder
    from factory.publish.command import publish as run_publish

    # Shards of at most 1 byte: one row per shard, named as the Hub names shards, read back in order.
    done = run_publish(export, REPO, Warehouse(tmp_path / "wh"), dry_run=str(tmp_path / "sharded"), max_shard_bytes=1)
    assert done.staged.shards["train"] == [f"data/train-0000{i}-of-00003.parquet" for i in range(3)]
    loaded = datasets.load_dataset(str(tmp_path / "sharded"), cache_dir=str(tmp_path / "cache"))
    assert {split: ds.to_list() for split, ds in loaded.items()} == export_rows(export)

    # An empty split is left out of the files and the card: load_dataset refuses a split without rows.
    train = export_rows(export)["train"]
    readme = (export / "README.md").read_text(encoding="utf-8")
    only_train = tmp_path / "only-train"
    write_dataset_folder(only_train, {"train": train, "test": []}, PREFERENCE, readme, "k", "r")
    out = ok(publish(only_train, "--repo-id", REPO, "--dry-run", "-w", tmp_path / "wh")).output
    assert "split 'test' has no rows" in out
    assert sorted(files(tmp_path / "only-train-publish")) == ["README.md", SHARDS[0]]
    (config,) = card_of(tmp_path / "only-train-publish")[1].configs
    assert [entry["split"] for entry in config["data_files"]] == ["train"]


# ------------------------------------------------------------------------------------------ the stand-in Hub


# huggingface_hub's LFS upload passes a file to httpx2 as `data=`, which httpx2 deprecates; not factory's to fix.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
def test_publish_to_a_stand_in_hub(export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    wh = tmp_path / "wh"
    ok(publish(export, "--repo-id", REPO, "--revision", "dev", "--dry-run", tmp_path / "preview", "-w", wh))
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        first = ok(publish(export, "--repo-id", REPO, "-w", wh))
        second = ok(publish(export, "--repo-id", REPO, "--revision", "dev", "--private", "-w", wh))
    assert hub.unexpected == []
    main_commit, dev_commit = hub.commits
    assert (main_commit.revision, dev_commit.revision) == ("main", "dev") and hub.repos[REPO].branches["dev"]
    # One commit each: the Parquet shards through LFS, the card inline, byte for byte what the dry run wrote.
    assert dev_commit.files == files(tmp_path / "preview")
    assert dev_commit.kinds == {**dict.fromkeys(SHARDS, "lfsFile"), "README.md": "file"}
    assert sorted(main_commit.files) == sorted([*SHARDS, "README.md"])
    assert main_commit.files[SHARDS[0]] == dev_commit.files[SHARDS[0]]
    assert b'load_dataset("factory-tests/scripted-prefs", revision="dev")' in dev_commit.files["README.md"]

    # The token went only into Authorization headers; nowhere on disk, nowhere in the output.
    assert hub.token_leaks(TOKEN) == []
    assert any(value == f"Bearer {TOKEN}" for r in hub.requests for name, value in r.headers)
    for root in (wh, export, tmp_path / "preview"):
        leaked = [path for path, data in files(root).items() if TOKEN.encode() in data]
        assert leaked == [], f"the token is in {root}: {leaked}"
    assert TOKEN not in first.output + second.output

    dry, on_main, on_dev = publications(wh)
    assert dry["dry_run"] and not on_main["dry_run"] and not on_dev["dry_run"]
    for row, commit in ((on_main, main_commit), (on_dev, dev_commit)):
        assert row["repo_id"] == REPO and row["revision"] == commit.revision and row["endpoint"] == hub.url
        assert row["commit_id"] == commit.oid and row["commit_url"].endswith(f"/commit/{commit.oid}")
        assert commit.oid in (first.output if commit is main_commit else second.output)
    assert (on_main["private"], on_dev["private"]) == (False, True) and hub.repos[REPO].private is False
    assert len({row["export_hash"] for row in (dry, on_main, on_dev)}) == 1


# ------------------------------------------------------------------------------------------------- refusals


def test_missing_token_is_one_line(export: Path, tmp_path: Path) -> None:
    line = one_error(publish(export, "--repo-id", REPO, "-w", tmp_path / "wh"))
    assert "no Hugging Face token" in line and "HF_TOKEN" in line
    assert not (tmp_path / "wh").exists()


def test_a_refused_repo_is_one_line_naming_it(export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    wh = tmp_path / "wh"
    with HubStandIn(refuse_create=403) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = publish(export, "--repo-id", REPO, "-w", wh)
    line = one_error(result)
    assert REPO in line and "403" in line and TOKEN not in result.output
    assert hub.commits == [] and hub.token_leaks(TOKEN) == []
    (run,) = Warehouse(wh).query("SELECT status, error FROM runs").to_pylist()
    assert run["status"] == "failed" and REPO in run["error"] and TOKEN not in run["error"]
    assert publications(wh) == []
    assert all(TOKEN.encode() not in data for data in files(wh).values())


def test_offline_and_unreachable_hub_are_one_line(
    export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in one_error(publish(export, "--repo-id", REPO, "-w", tmp_path / "wh"))
    assert not (tmp_path / "wh").exists()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    result = publish(export, "--repo-id", REPO, "-w", tmp_path / "wh")
    assert "cannot reach the Hub" in one_error(result) and TOKEN not in result.output


@pytest.mark.parametrize(
    "repo_id", ["prefs", "a/b/c", "-a/b", "a/b-", "a--b/c", "a/b..c", "a/", "/b", "a b/c", "a/" + "x" * 97]
)
def test_bad_repo_ids_are_refused(export: Path, tmp_path: Path, repo_id: str) -> None:
    assert "OWNER/NAME" in one_error(publish(export, "--repo-id", repo_id, "--dry-run", "-w", tmp_path / "wh"))
    assert not (tmp_path / "wh").exists()


def test_anything_but_a_complete_factory_export_is_refused(export: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "dataset_dict.json").write_text("{}")
    marker = export / ".factory-export.json"
    cases = {foreign: "not an export folder written by factory", tmp_path / "nowhere": "no such folder"}
    for path, message in cases.items():
        assert message in one_error(publish(path, "--repo-id", REPO, "--dry-run", "-w", tmp_path / "wh"))
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "complete": False}))
    assert "did not finish" in one_error(publish(export, "--repo-id", REPO, "--dry-run", "-w", tmp_path / "wh"))
    for revision in ("a..b", "refs/pr/1", "-x", "x.lock"):
        line = one_error(publish(export, "--repo-id", REPO, "--revision", revision, "-w", tmp_path / "wh"))
        assert "--revision" in line
    assert not (tmp_path / "wh").exists()
