"""Running model calls: cached results first, then the missing calls in batches, each batch flushed to
the warehouse as it finishes. Shared by `factory build` and `factory judge-eval`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from factory.backends import Backend, RequestFailed, load_backend
from factory.keys import stable_hash
from factory.recipe import ModelSpec
from factory.stages import Call
from factory.warehouse import Warehouse


@dataclass
class StageStats:
    """What one stage did in one build (a row of the runs table's `stages` list)."""

    stage: str
    stage_key: str = ""
    skipped: bool = False
    rows: int = 0
    model_calls: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    retries: int = 0
    """Requests repeated after a transient failure (HTTP backends), over every call of the stage."""
    cost_usd: float | None = None
    """Summed price of the stage's priced calls; None when no call had a known price."""
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def run_totals(stats: Sequence[StageStats]) -> dict[str, Any]:
    """A runs-table row's totals over its stages; cost stays null unless some call had a known price."""
    totals: dict[str, Any] = {
        name: sum(getattr(s, name) for s in stats)
        for name in ("model_calls", "cached_calls", "failed_calls", "tokens_in", "tokens_out", "retries")
    }
    costs = [s.cost_usd for s in stats if s.cost_usd is not None]
    totals["cost_usd"] = sum(costs) if costs else None
    return totals


class Reporter:
    """Progress hooks; the CLI subclasses it with rich output, tests and benches use it silent."""

    def stage_started(self, stage: str, total_calls: int) -> None:
        """A stage begins; `total_calls` model calls are not cached."""

    def calls_done(self, stage: str, n: int, tokens_out: int) -> None:
        """`n` more calls of the stage finished."""

    def stage_finished(self, stats: StageStats) -> None:
        """A stage is done (or skipped)."""


class ModelPool:
    """Backends loaded lazily, once per model per build: an unchanged rebuild never loads a model."""

    def __init__(self, specs: dict[str, ModelSpec], loader: Callable[[ModelSpec], Backend] = load_backend) -> None:
        self.specs = specs
        self.loader = loader
        self.backends: dict[str, Backend] = {}

    def get(self, name: str) -> Backend:
        """The backend for a named model, loading it on first use."""
        if name not in self.backends:
            self.backends[name] = self.loader(self.specs[name])
        return self.backends[name]

    def close(self) -> None:
        """Release every loaded model."""
        for backend in self.backends.values():
            backend.close()
        self.backends.clear()


def now() -> datetime:
    """The current UTC time (rows carry timezone-aware timestamps)."""
    return datetime.now(timezone.utc)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class CallRunner:
    """Runs one stage's calls against the cache and a model pool, writing every result as it arrives."""

    def __init__(self, wh: Warehouse, run_id: str, recipe: str, pool: ModelPool, reporter: Reporter) -> None:
        self.wh, self.run_id, self.recipe, self.pool, self.reporter = wh, run_id, recipe, pool, reporter

    def run(self, table: str, stage: str, model: str, calls: list[Call], st: StageStats) -> dict[str, Any]:
        """Results for every call: cached successes, then new calls flushed batch by batch as they finish."""
        results = self.wh.cached_calls(table, (c.key for c in calls))
        # Two calls can share a key (two samples with the same text render the same judge prompt): call once.
        missing = list({c.key: c for c in calls if c.key not in results}.values())
        st.cached_calls = len(calls) - len(missing)
        self.reporter.stage_started(stage, len(missing))
        if not missing:
            return results
        backend = self.pool.get(model)
        size = self.pool.specs[model].batch_size
        for batch in self._batches(table, missing, size):
            rows = self._call_batch(table, backend, model, batch)
            self.wh.append_calls(table, self.run_id, rows)
            for row in rows:
                st.model_calls += 1
                st.retries += row.get("retries") or 0
                if row.get("cost_usd") is not None:
                    st.cost_usd = (st.cost_usd or 0.0) + row["cost_usd"]
                if row["status"] == "ok":
                    results[row["request_key"]] = row
                    st.tokens_in += row["tokens_in"] or 0
                    st.tokens_out += row["tokens_out"] or 0
                else:
                    st.failed_calls += 1
            self.reporter.calls_done(stage, len(rows), sum(r.get("tokens_out") or 0 for r in rows))
        return results

    @staticmethod
    def _batches(table: str, calls: list[Call], size: int) -> Iterator[list[Call]]:
        if table != "generation_calls":
            yield from (list(b) for b in _chunks(calls, size))
            return
        # Generation: group a prompt's missing sample indices into one n-sample request; batch by prompt.
        by_prompt: dict[str, list[Call]] = {}
        for c in calls:
            r = c.request
            by_prompt.setdefault(stable_hash([r.messages, r.params.model_dump(), r.seed]), []).append(c)
        groups = list(by_prompt.values())
        for chunk in _chunks(groups, size):
            yield [c for g in chunk for c in g]

    def _call_batch(self, table: str, backend: Backend, model: str, batch: list[Call]) -> list[dict[str, Any]]:
        base = {"recipe": self.recipe, "run_id": self.run_id, "model": model}
        t0 = time.perf_counter()
        try:
            if table == "judge_calls":
                outputs = backend.judge([c.request for c in batch])
                flat: list[dict[str, Any] | Exception] = [
                    o
                    if isinstance(o, Exception)
                    else {
                        "text": o.text,
                        "tokens": o.tokens,
                        "top_logprobs": [[{"token": t, "logprob": lp} for t, lp in step] for step in o.top_logprobs],
                        "tokens_in": o.tokens_in,
                        "tokens_out": o.tokens_out,
                        "retries": o.retries,
                        "cost_usd": o.cost_usd,
                    }
                    for o in outputs
                ]
            elif table == "reward_calls":
                rewards = backend.reward([c.request for c in batch])
                flat = [{"reward": o.reward, "tokens_in": o.tokens_in, "tokens_out": 0} for o in rewards]
            else:
                flat = self._generate(backend, batch)
            error = None
        except Exception as exc:  # a failed batch becomes error rows; the next build retries them
            flat, error = [], f"{type(exc).__name__}: {exc}"
        latency = (time.perf_counter() - t0) / max(len(batch), 1)
        created = now()
        if error is not None:
            return [
                {**base, "request_key": c.key, "status": "error", "error": error, "created_at": created} for c in batch
            ]
        return [
            _failed_row(base, c.key, out, latency, created)
            if isinstance(out, Exception)
            else {**base, **out, "request_key": c.key, "status": "ok", "latency_s": latency, "created_at": created}
            for c, out in zip(batch, flat, strict=True)
        ]

    @staticmethod
    def _generate(backend: Backend, batch: list[Call]) -> list[dict[str, Any] | Exception]:
        """Merge a prompt's calls into one request with several sample indices, then split the outputs."""
        merged: dict[str, tuple[Any, list[Call]]] = {}
        for c in batch:
            r = c.request
            h = stable_hash([r.messages, r.params.model_dump(), r.seed])
            if h in merged:
                merged[h][1].append(c)
            else:
                merged[h] = (c.request, [c])
        requests = [
            type(req)(req.messages, req.params, req.seed, tuple(c.request.sample_indices[0] for c in cs))
            for req, cs in merged.values()
        ]
        outputs = backend.generate(requests)
        by_key: dict[str, dict[str, Any] | Exception] = {}
        for (_, cs), gens in zip(merged.values(), outputs, strict=True):
            if isinstance(gens, Exception):  # the request failed on its own: each of its samples is an error
                # Its retries are counted once, on the first sample's row, so the rows add up to the requests.
                rest = RequestFailed(str(gens), 0)
                by_key.update((c.key, gens if i == 0 else rest) for i, c in enumerate(cs))
                continue
            for c, g in zip(cs, gens, strict=True):
                by_key[c.key] = asdict(g)
        return [by_key[c.key] for c in batch]


def _failed_row(base: dict[str, Any], key: str, exc: Exception, latency: float, created: datetime) -> dict[str, Any]:
    """The error row of one request that failed on its own; its retries stay on record."""
    return {
        **base,
        "request_key": key,
        "status": "error",
        "error": f"{type(exc).__name__}: {exc}",
        "retries": getattr(exc, "retries", None),
        "latency_s": latency,
        "created_at": created,
    }
