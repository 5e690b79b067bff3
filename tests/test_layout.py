"""The package's shape, checked: the layers of docs/DESIGN.md ("The house") and the size of a module.

A module that grows past 400 lines is doing more than one job; an import that points up a layer (or
sideways between folders of one layer) tangles the data flow a newcomer follows top-down."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def test_no_module_over_400_lines() -> None:
    sizes = {
        p.relative_to(ROOT): len(p.read_text(encoding="utf-8").splitlines()) for p in (ROOT / "factory").rglob("*.py")
    }
    over = {str(p): n for p, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by concept): {over}"


def test_imports_respect_the_layers() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: install the dev extra (pip install -e '.[dev]')")
    result = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    broken = result.stdout[result.stdout.find("Broken contracts") :] if result.returncode else ""
    assert result.returncode == 0, f"an import breaks the layers in pyproject.toml:\n{broken or result.stderr}"
