"""Reliability of `factory build` as a process: kill -9 at random points, Ctrl-C, two builds on one warehouse,
corrupt call files, transient and non-transient model failures.

Every build runs as a real `python -m factory.cli.main build` subprocess on the `scripted` backend (deterministic
answers, injected delays and failures, no torch), so a killed build is really killed and a resumed one really
starts from what is on disk. Finished warehouses are compared with an uninterrupted build of the same recipe
on the content columns of every stage table, the exported Parquet files and the calls tables.

With FACTORY_RELIABILITY_OUT set, the kill -9 trials and the other scenarios write what they measured to that
JSON file (`bench/reliability.py` prints it as a table). docs/RELIABILITY.md describes each check.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NAME = "rel"
STAGE_TABLES = ("prompts", "references", "samples", "judgments", "scores", "pairs")
CALL_TABLES = ("generation_calls", "judge_calls")
# Columns that differ between two builds by design: who made a row, when, how fast; and the exported rows'
# recipe_hash, a hash of the whole recipe file, which the variants with other delays or injected failures change.
VOLATILE = frozenset({"run_id", "latency_s", "created_at", "started_at", "finished_at", "seconds", "recipe_hash"})
NESTED_ENV = "FACTORY_RELIABILITY_NESTED"
OUT_ENV = "FACTORY_RELIABILITY_OUT"
BUILD_TIMEOUT_S = 120  # one build; a healthy one takes 1-5 s
POLL_S = 0.002

PROMPTS = [
    {"instruction": "Name a color.", "ref": "Blue."},
    {"instruction": "Say hi.", "ref": "Hi."},
    {"instruction": "Name a fruit.", "ref": "Apple."},
    {"instruction": "What is 2+2?", "ref": "4"},
    {"instruction": "Name an animal.", "ref": "Cat."},
    {"instruction": "Name a country.", "ref": "France."},
    {"instruction": "Name a planet.", "ref": "Mars."},
    {"instruction": "Name a tool.", "ref": "Hammer."},
]
N = 4
# 8 model references (ref, 2 per batch), 8 sample requests of 4 samples (pol, 2 per batch), 8 × 4 × 3 = 96
# judge calls (judge, 8 per batch): 136 calls. The default delays make an uninterrupted build last ~3 s.
DELAYS = {"ref": 0.03, "pol": 0.03, "judge": 0.005}
SLOW_DELAYS = {"ref": 0.06, "pol": 0.06, "judge": 0.025}  # ~4 s of work after the lock: time to start another
NO_DELAYS = {"ref": 0.0, "pol": 0.0, "judge": 0.0}
BATCH = {"ref": 2, "pol": 2, "judge": 8}


# ---------------------------------------------------------------------------------------------- recipes
def recipe_data(delays: dict[str, float] | None = None, refs: str = "model", **script: Any) -> dict[str, Any]:
    """The test recipe. `delays` and `script` (fail_rate, crash_after, ...) are operational: they change no
    request key, so every variant's finished tables equal the default's (for the same `refs`)."""
    delays = DELAYS if delays is None else delays
    models = {
        name: {"backend": "scripted", "batch_size": BATCH[name], "script": {"delay_s": delays[name], **script}}
        for name in ("ref", "pol", "judge")
    }
    if refs == "model":
        references = [{"name": "gold", "kind": "model", "model": "ref", "params": {"max_tokens": 12}}]
    else:
        references = [{"name": "gold", "kind": "column", "field": "ref"}]
    return {
        "name": NAME,
        "models": models,
        "prompts": {"inline": PROMPTS, "reference_fields": ["ref"]},
        "references": references,
        "samples": {"policy": "pol", "n": N, "params": {"max_tokens": 10}},
        "judgments": {"judge": "judge", "protocol": "refeval", "reference": "gold"},
        "export": {"test_fraction": 0.25},
    }


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ processes
def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default, so Python installs its KeyboardInterrupt handler
    even when the test runner ignores SIGINT (an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FACTORY_DEBUG", None)  # it turns one-line errors into tracebacks
    return env


def factory_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "factory.cli.main", *args]


def start_build(recipe: Path, wh: Path, stderr: Path) -> subprocess.Popen[bytes]:
    """`factory build RECIPE -w WH -q` in its own process; stderr goes to a file (a pipe could fill up)."""
    with open(stderr, "wb") as err:
        return subprocess.Popen(
            factory_cmd("build", str(recipe), "-w", str(wh), "-q"),
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=_default_sigint,
            env=_env(),
            cwd=ROOT,
        )


def spawn_cli(*args: str) -> subprocess.Popen[str]:
    """`factory ARGS` in its own process, its output captured as text (for short commands)."""
    return subprocess.Popen(
        factory_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
        env=_env(),
        cwd=ROOT,
    )


def run_cli(*args: str, timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        factory_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_default_sigint,
        env=_env(),
        cwd=ROOT,
    )


def run_build(recipe: Path, wh: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("build", str(recipe), "-w", str(wh), "-q")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------ warehouse state
def _table_done(table: str) -> Callable[[Path], bool]:
    # A stage's version file is complete when the stage ends; the pointers (CURRENT.json) are all written
    # together once every shard is done (docs/DESIGN.md, "Shards"), so they cannot tell the stages apart.
    return lambda wh: any((wh / "tables" / table / NAME).glob("*.complete"))


# What a build has done so far, in order, as files a watcher can see: the runs row (written once the lock is
# held), each stage table's version file (complete when the stage ends), the export folder's marker.
MARKS: list[tuple[str, Callable[[Path], bool]]] = [
    ("lock", lambda wh: any((wh / "runs").glob("*.parquet"))),
    *[(t, _table_done(t)) for t in STAGE_TABLES],
    ("export", lambda wh: (wh / "exports" / NAME / ".factory-export.json").is_file()),
]
MARK_NAMES = [m for m, _ in MARKS]


def stage_at(wh: Path) -> str:
    """The stage a stopped build was in: the first mark it had not reached ("finish": after the export)."""
    for name, reached in MARKS:
        if not reached(wh):
            return "startup" if name == "lock" else name
    return "finish"


def call_rows(wh: Path, table: str) -> list[dict[str, Any]]:
    """Every row of a calls table: its parts and compacted files, less the files that a compacted file says
    it holds (a compaction killed before removing them leaves them); files set aside in corrupt/ are not
    globbed."""
    folder = wh / "calls" / table
    compacted = sorted(folder.glob("compact-*.parquet"))
    covered = {name for c in compacted for name in json.loads(pq.read_metadata(c).metadata[b"factory.covers"])}
    files = [p for p in sorted(folder.glob("part-*.parquet")) + compacted if p.name not in covered]
    return [row for p in files for row in pq.read_table(p).to_pylist()]


def all_calls(wh: Path) -> list[dict[str, Any]]:
    return [row for t in CALL_TABLES for row in call_rows(wh, t)]


def ok_keys(wh: Path) -> Counter[tuple[str, str]]:
    return Counter((t, r["request_key"]) for t in CALL_TABLES for r in call_rows(wh, t) if r["status"] == "ok")


def duplicated(keys: Counter[tuple[str, str]]) -> int:
    """Calls made more than once: ok rows beyond the first for any request key."""
    return sum(n - 1 for n in keys.values() if n > 1)


def runs_rows(wh: Path) -> list[dict[str, Any]]:
    rows = [pq.read_table(p).to_pylist()[0] for p in sorted((wh / "runs").glob("*.parquet"))]
    return sorted(rows, key=lambda r: r["started_at"])


def _norm(row: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in VOLATILE}, sort_keys=True, default=str)


def snapshot(wh: Path) -> dict[str, Counter[str]]:
    """The content of every stage table's current version and of the exported Parquet files."""
    out: dict[str, Counter[str]] = {}
    for table in STAGE_TABLES:
        pointer = wh / "tables" / table / NAME / "CURRENT.json"
        rows: list[dict[str, Any]] = []
        if pointer.is_file():
            key = json.loads(pointer.read_text())["stage_key"]
            rows = pq.read_table(pointer.parent / f"{key}.parquet").to_pylist()
        out[table] = Counter(_norm(r) for r in rows)
    for split in ("train", "test"):
        files = sorted((wh / "exports" / NAME / "data").glob(f"{split}-*.parquet"))
        out[f"export/{split}"] = Counter(_norm(r) for f in files for r in pq.read_table(f).to_pylist())
    return out


