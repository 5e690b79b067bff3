"""Reliability figures: kill -9 at 10 points of a build, then Ctrl-C, two builds on one warehouse and corrupt
call files, once each.

Runs the scenarios of tests/test_reliability.py through pytest with FACTORY_RELIABILITY_OUT set, then prints
what they measured: per kill -9 trial, when the build was killed, the stage it was in, the calls it had made,
the calls the resume made, and the rows lost and calls duplicated compared with an uninterrupted build.
docs/RELIABILITY.md explains each check.

    python bench/reliability.py                    # seed 20240917, 2 trials at a time
    python bench/reliability.py --seed 7 --jobs 1  # other kill points, one trial at a time
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SELECTION = "kill_9 or ctrl_c_core or second_build or corrupt_parts_are_skipped or corrupt_parts_are_set_aside"


def machine() -> str:
    """CPUs this process may use, the CPU model and the memory, from /proc where there is one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model, memory = platform.processor() or "unknown CPU", "unknown memory"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB RAM"
                break
    except OSError:
        pass
    return f"{cpus} CPUs (nproc), {model}, {memory}, Python {platform.python_version()}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table with aligned columns."""
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def report(data: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    kill = data.get("kill9")
    if kill:
        timeline = ", ".join(f"{k} {v:.2f}" for k, v in kill["reference_timeline"].items())
        lines += [
            f"uninterrupted build: {kill['reference_seconds']:.2f} s, {kill['reference_ok_calls']} model calls "
            f"(marks seen at, in s: {timeline})",
            f"seed {kill['seed']}, {kill['jobs']} trial(s) at a time",
            "",
        ]
        rows = []
        for t in kill["trials"]:
            if "error" in t:
                rows.append([t["trial"], "-", t["target"], "error", "-", "-", "-", "-"])
                continue
            rows.append(
                [
                    t["trial"],
                    f"{t['kill_s']:.3f}",
                    t["target"],
                    t["stage_hit"],
                    t["calls_before_kill"],
                    t["calls_on_resume"],
                    t["lost_rows"] + t["lost_calls"],
                    t["duplicated_calls"],
                ]
            )
        header = ["trial", "kill at (s)", "aimed at", "stage hit", "calls before kill", "calls on resume"]
        lines += [table([*header, "lost rows", "duplicated calls"], rows), ""]
        done = [t for t in kill["trials"] if "error" not in t]
        hits: dict[str, int] = {}
        for t in done:
            hits[t["stage_hit"]] = hits.get(t["stage_hit"], 0) + 1
        lost = sum(t["lost_rows"] + t["lost_calls"] for t in done)
        extra = sum(t["extra_rows"] for t in done)
        dup = sum(t["duplicated_calls"] for t in done)
        resumes = max((len(t["resume_exit_codes"]) for t in done), default=0)
        ok = all(t["resume_exit_codes"][-1] == 0 for t in done)
        leftover = sorted({p for t in done for p in t["temp_left_after_resume"]})
        lines.append(
            f"summary: {len(done)}/{len(kill['trials'])} kill -9 trials carried out (stages hit: "
            + ", ".join(f"{k} {v}" for k, v in hits.items())
            + f"); {lost} lost rows, {extra} extra rows, {dup} duplicated calls; "
            + ("every resume ended ok" if ok else "SOME RESUMES FAILED")
            + f" (at most {resumes} build(s) each)"
            + (f"; temporary files left: {leftover}" if leftover else "")
        )
    if "ctrl_c" in data:
        c = data["ctrl_c"]
        lines.append(
            f"Ctrl-C: SIGINT {c['signal_s']:.2f} s after start, exit {c['exit_code']} after "
            f"{c['exit_after_signal_s']:.2f} s; {c['calls_before']} calls before, {c['calls_on_resume']} on resume, "
            f"{c['duplicated_calls']} duplicated"
        )
    if "lock" in data:
        lk = data["lock"]
        lines.append(
            f"two builds: B exited {lk['b_exit_code']} after {lk['b_seconds']:.2f} s while A held the lock; "
            f"factory sql during A took {lk['sql_seconds']:.2f} s and saw {lk['sql_result']}; A ended ok in "
            f"{lk['a_seconds']:.2f} s with tables equal to the reference"
        )
    if "corrupt_sql" in data and "corrupt_build" in data:
        cs, cb = data["corrupt_sql"], data["corrupt_build"]
        lines.append(
            f"corrupt parts: factory sql exit {cs['exit_code']}, skipped {cb['parts_damaged']} named file(s) "
            f"({cs['rows_skipped']} calls); the rebuild set aside {len(cb['set_aside'])}, remade "
            f"{cb['calls_remade_by_plain_rebuild']} calls (the judgments stage saw its calls missing), and "
            f"{cb['calls_remade_with_judgments_dropped']} once the judgments stage was dropped"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=20240917, help="seeds the kill points")
    parser.add_argument("--jobs", type=int, default=2, help="kill -9 trials run at a time")
    parser.add_argument("--out", type=Path, help="keep the measured figures in this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "reliability.json"
        out.unlink(missing_ok=True)
        env = {
            **os.environ,
            "FACTORY_RELIABILITY_OUT": str(out.resolve()),
            "FACTORY_RELIABILITY_SEED": str(args.seed),
            "FACTORY_RELIABILITY_JOBS": str(args.jobs),
        }
        command = [sys.executable, "-m", "pytest", "tests/test_reliability.py", "-q", "-p", "no:cacheprovider"]
        result = subprocess.run([*command, "-k", SELECTION], cwd=ROOT, env=env, timeout=1200)
        data = json.loads(out.read_text()) if out.is_file() else {}
    print()
    print(f"machine: {machine()}")
    print("\n".join(report(data)) if data else "no figures were recorded")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
