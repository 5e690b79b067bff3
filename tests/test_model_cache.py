"""The embedded model's conversion: a rename that fails raises, naming the folder, and leaves nothing behind.

Marked `model`: it loads no model, but importing transformers takes seconds, which the fast suite does not pay.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from factory.core.errors import FactoryError


class Saved:
    """A tokenizer or model stand-in whose `save_pretrained` writes one file."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.config = object()

    def save_pretrained(self, folder: Path) -> None:
        (Path(folder) / self.name).write_text("{}")


@pytest.mark.model
def test_a_failed_rename_raises_naming_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from factory.models import hf

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
