"""Running model calls: cached results first, then the missing calls in batches, each batch flushed to
the warehouse as it finishes. Used by every run (factory.pipeline.run).

Only transient failures become error rows (docs/DESIGN.md, "No silent failure"): a `TransientError` raised
for a batch, or a `RequestFailed` returned in place of one request's result. Any other exception stops the
run: recording it as a failed call would make the build "incomplete, run again" forever.

Where the batches run is an `Executor`'s business: `LocalExecutor` calls the backend in this process (the
default); `factory.pipeline.executors.RayExecutor` runs them on Ray actors (docs/SCALING.md). Either way the rows come
back here and only this process writes them, so caching, resume and the runs table do not depend on it.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

from factory.config.vocabulary import Role
from factory.core.errors import FactoryError
from factory.core.redact import redact
from factory.models.registry import BACKENDS, Backend, load_backend
from factory.models.requests import (
    Call,
    Generation,
    GenerationRequest,
    JudgeRequest,
    RequestFailed,
    RewardRequest,
    TransientError,
    request_group,
)
from factory.pipeline.stage import StageStats
from factory.warehouse.store import Warehouse

if TYPE_CHECKING:
    from factory.config.models import ModelSpec


@dataclass(frozen=True)
class CallKind:
    """How one kind of request is run: the role it needs, the backend method, and the calls table it fills."""

    role: Role
    table: str


KINDS: dict[type, CallKind] = {
    GenerationRequest: CallKind("generate", "generation_calls"),
    JudgeRequest: CallKind("judge", "judge_calls"),
    RewardRequest: CallKind("reward", "reward_calls"),
}


class Reporter:
    """Progress hooks; the CLI subclasses it with rich output, tests and benches use it silent."""

    def stage_started(self, stage: str, total_calls: int) -> None:
        """A stage begins; `total_calls` model calls are not cached."""

    def calls_done(self, stage: str, n: int, tokens_out: int) -> None:
        """`n` more calls of the stage finished."""

    def stage_finished(self, stats: StageStats) -> None:
        """A stage is done (or skipped)."""

    def warn(self, message: str) -> None:
        """Something the user should know that does not stop the run (e.g. corrupt call files set aside)."""


class Executor(Protocol):
    """Where a stage's batches of calls run: `map` yields each batch with its call rows as it finishes, in
    any order. The rows are made by `call_batch` wherever the backend lives; the caller alone writes them."""

    name: str

    def map(
        self, pool: ModelPool, kind: CallKind, model: str, base: dict[str, Any], batches: list[list[Call]]
    ) -> Iterator[tuple[list[Call], list[dict[str, Any]]]]:
        """Run every batch with model `model` of `pool`; `base` holds the row fields every call row shares."""
        ...

    def release(self, model: str) -> None:
        """Free what runs `model` (its workers); a later `map` starts them again."""
        ...

    def close(self) -> None:
        """Free everything; a later `map` starts again."""
        ...


class LocalExecutor:
    """Batches run one after another in this process, on the pool's loaded backend."""

    name = "local"

    def map(
        self, pool: ModelPool, kind: CallKind, model: str, base: dict[str, Any], batches: list[list[Call]]
    ) -> Iterator[tuple[list[Call], list[dict[str, Any]]]]:
        backend = pool.get(model, kind.role)
        for batch in batches:
            yield batch, call_batch(kind, backend, model, batch, base)

    def release(self, model: str) -> None:
        """Nothing beyond the pool's own backends (the pool releases those)."""

    def close(self) -> None:
        """Nothing beyond the pool's own backends."""


WRITES_QUEUED = 3
"""Batches whose call rows may wait to be written while the next is computed (`kill -9` loses at most these
and the batch being computed)."""

_scoped_executor: Executor | None = None


@contextlib.contextmanager
def executor_scope(executor: Executor) -> Iterator[Executor]:
    """Every `ModelPool` made inside runs its calls with `executor` (the CLI's `build --executor ray` covers
    the build, its rounds and its eval this way); a pool's close frees the executor's workers, not the
    executor, which starts them again when a later pool needs them."""
    global _scoped_executor
    previous, _scoped_executor = _scoped_executor, executor
    try:
        yield executor
    finally:
        _scoped_executor = previous


