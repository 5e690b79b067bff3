"""The embedded model's conversion: a rename that fails raises, naming the folder, and leaves nothing behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from factory.core.errors import FactoryError
from factory.models import hf


class Saved:
    """A tokenizer or model stand-in whose `save_pretrained` writes one file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.config = object()

    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / self.name).write_text("{}")


def test_a_failed_rename_raises_naming_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf.AutoTokenizer, "from_pretrained", lambda *a, **k: Saved("tokenizer.json"))
    monkeypatch.setattr(hf.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Saved("config.json"))

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    target = tmp_path / "models" / "smollm2"
    target.parent.mkdir()
    with pytest.raises(FactoryError, match="smollm2: cannot put the converted model in place") as caught:
        hf._convert(tmp_path, "model.gguf", target)
    assert str(target) in str(caught.value)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # the folder built beside it is removed