def differences(reference: dict[str, Counter[str]], got: dict[str, Counter[str]]) -> tuple[int, int, list[str]]:
    """(rows of the reference missing, rows not in the reference, names of the tables that differ)."""
    lost = extra = 0
    differ = []
    for name, want in reference.items():
        have = got.get(name, Counter())
        missing, surplus = sum((want - have).values()), sum((have - want).values())
        lost, extra = lost + missing, extra + surplus
        if missing or surplus:
            differ.append(f"{name} (-{missing} +{surplus})")
    return lost, extra, differ


def leftovers(wh: Path) -> list[str]:
    """Temporary files and folders an interrupted write left behind (harmless to readers; the next build under
    the lock removes them)."""
    found = [p for p in wh.rglob("*.tmp")]
    exports = wh / "exports"
    if exports.is_dir():
        found += [p for p in exports.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    return sorted(str(p.relative_to(wh)) for p in found)


def record(key: str, value: Any) -> None:
    """Merge one scenario's figures into $FACTORY_RELIABILITY_OUT (a JSON object), when it is set."""
    path = os.environ.get(OUT_ENV)
    if not path:
        return
    out = Path(path)
    data = json.loads(out.read_text()) if out.is_file() and out.stat().st_size else {}
    data[key] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str))


def wait_for(proc: subprocess.Popen[bytes], wh: Path, mark: str, deadline: float) -> float:
    """Poll until the build reaches `mark`; returns the monotonic time it was seen. Fails if the build ends or
    the deadline passes first."""
    reached = dict(MARKS)[mark]
    while not reached(wh):
        assert proc.poll() is None, f"the build ended (exit {proc.returncode}) before reaching '{mark}'"
        assert time.monotonic() < deadline, f"the build did not reach '{mark}' in time"
        time.sleep(POLL_S)
    return time.monotonic()


