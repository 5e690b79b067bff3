"""How much time does factory add on top of the model calls it makes?

Runs the same requests twice in one process, on the embedded model:
  (a) `factory build` (in-process Build.run on a fresh warehouse: cache lookups, Parquet flushes per batch,
      stage tables, DuckDB views, export), and
  (b) the backend called directly with the very same requests in the very same batches (no cache, no files).
Both include loading the model. Sampling seeds are derived from the batch contents, so both sides generate
the same texts and then judge identical prompts. Prints both wall times and their ratio.

    python bench/overhead.py                    # 8 prompts, n=4, 32 new tokens
    python bench/overhead.py --prompts 16 --max-tokens 64
    python bench/overhead.py --backend scripted --prompts 16   # factory's own cost per call, no model time
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from factory.build.command import Build
from factory.config.loading import load_recipe
from factory.models.registry import load_backend, model_identity
from factory.models.requests import GenerationRequest, JudgeRequest
from factory.pipeline.calls import KINDS, CallRunner, ModelPool
from factory.stages.judgments import judge_calls, judge_protocol
from factory.stages.samples import generation_calls
from factory.warehouse.store import Warehouse

ROOT = Path(__file__).resolve().parent.parent


def make_recipe(folder: Path, prompts: int, n: int, max_tokens: int, threads: int | None, backend: str) -> Path:
    """The quickstart recipe with a bench-sized prompt count and sample length."""
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    recipe["models"]["smol"]["backend"] = backend
    recipe["prompts"]["path"] = str(ROOT / "recipes" / "data" / "llmbar_natural_16.jsonl")
    recipe["prompts"]["limit"] = prompts
    recipe["samples"]["n"] = n
    recipe["samples"]["params"]["max_tokens"] = max_tokens
    recipe["models"]["smol"]["threads"] = threads
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_factory(recipe_path: Path, warehouse: Path) -> tuple[float, Build]:
    loaded = load_recipe(recipe_path)
    t0 = time.perf_counter()
    build = Build(loaded, Warehouse(warehouse))
    build.run()
    return time.perf_counter() - t0, build


def run_direct(recipe_path: Path, factory_build: Build) -> tuple[float, int]:
    """The same generation and judge requests, batched the same way, straight into the backend."""
    loaded = load_recipe(recipe_path)
    r = loaded.recipe
    wh = factory_build.wh
    prompts = wh.query("SELECT * FROM prompts").to_pylist()
    references = wh.query('SELECT * FROM "references"').to_pylist()
    # Judge the factory run's samples, so both sides judge identical prompts.
    samples = wh.query("SELECT * FROM samples ORDER BY prompt_id, sample_index").to_pylist()
    t0 = time.perf_counter()
    spec = r.models[r.samples.policy]
    backend = load_backend(spec)
    identity = model_identity(spec)
    gen = generation_calls(prompts, identity, r.samples.params, r.samples.seed, r.samples.n)
    calls = 0
    for batch in CallRunner._batches(KINDS[GenerationRequest], gen, spec.batch_size):
        CallRunner._generate(backend, batch)
        calls += len(batch)
    protocol = judge_protocol(loaded)
    jc, _ = judge_calls(prompts, samples, references, r.judgments, protocol, identity)
    for batch in CallRunner._batches(KINDS[JudgeRequest], jc, spec.batch_size):
        backend.judge([c.request for c in batch])
        calls += len(batch)
    return time.perf_counter() - t0, calls


def backend_seconds(build: Build) -> float:
    """Time this build spent inside backend calls (each call row carries its share of its batch's time)."""
    q = "SELECT coalesce(sum(latency_s), 0) AS s FROM {} WHERE run_id = '" + build.run_id + "'"
    return sum(build.wh.query(q.format(t)).to_pylist()[0]["s"] for t in ("generation_calls", "judge_calls"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--backend",
        choices=("embedded", "scripted"),
        default="embedded",
        help="scripted: a model that answers instantly, so the whole difference is factory's own time",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        recipe = make_recipe(folder, args.prompts, args.n, args.max_tokens, args.threads, args.backend)
        # Warm the converted-model cache and the OS file cache so neither side pays a one-time cost.
        ModelPool(load_recipe(recipe).recipe.models).get("smol").close()
        # Order A B B A (factory, direct, direct, factory) so a steady drift in machine load cancels out.
        t_factory_1, build = run_factory(recipe, folder / "wh1")
        t_direct_1, n_calls = run_direct(recipe, build)
        t_direct_2, _ = run_direct(recipe, build)
        t_factory_2, build_2 = run_factory(recipe, folder / "wh2")
        t_rebuild, _ = run_factory(recipe, folder / "wh2")
        in_calls = (backend_seconds(build) + backend_seconds(build_2)) / 2
    t_factory, t_direct = (t_factory_1 + t_factory_2) / 2, (t_direct_1 + t_direct_2) / 2
    result = {
        "backend": args.backend,
        "prompts": args.prompts,
        "samples_per_prompt": args.n,
        "max_tokens": args.max_tokens,
        "model_calls": n_calls,
        "factory_build_s": round(t_factory, 2),
        "direct_backend_s": round(t_direct, 2),
        "ratio": round(t_factory / t_direct, 3),
        # The same comparison inside each build, immune to load changing between runs: all of the build's
        # wall time over the time its backend calls took (what factory adds is the difference).
        "factory_backend_call_s": round(in_calls, 2),
        "factory_own_s": round(t_factory - in_calls, 2),
        "unchanged_rebuild_s": round(t_rebuild, 2),
        "runs_s": {
            "factory": [round(t_factory_1, 2), round(t_factory_2, 2)],
            "direct": [round(t_direct_1, 2), round(t_direct_2, 2)],
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
