"""Call rows and the call cache: a judge call row keeps the backend's (token, logprob) pairs (written, they are
the same Parquet structs as dicts; read back as dicts they give the same verdict fields), and a cache that
reads only those of its own parts that may hold a wanted key answers as one that reads every part."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from factory.judge.protocols import get_protocol
from factory.stages.judgments import logprob_pairs, verdict_fields
from factory.warehouse.call_cache import CallCache
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


def gen_row(key: str, text: str, minute: int, status: str = "ok") -> dict[str, object]:
    created = datetime(2026, 1, 1, 0, minute, tzinfo=timezone.utc)
    return {"request_key": key, "recipe": "r", "run_id": "x", "model": "m", "text": text, "status": status,
            "created_at": created}  # fmt: skip


def test_a_cache_reading_only_its_own_parts_that_hold_a_key_answers_as_one_reading_all(tmp_path: Path) -> None:
    # Another process's part (read whole), then this instance's parts: a key in several of them (the newest
    # success wins), a failure, keys in no part at all.
    CallCache(tmp_path).append_calls("generation_calls", "old", [gen_row("k0", "old", 0), gen_row("k1", "old", 0)])
    cache = CallCache(tmp_path)
    cache.append_calls("generation_calls", "new", [gen_row("k1", "newer", 5), gen_row("k2", "a", 1)])
    for i in range(3, 40):
        cache.append_calls("generation_calls", "new", [gen_row(f"k{i}", f"t{i}", 2)])
    cache.append_calls("generation_calls", "new", [gen_row("k2", "failed later", 9, "error"), gen_row("k5", "b", 3)])
    fresh = CallCache(tmp_path)
    for keys in (["k0", "k1", "k2", "k5", "k39", "nope"], ["nope"], ["k7"], [f"k{i}" for i in range(50)]):
        got = cache.cached_calls("generation_calls", keys)
        assert got == fresh.cached_calls("generation_calls", keys)
    assert cache.cached_calls("generation_calls", ["k1", "k2", "k5"]) == {
        k: fresh.cached_calls("generation_calls", [k])[k] for k in ("k1", "k2", "k5")
    }
    assert cache.cached_calls("generation_calls", ["k1"])["k1"]["text"] == "newer"


def test_own_parts_alone_and_no_key_held_read_nothing(tmp_path: Path) -> None:
    cache = CallCache(tmp_path)
    cache.append_calls("judge_calls", "new", [row(PAIRS) | {"run_id": "new", "created_at": datetime.now(timezone.utc)}])
    assert cache.cached_calls("judge_calls", ["other"]) == {}
    assert set(cache.cached_calls("judge_calls", ["k"])) == {"k"}