# ------------------------------------------------------------------------------------ the reference build
@dataclass
class Reference:
    """An uninterrupted build of the default recipe, timed mark by mark."""

    wh: Path
    recipe: Path
    seconds: float
    timeline: dict[str, float]
    tables: dict[str, Counter[str]]
    ok_calls: Counter[tuple[str, str]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    base = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(base / "recipe.yaml", recipe_data())
    wh = base / "wh"
    t0 = time.monotonic()
    proc = start_build(recipe, wh, base / "stderr.txt")
    timeline: dict[str, float] = {}
    try:
        deadline = t0 + BUILD_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            for name, reached in MARKS:
                if name not in timeline and reached(wh):
                    timeline[name] = round(time.monotonic() - t0, 4)
            time.sleep(POLL_S)
    finally:
        stop(proc)
    seconds = round(time.monotonic() - t0, 3)
    assert proc.returncode == 0, (base / "stderr.txt").read_text()
    missed = [m for m in MARK_NAMES if m not in timeline]
    assert not missed, f"the watcher never saw {missed}"
    keys = ok_keys(wh)
    assert duplicated(keys) == 0 and len(keys) == 8 + 8 * N + 8 * N * (N - 1)
    return Reference(wh, recipe, seconds, timeline, snapshot(wh), keys)


# ------------------------------------------------------------------------------------- (a) kill -9
KILL_TRIALS = 10
# Stratified: every model stage and the export is hit. A trial waits for the mark before its target stage
# (observed in that trial's own build, so machine load cannot shift the kill into another stage), then sleeps
# a random share of that stage's length in the reference build.
KILL_TARGETS = ["references", "samples", "judgments", "export"] * 2 + ["judgments", "export"]
SHARE = {"references": (0.1, 0.9), "samples": (0.1, 0.9), "judgments": (0.1, 0.9), "export": (0.2, 0.9)}


def kill_plan(ref: Reference, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    plan = []
    for i, target in enumerate(KILL_TARGETS[:KILL_TRIALS]):
        trigger = MARK_NAMES[MARK_NAMES.index(target) - 1]
        window = ref.timeline[target] - ref.timeline[trigger]
        share = rng.uniform(*SHARE[target])
        plan.append({"trial": i + 1, "target": target, "after": trigger, "offset_s": round(share * window, 4)})
    return plan


def kill_trial(ref: Reference, base: Path, trial: dict[str, Any]) -> dict[str, Any]:
    """Kill -9 one build at its planned point, resume it, compare with the reference; returns the figures
    (with `error` saying what went wrong when the trial could not be carried out)."""
    try:
        return _kill_trial(ref, base, trial)
    except Exception as exc:
        return {**trial, "error": f"{type(exc).__name__}: {exc}"}


def _kill_trial(ref: Reference, base: Path, trial: dict[str, Any]) -> dict[str, Any]:
    folder = base / f"trial{trial['trial']:02d}"
    folder.mkdir()
    wh = folder / "wh"
    t0 = time.monotonic()
    proc = start_build(ref.recipe, wh, folder / "killed.stderr")
    try:
        wait_for(proc, wh, trial["after"], t0 + BUILD_TIMEOUT_S)
        time.sleep(trial["offset_s"])
        kill_s = time.monotonic() - t0
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    stage = stage_at(wh)
    killed_runs = [r["run_id"] for r in runs_rows(wh)] if (wh / "runs").is_dir() else []
    before = all_calls(wh)
    left_at_kill = leftovers(wh)
    resumes, statuses = 0, []
    while resumes < 3:  # a plain rebuild, repeated until it ends ok
        resumes += 1
        result = run_build(ref.recipe, wh)
        statuses.append(result.returncode)
        if result.returncode == 0:
            break
    after = all_calls(wh)
    keys = ok_keys(wh)
    lost, extra, differ = differences(ref.tables, snapshot(wh))
    return {
        **trial,
        "kill_s": round(kill_s, 3),
        "exit_code": proc.returncode,
        "stage_hit": stage,
        "calls_before_kill": len(before),
        "calls_on_resume": sum(1 for r in after if r["run_id"] not in killed_runs),
        "resume_exit_codes": statuses,
        "lost_rows": lost,
        "extra_rows": extra,
        "tables_differ": differ,
        "lost_calls": len(set(ref.ok_calls) - set(keys)),
        "duplicated_calls": duplicated(keys),
        "ok_calls": sum(keys.values()),
        "reference_ok_calls": sum(ref.ok_calls.values()),
        "temp_left_at_kill": left_at_kill,
        "temp_left_after_resume": leftovers(wh),
    }


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume(reference: Reference, tmp_path: Path) -> None:
    seed = int(os.environ.get("FACTORY_RELIABILITY_SEED", "20240917"))
    jobs = int(os.environ.get("FACTORY_RELIABILITY_JOBS", "2"))
    plan = kill_plan(reference, seed)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        trials = list(pool.map(lambda t: kill_trial(reference, tmp_path, t), plan))
    record(
        "kill9",
        {
            "seed": seed,
            "jobs": jobs,
            "reference_seconds": reference.seconds,
            "reference_timeline": reference.timeline,
            "reference_ok_calls": sum(reference.ok_calls.values()),
            "trials": trials,
        },
    )
    problems = [f"trial {t['trial']}: {t['error']}" for t in trials if "error" in t]
    for t in (t for t in trials if "error" not in t):
        if t["exit_code"] != -signal.SIGKILL:
            problems.append(f"trial {t['trial']}: the build was not killed (exit {t['exit_code']})")
        if t["resume_exit_codes"][-1] != 0:
            problems.append(f"trial {t['trial']}: no resume ended ok ({t['resume_exit_codes']})")
        if t["lost_rows"] or t["extra_rows"]:
            problems.append(f"trial {t['trial']}: tables differ from the reference: {t['tables_differ']}")
        if t["temp_left_after_resume"]:
            problems.append(f"trial {t['trial']}: the resume left temporary files: {t['temp_left_after_resume']}")
        if t["duplicated_calls"] or t["lost_calls"] or t["ok_calls"] != t["reference_ok_calls"]:
            problems.append(
                f"trial {t['trial']}: {t['duplicated_calls']} duplicated, {t['lost_calls']} lost calls, "
                f"{t['ok_calls']} ok calls (reference {t['reference_ok_calls']})"
            )
        if t["calls_before_kill"] + t["calls_on_resume"] != t["reference_ok_calls"]:
            problems.append(
                f"trial {t['trial']}: {t['calls_before_kill']} calls before the kill + {t['calls_on_resume']} "
                f"on resume != {t['reference_ok_calls']}"
            )
    assert not problems, "\n".join(problems)
    hit = {t["stage_hit"] for t in trials}
    assert {"references", "samples", "judgments", "export"} <= hit, f"stages hit: {sorted(hit)}"


# ---------------------------------------------------------------------------------------- (b) Ctrl-C
def check_ctrl_c(tmp_path: Path) -> dict[str, Any]:
    """SIGINT once the first sample batch is on disk: exit 130, an `interrupted` runs row, and a resumed build
    that makes only the missing calls."""
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_data({"ref": 0.0, "pol": 0.04, "judge": 0.0}, "column"))
    wh = tmp_path / "wh"
    folder = wh / "calls" / "generation_calls"
    t0 = time.monotonic()
    proc = start_build(recipe, wh, tmp_path / "stderr.txt")
    try:
        while not any(folder.glob("part-*.parquet")):
            assert proc.poll() is None, f"the build ended (exit {proc.returncode}) before its first sample batch"
            assert time.monotonic() < t0 + BUILD_TIMEOUT_S, "no sample batch written in time"
            time.sleep(POLL_S)
        signal_s = time.monotonic() - t0
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        exit_s = time.monotonic() - t0 - signal_s
    finally:
        stop(proc)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    written = len(call_rows(wh, "generation_calls"))
    assert 0 < written < len(PROMPTS) * N, f"the interrupt came too late to test resuming ({written} calls)"
    [interrupted] = runs_rows(wh)
    assert interrupted["status"] == "interrupted"
    assert interrupted["finished_at"] is not None

    result = run_build(recipe, wh)
    assert result.returncode == 0, result.stderr
    keys = ok_keys(wh)
    assert duplicated(keys) == 0
    assert sum(1 for t, _ in keys if t == "generation_calls") == len(PROMPTS) * N
    resumed = runs_rows(wh)[-1]
    assert resumed["status"] == "ok"
    samples = {s["stage"]: s for s in resumed["stages"]}["samples"]
    assert samples["cached_calls"] == written
    assert samples["model_calls"] == len(PROMPTS) * N - written
    return {
        "signal_s": round(signal_s, 3),
        "exit_code": code,
        "exit_after_signal_s": round(exit_s, 3),
        "calls_before": written,
        "calls_on_resume": samples["model_calls"],
        "duplicated_calls": duplicated(keys),
        "runner_ignores_sigint": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    }


def test_ctrl_c_core(tmp_path: Path) -> None:
    if os.environ.get(NESTED_ENV):  # the nested run below checks that it really runs with SIGINT ignored
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    figures = check_ctrl_c(tmp_path)
    record("ctrl_c_runner_ignores_sigint" if os.environ.get(NESTED_ENV) else "ctrl_c", figures)


@pytest.mark.slow
def test_ctrl_c_when_the_runner_ignores_sigint(tmp_path: Path) -> None:
    """A background CI job starts pytest with SIGINT ignored; the build must still get Ctrl-C."""
    if os.environ.get(NESTED_ENV):
        pytest.skip("already inside the nested run")
    args = [str(Path(__file__)), "-k", "ctrl_c_core", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t")]
    ignore = "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.SIG_IGN)"
    code = f"{ignore}; sys.exit(pytest.main({args!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), NESTED_ENV: "1"},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout, result.stdout[-2000:]


# ------------------------------------------------------------------------------- (c) two builds at once
CONSISTENCY_SQL = (
    "SELECT (SELECT count(*) FROM generation_calls WHERE status = 'ok') AS ok_rows, "
    "(SELECT count(DISTINCT request_key) FROM generation_calls WHERE status = 'ok') AS ok_keys, "
    "(SELECT count(*) FROM samples) AS samples, (SELECT count(*) FROM runs) AS runs"
)


@pytest.mark.slow
def test_second_build_on_a_locked_warehouse_fails_fast(reference: Reference, tmp_path: Path) -> None:
    slow = write_recipe(tmp_path / "slow.yaml", recipe_data(SLOW_DELAYS))
    wh = tmp_path / "wh"
    t0 = time.monotonic()
    a = start_build(slow, wh, tmp_path / "a.stderr")
    try:
        wait_for(a, wh, "lock", t0 + BUILD_TIMEOUT_S)
        locked_s = time.monotonic() - t0
        # B and a reader, at once, while A holds the lock.
        tb = time.monotonic()
        b = spawn_cli("build", str(reference.recipe), "-w", str(wh), "-q")
        sql = spawn_cli("sql", CONSISTENCY_SQL, "-w", str(wh), "--format", "json")
        b_out, b_err = b.communicate(timeout=60)
        b_s = time.monotonic() - tb
        a_running_after_b = a.poll() is None
        sql_out, sql_err = sql.communicate(timeout=60)
        sql_s = time.monotonic() - tb
        a_running_after_sql = a.poll() is None
        a_code = a.wait(timeout=BUILD_TIMEOUT_S)
        a_s = time.monotonic() - t0
    finally:
        stop(a)

    lines = b_err.splitlines()
    assert b.returncode != 0
    assert a_running_after_b, "A ended before B did: B's refusal proves nothing"
    assert len(lines) == 1 and lines[0].startswith("error:"), b_err
    assert "another build is using this warehouse" in lines[0]
    assert "Traceback" not in b_err + b_out

    assert sql.returncode == 0, sql_err
    assert a_running_after_sql, "A ended before the reader did: not a read during a build"
    assert "error" not in sql_err and "Traceback" not in sql_err
    seen = json.loads(sql_out.strip().splitlines()[-1])
    assert seen["ok_rows"] == seen["ok_keys"]
    assert seen["samples"] in (0, len(PROMPTS) * N)  # a stage table is there whole or not at all
    assert seen["runs"] == 1

    assert a_code == 0, (tmp_path / "a.stderr").read_text()
    assert [r["status"] for r in runs_rows(wh)] == ["ok"]  # B left no runs row
    lost, extra, differ = differences(reference.tables, snapshot(wh))
    assert (lost, extra) == (0, 0), differ
    keys = ok_keys(wh)
    assert duplicated(keys) == 0 and keys == reference.ok_calls
    record(
        "lock",
        {
            "a_locked_s": round(locked_s, 3),
            "a_seconds": round(a_s, 3),
            "b_exit_code": b.returncode,
            "b_seconds": round(b_s, 3),
            "b_stderr": lines[0],
            "sql_seconds": round(sql_s, 3),
            "sql_result": seen,
            "a_tables_equal_reference": True,
        },
    )


# ---------------------------------------------------------------------------------- (d) corrupt parts
def damage_two_judge_parts(reference: Reference, tmp_path: Path) -> tuple[Path, list[Path], int]:
    """A copy of the reference warehouse with one judge_calls part cut to half its size and another overwritten
    with garbage; returns the copy, the two parts and how many calls they held."""
    wh = tmp_path / "wh"
    shutil.copytree(reference.wh, wh)
    parts = sorted((wh / "calls" / "judge_calls").glob("part-*.parquet"))
    assert len(parts) >= 3
    bad = [parts[0], parts[len(parts) // 2]]
    held = sum(pq.read_table(p).num_rows for p in bad)
    data = bad[0].read_bytes()
    bad[0].write_bytes(data[: len(data) // 2])
    bad[1].write_bytes(bytes(range(256)) * 16)
    return wh, bad, held


@pytest.mark.slow
def test_corrupt_parts_are_skipped_by_sql_with_a_warning(reference: Reference, tmp_path: Path) -> None:
    wh, bad, held = damage_two_judge_parts(reference, tmp_path)
    result = run_cli("sql", "SELECT count(*) AS n FROM judge_calls", "-w", str(wh), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
    assert "warning" in result.stderr
    for part in bad:
        assert str(part) in result.stderr
    total = sum(n for (t, _), n in reference.ok_calls.items() if t == "judge_calls")
    assert json.loads(result.stdout.strip().splitlines()[-1])["n"] == total - held
    record("corrupt_sql", {"exit_code": result.returncode, "stderr": result.stderr.strip(), "rows_skipped": held})


@pytest.mark.slow
def test_corrupt_parts_are_set_aside_and_remade(reference: Reference, tmp_path: Path) -> None:
    wh, bad, held = damage_two_judge_parts(reference, tmp_path)
    result = run_build(reference.recipe, wh)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    corrupt = wh / "calls" / "judge_calls" / "corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == sorted(p.name for p in bad)
    assert not any(p.exists() for p in bad)
    lost, extra, differ = differences(reference.tables, snapshot(wh))
    assert (lost, extra) == (0, 0), differ
    first = runs_rows(wh)[-1]
    assert first["status"] == "ok"
    # The judgments stage sees that some of its calls are gone from the cache and makes exactly those again.
    judged = {s["stage"]: s for s in first["stages"]}["judgments"]
    assert judged["model_calls"] == held and first["model_calls"] == held
    # With the cache whole again, even a dropped judgments table is rebuilt with no call.
    shutil.rmtree(wh / "tables" / "judgments" / NAME)
    again = run_build(reference.recipe, wh)
    assert again.returncode == 0, again.stderr
    second = runs_rows(wh)[-1]
    assert second["model_calls"] == 0
    lost, extra, differ = differences(reference.tables, snapshot(wh))
    assert (lost, extra) == (0, 0), differ
    keys = ok_keys(wh)
    assert duplicated(keys) == 0 and keys == reference.ok_calls
    record(
        "corrupt_build",
        {
            "parts_damaged": len(bad),
            "calls_held": held,
            "set_aside": sorted(p.name for p in corrupt.iterdir()),
            "calls_remade_by_plain_rebuild": first["model_calls"],
            "calls_remade_with_judgments_dropped": second["model_calls"],
            "tables_equal_reference": True,
        },
    )


# ------------------------------------------------------------------------------ (e) transient failures
@pytest.mark.slow
def test_transient_failures_end_incomplete_then_rebuilds_finish(reference: Reference, tmp_path: Path) -> None:
    flaky = write_recipe(tmp_path / "flaky.yaml", recipe_data(NO_DELAYS, fail_rate=0.3))
    wh = tmp_path / "wh"
    first = run_build(flaky, wh)
    assert first.returncode == 1, first.stderr
    assert "Traceback" not in first.stderr
    assert runs_rows(wh)[0]["status"] == "incomplete"
    errors = [r for r in all_calls(wh) if r["status"] == "error"]
    assert errors and all(r["error"] for r in errors)
    builds = 1
    while builds < 10:
        builds += 1
        result = run_build(flaky, wh)
        if result.returncode == 0:
            break
        assert result.returncode == 1, result.stderr
    runs = runs_rows(wh)
    statuses = [r["status"] for r in runs]
    assert statuses[-1] == "ok", statuses
    assert set(statuses[:-1]) == {"incomplete"}
    keys = ok_keys(wh)
    assert duplicated(keys) == 0 and keys == reference.ok_calls
    got = snapshot(wh)
    lost, extra, differ = differences({t: reference.tables[t] for t in STAGE_TABLES}, got)
    assert (lost, extra) == (0, 0), differ
    lost, extra, differ = differences(reference.tables, got)
    writer = json.loads((wh / "exports" / NAME / ".factory-export.json").read_text())["run_id"]
    # The export an incomplete run wrote must be rewritten by the run that completes.
    stale = {r["run_id"]: r["status"] for r in runs}[writer] == "incomplete"
    record(
        "transient",
        {
            "builds": builds,
            "error_rows": sum(1 for r in all_calls(wh) if r["status"] == "error"),
            "stage_tables_equal_reference": True,
            "export_rows_differing": lost + extra,
            "export_written_by": "incomplete run" if stale else "ok run",
        },
    )
    assert not stale
    assert (lost, extra) == (0, 0), differ


# ----------------------------------------------------------------------------- (f) a non-transient failure
def test_crash_fails_the_run_without_error_rows(tmp_path: Path) -> None:
    crashing = write_recipe(tmp_path / "crash.yaml", recipe_data(NO_DELAYS, crash_after=5))
    wh = tmp_path / "wh"
    result = run_build(crashing, wh)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "scripted crash after 5 requests" in lines[0]
    [run] = runs_rows(wh)
    assert run["status"] == "failed"
    assert "ScriptedCrash" in run["error"]
    rows = all_calls(wh)
    assert rows and all(r["status"] == "ok" for r in rows)  # the batches before the crash, and no error row

    fixed = write_recipe(tmp_path / "fixed.yaml", recipe_data(NO_DELAYS))
    again = run_build(fixed, wh)
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in runs_rows(wh)] == ["failed", "ok"]
    assert duplicated(ok_keys(wh)) == 0
