"""The report page's fixed sizes, limits and colours, and the matplotlib style its figures are drawn with."""

from __future__ import annotations

DPI = 150  # PNG pixels per inch; the page shows each figure at 96 CSS px per inch, so it stays sharp on HiDPI
CSS_PER_INCH = 96
WIDTH = 10.0  # inches: 960 CSS px, the page's text width
MAX_LABEL = 46  # characters of a label in a figure before it is cut with …
MAX_GROUPS = 10  # histograms overlaid in one panel
MAX_RATERS = 12  # rows and columns of an agreement heatmap
RUNS_LISTED = 30  # rows of the runs table
RUNS_PLOTTED = 6  # runs whose stages are drawn
STAGE_MIN_SECONDS = 0.5  # stages without model calls are drawn only when they took at least this long
EXAMPLES = 5  # unparsed answers quoted
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974")
GENERATOR_META = '<meta name="generator" content="factory report">'
"""Written in every page's head: how `factory report` recognises a page it may replace."""
STATUS_COLORS = {"ok": "#55A868", "no_match": "#DD8452", "invalid_marker": "#C44E52", "error": "#8C8C8C"}
STYLE = {
    "text.parse_math": False,  # data text is never math: `$` is a dollar sign, not a formula delimiter
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.frameon": False,
}
