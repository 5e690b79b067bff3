"""factory's own cost at paper scale: builds of N prompts on the `scripted` backend (a model that takes no time,
so every second and byte measured is factory's), one fresh warehouse per size.

For each size it prints: the build's wall time, CPU time and peak RSS (GNU time), the load average after it,
its time per model call (`ms_per_call`), the time spent inside the backend's methods (`model_s`: the sum of
the call rows' `latency_s`) and factory's own time per model call without it (`factory_ms_per_call`); the
same in CPU time (`model_cpu_s`, as the scripted backend clocks its thread, and `factory_cpu_ms_per_call`:
on a shared machine the wall time also counts the time other programs held the cores), an unchanged rebuild
(wall, RSS, model calls: must be 0), a build after adding 1 % more prompts (wall, calls),
`factory sql "select 1"`, `factory ls`, a GROUP BY over every judgment, and, with `--ray`, the same build
with `--executor ray` on a local cluster (wall, RSS, and whether its tables equal the local build's). With
`--profile` the first build also runs under cProfile and a summary is printed: own time by area (factory's
modules, the backend, json, hashlib, pyarrow, duckdb...) and the top functions by own time.

The recipe is the quickstart's shape: 5 samples of at most 64 tokens per prompt, RefEval against a column
reference in both orders (20 judgments per prompt), batch size 256.

    python bench/scale.py                      # 1K, 10K and 60K prompts
    python bench/scale.py 2000 --profile       # one size, with a profile summary
    python bench/scale.py 60000 --ray
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from factory.models.scripted import CLOCK_ENV

WORDS = [
    "the",
    "a",
    "model",
    "answer",
    "clear",
    "short",
    "long",
    "reply",
    "because",
    "which",
    "every",
    "note",
    "list",
    "first",
    "then",
]


def write_prompts(path: Path, n: int, start: int = 0) -> None:
    """`n` distinct prompts with a reference column (appended when `start` > 0)."""
    with path.open("a" if start else "w", encoding="utf-8") as f:
        for i in range(start, start + n):
            words = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(12))
            row = {"id": f"p{i}", "instruction": f"Question {i}: {words}?", "reference": f"Answer {i}: {words}."}
            f.write(json.dumps(row) + "\n")


def write_recipe(path: Path, prompts: Path) -> None:
    recipe: dict[str, Any] = {
        "name": "scale",
        "models": {"m": {"backend": "scripted", "batch_size": 256}},
        "prompts": {"path": str(prompts), "reference_fields": ["reference"], "id_field": "id"},
        "references": [{"name": "human", "kind": "column", "field": "reference"}],
        "samples": {"policy": "m", "n": 5, "params": {"max_tokens": 64}},
        "judgments": {"judge": "m", "protocol": "refeval", "reference": "human", "orders": "both"},
        "export": {"test_fraction": 0.01},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def timed(args: list[str], ok: tuple[int, ...] = (0,), env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command under GNU time: wall and CPU seconds, peak RSS (MiB) and its stdout."""
    environ = {**os.environ, **(env or {})}
    proc = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True, env=environ)
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    # CPU seconds as well: on a shared machine the wall time also counts the time other programs held the cores.
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", proc.stderr))
    return {"wall_s": round(seconds, 2), "cpu_s": round(cpu, 2), "rss_mib": round(rss / 1024), "stdout": proc.stdout}


def calls_of(stdout: str) -> int:
    found = re.search(r"model calls: (\d+)", stdout)
    return int(found.group(1)) if found else -1


FACTORY = [sys.executable, "-m", "factory.cli.main"]


def build(recipe: Path, wh: Path, *extra: str, clock: Path | None = None) -> dict[str, Any]:
    """A build's times and model calls; with `clock`, the scripted backends' own times go to that file."""
    env = {CLOCK_ENV: str(clock)} if clock is not None else None
    out = timed([*FACTORY, "build", str(recipe), "-w", str(wh), *extra], env=env)
    out["calls"] = calls_of(out.pop("stdout"))
    return out


