"""One prompt's rows for `factory show`: the prompt found by an id prefix, its rows per recipe and table from
the current views, and the order its judgments are listed in.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from factory.core.errors import UserInputError
from factory.core.text import clean, one_line
from factory.warehouse.store import Warehouse

CANDIDATES = 5  # prompts named when a prefix is ambiguous


def literal(text: str) -> str:
    """An SQL string literal (quotes doubled): ids come from the command line."""
    return "'" + text.replace("'", "''") + "'"


def find_prompt(wh: Warehouse, prefix: str, recipe: str | None) -> list[dict[str, Any]]:
    """The prompts rows (one per recipe) of the one prompt whose id starts with `prefix`.

    UserInputError when no prompt matches, when several do (naming a few), or when `recipe` is unknown.
    """
    if not prefix.strip():
        raise UserInputError('give a prompt id or a prefix of one (factory sql "SELECT prompt_id FROM prompts")')
    where = f"starts_with(prompt_id, {literal(prefix)})"
    if recipe is not None:
        check_recipe(wh, recipe)
        where += f" AND recipe = {literal(recipe)}"
    rows = wh.query(
        f"SELECT recipe, prompt_id, instruction, source, source_row, source_id FROM prompts WHERE {where} "
        "ORDER BY prompt_id, recipe"
    ).to_pylist()
    ids = list(dict.fromkeys(r["prompt_id"] for r in rows))
    if not ids:
        scope = f" in recipe '{recipe}'" if recipe else ""
        raise UserInputError(
            f"no prompt id starts with '{clean(prefix)}'{scope} in {wh.root} "
            '(factory sql "SELECT prompt_id, instruction FROM prompts" lists them)'
        )
    if len(ids) > 1:
        first = {r["prompt_id"]: r["instruction"] for r in reversed(rows)}
        named = "; ".join(f"{i} ({one_line(first[i], 40)})" for i in ids[:CANDIDATES])
        more = f" and {len(ids) - CANDIDATES} more" if len(ids) > CANDIDATES else ""
        raise UserInputError(
            f"'{clean(prefix)}' is ambiguous: {len(ids)} prompts match: {named}{more}; give more of the id"
        )
    return rows


def check_recipe(wh: Warehouse, recipe: str) -> None:
    recipes = [r["recipe"] for r in wh.query("SELECT DISTINCT recipe FROM prompts ORDER BY recipe").to_pylist()]
    if recipe not in recipes:
        raise UserInputError(f"no recipe '{clean(recipe)}' in {wh.root}; recipes with prompts: {recipes}")


def rows_of(wh: Warehouse, prompt_id: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """recipe → table → rows for one prompt: references, samples (with their scores), judgments, pairs."""
    pid = literal(prompt_id)
    queries = {
        "references": f'SELECT * FROM "references" WHERE prompt_id = {pid} ORDER BY reference_name',
        "samples": (
            "SELECT s.*, sc.labeler, sc.score, sc.n_comparisons, sc.wins FROM samples s LEFT JOIN scores sc "
            f"ON sc.recipe = s.recipe AND sc.sample_id = s.sample_id WHERE s.prompt_id = {pid} ORDER BY s.sample_index"
        ),
        "judgments": f"SELECT * FROM judgments WHERE prompt_id = {pid}",
        "pairs": f"SELECT * FROM pairs WHERE prompt_id = {pid}",
    }
    out: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for table, sql in queries.items():
        for row in wh.query(sql).to_pylist():
            out[row["recipe"]][table].append(row)
    return out


def policy_figures(wh: Warehouse, recipe: str) -> list[dict[str, Any]]:
    """Per policy (or import source) of one recipe: samples, chosen, rejected, mean score and length."""
    from factory.report.data import POLICIES_SQL

    return [r for r in wh.query(POLICIES_SQL).to_pylist() if r["recipe"] == recipe]


def judgment_order(j: dict[str, Any], index: dict[str, str]) -> tuple[Any, ...]:
    """The judgments table's order: pair by pair, each pair's two orders together, per reference."""
    pair = sorted((index.get(j["sample_a"], j["sample_a"]), index.get(j["sample_b"], j["sample_b"])))
    return (*pair, j["reference_name"] or "", j["order"] != "forward", j["judge"], j["protocol"])