class ModelPool:
    """Backends loaded lazily, once per model per run: an unchanged rebuild never loads a model.

    The pool's `executor` decides where calls run (`LocalExecutor` unless given one or made inside an
    `executor_scope`); closing the pool closes the executor's workers as well as the local backends.
    """

    def __init__(
        self,
        specs: dict[str, ModelSpec],
        loader: Callable[[ModelSpec], Backend] = load_backend,
        executor: Executor | None = None,
    ) -> None:
        self.specs = specs
        self.loader = loader
        self.backends: dict[str, Backend] = {}
        self.executor: Executor = executor or _scoped_executor or LocalExecutor()

    def check(self, name: str, role: Role | None = None) -> ModelSpec:
        """The spec of a named model; `role` is checked against the backend registry."""
        spec = self.specs[name]
        if role is not None and spec.backend in BACKENDS and role not in BACKENDS[spec.backend].roles:
            raise FactoryError(f"model '{name}' (backend '{spec.backend}') cannot {role}")
        return spec

    def get(self, name: str, role: Role | None = None) -> Backend:
        """The backend for a named model, loading it on first use; `role` is checked against the registry."""
        spec = self.check(name, role)
        if name not in self.backends:
            self.backends[name] = self.loader(spec)
        return self.backends[name]

    def release(self, name: str) -> None:
        """Release one model (judge-eval keeps one judge in memory at a time), here and in the executor."""
        backend = self.backends.pop(name, None)
        try:
            if backend is not None:
                backend.close()
        finally:
            self.executor.release(name)

    def close(self) -> None:
        """Release every loaded model and the executor's workers."""
        try:
            for name in list(self.backends):
                self.release(name)
        finally:
            self.executor.close()


def now() -> datetime:
    """The current UTC time (call rows carry timezone-aware timestamps)."""
    return datetime.now(timezone.utc)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class CallRunner:
    """Runs one stage's calls against the cache and a model pool, writing every result as it arrives."""

    def __init__(self, wh: Warehouse, run_id: str, recipe: str, reporter: Reporter) -> None:
        self.wh, self.run_id, self.recipe, self.reporter = wh, run_id, recipe, reporter

    def run(
        self, stage: str, model: str, calls: list[Call], st: StageStats, pool: ModelPool
    ) -> dict[str, dict[str, Any]]:
        """Results for every call: cached successes, then new calls flushed batch by batch as they finish on
        `pool`'s models."""
        if not calls:
            self.reporter.stage_started(stage, 0)
            return {}
        kind = KINDS[type(calls[0].request)]
        # Two calls can share a key (two samples with the same text render the same judge prompt): call once.
        unique = {c.key: c for c in calls}
        neutralised = sum(c.neutralised for c in unique.values())
        if neutralised:  # data that carried chat control tokens (factory.models.chat_tokens); absent when none did
            st.notes["neutralised_contents"] = st.notes.get("neutralised_contents", 0) + neutralised
        results = self.wh.cached_calls(kind.table, unique)
        missing = [c for key, c in unique.items() if key not in results]
        st.cached_calls += len(calls) - len(missing)
        self.reporter.stage_started(stage, len(missing))
        if not missing:
            return results
        pool.check(model, kind.role)
        batches = list(self._batches(kind, missing, pool.specs[model].batch_size))
        base = {"recipe": self.recipe, "run_id": self.run_id, "model": model}
        # A batch's rows are written (Parquet, fsync, rename) on a thread while the next batches are computed:
        # fsync waits on the disk, not the CPU, and a slow one on a busy disk is absorbed by the batches queued
        # behind it. One write at a time, in order, at most WRITES_QUEUED waiting; every write ends before
        # `run` returns or raises (the pool's shutdown waits), so a stage never reads a cache being written.
        written: deque[Future[None]] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="factory-calls") as writer:
            for _, rows in pool.executor.map(pool, kind, model, base, batches):
                while len(written) >= WRITES_QUEUED:
                    written.popleft().result()  # that batch is on disk (its error, if any, stops the run here)
                written.append(writer.submit(self.wh.append_calls, kind.table, self.run_id, rows))
                self._count(stage, st, rows, results)
            while written:
                written.popleft().result()
        if pool.executor.name != "local":
            st.notes.setdefault("executor", pool.executor.name)
        return results

    def _count(self, stage: str, st: StageStats, rows: list[dict[str, Any]], results: dict[str, Any]) -> None:
        """One batch's rows into the stage's stats and results, and the progress display."""
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

    @staticmethod
    def _batches(kind: CallKind, calls: list[Call], size: int) -> Iterator[list[Call]]:
        if kind.role != "generate":
            yield from (list(b) for b in _chunks(calls, size))
            return
        # Generation: group a prompt's missing sample indices into one n-sample request; batch by prompt.
        by_prompt: dict[str, list[Call]] = {}
        for c in calls:
            by_prompt.setdefault(c.group or request_group(c.request), []).append(c)
        groups = list(by_prompt.values())
        for chunk in _chunks(groups, size):
            yield [c for g in chunk for c in g]

    def _call_batch(self, kind: CallKind, backend: Any, model: str, batch: list[Call]) -> list[dict[str, Any]]:
        return call_batch(kind, backend, model, batch, {"recipe": self.recipe, "run_id": self.run_id, "model": model})

    @staticmethod
    def _generate(backend: Backend, batch: list[Call], clock: _Clock | None = None) -> list[dict[str, Any] | Exception]:
        """Merge a prompt's calls into one request with several sample indices, then split the outputs."""
        merged: dict[str, tuple[Any, list[Call]]] = {}
        for c in batch:
            h = c.group or request_group(c.request)
            if h in merged:
                merged[h][1].append(c)
            else:
                merged[h] = (c.request, [c])
        requests = [
            type(req)(req.messages, req.params, req.seed, tuple(c.request.sample_indices[0] for c in cs))
            for req, cs in merged.values()
        ]
        outputs = (clock or _Clock()).run(backend.generate, requests)
        by_key: dict[str, dict[str, Any] | Exception] = {}
        if len(outputs) != len(requests):
            raise FactoryError(f"a backend returned {len(outputs)} results for {len(requests)} generation requests")
        for (_, cs), gens in zip(merged.values(), outputs, strict=True):
            if isinstance(gens, Exception) and not isinstance(gens, RequestFailed):
                raise gens
            if isinstance(gens, Exception):  # the request failed on its own: each of its samples is an error
                # Its retries are counted once, on the first sample's row, so the rows add up to the requests.
                rest = RequestFailed(str(gens), 0)
                by_key.update((c.key, gens if i == 0 else rest) for i, c in enumerate(cs))
                continue
            for c, g in zip(cs, gens, strict=True):
                by_key[c.key] = {name: getattr(g, name) for name in _GENERATION_FIELDS}
        return [by_key[c.key] for c in batch]


