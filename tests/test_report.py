"""`factory report`: one self-contained HTML page from a warehouse built with the `scripted` backend.

A build with a position-biased judge that garbles some answers, two references and an `eval:` section, plus
a judge-eval run with two judges and two protocols, gives every section data. The page is then opened in
headless Chromium, driven by its own command line (no npm or pip package): a copy of the page carries a
small script, allowed by a hash in the page's own Content-Security-Policy, that writes what every image
loaded into the DOM, and `--dump-dom` prints it. Those tests are `slow`; the fast ones check a judge-eval-only
warehouse (what is missing is said), the escaping of data, and the one-line errors.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from factory.cli.main import main
from factory.report.html import CSP, html_table

CHROMIUM = shutil.which("chromium")
NEEDS_CHROMIUM = pytest.mark.skipif(
    CHROMIUM is None, reason="the `chromium` binary is not on PATH (CI installs Debian's chromium)"
)
# A judge name full of HTML and a `$` (matplotlib math is off): it must arrive in the page as text.
ODD_JUDGE = "<i>ju&dge</i> $x$"
RECIPE: dict[str, Any] = {
    "name": "demo",
    "models": {
        "pol": {"backend": "scripted", "script": {"seed": 1}},
        "judge": {"backend": "scripted", "script": {"seed": 2, "position_bias": 1.2, "garble_rate": 0.15}},
    },
    "prompts": {
        "inline": [
            {"instruction": "Name a color.", "ref": "Blue."},
            {"instruction": "Say hi.", "ref": "Hi."},
            {"instruction": "Name a fruit.", "ref": "Apple."},
            {"instruction": "What is 2+2?", "ref": "4"},
            {"instruction": "Name a tree.", "ref": "Oak."},
            {"instruction": "Name a bird.", "ref": "Robin."},
        ],
        "reference_fields": ["ref"],
    },
    "references": [
        {"name": "human", "kind": "column"},
        {"name": "gen", "kind": "model", "model": "pol", "params": {"max_tokens": 8}},
    ],
    "samples": {"policy": "pol", "n": 3, "params": {"max_tokens": 12}},
    "judgments": {"judge": "judge", "reference": ["human", "gen"]},
    "eval": {
        "prompts": {
            "inline": [
                {"instruction": "Name a month.", "gpt4": "May."},
                {"instruction": "Name a fish.", "gpt4": "Salmon."},
                {"instruction": "Name a planet.", "gpt4": "Mars, the red planet."},
            ],
            "reference_fields": ["gpt4"],
        },
        "baseline": "gpt4",
        "judge": "judge",
        "resamples": 100,
    },
}
JUDGES = {
    "fair": {"backend": "scripted", "script": {"seed": 3}},
    "biased": {"backend": "scripted", "script": {"seed": 4, "position_bias": 1.5, "garble_rate": 0.1}},
}
# Plots per section of the full warehouse: agreement has one heatmap for the build's two references and one
# for judge-eval's judges × protocols.
FULL_PLOTS = {
    "overview": 0,
    "scores": 1,
    "length": 1,
    "position": 1,
    "agreement": 2,
    "parsing": 1,
    "costs": 1,
    "judge-eval": 1,
    "win-rates": 1,
}


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: str | Path) -> Result:
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


def eval_set(path: Path) -> Path:
    """A small LLMBar-format set: the better output is `good answer <i> xxx…`, longer as i grows."""
    rows = []
    for i in range(12):
        label = 2 if i % 3 == 0 else 1
        good, bad = f"good answer {i} " + "x" * (5 + i), f"bad {i}"
        o1, o2 = (good, bad) if label == 1 else (bad, good)
        rows.append(
            {"id": f"c{i}", "input": f"Task {i}", "output_1": o1, "output_2": o2, "label": label, "reference": good}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def judge_eval(root: Path, wh: Path, judges: dict[str, Any], *protocols: str) -> None:
    judges_file = root / "judges.yaml"
    judges_file.write_text(yaml.safe_dump(judges), encoding="utf-8")
    args: list[str | Path] = ["judge-eval", "--data", f"toy={eval_set(root / 'toy.jsonl')}", "--judge", judges_file]
    for protocol in protocols:
        args += ["--protocol", protocol]
    ok(*args, "--bootstrap", "20", "-w", wh, "-q")


class Page(HTMLParser):
    """The parts of a report page the tests check: images, and per section its plots and missing line."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.sections: dict[str, dict[str, Any]] = {}
        self.scripts = 0
        self.body_plots: int | None = None
        self._section: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body_plots = int(a["data-plots"] or -1)
        elif tag == "section":
            self._section = a["id"]
            self.sections[a["id"] or ""] = {"plots": 0, "missing": False}
        elif tag == "img":
            self.images.append(a)
            if self._section is not None:
                self.sections[self._section]["plots"] += 1
        elif tag == "p" and a.get("class") == "missing" and self._section is not None:
            self.sections[self._section]["missing"] = True
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section = None


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The report of a warehouse that has data for every section: (its path, its text)."""
    root = tmp_path_factory.mktemp("report")
    wh = root / "wh"
    judge_eval(root, wh, JUDGES, "refeval", "reffree")
    recipe = root / "demo.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE, sort_keys=False), encoding="utf-8")
    ok("build", recipe, "-w", wh, "-q")
    out = root / "out" / "report.html"
    result = ok("report", "-w", wh, "--out", out)
    assert f"report: {out} (9 plots in 9 of 9 sections)" in result.output
    return out, out.read_text(encoding="utf-8")


@pytest.mark.slow
def test_full_report_has_every_section_and_only_inline_images(full: tuple[Path, str]) -> None:
    _, text = full
    page = Page(text)
    assert {k: v["plots"] for k, v in page.sections.items()} == FULL_PLOTS
    assert not any(v["missing"] for v in page.sections.values())
    assert page.body_plots == len(page.images) == sum(FULL_PLOTS.values())
    for img in page.images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
        assert img["alt"]
    assert page.scripts == 0 and f'content="{CSP}"' in text
    # Nothing is fetched: no http(s) link, no file outside the page.
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text)
    for expected in ("Position bias and consistency", "judge · refeval · human", "biased · reffree", "pol", "gpt4"):
        assert html.escape(expected) in text


@pytest.mark.slow
@NEEDS_CHROMIUM
def test_every_image_loads_in_headless_chromium(full: tuple[Path, str], tmp_path: Path) -> None:
    _, text = full
    check = (
        "window.addEventListener('load', () => {"
        " const imgs = Array.from(document.images);"
        " const pre = document.createElement('pre'); pre.id = 'check';"
        " pre.textContent = JSON.stringify({images: imgs.length,"
        " widths: imgs.map(i => i.complete ? i.naturalWidth : 0),"
        " plots: Number(document.body.dataset.plots)});"
        " document.body.appendChild(pre); });"
    )
    digest = base64.b64encode(hashlib.sha256(check.encode()).digest()).decode()
    # Only this script may run, under the page's own policy otherwise (so images still load as data: only).
    assert text.count(CSP) == 1
    copy = text.replace(CSP, f"{CSP}; script-src 'sha256-{digest}'").replace(
        "</body>", f"<script>{check}</script></body>"
    )
    page = tmp_path / "checked.html"
    page.write_text(copy, encoding="utf-8")
    dom = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="check">(.*?)</pre>', dom, re.S)
    assert found, f"the check script did not run; DOM starts: {dom[:300]!r}"
    result = json.loads(html.unescape(found.group(1)))
    assert result["images"] == result["plots"] == sum(FULL_PLOTS.values())
    assert all(width > 0 for width in result["widths"]), result


def chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium with its own throwaway profile and no network chatter; return stdout."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# ---------------------------------------------------------------------------------------------------- fast


def test_judge_eval_only_report_says_what_is_missing(tmp_path: Path) -> None:
    wh = tmp_path / "wh"
    judge_eval(tmp_path, wh, {ODD_JUDGE: {"backend": "scripted", "script": {"seed": 5}}}, "refeval")
    out = tmp_path / "report.html"
    result = ok("report", "-w", wh, "--out", out)
    assert "(4 plots in 5 of 9 sections)" in result.output
    assert "no data for: Score distribution, Chosen vs rejected length" in result.output
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    missing = {k for k, v in page.sections.items() if v["missing"]}
    assert missing == {"scores", "length", "agreement", "win-rates"}
    assert {k: v["plots"] for k, v in page.sections.items() if k not in missing} == {
        "overview": 0,
        "position": 1,
        "parsing": 1,
        "costs": 1,
        "judge-eval": 1,
    }
    assert page.body_plots == len(page.images) == 4
    assert "No scores yet" in text and "factory judge-eval" in text
    # The judge's name is text wherever it appears, never markup.
    assert html.escape(ODD_JUDGE) in text and "<i>ju" not in text
    assert out.stat().st_mode & 0o777 != 0o600  # a page to share, not a private temporary file


def test_tables_escape_text_from_the_data() -> None:
    table = html_table(["<th>"], [["<script>alert(1)</script>", 'a"b', 1234, 0.5, None]], caption="<b>")
    assert "<script>" not in table and "&lt;script&gt;alert(1)&lt;/script&gt;" in table
    assert "a&quot;b" in table and "&lt;th&gt;" in table and "<caption>&lt;b&gt;</caption>" in table
    assert '<td class="num">1,234</td>' in table and '<td class="num">0.50</td>' in table and "<td></td>" in table


def test_report_errors_are_one_line(tmp_path: Path) -> None:
    nowhere = cli("report", "-w", tmp_path / "nothing", "--out", tmp_path / "r.html")
    assert nowhere.exit_code == 2 and nowhere.output.startswith("error:") and "no warehouse here" in nowhere.output
    (tmp_path / "empty" / "tables").mkdir(parents=True)
    no_runs = cli("report", "-w", tmp_path / "empty", "--out", tmp_path / "r.html")
    assert no_runs.exit_code == 2, no_runs.output
    assert no_runs.output.count("\n") == 1 and "no runs in this warehouse yet" in no_runs.output
    assert not (tmp_path / "r.html").exists()
