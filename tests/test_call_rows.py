"""A judge call row keeps the backend's (token, logprob) pairs: written, they are the same Parquet structs as
dicts, and read back from the cache (dicts) they give the same verdict fields as fresh pairs."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from factory.judge.protocols import get_protocol
from factory.stages.judgments import logprob_pairs, verdict_fields
from factory.warehouse.parquet import atomic_write_parquet, to_table
from factory.warehouse.tables import CALL_TABLES

PAIRS = [[], [("a", -0.1), ("b", -2.3), (" ", -12.0)], [(")", -0.01)]]


def row(tops: list[list[object]]) -> dict[str, object]:
    return {"request_key": "k", "status": "ok", "text": "a)", "tokens": ["x", "a", ")"], "top_logprobs": tops}


def test_pairs_and_dicts_write_the_same_parquet_bytes(tmp_path: Path) -> None:
    dicts = [[{"token": t, "logprob": lp} for t, lp in step] for step in PAIRS]
    schema = CALL_TABLES["judge_calls"]
    atomic_write_parquet(tmp_path / "pairs.parquet", to_table([row(PAIRS)], schema))  # type: ignore[arg-type]
    atomic_write_parquet(tmp_path / "dicts.parquet", to_table([row(dicts)], schema))  # type: ignore[arg-type]
    assert (tmp_path / "pairs.parquet").read_bytes() == (tmp_path / "dicts.parquet").read_bytes()
    read_back = pq.read_table(tmp_path / "pairs.parquet").to_pylist()[0]["top_logprobs"]
    assert read_back == dicts
    assert logprob_pairs(read_back) == PAIRS
    assert logprob_pairs(PAIRS) is PAIRS


def test_cached_and_fresh_rows_read_the_same() -> None:
    protocol = get_protocol("refeval")
    dicts = [[{"token": t, "logprob": lp} for t, lp in step] for step in PAIRS]
    assert verdict_fields(row(PAIRS), protocol) == verdict_fields(row(dicts), protocol)
    assert verdict_fields(row(PAIRS), protocol)["verdict"] == "a"
