"""A model's own Python runs only when the recipe opts in (`trust_remote_code` on its model entry).

The model folder below is the embedded model's weights and tokenizer under a model type transformers does not
know, with an `auto_map` pointing at a Python file beside them: loading it needs that file, and importing the
file writes a sentinel. Without the opt-in every loader refuses in one line and the sentinel never appears.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from factory.cli.main import main
from factory.config.models import ModelSpec
from factory.config.training import TrainSettings
from factory.core.errors import UserInputError
from factory.models.registry import model_identity
from factory.models.remote_code import RECIPE_OPT_IN, TRAIN_OPT_IN
from factory.models.requests import judge_call
from factory.rounds.loop import train_base
from factory.train.selection import checkpoint_spec

MODULE = """\
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

Path({sentinel!r}).write_text("the model's own code ran", encoding="utf-8")


class SentinelConfig(LlamaConfig):
    model_type = "factory_sentinel"


class SentinelForCausalLM(LlamaForCausalLM):
    config_class = SentinelConfig


class SentinelForSequenceClassification(LlamaForSequenceClassification):
    config_class = SentinelConfig
"""


def code_model(folder: Path, embedded_dir: Path, sentinel: Path) -> Path:
    """A model folder that loads only through the Python file it ships (which writes `sentinel`)."""
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(embedded_dir / name, folder / name)
    os.symlink(embedded_dir / "model.safetensors", folder / "model.safetensors")  # 540 MB: linked, not copied
    config = json.loads((embedded_dir / "config.json").read_text(encoding="utf-8"))
    config.update(
        model_type="factory_sentinel",
        architectures=["SentinelForCausalLM"],
        auto_map={
            "AutoConfig": "sentinel_model.SentinelConfig",
            "AutoModelForCausalLM": "sentinel_model.SentinelForCausalLM",
            "AutoModelForSequenceClassification": "sentinel_model.SentinelForSequenceClassification",
        },
    )
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "sentinel_model.py").write_text(MODULE.format(sentinel=str(sentinel)), encoding="utf-8")
    return folder


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    return tmp_path / "code-ran.txt"


@pytest.fixture
def model_folder(tmp_path: Path, embedded_dir: Path, sentinel: Path) -> Path:
    return code_model(tmp_path / "code-model", embedded_dir, sentinel)


def one_error_line(result: Result) -> str:
    """The only output line of a refused command: one `error:` line, exit 2, no traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, lines
    return lines[0]


def test_trust_remote_code_is_off_by_default_and_stays_out_of_request_keys() -> None:
    spec = ModelSpec(backend="transformers", model="org/model")
    trusted = spec.model_copy(update={"trust_remote_code": True})
    assert not spec.trust_remote_code and not TrainSettings().trust_remote_code
    # Operational, like batch_size: the same weights give the same outputs whichever way they were allowed to load.
    assert model_identity(trusted) == model_identity(spec)
    messages = [{"role": "user", "content": "Hi"}]
    assert (
        judge_call(model_identity(trusted), messages, "", 8, 5).key
        == judge_call(model_identity(spec), messages, "", 8, 5).key
    )
    # A round's checkpoint and its training keep the policy's opt-in (a saved model keeps its code).
    assert checkpoint_spec(trusted, "/tmp/ckpt").trust_remote_code
    assert TrainSettings(**train_base(trusted)).trust_remote_code
    assert not TrainSettings(**train_base(spec)).trust_remote_code


@pytest.mark.model
def test_backends_refuse_a_model_that_ships_code_without_running_it(model_folder: Path, sentinel: Path) -> None:
    from factory.models.hf import RewardModelBackend, TransformersBackend

    for cls, backend in ((TransformersBackend, "transformers"), (RewardModelBackend, "reward-model")):
        with pytest.raises(UserInputError) as refused:
            cls(ModelSpec(backend=backend, model=str(model_folder), threads=1))
        message = str(refused.value)
        assert "\n" not in message and str(model_folder) in message and message.endswith(RECIPE_OPT_IN)
    assert not sentinel.exists()


@pytest.mark.model
def test_a_build_with_a_code_shipping_reward_model_stops_in_one_line(
    tmp_path: Path, model_folder: Path, sentinel: Path
) -> None:
    """The reported case: a reward model folder carrying Python ran it during `factory build`."""
    recipe = {
        "name": "rm",
        "models": {"pol": {"backend": "scripted"}, "rm": {"backend": "reward-model", "model": str(model_folder)}},
        "prompts": {"inline": [{"instruction": "Say hi."}, {"instruction": "Name a color."}]},
        "samples": {"policy": "pol", "n": 2, "params": {"max_tokens": 8}},
        "rewards": {"model": "rm"},
    }
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = CliRunner().invoke(main, ["build", str(path), "-w", str(tmp_path / "wh"), "-q"])
    assert one_error_line(result).endswith(RECIPE_OPT_IN)
    assert not sentinel.exists()


@pytest.mark.model
def test_training_from_a_code_shipping_base_model_stops_in_one_line(
    tmp_path: Path, model_folder: Path, sentinel: Path
) -> None:
    from test_train import scripted_export

    export = scripted_export(tmp_path, sft=True)
    args = ["train", str(export), "--preset", "cpu", "--set", f"base_model={model_folder}", "-w", str(tmp_path / "wh")]
    result = CliRunner().invoke(main, [*args, "-q"])
    assert one_error_line(result).endswith(TRAIN_OPT_IN)
    assert not sentinel.exists()


@pytest.mark.model
def test_with_the_opt_in_the_models_code_loads_and_runs(tmp_path: Path, model_folder: Path, sentinel: Path) -> None:
    # In a process of its own, so transformers copies the module into this test's own modules cache.
    script = textwrap.dedent(
        f"""
        from factory.models.hf import TransformersBackend
        from factory.config.models import ModelSpec
        from factory.models.requests import JudgeRequest

        spec = ModelSpec(backend="transformers", model={str(model_folder)!r}, threads=1, trust_remote_code=True)
        backend = TransformersBackend(spec)
        assert type(backend.model).__name__ == "SentinelForCausalLM", type(backend.model)
        (out,) = backend.judge([JudgeRequest([{{"role": "user", "content": "Pick a or b."}}], "Output (", 2, 5)])
        assert out.tokens_out >= 1
        """
    )
    env: dict[str, Any] = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sentinel.read_text(encoding="utf-8") == "the model's own code ran"


@pytest.mark.model  # it needs the embedded model's folder (torch, transformers), like the tests above
@pytest.mark.vllm
def test_vllm_refuses_a_model_that_ships_code_before_its_engine_starts(model_folder: Path, sentinel: Path) -> None:
    pytest.importorskip("vllm")
    from factory.models.vllm_backend import VLLMBackend

    with pytest.raises(UserInputError) as refused:
        VLLMBackend(ModelSpec(backend="vllm", model=str(model_folder), engine={"enforce_eager": True}))
    assert str(refused.value).endswith(RECIPE_OPT_IN)
    assert not sentinel.exists()
