"""`import factory` and `factory --help` stay light: no torch, transformers or vllm (docs/DESIGN.md §6)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "vllm")

SCRIPT = f"""
import json, sys
import factory, factory.cli.main, factory.config.recipe, factory.warehouse.store
import factory.stages.judgments, factory.judge.protocols
after_import = sorted(m for m in {HEAVY!r} if m in sys.modules)
code = None
try:
    factory.cli.main.main(["--help"], standalone_mode=True)
except SystemExit as exc:
    code = exc.code
after_help = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps({{"after_import": after_import, "after_help": after_help, "exit": code}}))
"""


def test_import_and_help_do_not_load_heavy_libraries() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *help_lines, last = proc.stdout.strip().splitlines()
    report = json.loads(last)
    assert report["exit"] == 0
    assert "build" in "\n".join(help_lines), "the help text was not printed"
    assert report["after_import"] == [], f"importing factory loaded {report['after_import']}"
    assert report["after_help"] == [], f"`factory --help` loaded {report['after_help']}"
