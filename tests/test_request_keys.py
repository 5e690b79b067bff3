"""Request keys are the cache: a key that changes makes every stored call unreachable and every build pay again.

`tests/golden/request_keys.json` holds the keys of the quickstart's first requests of each kind (generation,
judge, reward), written before the package was reorganised into folders (docs/DESIGN.md §1). A code move that
changes one fails here, naming the kind; a deliberate change of key rewrites the file and says why in its
commit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from factory.config.loading import load_recipe
from factory.config.models import ModelSpec
from factory.models.registry import model_identity
from factory.models.requests import reward_call
from factory.stages.judgments import judge_calls, judge_protocol
from factory.stages.prompts import read_prompts
from factory.stages.samples import generation_calls

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "request_keys.json"


def quickstart_keys() -> dict[str, Any]:
    """The keys, computed without loading a model: the embedded model's identity is its file's fingerprint."""
    loaded = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    r = loaded.recipe
    prompts = read_prompts(loaded).rows[:2]
    identity = model_identity(r.models[r.samples.policy])
    generation = generation_calls(prompts, identity, r.samples.params, r.samples.seed, r.samples.n)
    first = prompts[0]["prompt_id"]
    samples = [
        {"prompt_id": first, "sample_id": f"s{i}", "sample_index": i, "text": text, "error": None}
        for i, text in enumerate(["Blue is a calm color.", "Red.", "I like green."])
    ]
    refs = [{"prompt_id": first, "reference_name": "gpt4", "text": "A reference answer.", "status": "ok"}]
    judge, _ = judge_calls(
        prompts[:1], samples, refs, r.judgments, judge_protocol(loaded), model_identity(r.models[r.judgments.judge])
    )
    reward_model = ModelSpec(backend="reward-model", model="RLHFlow/ArmoRM-Llama3-8B-v0.1")
    conversation = [*json.loads(prompts[0]["messages"]), {"role": "assistant", "content": "Blue is a calm color."}]
    reward = reward_call(model_identity(reward_model), conversation)
    return {
        "generation": [c.key for c in generation],
        "judge": [c.key for c in judge],
        "reward": [reward.key],
    }


def test_quickstart_request_keys_are_unchanged() -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    keys = quickstart_keys()
    for kind in ("generation", "judge", "reward"):
        assert keys[kind] == golden[kind], f"the {kind} request keys changed: every stored {kind} call is lost"


if __name__ == "__main__":  # writes the golden file; run only for a deliberate change of key
    GOLDEN.write_text(json.dumps(quickstart_keys(), indent=1) + "\n", encoding="utf-8")


def test_a_warehouse_built_before_the_move_is_rebuilt_without_a_model_call(tmp_path: Path) -> None:
    """The fixture holds a build, its held-out evaluation and a judge-eval run, made by the code before the
    package moved into folders: today's code runs all three again from the warehouse alone."""
    import shutil

    from click.testing import CliRunner

    from factory.cli.main import main
    from factory.warehouse.store import Warehouse

    folder = tmp_path / "w"
    shutil.copytree(Path(__file__).parent / "data" / "warehouse_before_move", folder)
    wh = folder / "warehouse"
    before = {r["run_id"] for r in Warehouse(wh).query("SELECT run_id FROM runs").to_pylist()}
    build = CliRunner().invoke(main, ["build", str(folder / "recipe.yaml"), "-w", str(wh), "-q"])
    assert build.exit_code == 0, build.output
    labelled = f"natural={folder / 'labelled.jsonl'}"
    args = ["judge-eval", "--data", labelled, "--judge", "scripted", "--protocol", "reffree", "--bootstrap", "50"]
    judged = CliRunner().invoke(main, [*args, "-w", str(wh), "-q"])
    assert judged.exit_code == 0, judged.output
    runs = [
        r
        for r in Warehouse(wh).query("SELECT * FROM runs ORDER BY started_at").to_pylist()
        if r["run_id"] not in before
    ]
    assert len(runs) == 3, [r["recipe"] for r in runs]  # the build, its evaluation, judge-eval
    stages = [s for r in runs for s in r["stages"]]
    assert sum(s["model_calls"] for s in stages) == 0, [(s["stage"], s["model_calls"]) for s in stages]
    recomputed = [s["stage"] for s in stages if not s["skipped"] and s["stage"] != "export"]
    assert not recomputed, f"stages recomputed although nothing they depend on changed: {recomputed}"