def model_seconds(wh: Path) -> float:
    """Seconds the build's models spent answering: a call row's `latency_s` is its batch's time inside the
    backend's method divided by the batch's calls, so the rows add up to the time inside the backend. Read
    through the warehouse's views, which see parts and compacted files alike."""
    from factory.warehouse.store import Warehouse
    from factory.warehouse.tables import CALL_TABLES

    wh_ = Warehouse(wh)
    return sum(wh_.query(f"SELECT coalesce(sum(latency_s), 0) AS s FROM {t}")["s"][0].as_py() for t in CALL_TABLES)


def clock_seconds(clock: Path) -> tuple[float, float]:
    """The wall and CPU seconds the scripted backends of a build spent answering (`FACTORY_SCRIPTED_CLOCK`)."""
    lines = [json.loads(x) for x in clock.read_text(encoding="utf-8").splitlines()] if clock.is_file() else []
    return sum(x["wall_s"] for x in lines), sum(x["cpu_s"] for x in lines)


def area(filename: str) -> str:
    """The part of the program a profiled function belongs to: a factory module, a library, or Python."""
    path = filename.replace("\\", "/")
    if "/factory/" in path:
        return "factory/" + path.rsplit("/factory/", 1)[1]
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if path.startswith("<"):
        return path  # <frozen importlib._bootstrap>, <string>
    return "/".join(path.split("/")[-2:])  # the standard library: json/encoder.py


Func = tuple[str, int, str]


def backend_shares(raw: dict[Func, tuple[Any, ...]]) -> dict[Func, float]:
    """For each profiled function, the share of its own time spent on the backend's behalf: 1 for the
    scripted backend's own functions, and for a function both sides call (stable_hash, the JSON encoder) the
    share of its own time along the edges from callers inside the backend, weighted by those callers' shares."""
    share = {f: 1.0 if "models/scripted.py" in f[0] else 0.0 for f in raw}
    for _ in range(30):  # call chains from the backend are short: a fixed number of passes settles them
        for f, v in raw.items():
            callers = v[4]
            if "models/scripted.py" in f[0] or not callers:
                continue
            along = sum(edge[2] for edge in callers.values())
            if along:
                share[f] = sum(edge[2] * share.get(c, 0.0) for c, edge in callers.items()) / along
    return share


