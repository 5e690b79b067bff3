"""`factory judge-eval` and `factory judge-compare`: judge meta-evaluation against human labels.

`factory.cli.main` registers `COMMANDS`. This module imports only click at load time (`import factory.cli.main`
stays light); it does not import `factory.cli.main` either, so either module may be imported first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from factory.cli.options import WAREHOUSE_OPTION, friendly
from factory.core.errors import UserInputError
from factory.core.text import clean
from factory.judge.protocols import PROTOCOLS

PRESET_NAMES = ("llmbar-natural", "llmbar-adversarial", "mtbench", "instrusum", "href")
"""`factory.inputs.presets.PRESETS` by name, repeated so `--help` needs no import beyond click (a test checks)."""
JUDGE_PRESET_NAMES = ("reife",)
"""`factory.judge_eval.settings.PRESETS` by name, for `--preset` (a test checks they agree)."""
PRESET_OPTIONS = ("prefill", "max_tokens", "cot_max_tokens", "top_logprobs", "markers", "swap", "unparsed")
"""The options a `--preset` sets: giving one of them beside it is refused."""


@click.command(name="judge-eval")
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    help="[NAME=]PATH of a labelled pairwise set (LLMBar format): JSONL, JSON, Parquet, a saved dataset "
    f"folder or a Hub name; or a preset of the paper's Table 1 ({', '.join(PRESET_NAMES)}) loaded from the Hub, "
    "or PRESET=FILE for a local file in that preset's Hub layout. Repeat for several sets.",
)
@click.option(
    "--references",
    "reference_files",
    multiple=True,
    help="[NAME=]FILE of references (JSONL/JSON), aligned by id or by position; repeat for several "
    "(the judge then also votes over them). Only with one --data.",
)
@click.option(
    "--reference-column",
    "reference_columns",
    multiple=True,
    help="Column(s) of the set holding references [default: `reference` when present].",
)
@click.option(
    "--judge",
    "judges",
    multiple=True,
    default=("embedded:smollm2-135m-instruct",),
    show_default=True,
    help="BACKEND[:MODEL] or a YAML/JSON model spec file (one spec, or a mapping name → spec). Repeatable.",
)
@click.option(
    "--protocol",
    "protocols",
    multiple=True,
    help=f"Protocol(s): {', '.join(PROTOCOLS)} [default: all {len(PROTOCOLS)}].",
)
@click.option(
    "--custom-template",
    "custom_templates",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A custom judge template (text with {instruction} {output_a} {output_b} [{reference}], or YAML).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Judge only the first N cases of each set.")
@click.option("--split", default=None, help="Split of a dataset folder or Hub dataset.")
@click.option("--hf-config", default=None, help="Configuration name of a Hub dataset.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Judge batch size (string judges).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (string judges).")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Judge tokens after `Output (` [default: the protocol's].",
)
@click.option(
    "--cot-max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Judge tokens for protocols that reason first [default: the protocol's].",
)
@click.option(
    "--top-logprobs",
    type=click.IntRange(min=2),
    default=20,
    show_default=True,
    help="Top log-probabilities kept per generated token (the paper's code: 5).",
)
@click.option(
    "--prefill",
    type=click.Choice(["output", "none"]),
    default="output",
    show_default=True,
    help="output: answers start with `Output (`; none: the paper's decoding (no prefill, 16 tokens, verdict by "
    "regex, soft score at its marker token).",
)
@click.option(
    "--markers",
    type=click.Choice(["variants", "exact"]),
    default="variants",
    show_default=True,
    help="Tokens the soft score p_a counts: marker variants (a, ' a', A, ...) or exactly a/b (the paper's rule). "
    "Only re-reads stored answers; both rules are reported.",
)
@click.option(
    "--swap",
    type=click.Choice(["outputs", "blocks", "both"]),
    default="outputs",
    show_default=True,
    help="Second order: swap the outputs under fixed letters, or show (b)'s block first with each output keeping "
    "its letter (variant PROTOCOL+blocks); both: position and letter bias apart.",
)
@click.option(
    "--unparsed",
    type=click.Choice(["random", "wrong", "half"]),
    default="random",
    show_default=True,
    help="How an unparsed or tied verdict counts in accuracy: a seeded random winner (the literature's rule), "
    "wrong, or ½. The parse-failure rate is always reported.",
)
@click.option(
    "--preset",
    type=click.Choice(JUDGE_PRESET_NAMES),
    default=None,
    help="Judge and count as a named meta-evaluation does. reife: ReIFE's (no prefill, 64 tokens, 1024 for cot, "
    "top-4, exact markers, --swap blocks, its regex verdict, --unparsed random). It sets --prefill --max-tokens "
    "--cot-max-tokens --top-logprobs --markers --swap --unparsed, which are refused beside it.",
)
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True, help="CI resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap and of --unparsed random.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Report folder [default: WAREHOUSE/judge-eval].",
)
@WAREHOUSE_OPTION
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@friendly
def judge_eval(
    data: tuple[str, ...],
    reference_files: tuple[str, ...],
    reference_columns: tuple[str, ...],
    judges: tuple[str, ...],
    protocols: tuple[str, ...],
    custom_templates: tuple[Path, ...],
    limit: int | None,
    split: str | None,
    hf_config: str | None,
    batch_size: int | None,
    threads: int | None,
    max_tokens: int | None,
    cot_max_tokens: int | None,
    top_logprobs: int,
    prefill: str,
    markers: str,
    swap: str,
    unparsed: str,
    preset: str | None,
    bootstrap: int,
    seed: int,
    out: Path | None,
    warehouse: Path,
    quiet: bool,
) -> None:
    """Measure judges × protocols against human labels (both orders), like the paper's Table 1.

    Judgments are stored in the `eval_judgments` table and every call is cached: a rerun makes no model
    call. Prints Table 1 and the full metrics, and writes them as CSV and Markdown.
    """
    from factory.cli.progress import RichReporter
    from factory.inputs.data_sources import data_source, split_named
    from factory.inputs.labelled_sets import read_eval_set
    from factory.judge_eval.command import run_judge_eval
    from factory.judge_eval.console import print_report
    from factory.judge_eval.judges import parse_judges
    from factory.judge_eval.report_folder import adopt_legacy_report_folder, report_folder_kind, write_files
    from factory.judge_eval.settings import EvalSettings, preset_settings
    from factory.judge_eval.tables import build_report
    from factory.judge_eval.templates import DEFAULT_PROTOCOLS, builtin_protocol, load_custom_template
    from factory.warehouse.store import Warehouse

    if preset is None:
        settings = EvalSettings(
            max_tokens=max_tokens,
            cot_max_tokens=cot_max_tokens,
            top_logprobs=top_logprobs,
            prefill=prefill,  # type: ignore[arg-type]
            markers=markers,  # type: ignore[arg-type]
            swap=swap,  # type: ignore[arg-type]
            unparsed=unparsed,  # type: ignore[arg-type]
            limit=limit,
            bootstrap=bootstrap,
            seed=seed,
        )
    else:
        # Refused rather than overridden: a table that names a preset must have been made with all of it.
        ctx = click.get_current_context()
        given = [n for n in PRESET_OPTIONS if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
        if given:
            shown = ", ".join("--" + n.replace("_", "-") for n in given)
            raise UserInputError(f"--preset {preset} sets {shown} itself; give the preset or the options, not both")
        settings = preset_settings(preset, limit=limit, bootstrap=bootstrap, seed=seed)
    if reference_files and len(data) > 1:
        raise UserInputError("--references goes with one --data; for several sets, keep references in a column")
    sets = []
    for value in data:
        named = data_source(value)
        sets.append(
            read_eval_set(
                named.path,
                name=named.name,
                preset=named.preset,
                reference_columns=list(reference_columns) or None,
                reference_files=[split_named(f) for f in reference_files],
                split=split,
                config=hf_config,
                limit=limit,
            )
        )
    judge_specs = parse_judges(list(judges), batch_size=batch_size, threads=threads)
    names = list(protocols) if (protocols or custom_templates) else list(DEFAULT_PROTOCOLS)
    chosen = [builtin_protocol(n, settings) for n in dict.fromkeys(names)]
    chosen += [load_custom_template(p, settings) for p in custom_templates]
    wh = Warehouse(warehouse)
    folder = (out or wh.root / "judge-eval").resolve()
    from factory.core.owned import check_replaceable

    if out is None:
        adopt_legacy_report_folder(folder)
    check_replaceable(folder, report_folder_kind(), wh.root)  # a folder it may not replace is refused before judging
    with RichReporter(quiet=quiet) as reporter:
        run = run_judge_eval(
            sets, judge_specs, chosen, settings, wh, explicit_protocols=bool(protocols), reporter=reporter
        )
    report = build_report(run.rows, settings.bootstrap, settings.seed, settings.unparsed, settings.preset)
    print_report(report, settings)
    for note in run.notes:
        click.echo(clean(f"note: {note}"))
    paths = write_files(folder, report.files(), wh.root)
    tokens_out = sum(s.tokens_out for s in run.stats)
    click.echo(
        f"run {run.run_id}: {run.status}; model calls {run.model_calls}, cached {run.cached_calls}, "
        f"new tokens out {tokens_out}; {len(run.rows)} judgments in table eval_judgments"
    )
    click.echo(clean(f"report: {', '.join(str(p) for p in paths)}"))
    if run.status != "ok":
        click.echo(
            f"some calls failed (counted by --unparsed {settings.unparsed}); run the same command again to retry them",
            err=True,
        )
        sys.exit(1)


@click.command(name="judge-compare")
@click.option("--protocol-a", required=True, help="A protocol variant as the report names it (e.g. refeval).")
@click.option("--protocol-b", required=True, help="The other protocol variant (e.g. reffree).")
@click.option("--judge", default=None, help="The judge (needed when the table holds several).")
@click.option("--dataset", "datasets", multiple=True, help="Data set(s) to compare on [default: all].")
@click.option(
    "--unparsed",
    type=click.Choice(["random", "wrong", "half"]),
    default="random",
    show_default=True,
    help="How an unparsed or tied verdict counts (as in judge-eval).",
)
@click.option("--bootstrap", type=click.IntRange(min=1), default=1000, show_default=True, help="CI resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap and of --unparsed random.")
@WAREHOUSE_OPTION
@friendly
def judge_compare(
    protocol_a: str,
    protocol_b: str,
    judge: str | None,
    datasets: tuple[str, ...],
    unparsed: str,
    bootstrap: int,
    seed: int,
    warehouse: Path,
) -> None:
    """Compare two protocols on the same judge and cases, from the stored eval judgments.

    Exact McNemar test on per-judgment correctness (each case in each order) and a paired bootstrap 95% CI
    of the accuracy difference (cases resampled with both orders together). A protocol judged with
    `--swap blocks` is the variant PROTOCOL+blocks.
    """
    from factory.judge_eval.comparison import compare_stored
    from factory.judge_eval.console import print_rows
    from factory.judge_eval.variants import Unparsed

    if protocol_a == protocol_b:
        raise UserInputError("--protocol-a and --protocol-b are the same")
    from factory.warehouse.store import Warehouse

    wh = Warehouse(warehouse)
    if not wh.root.is_dir():
        raise UserInputError(f"{wh.root}: no warehouse here (run `factory judge-eval` first)")
    rows = wh.current_rows("eval_judgments")
    warning = wh.skipped_warning()  # a damaged unit is left out: say so rather than compare quietly without it
    if warning:
        click.echo(clean(warning), err=True)
    results, notes = compare_stored(rows, protocol_a, protocol_b, judge, list(datasets), bootstrap, seed, unparsed)
    columns = [
        "dataset",
        "cases",
        "acc_a",
        "acc_b",
        "diff",
        "diff_ci_low",
        "diff_ci_high",
        "only_a_right",
        "only_b_right",
        "p_value",
    ]
    shown_rows = []
    for c in results:
        r = dict(c.__dict__)
        for k in ("acc_a", "acc_b", "diff", "diff_ci_low", "diff_ci_high"):
            r[k] = None if r[k] is None else f"{100 * r[k]:.1f}"
        r["p_value"] = f"{c.p_value:.4g}"
        shown_rows.append(r)
    rule = Unparsed(unparsed, seed).describe()
    title = f"{results[0].judge}: {protocol_a} (A) vs {protocol_b} (B); accuracies in %; {rule}"
    print_rows(title, columns, shown_rows, percent=False)
    for note in notes:
        click.echo(clean(f"note: {note}"))


COMMANDS = [judge_eval, judge_compare]
