"""What the report page reads: its SQL over the warehouse's views, each query run once (`Data`), and the small
aggregates its sections compute from the rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from factory.report.style import EXAMPLES
from factory.warehouse.store import Warehouse

if TYPE_CHECKING:
    from factory.judge_eval.tables import Report as EvalReport

RUNS_SQL = """
SELECT run_id, recipe, status, started_at, seconds, model_calls, cached_calls, failed_calls, tokens_in,
       tokens_out, retries, cost_usd, stages
FROM runs ORDER BY started_at DESC NULLS LAST, run_id DESC
"""
SCORES_SQL = "SELECT recipe, labeler, score FROM scores WHERE score IS NOT NULL"
MARGINS_SQL = "SELECT recipe, margin FROM pairs WHERE margin IS NOT NULL"
PAIR_LENGTHS_SQL = """
SELECT p.recipe, length(c.text) AS chosen_len, length(r.text) AS rejected_len
FROM pairs p
JOIN samples c ON c.recipe = p.recipe AND c.sample_id = p.chosen_sample_id
JOIN samples r ON r.recipe = p.recipe AND r.sample_id = p.rejected_sample_id
WHERE c.text IS NOT NULL AND r.text IS NOT NULL
"""
SCORE_LENGTHS_SQL = """
SELECT s.recipe, s.labeler, s.score, length(x.text) AS len
FROM scores s JOIN samples x ON x.recipe = s.recipe AND x.sample_id = s.sample_id
WHERE s.score IS NOT NULL AND x.text IS NOT NULL
"""
JUDGMENTS_SQL = """
SELECT recipe, judge, protocol, reference_name, prompt_id, sample_a, sample_b, "order", verdict, p_a, parse_status
FROM judgments
"""
EVAL_JUDGMENTS_SQL = "SELECT * FROM eval_judgments"
# Per policy (or import source) of each recipe: its samples, how often one is chosen and rejected, its mean
# score and mean length in characters. `factory show` reads it for one recipe (`policy_figures`).
POLICIES_SQL = """
SELECT s.recipe, coalesce(s.policy, '?') AS policy, count(*) AS samples,
       count(pc.prompt_id) AS chosen, count(pr.prompt_id) AS rejected,
       avg(sc.score) AS mean_score, avg(length(s.text)) AS mean_length
FROM samples s
LEFT JOIN scores sc ON sc.recipe = s.recipe AND sc.sample_id = s.sample_id
LEFT JOIN pairs pc ON pc.recipe = s.recipe AND pc.chosen_sample_id = s.sample_id
LEFT JOIN pairs pr ON pr.recipe = s.recipe AND pr.rejected_sample_id = s.sample_id
WHERE s.error IS NULL
GROUP BY ALL ORDER BY 1, 2
"""
PARSE_SQL = """
SELECT 'build' AS source, judge, protocol, coalesce(parse_status, 'null') AS status, count(*) AS n
FROM judgments GROUP BY judge, protocol, status
UNION ALL
SELECT 'judge-eval', judge, protocol, coalesce(parse_status, 'null'), count(*)
FROM eval_judgments GROUP BY judge, protocol, parse_status
UNION ALL
SELECT 'eval', judge, protocol, coalesce(parse_status, 'null'), count(*)
FROM eval GROUP BY judge, protocol, parse_status
ORDER BY 1, 2, 3, 4
"""
# One answer per source × judge × protocol × status, so the examples show the different ways of failing.
UNPARSED_EXAMPLES_SQL = f"""
SELECT source, judge, protocol, status, raw_output FROM (
    SELECT 'build' AS source, judge, protocol, parse_status AS status, raw_output, request_key FROM judgments
    UNION ALL SELECT 'judge-eval', judge, protocol, parse_status, raw_output, request_key FROM eval_judgments
    UNION ALL SELECT 'eval', judge, protocol, parse_status, raw_output, request_key FROM eval
) WHERE status IS DISTINCT FROM 'ok'
QUALIFY row_number() OVER (PARTITION BY source, judge, protocol, status ORDER BY request_key) = 1
ORDER BY source, judge, protocol, status LIMIT {EXAMPLES}
"""
WIN_RATES_SQL = "SELECT * FROM eval_results ORDER BY recipe, contender, baseline, judge, protocol"
RUN_COUNT_SQL = "SELECT count(*) AS n FROM runs"


def pct(part: float, whole: float) -> float | None:
    """`part` of `whole` in percent; None when the whole is empty."""
    return 100.0 * part / whole if whole else None


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r; None with fewer than three points or no spread."""
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


class Data:
    """The warehouse's rows, each query run once (several sections read the same rows)."""

    def __init__(self, wh: Warehouse) -> None:
        self.wh = wh
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._eval_report: EvalReport | None = None

    def rows(self, sql: str) -> list[dict[str, Any]]:
        if sql not in self._rows:
            self._rows[sql] = self.wh.query(sql).to_pylist()
        return self._rows[sql]

    def eval_report(self) -> EvalReport | None:
        """judge-eval's metrics over every stored eval judgment, with its default rules (1000 resamples,
        seed 0, unparsed verdicts get a random winner), so the numbers match a default `factory judge-eval`."""
        rows = self.rows(EVAL_JUDGMENTS_SQL)
        if rows and self._eval_report is None:
            from factory.judge_eval.tables import build_report

            self._eval_report = build_report(rows)
        return self._eval_report