def profile_summary(stats_file: Path, n: int, top: int = 15) -> None:
    """Where the profiled build's time went: the backend's share, factory's own time per area, then the
    functions with the most of factory's own time (the backend's share of each left out)."""
    import pstats

    stats = pstats.Stats(str(stats_file))
    raw: dict[Func, tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    share = backend_shares(raw)
    total = sum(v[2] for v in raw.values()) or 1.0
    backend = sum(v[2] * share[f] for f, v in raw.items())
    own = {f: v[2] * (1.0 - share[f]) for f, v in raw.items()}
    by_area: dict[str, float] = {}
    for (filename, _, name), sec in own.items():
        key = area(filename) if filename != "~" else f"builtins ({name.split(' of ')[0].strip('<>{}')})"
        by_area[key] = by_area.get(key, 0.0) + sec
    print(
        f"--- profile of the {n}-prompt build: {total:.1f} s under cProfile, {backend:.1f} s of it inside the "
        f"scripted backend; factory's own {total - backend:.1f} s by area (share of it) ---"
    )
    for key, sec in sorted(by_area.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{sec:9.2f} s {100 * sec / max(total - backend, 1e-9):5.1f} %  {key}")
    print(f"--- top {top} functions by factory's own time (the backend's share left out) ---")
    print(f"{'own s':>9} {'cum s':>9} {'calls':>10}  function")
    for f, sec in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{sec:9.2f} {raw[f][3]:9.2f} {raw[f][1]:10d}  {area(f[0])}:{f[1]}({f[2]})")


def tables_equal(a: Path, b: Path) -> bool:
    """Whether two warehouses hold the same stage rows (run ids, times and latencies aside)."""
    import duckdb

    skip = {"run_id", "latency_s", "created_at", "finished_at", "started_at", "seconds"}
    for table in ("prompts", "samples", "judgments", "scores", "pairs"):
        got = []
        for wh in (a, b):
            con = duckdb.connect(str(wh / "factory.duckdb"), read_only=True)
            cols = [c for (c,) in con.execute(f"select column_name from (describe {table})").fetchall()]
            keep = ", ".join(f'"{c}"' for c in cols if c not in skip)
            got.append(con.execute(f"select {keep} from {table} order by all").fetchall())
            con.close()
        if got[0] != got[1]:
            return False
    return True


def measure(n: int, folder: Path, ray: bool, profile: bool) -> dict[str, Any]:
    prompts, recipe, wh = folder / f"p{n}.jsonl", folder / f"r{n}.yaml", folder / f"wh{n}"
    write_prompts(prompts, n)
    write_recipe(recipe, prompts)
    clock = folder / f"clock{n}.jsonl"
    clock.unlink(missing_ok=True)
    first = build(recipe, wh, "-q", clock=clock)
    row: dict[str, Any] = {"prompts": n, "build_s": first["wall_s"], "build_cpu_s": first["cpu_s"]}
    row["build_rss_mib"] = first["rss_mib"]
    row["load_avg"] = round(os.getloadavg()[0], 2)
    row["calls"] = first["calls"]
    row["ms_per_call"] = round(1000 * first["wall_s"] / max(first["calls"], 1), 4)
    row["model_s"] = round(model_seconds(wh), 2)
    row["factory_s"] = round(first["wall_s"] - row["model_s"], 2)
    row["factory_ms_per_call"] = round(1000 * row["factory_s"] / max(first["calls"], 1), 4)
    # The same in CPU seconds (the build's, less the backend thread's): what the wall figures would be on a
    # machine of its own, where no other program holds the cores.
    row["model_cpu_s"] = round(clock_seconds(clock)[1], 2)
    row["factory_cpu_ms_per_call"] = round(1000 * (first["cpu_s"] - row["model_cpu_s"]) / max(first["calls"], 1), 4)
    again = build(recipe, wh, "-q")
    row.update(rebuild_s=again["wall_s"], rebuild_rss_mib=again["rss_mib"], rebuild_calls=again["calls"])
    for name, args in (
        ("sql_s", ["sql", "select 1", "-w", str(wh)]),
        ("ls_s", ["ls", "-w", str(wh)]),
        ("group_by_s", ["sql", "select verdict, count(*) from judgments group by all", "-w", str(wh)]),
    ):
        row[name] = timed([*FACTORY, *args])["wall_s"]
    write_prompts(prompts, max(n // 100, 1), start=n)
    more = build(recipe, wh, "-q")
    row.update(add_1pct_s=more["wall_s"], add_1pct_calls=more["calls"])
    row["add_1pct_share"] = round(more["wall_s"] / first["wall_s"], 3)
    if ray:
        write_prompts(prompts, n)  # back to the first n prompts, into a fresh warehouse
        rwh = folder / f"ray{n}"
        got = build(recipe, rwh, "-q", "--executor", "ray")
        row.update(ray_build_s=got["wall_s"], ray_rss_mib=got["rss_mib"], ray_calls=got["calls"])
        local = folder / f"local{n}"
        build(recipe, local, "-q")
        row["ray_tables_equal"] = tables_equal(local, rwh)
    if profile:
        pwh = folder / f"prof{n}"
        write_prompts(prompts, n)
        stats = folder / f"prof{n}.pstats"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                str(stats),
                "-m",
                "factory.cli.main",
                "build",
                str(recipe),
                "-w",
                str(pwh),
                "-q",
            ],
            check=False,
            capture_output=True,
        )
        profile_summary(stats, n)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[1000, 10000, 60000])
    parser.add_argument("--ray", action="store_true", help="also build with --executor ray on a local cluster")
    parser.add_argument("--profile", action="store_true", help="print a cProfile summary of each first build")
    parser.add_argument("--keep", type=Path, help="build here and keep the warehouses (default: a temporary folder)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} cores, load average {load:.2f} at the start, {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for n in args.sizes:
            print(json.dumps(measure(n, folder, args.ray, args.profile)), flush=True)


if __name__ == "__main__":
    main()
