"""`factory report`: one self-contained HTML page about a warehouse.

`factory.cli.main` registers `COMMANDS`; only click is imported at load time (matplotlib and rich load when run).
"""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli.options import WAREHOUSE_OPTION, friendly
from factory.core.text import clean


@click.command(name="report")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("report.html"),
    show_default=True,
    help="The HTML file to write (one self-contained page: plots inline, no scripts).",
)
@WAREHOUSE_OPTION
@friendly
def report(out: Path, warehouse: Path) -> None:
    """Write one self-contained HTML page of plots and tables about the warehouse.

    Score distribution, chosen vs rejected length, position bias and consistency, agreement between judges,
    protocols and references, parse failures, calls, tokens, time and cost per stage and run, judge-eval's
    Table 1 and held-out win rates: each section where its data exists, else a line saying what is missing.
    """
    from factory.report.page import write_report
    from factory.warehouse.store import Warehouse

    wh = Warehouse(warehouse)
    written = write_report(wh, out)
    warning = wh.skipped_warning()
    if warning:
        click.echo(warning, err=True)
    shown = len(written.sections) - len(written.missing)
    click.echo(clean(f"report: {out} ({written.plots} plots in {shown} of {len(written.sections)} sections)"))
    if written.missing:
        click.echo("no data for: " + ", ".join(s.title for s in written.missing))


COMMANDS = [report]