_GENERATION_FIELDS = tuple(f.name for f in fields(Generation))
"""A `Generation`'s fields, in order: its row fields are scalars, so reading them equals `asdict`, without
its deep copy of each value."""


class _Clock:
    """Seconds spent inside a backend's methods: a call row's latency is the model's time, not factory's."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def run(self, method: Callable[[Any], Any], requests: list[Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return method(requests)
        finally:
            self.seconds += time.perf_counter() - t0


def call_batch(
    kind: CallKind, backend: Any, model: str, batch: list[Call], base: dict[str, Any]
) -> list[dict[str, Any]]:
    """One batch's call rows from `backend` (in this process or on a worker): a transient failure becomes
    error rows; any other exception propagates and stops the run. `base` holds recipe, run_id and model.

    Each row's `latency_s` is the batch's time inside the backend's method divided by its calls, so the rows
    of a run add up to the time its models took (bench/scale.py subtracts it to find factory's own cost)."""
    clock = _Clock()
    try:
        if kind.role == "judge":
            flat: list[dict[str, Any] | Exception] = [
                o if isinstance(o, Exception) else _judge_fields(o)
                for o in clock.run(backend.judge, [c.request for c in batch])
            ]
        elif kind.role == "reward":
            flat = [
                o if isinstance(o, Exception) else {"reward": o.reward, "tokens_in": o.tokens_in, "tokens_out": 0}
                for o in clock.run(backend.reward, [c.request for c in batch])
            ]
        else:
            flat = CallRunner._generate(backend, batch, clock)
        error: TransientError | None = None
    except TransientError as exc:  # the whole batch failed transiently: error rows, retried next build
        flat, error = [], exc
    latency = clock.seconds / max(len(batch), 1)
    created = now()
    if error is not None:
        return [_failed_row(base, c.key, error, latency, created) for c in batch]
    if len(flat) != len(batch):
        raise FactoryError(f"backend of model '{model}' returned {len(flat)} results for {len(batch)} requests")
    rows = []
    for c, out in zip(batch, flat, strict=True):
        if isinstance(out, RequestFailed):
            rows.append(_failed_row(base, c.key, out, latency, created))
        elif isinstance(out, Exception):  # a non-transient failure returned in place: stop, do not record
            raise out
        else:
            rows.append(
                {**base, **out, "request_key": c.key, "status": "ok", "latency_s": latency, "created_at": created}
            )
    return rows


def _judge_fields(o: Any) -> dict[str, Any]:
    """A judge output as call-row fields."""
    return {
        "text": o.text,
        "tokens": o.tokens,
        # Kept as the backend's (token, logprob) pairs: Arrow writes a pair as the {token, logprob} struct
        # (the same Parquet bytes as dicts), and `verdict_fields` reads pairs as well as the dicts a cached row
        # holds, so no call converts them twice.
        "top_logprobs": o.top_logprobs,
        "tokens_in": o.tokens_in,
        "tokens_out": o.tokens_out,
        "retries": o.retries,
        "cost_usd": o.cost_usd,
    }


def _failed_row(base: dict[str, Any], key: str, exc: Exception, latency: float, created: datetime) -> dict[str, Any]:
    """The error row of one request that failed transiently; its retries stay on record, secrets never."""
    return {
        **base,
        "request_key": key,
        "status": "error",
        "error": redact(f"{type(exc).__name__}: {exc}"),
        "retries": getattr(exc, "retries", None),
        "latency_s": latency,
        "created_at": created,
    }
