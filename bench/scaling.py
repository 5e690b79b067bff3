"""Wall time and peak memory of `factory build` as the prompt count grows (quickstart settings).

Each size is a separate `factory build` process on a fresh warehouse, measured with GNU time, so the
figures include the model load and everything a user waits for. Prompts come from an LLMBar-format JSONL
with a `reference` column (default: the shared LLMBar-Natural set beside the repository).

    python bench/scaling.py --sizes 16 64
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "llmbar" / "natural.jsonl"


def measure(data: Path, prompts: int, max_tokens: int, threads: int | None, folder: Path) -> dict[str, float | int]:
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    recipe["models"]["smol"]["threads"] = threads
    recipe["prompts"]["path"] = str(data)
    recipe["prompts"]["limit"] = prompts
    recipe["samples"]["params"]["max_tokens"] = max_tokens
    path = folder / f"scale{prompts}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    wh = folder / f"wh{prompts}"
    proc = subprocess.run(
        ["/usr/bin/time", "-v", "factory", "build", str(path), "-w", str(wh), "-q"],
        capture_output=True,
        text=True,
    )
    if proc.returncode not in (0, 1):  # 1 is an `incomplete` build: some calls failed and are counted
        raise SystemExit(f"factory build failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    calls = re.search(r"model calls: (\d+)", proc.stdout)
    return {
        "prompts": prompts,
        "wall_s": round(seconds, 1),
        "peak_rss_mib": round(rss_kb / 1024),
        "model_calls": int(calls.group(1)) if calls else -1,
        "status": "ok" if proc.returncode == 0 else "incomplete",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (quickstart: 2)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(args.data, n, args.max_tokens, args.threads, Path(tmp)) for n in args.sizes]
    base = rows[0]
    for row in rows:
        row["time_vs_first"] = round(row["wall_s"] / base["wall_s"], 2)
        row["s_per_call"] = round(row["wall_s"] / max(row["model_calls"], 1), 3)
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
